"""The runner's commands: each a verb taking the settings first, filling in a Report, returning an exit code.

`upgrade` is the one that writes (through `migrate`, under the lock); `check`,
`wait`, `plan` and `heads` only read, take no lock and run no DDL.
"""

from __future__ import annotations

import io
import logging
import sys
import time

import tenacity
from alembic import command as alembic_command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from . import database, log, migrate, revisions
from .errors import EXIT_OK, ConfigError, DatabaseUnreachable, PendingRevisions
from .lock import advisory_lock
from .report import Report
from .settings import Settings
from .wait import connection_error, fatal_reason, first_line, first_login, wait_for_database

logger = logging.getLogger("runner")


def upgrade(settings: Settings, report: Report) -> int:
    """Wait for the database, take the lock, check heads, stamp a baseline if asked, upgrade heads."""
    url, config, script = _scripts(settings)
    version, first_session = first_login(url, settings.wait_timeout)
    # The lock's session is the first to carry the session options: it reports a proxy refusing them.
    check_interval = _options_after_login(settings, version)

    # The wait's session, still open, serves the lock as the second session that tells a transaction pooler.
    with advisory_lock(url, settings.lock_key, settings.lock_timeout, schema=settings.version_table_schema,
                       table=settings.version_table, second_session=first_session) as lock:
        report.lock_wait = lock.waited
        # Timeouts for migration sessions only: the lock wait above must not be cut short by them.
        _session_options(settings, check_interval, statement_timeout=_ms(settings.statement_timeout),
                         lock_timeout=_ms(settings.ddl_lock_timeout))

        def read_state() -> revisions.State:
            return revisions.database_state(lock.connection, script, version_table=settings.version_table,
                                            schema=settings.version_table_schema)

        state = read_state()
        report.from_revision = report.to_revision = state.current
        _log_state(state)
        if state.kind == "ahead":
            revisions.refuse_ahead(state)
        engine = database.engine(url)
        progress = migrate.Progress()
        try:
            with migrate.guarded_by(lock) as watchdog:
                if state.kind == "legacy":
                    baseline = revisions.refuse_legacy(state, settings.baseline_revision, script)
                    with engine.begin() as connection:
                        config.attributes["connection"] = connection
                        migrate.stamp(config, baseline)
                    state = read_state()
                    report.to_revision = state.current
                if state.kind == "current":
                    report.outcome = "current"
                    report.message = f"already at heads: {_names(state.current)}"
                    return EXIT_OK
                migrate.upgrade_retrying(engine, config, script, progress, watchdog, retries=settings.ddl_lock_retries,
                                         read_back=lambda: _read_back(url, settings))
        except Exception as e:
            report.applied = progress.applied
            raise migrate.explain_failure(e, progress, lambda: _read_back(url, settings)) from None
        finally:
            report.applied = progress.applied
            config.attributes.pop("connection", None)
        report.to_revision = read_state().current
    report.outcome = "upgraded"
    report.message = (f"upgraded: {_names(report.from_revision)} -> {_names(report.to_revision)}, "
                      f"{len(progress.applied)} revisions applied, lock wait {report.lock_wait:.1f}s, "
                      f"total {time.monotonic() - report.started:.1f}s")
    return EXIT_OK


def check(settings: Settings, report: Report) -> int:
    """Exit 0 if the database is at the scripts' heads, 9 if revisions are pending, 8 if it is ahead."""
    url, _, script = _scripts(settings)
    _connect(settings, url)
    state = _read_back_state(url, settings, script)
    _log_state(state)
    return _judge(state, report)


def wait(settings: Settings, report: Report) -> int:
    """Repeat `check` with backoff until the database is at heads or MIGRATE_WAIT_TIMEOUT passes."""
    url, _, script = _scripts(settings)
    last_logged = [None]

    def attempt() -> int:
        try:
            state = _read_back_state(url, settings, script)
        except DBAPIError as e:
            if fatal_reason(e):
                raise DatabaseUnreachable(f"database {database.endpoint(url)} refused the connection: "
                                          f"{fatal_reason(e)}: {first_line(e)}") from None
            raise _NotUpYet(first_line(e)) from None
        if (state.kind, state.current) != last_logged[0]:
            last_logged[0] = (state.kind, state.current)
            _log_state(state)
        return _judge(state, report)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(settings.wait_timeout),
        # Capped at 1 s: an application pod should start within a second or two of the migration.
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=1),
        retry=tenacity.retry_if_exception_type((PendingRevisions, _NotUpYet)),
        reraise=True,
    )
    try:
        return retrying(attempt)
    except PendingRevisions as e:
        raise PendingRevisions(f"still not at heads after {settings.wait_timeout:g}s (MIGRATE_WAIT_TIMEOUT): "
                               f"{e}") from None
    except _NotUpYet as e:
        raise DatabaseUnreachable(f"database {database.endpoint(url)} not reachable after "
                                  f"{settings.wait_timeout:g}s (MIGRATE_WAIT_TIMEOUT): {e}") from None


class _NotUpYet(Exception):
    """`wait`: the database did not answer this time; waiting may still cure it."""


