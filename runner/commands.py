"""The runner's commands, each a verb taking the settings first and returning an exit code."""

from __future__ import annotations

import logging
import time

from . import database, log, migrate, revisions
from .errors import EXIT_OK
from .lock import advisory_lock
from .settings import Settings
from .wait import wait_for_database

logger = logging.getLogger("runner")


def upgrade(settings: Settings) -> int:
    """Wait for the database, take the lock, check heads, stamp a baseline if asked, upgrade heads."""
    started = time.monotonic()
    url = database.with_defaults(settings.url())
    config = revisions.load_config(settings.alembic_config, url)
    script = revisions.load_scripts(config)
    heads = tuple(script.get_heads()) if settings.allow_multiple_heads else revisions.check_single_head(script)
    logger.info("scripts at %s: head %s", script.dir, ", ".join(heads) or "none",
                extra={"heads": list(heads)})

    version = wait_for_database(url, settings.wait_timeout)
    interval = int(settings.connection_check_interval * 1000) if version >= 140000 else None
    database.set_session_options(settings.application_name, client_connection_check_interval=interval or None)

    with advisory_lock(url, settings.lock_key, settings.lock_timeout, schema=settings.version_table_schema,
                       table=settings.version_table) as lock:
        # Timeouts for migration sessions only: the lock wait above must not be cut short by them.
        database.set_session_options(
            settings.application_name,
            client_connection_check_interval=interval or None,
            statement_timeout=_ms(settings.statement_timeout),
            lock_timeout=_ms(settings.ddl_lock_timeout),
        )

        def read_state():
            return revisions.database_state(lock.connection, script, version_table=settings.version_table,
                                            schema=settings.version_table_schema)

        state = read_state()
        start = state.current
        logger.info("database is %s%s", state.kind, f" at {', '.join(state.current)}" if state.current else "",
                    extra={"state": state.kind, "current": list(state.current)})
        if state.kind == "ahead":
            revisions.refuse_ahead(state)
        engine = database.engine(url)
        progress = migrate.Progress()
        try:
            with migrate.guarded_by(lock):
                if state.kind == "legacy":
                    baseline = revisions.refuse_legacy(state, settings.baseline_revision, script)
                    with engine.begin() as connection:
                        config.attributes["connection"] = connection
                        migrate.stamp(config, baseline)
                    state = read_state()
                if state.kind == "current":
                    _summary("already at heads", start, state.current, [], lock.waited, started)
                    return EXIT_OK
                with engine.begin() as connection:
                    config.attributes["connection"] = connection
                    migrate.upgrade(config, script, progress)
        except Exception as e:
            raise migrate.explain_failure(e, progress, lambda: _read_back(url, settings)) from None
        finally:
            config.attributes.pop("connection", None)
            engine.dispose()
        final = read_state()
    _summary("upgraded", start, final.current, progress.applied, lock.waited, started)
    return EXIT_OK


def _read_back(url, settings: Settings) -> tuple[str, ...]:
    """The revisions the database is at, read on a new connection after a failure."""
    engine = database.engine(url)
    try:
        with engine.connect() as connection:
            return revisions.current_heads(connection, version_table=settings.version_table,
                                           schema=settings.version_table_schema)
    finally:
        engine.dispose()


def _summary(outcome: str, start, end, applied: list[str], lock_wait: float, started: float) -> None:
    before = ", ".join(start) or "base"
    after = ", ".join(end) or "base"
    seconds = time.monotonic() - started
    log.summary(
        f"{outcome}: {before} -> {after}, {len(applied)} revisions applied, lock wait {lock_wait:.1f}s, "
        f"total {seconds:.1f}s",
        outcome=outcome, from_revision=list(start), to_revision=list(end), applied=applied,
        lock_wait=round(lock_wait, 3), duration=round(seconds, 3),
    )


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))
