"""The only module that writes: upgrade to the target (stamping a baseline first if asked), or downgrade.

It runs the project's own env.py as `alembic upgrade <target>` and `alembic downgrade`
do (a baseline is a stamp step ahead of the upgrade's, as `alembic stamp` would
write it), and hands it nothing: env.py builds its own engine and opens its own
transactions, so whatever it configures (driver, connect_args, version table,
transaction per migration, autocommit blocks) behaves as under alembic's CLI.
Each change of the version table also records the scripts' lineage (`lineage`)
in the same transaction. The guard (`guard.guarded_by`) follows every connection
env.py opens.
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
from sqlalchemy import MetaData, Table, event, text
from sqlalchemy.engine import Engine

from . import database, envpy, lineage, log, revisions, target, telemetry
from .errors import ConfigError, DatabaseUnreachable, RevisionFailed, RunnerError
from .guard import LockLost, Watchdog, describe_blockers

logger = logging.getLogger("runner.migrate")


@dataclass
class Progress:
    """What an upgrade is doing: the state it started from and the revision running now."""

    state: revisions.State | None = None  # as read on env.py's connection before anything was written
    start: tuple[str, ...] | None = None  # the revisions the run started from (after any baseline stamp)
    running: object | None = None  # the Script being applied
    # Commits made while the running revision's upgrade() ran (alembic's autocommit_block):
    # a revision that committed part of itself did not roll back entirely.
    committed_inside: int = 0
    inside: bool = False
    raised_inside: bool = False  # the running revision's upgrade() raised (SystemExit included)
    started: float = 0.0  # when the running revision began (time.monotonic)
    recording: bool = False  # writing the lineage, after the running revision's version change


def upgrade(config: Config, script: ScriptDirectory, progress: Progress,
            decide: Callable[[revisions.State], str | None], *, record: lineage.Lineage | None = None,
            expected: dict | None = None, tables_before: frozenset[int] | None = None,
            goal: target.Target | None = None, history=None) -> None:
    """`alembic upgrade <goal>` (default heads) in one run of env.py, which reads the database's state first.

    Before anything is written, `decide` gets the state as read on env.py's own
    connection (its driver, search_path and version table; `expected` are the
    MIGRATE_ version table variables that must agree): it raises to refuse, or
    returns a baseline revision to stamp first, in the same transaction as the
    upgrade. A database at or beyond the goal, or ahead of the scripts (let through), gets no step.
    Only tables among `tables_before` (there when the lock was taken) make it legacy.
    """
    goal = goal or target.resolve(script, target.HEADS)

    def plan(state: revisions.State, current: tuple[str, ...], context, first_attempt: bool) -> list:
        baseline = decide(state)
        start = (baseline,) if baseline else current
        if first_attempt:  # a retry starts where the last attempt left the database
            progress.start = start
        if state.kind in ("current", "ahead"):
            return []
        # What command.upgrade does, with each revision timed as it runs.
        upgrades = target.upgrade_steps(script, goal, start)
        for step in upgrades:
            step.migration_fn = _timed(step.migration_fn, step.revision, progress, "ran")
        if not current:
            context._ensure_version_table()
        stamps = script._stamp_revs(baseline, current) if baseline else []
        if baseline:  # written in the upgrade's transaction, with its first step: a point in the trace
            telemetry.mark("stamp baseline", {"migration.revision": baseline})
        return [*stamps, *upgrades]

    _run(config, script, progress, plan, record, {**(expected or {}), "tables_before": tables_before, "goal": goal},
         history=history, destination_rev=goal.name)


def downgrade(config: Config, script: ScriptDirectory, progress: Progress, target: str,
              decide: Callable[[revisions.State], None], *, record: lineage.Lineage | None = None,
              expected: dict | None = None, history=None) -> None:
    """`alembic downgrade <target>` in one run of env.py; `decide` refuses a state it must not touch."""

    def plan(state: revisions.State, current: tuple[str, ...], context, first_attempt: bool) -> list:
        decide(state)
        if first_attempt:
            progress.start = current
        # What command.downgrade does: every revision above the target, newest first.
        steps = script._downgrade_revs(target, current)
        for step in steps:
            step.migration_fn = _timed(step.migration_fn, step.revision, progress, "reverted")
        return steps

    _run(config, script, progress, plan, record, expected or {}, history=history, destination_rev=target)


def _run(config: Config, script: ScriptDirectory, progress: Progress, plan, record: lineage.Lineage | None,
         expected: dict, history=None, **options) -> None:
    """Run env.py once with dont_mutate, so that a refusal leaves nothing behind (not even a version table);
    `plan` gets the state read on env.py's connection and returns the steps to run; `history` (a
    history.Recorder) writes a row per step in the step's transaction."""
    contexts = []

    def steps(current, context):
        if contexts:
            raise revisions.SeveralContexts()
        contexts.append(context)
        log.restore()  # whatever env.py did to logging on its way here (logging.disable, say)
        first_attempt = progress.state is None
        state = progress.state = revisions.observe(context, script, **expected)
        planned = plan(state, tuple(current), context, first_attempt)
        if planned and record is not None:
            # Called by alembic after each step's version table change, inside the same transaction.
            context.on_version_apply_callbacks = (*context.on_version_apply_callbacks,
                                                  _recorder(record, state, progress))
        if planned and history is not None:
            context.on_version_apply_callbacks = (*context.on_version_apply_callbacks,
                                                  history.callback(state, progress, script))
        return planned

    envpy.run(config, script, steps, dont_mutate=True, **options)