def plan(settings: Settings, report: Report, sql: bool = False) -> int:
    """Say what `upgrade` would do from the database's current state; with sql, print the SQL. Changes nothing."""
    url, config, script = _scripts(settings)
    _connect(settings, url)
    state = _read_back_state(url, settings, script)
    _log_state(state)
    report.from_revision = report.to_revision = state.current
    if state.kind == "ahead":
        revisions.refuse_ahead(state)
    start = state.current
    baseline = None
    if state.kind == "legacy":
        baseline = revisions.refuse_legacy(state, settings.baseline_revision, script)
        logger.info("would stamp baseline %s on the legacy database (%d tables, no version table)",
                    baseline, len(state.tables), extra={"baseline": baseline})
        start = (baseline,)
    pending = revisions.pending_revisions(script, start)
    for revision in pending:
        logger.info("would apply %s: %s", revision.revision, revision.doc or "", extra={"revision": revision.revision})
    report.pending = [revision.revision for revision in pending]
    report.to_revision = tuple(script.get_heads())
    report.outcome = "planned"
    report.message = (f"plan: {_names(state.current)} -> {_names(script.get_heads())}"
                      f"{f' (stamping baseline {baseline} first)' if baseline else ''}, "
                      f"{len(pending)} revisions would be applied")
    if sql:
        _print_sql(config, start, baseline)
    return EXIT_OK


def heads(settings: Settings, report: Report) -> int:
    """Exit 0 naming the single head, or 5 listing the heads; needs no database."""
    config = revisions.load_config(settings.alembic_config)
    script = revisions.load_scripts(config)
    found = revisions.check_single_head(script)
    report.to_revision = found
    report.outcome = "single head"
    report.message = f"single head: {_names(found)}"
    return EXIT_OK


COMMANDS = {"upgrade": upgrade, "check": check, "wait": wait, "plan": plan, "heads": heads}


# -- shared steps -----------------------------------------------------------------------
def _scripts(settings: Settings) -> tuple[URL, Config, ScriptDirectory]:
    """What every command starts from: the URL (its secrets masked), alembic's config and the scripts."""
    url = database.with_defaults(settings.url())
    log.add_secret(url.password)
    log.add_secret(url.query.get("password"))
    # application_name from the first login on; the other options wait for the server's version.
    _session_options(settings, None)
    config = revisions.load_config(settings.alembic_config, url)
    script = revisions.load_scripts(config)
    found = tuple(script.get_heads()) if settings.allow_multiple_heads else revisions.check_single_head(script)
    logger.info("scripts at %s: head %s", script.dir, _names(found), extra={"heads": list(found)})
    return url, config, script


def _connect(settings: Settings, url: URL) -> None:
    """Wait for the database, then set the session options every later connection carries."""
    if _options_after_login(settings, wait_for_database(url, settings.wait_timeout)):
        _probe_session_options(url)


def _options_after_login(settings: Settings, server_version: int) -> int | None:
    """Set the session options once the server's version is known; returns client_connection_check_interval
    in ms, None before PostgreSQL 14, which lacks it."""
    check_interval = int(settings.connection_check_interval * 1000) or None if server_version >= 140000 else None
    _session_options(settings, check_interval)
    return check_interval


def _probe_session_options(url: URL) -> None:
    # Commands without the lock: their first connection carrying the options is this one.
    try:
        with database.engine(url).connect():
            pass
    except DBAPIError as e:
        raise connection_error(url, e) from None


def _session_options(settings: Settings, check_interval: int | None, **timeouts: int | None) -> None:
    database.set_session_options(settings.application_name, client_connection_check_interval=check_interval,
                                 **timeouts)


def _judge(state: revisions.State, report: Report) -> int:
    report.from_revision = report.to_revision = state.current
    if state.kind == "ahead":
        revisions.refuse_ahead(state)
    if state.kind == "current":
        report.outcome = "current"
        report.message = f"at heads: {_names(state.current)}"
        return EXIT_OK
    pending = state.pending or []
    report.pending = [revision.revision for revision in pending]
    report.outcome = "pending"
    if state.kind == "legacy":
        raise PendingRevisions(f"the database has {len(state.tables)} tables but no version table: "
                               f"`upgrade` needs MIGRATE_BASELINE_REVISION")
    described = ", ".join(f"{r.revision} ({r.doc})" for r in pending)
    raise PendingRevisions(f"{len(pending)} revisions pending at {_names(state.current)}: {described}")


def _read_back_state(url: URL, settings: Settings, script: ScriptDirectory) -> revisions.State:
    """The database's state, read on a short connection of its own (no lock, read only)."""
    with database.engine(url).connect() as connection:
        return revisions.database_state(connection, script, version_table=settings.version_table,
                                        schema=settings.version_table_schema)


def _read_back(url: URL, settings: Settings) -> tuple[str, ...]:
    """The revisions the database is at, read on a new connection after a failure."""
    with database.engine(url).connect() as connection:
        return revisions.current_heads(connection, version_table=settings.version_table,
                                       schema=settings.version_table_schema)


def _print_sql(config: Config, start: tuple[str, ...], baseline: str | None) -> None:
    """alembic's offline SQL from `start` to heads, on stdout (logs stay on stderr)."""
    if len(start) > 1:
        raise ConfigError("plan --sql needs the database at one revision; it is at " + _names(start))
    buffer = io.StringIO()
    config.output_buffer = buffer
    if baseline:
        alembic_command.stamp(config, baseline, sql=True)
    alembic_command.upgrade(config, f"{start[0]}:heads" if start else "heads", sql=True)
    sys.__stdout__.write(buffer.getvalue())
    sys.__stdout__.flush()


def _log_state(state: revisions.State) -> None:
    detail = f" at {_names(state.current)}" if state.current else ""
    if state.kind == "legacy":
        detail = f" ({len(state.tables)} tables, no version table)"
    logger.info("database is %s%s", state.kind, detail, extra={"state": state.kind, "current": list(state.current)})


def _names(revisions_: tuple[str, ...] | list[str]) -> str:
    return ", ".join(revisions_) or "base"


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))
