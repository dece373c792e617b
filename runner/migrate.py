"""The only module that writes: upgrade to heads, stamping a baseline first if asked.

It runs the project's own env.py as `alembic upgrade heads` does (a baseline is a
stamp step ahead of the upgrade's, as `alembic stamp` would write it), and hands it nothing: env.py builds its own engine and opens its own
transactions, so whatever it configures (driver, connect_args, version table,
transaction per migration, autocommit blocks) behaves as under alembic's CLI.
The guard (`guard.guarded_by`) follows every connection env.py opens.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import tenacity
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine

from . import database, envpy, log, revisions
from .errors import ConfigError, DatabaseUnreachable, RevisionFailed, RunnerError
from .guard import LockLost, Watchdog, describe_blockers

logger = logging.getLogger("runner.migrate")


@dataclass
class Progress:
    """What an upgrade is doing: the state it started from and the revision running now."""

    state: revisions.State | None = None  # as read on env.py's connection before anything was written
    start: tuple[str, ...] = ()  # the revisions the upgrade started from (after any baseline stamp)
    running: object | None = None  # the Script being applied
    # Commits made while the running revision's upgrade() ran (alembic's autocommit_block):
    # a revision that committed part of itself did not roll back entirely.
    committed_inside: int = 0
    inside: bool = False
    raised_inside: bool = False  # the running revision's upgrade() raised (SystemExit included)
    started: float = 0.0  # when the running revision began (time.monotonic)


def upgrade(config: Config, script: ScriptDirectory, progress: Progress,
            decide: Callable[[revisions.State], str | None], **expected: str | None) -> None:
    """`alembic upgrade heads` in one run of env.py, which reads the database's state first.

    Before anything is written, `decide` gets the state as read on env.py's own
    connection (its driver, search_path and version table; `expected` are the
    MIGRATE_ version table variables that must agree): it raises to refuse, or
    returns a baseline revision to stamp first, in the same transaction as the
    upgrade. env.py runs with dont_mutate, so that a refusal leaves no version
    table behind; the table is created, by alembic, once the upgrade goes ahead.
    """

    contexts = []

    def steps(current, context):
        if contexts:
            raise revisions.SeveralContexts()
        contexts.append(context)
        log.restore()  # whatever env.py did to logging on its way here (logging.disable, say)
        first_attempt = progress.state is None
        state = progress.state = revisions.observe(context, script, **expected)
        baseline = decide(state)
        start = (baseline,) if baseline else tuple(current)
        if first_attempt:  # a retry starts where the last attempt left the database
            progress.start = start
        if state.kind == "current":
            return []
        # What command.upgrade does, with each revision timed as it runs.
        upgrades = script._upgrade_revs("heads", start)
        for step in upgrades:
            step.migration_fn = _timed(step.migration_fn, step.revision, progress)
        if not current:
            context._ensure_version_table()
        stamps = script._stamp_revs(baseline, current) if baseline else []
        return [*stamps, *upgrades]

    envpy.run(config, script, steps, destination_rev="heads", dont_mutate=True)


def _timed(migration_fn, revision, progress: Progress):
    # alembic logs "Running upgrade ..." from the function's name: keep it.
    @functools.wraps(migration_fn)
    def timed_upgrade(**kwargs):
        progress.running = revision
        progress.committed_inside = 0
        started = progress.started = time.monotonic()
        progress.inside = True
        try:
            migration_fn(**kwargs)
        except BaseException:
            progress.raised_inside = True
            raise
        finally:
            progress.inside = False
        seconds = time.monotonic() - started
        # Ran, not applied: it is applied once env.py commits it, which the read-back tells.
        logger.info("ran %s (%s) in %.2fs", revision.revision, revisions.title(revision.doc), seconds,
                    extra={"revision": revision.revision, "seconds": round(seconds, 3)})

    return timed_upgrade


def upgrade_retrying(config: Config, script: ScriptDirectory, progress: Progress, watchdog: Watchdog, *,
                     decide: Callable[[revisions.State], str | None], retries: int, read_back: Callable[[], tuple],
                     sleep=time.sleep, **expected: str | None) -> None:
    """upgrade(); a revision that rolled back entirely on lock_timeout is retried."""

    def attempt() -> None:
        watchdog.blockers = []
        progress.running, progress.raised_inside, progress.committed_inside = None, False, 0
        upgrade(config, script, progress, decide, **expected)

    def count_commit(connection) -> None:
        if progress.inside:
            progress.committed_inside += 1

    def retryable(error: BaseException) -> bool:
        return database.sqlstate(error) == "55P03" and progress.committed_inside == 0 and not watchdog.lock.lost

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        revision = progress.running
        logger.warning("revision %s gave up waiting for a lock (lock_timeout, MIGRATE_DDL_LOCK_TIMEOUT): %s; "
                       "blocked by %s; retry %d of %d in %.1fs", revision.revision if revision else "?",
                       _database_message(error), describe_blockers(watchdog.blockers), state.attempt_number,
                       retries, state.next_action.sleep,
                       extra={"revision": revision.revision if revision else None, "attempt": state.attempt_number,
                              "blockers": watchdog.blockers})

    event.listen(Engine, "commit", count_commit)
    try:
        tenacity.Retrying(stop=tenacity.stop_after_attempt(retries + 1),
                          wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
                          retry=tenacity.retry_if_exception(retryable), before_sleep=log_retry,
                          sleep=sleep, reraise=True)(attempt)
    except Exception as e:
        if database.sqlstate(e) != "55P03" or watchdog.lock.lost:
            raise
        failure = explain_failure(e, progress, read_back)
        tried = f" after {retries + 1} attempts (MIGRATE_DDL_LOCK_RETRIES={retries})" if retries else ""
        raise RevisionFailed(f"{failure}{tried}; blocked by {describe_blockers(watchdog.blockers)}") from None
    finally:
        event.remove(Engine, "commit", count_commit)


def explain_failure(error: BaseException, progress: Progress, read_back: Callable[[], tuple]) -> RunnerError:
    """The RunnerError for an exception raised while upgrading, with where the database is now."""
    revision = progress.running
    where = f"revision {revision.revision} ({revisions.title(revision.doc)})" if revision else "env.py, before any revision ran"

    def at() -> str:
        try:
            return _revisions(read_back())
        except Exception:
            return "unknown (the database is unreachable)"

    if isinstance(error, LockLost):
        return LockLost(f"{error} during {where}: the migration was stopped and rolled back so that no two "
                        f"runners migrate at once; the database is at {at()}")
    if isinstance(error, RunnerError):
        return error
    if database.is_disconnect(error):
        return DatabaseUnreachable(f"lost the database during {where}: {database.first_line(error)}; "
                                   f"the database is at {at()}")
    if isinstance(error, envpy.EarlyExit):
        if progress.raised_inside:
            return RevisionFailed(f"{where} called {error}: its transaction was rolled back; the database is at {at()}")
        return ConfigError(f"env.py exited ({error}) before reaching the heads; the database is at {at()}")
    code = database.sqlstate(error)
    if revision is None and not code:
        # env.py's own code, or a connection parameter its engine passes: nothing a retry changes.
        return ConfigError(f"{envpy.failure(error)}; the database is at {at()}")
    detail = f"SQLSTATE {code}: {_database_message(error)}" if code else f"{type(error).__name__}: {error}"
    return RevisionFailed(f"{where} failed: {detail}; the database is at {at()}")


def _revisions(heads: tuple) -> str:
    return ", ".join(heads) if heads else "base (no revision)"


def _database_message(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    return primary or database.first_line(error)