# Whether the session's role may comment on the version table (owns it), and its comment now.
_OWNER_AND_COMMENT = text("""
    SELECT pg_has_role(c.relowner, 'USAGE'), obj_description(c.oid, 'pg_class')
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = :table AND n.nspname = :schema
""")


def _recorder(record: lineage.Lineage, state: revisions.State, progress: Progress):
    """An on_version_apply callback writing `record` as the version table's comment, when it changed."""
    comment = lineage.encode(record)
    # Once written (or found, or refused) the comment stays so for the rest of the run: a later step's
    # failure ends the run, and a retry runs env.py, and so a new recorder, again. Asking once, not at
    # each of a thousand steps, keeps the lineage's cost to one query per run.
    settled = []

    def record_lineage(ctx, **_) -> None:
        if settled:
            return
        settled.append(True)
        # Settled for this run of env.py: off alembic's list, which builds each later step's MigrationInfo
        # and heads only for its callbacks (a thousand revisions, a thousand of each).
        ctx.on_version_apply_callbacks = tuple(callback for callback in ctx.on_version_apply_callbacks
                                               if callback is not record_lineage)
        progress.recording = True  # a failure from here on is the lineage's, not the revision's
        connection = ctx.connection
        found = connection.execute(_OWNER_AND_COMMENT, {"table": state.table, "schema": state.schema}).first()
        owner, current = found if found else (False, None)
        if current != comment and owner and lineage.is_ours(current):
            table = connection.dialect.identifier_preparer.format_table(
                Table(state.table, MetaData(), schema=state.schema))
            # Dollar-quoted: taken as it is whatever standard_conforming_strings says; a utility statement takes
            # no bind parameters, and no_parameters keeps every driver from reading its '%' as a placeholder.
            connection.exec_driver_sql(f"COMMENT ON TABLE {table} IS {_dollar_quoted(comment)}",
                                       execution_options={"no_parameters": True})
        elif current != comment:
            why = "the role does not own it" if not owner else "it holds a comment of its own"
            logger.warning("not recording the lineage on %s.%s (%s): an older image will treat this "
                           "database as unknown and exit 8 unless MIGRATE_ALLOW_AHEAD=always",
                           state.schema, state.table, why)
        progress.recording = False

    return record_lineage


def _dollar_quoted(value: str) -> str:
    tag = "lineage"
    while f"${tag}$" in value:
        tag += "_"
    return f"${tag}${value}${tag}$"


def _timed(migration_fn, revision, progress: Progress, verb: str):
    # alembic logs "Running upgrade ..." from the function's name: keep it.
    @functools.wraps(migration_fn)
    def timed(**kwargs):
        progress.running, progress.recording = revision, False
        progress.committed_inside = 0
        started = progress.started = time.monotonic()
        progress.inside = True
        try:
            if telemetry.recording():
                with telemetry.revision(revision, verb):
                    migration_fn(**kwargs)
            else:  # per revision, a thousand times: no context manager for a span nobody records
                migration_fn(**kwargs)
        except BaseException:
            progress.raised_inside = True
            raise
        finally:
            progress.inside = False
        seconds = time.monotonic() - started
        # Ran, not applied: it is applied once env.py commits it, which the read-back tells.
        logger.info("%s %s (%s) in %.2fs", verb, revision.revision, revisions.title(revision.doc), seconds,
                    extra={"revision": revision.revision, "seconds": round(seconds, 3)})

    return timed


def retrying(run: Callable[[], None], progress: Progress, watchdog: Watchdog, *, retries: int,
             read_back: Callable[[], tuple], sleep=time.sleep) -> None:
    """run() (an upgrade or a downgrade); a revision that rolled back entirely on lock_timeout is retried."""

    def attempt() -> None:
        watchdog.blockers = []
        progress.running, progress.raised_inside, progress.committed_inside = None, False, 0
        progress.recording = False
        run()

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
    if progress.recording:
        where = f"recording the lineage on the version table after {where}"

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
        return ConfigError(f"env.py exited ({error}) before it finished; the database is at {at()}")
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
