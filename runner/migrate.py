"""The only module that writes: stamp a baseline, upgrade to heads.

Both go through alembic with the user's own env.py, so whatever it configures
(target metadata, version table, transaction per migration) is honoured.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from .errors import ConfigError, DatabaseUnreachable, RevisionFailed, RunnerError
from .lock import Lock

logger = logging.getLogger("runner.migrate")


@dataclass
class Progress:
    """What an upgrade did so far: applied revisions and the one running now."""

    applied: list[str] = field(default_factory=list)
    running: object | None = None  # the Script being applied


def stamp(config: Config, revision: str) -> None:
    """Record `revision` in the version table without running any migration."""
    command.stamp(config, revision)
    logger.info("stamped baseline %s", revision, extra={"baseline": revision})


def upgrade(config: Config, script: ScriptDirectory, progress: Progress) -> None:
    """Apply every pending revision up to the heads, logging each one."""

    def steps(current, context):
        # What command.upgrade does, with each revision timed as it runs.
        revisions = script._upgrade_revs("heads", current)
        for step in revisions:
            step.migration_fn = _timed(step.migration_fn, step.revision, progress)
        return revisions

    with EnvironmentContext(config, script, fn=steps, destination_rev="heads"):
        script.run_env()


def _timed(migration_fn, revision, progress: Progress):
    # alembic logs "Running upgrade ..." from the function's name: keep it.
    @functools.wraps(migration_fn)
    def timed_upgrade(**kwargs):
        progress.running = revision
        started = time.monotonic()
        migration_fn(**kwargs)
        seconds = time.monotonic() - started
        progress.applied.append(revision.revision)
        logger.info("applied %s (%s) in %.2fs", revision.revision, revision.doc or "", seconds,
                    extra={"revision": revision.revision, "seconds": round(seconds, 3)})

    return timed_upgrade


@contextmanager
def guarded_by(lock: Lock) -> Iterator[None]:
    """Refuse any commit once the lock's session no longer holds the lock.

    If that session is lost, the server releases the lock and another runner may
    take it: nothing this runner has not committed yet may be committed then.
    """

    def before_commit(connection) -> None:
        try:
            held = lock.held()
        except DBAPIError:
            held = False
        if not held:
            raise DatabaseUnreachable(
                "lost the advisory lock's session before committing; rolled back so that no two "
                "runners migrate at once")

    event.listen(Engine, "commit", before_commit)
    try:
        yield
    finally:
        event.remove(Engine, "commit", before_commit)


def explain_failure(error: BaseException, progress: Progress, read_back: Callable[[], tuple]) -> RunnerError:
    """The RunnerError for an exception raised while upgrading, with where the database is now."""
    if isinstance(error, RunnerError):
        return error
    revision = progress.running
    where = f"revision {revision.revision} ({revision.doc})" if revision else "env.py, before any revision ran"
    if isinstance(error, DBAPIError) and (error.connection_invalidated or _sqlstate(error) in (None, "")
                                          or _sqlstate(error).startswith(("08", "57P"))):
        detail = _database_message(error)
        try:
            at = _revisions(read_back())
        except Exception:
            at = "unknown (the database is unreachable)"
        return DatabaseUnreachable(f"lost the database during {where}: {detail}; the database is at {at}")
    if revision is None and not isinstance(error, DBAPIError):
        return ConfigError(f"env.py failed: {type(error).__name__}: {error}")
    detail = (f"SQLSTATE {_sqlstate(error)}: {_database_message(error)}" if isinstance(error, DBAPIError)
              else f"{type(error).__name__}: {error}")
    try:
        at = _revisions(read_back())
    except Exception as e:
        at = f"unknown ({type(e).__name__} reading it back)"
    return RevisionFailed(f"{where} failed: {detail}; the database is at {at}")


def _revisions(heads: tuple) -> str:
    return ", ".join(heads) if heads else "base (no revision)"


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None)


def _database_message(error: DBAPIError) -> str:
    diag = getattr(error.orig, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return primary or str(error.orig).strip().splitlines()[0]
