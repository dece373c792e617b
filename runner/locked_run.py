"""A writing command's migration, run while the lock is held: guarded, retried, and read back to say where it is."""

from __future__ import annotations

from typing import Callable

import psycopg
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from . import database, envpy, guard, migrate, revisions, sessions, states, telemetry
from .errors import ConfigError, DatabaseUnreachable
from .lock import Lock
from .report import Report
from .settings import Settings
from .wait import first_line


def under_lock(settings: Settings, report: Report, url: URL, lock: Lock, script: ScriptDirectory,
               decide: Callable[[revisions.State], object], run: Callable[[migrate.Progress, Callable], None],
               before: Callable[[object], None] | None = None) -> tuple[migrate.Progress, tuple[str, ...]]:
    """`run` the migration under the guard, holding `lock`; where the database is, read back.

    `before(lock)`, if given, runs first (and raises to refuse);
    `decide` sees the state env.py's connection reads before anything is written
    (and raises to refuse); every failure becomes a RunnerError saying where the
    database is now.
    """
    if before is not None:
        before(lock)
    progress = migrate.Progress()

    @telemetry.traced("read back", result=lambda reached: {"migration.to_revisions": list(reached)})
    def read_back() -> tuple[str, ...]:
        # On a new connection: after a failure the lock's session may be gone too.
        with sessions.connect(url) as session:
            return revisions.version_rows(session, version_table=progress.state.table,
                                          schema=progress.state.schema)

    attempts = []

    def decide_once(state: revisions.State):
        attempts.append(state)
        if len(attempts) == 1:  # where the run started; a retry starts where the last attempt ended
            report.from_revision = state.current
        report.to_revision = state.current
        states.log(state)
        return decide(state)

    try:
        with guard.guarded_by(lock, progress=progress, report_every=settings.progress_interval) as watchdog:
            migrate.retrying(lambda: run(progress, decide_once), progress, watchdog,
                             retries=settings.ddl_lock_retries, read_back=read_back)
            if progress.state is None:
                raise revisions.NoMigrationsRun()
    except Exception as e:
        if progress.state is None:
            raise envpy.failure(e) from None
        try:
            reached = read_back()
        except Exception:
            reached = None
        else:
            report.to_revision = reached
            if progress.start is not None:  # else refused before it started
                report.applied = revisions.applied_between(script, progress.start, reached)
                report.reverted = revisions.reverted_between(script, progress.start, reached)
        # A read that failed once is tried again there, and reported as unknown if it fails again.
        raise migrate.explain_failure(e, progress, lambda: reached if reached is not None else read_back()) from None
    # Success is what the database says, read back, not what env.py returned.
    reached = _read_back_after_success(lock, progress.state)
    report.to_revision = reached
    return progress, reached


@telemetry.traced("read back", result=lambda reached: {"migration.to_revisions": list(reached)})
def _read_back_after_success(lock, state: revisions.State) -> tuple[str, ...]:
    """The version table, read on the lock's session once env.py returned."""
    try:
        return revisions.version_rows(lock.connection, version_table=state.table, schema=state.schema)
    except psycopg.Error as e:
        if database.is_disconnect(e):
            raise DatabaseUnreachable(f"env.py returned, but the database was lost before the runner could read "
                                      f"back where it is: {first_line(e)}") from None
        raise ConfigError(f"env.py returned, but the runner cannot read {state.schema}.{state.table} back to check "
                          f"it reached the heads (SQLSTATE {database.sqlstate(e)}: {first_line(e)}): DATABASE_URL's "
                          f"role needs SELECT on it") from None
