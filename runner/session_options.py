"""Session options every later connection carries, set in steps: application_name, the connection check, timeouts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg

from . import database, sessions
from .wait import connection_error, wait_for_database

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from .settings import Settings


def apply(settings: Settings, check_interval: int | None, **timeouts: int | None) -> None:
    database.set_session_options(settings.application_name, client_connection_check_interval=check_interval,
                                 **timeouts)


def apply_after_login(settings: Settings, server_version: int) -> int | None:
    """Set the session options once the server's version is known; returns client_connection_check_interval
    in ms, None before PostgreSQL 14, which lacks it."""
    check_interval = int(settings.connection_check_interval * 1000) or None if server_version >= 140000 else None
    apply(settings, check_interval)
    return check_interval


def apply_for_migrations(settings: Settings, check_interval: int | None) -> None:
    """Add MIGRATE_STATEMENT_TIMEOUT and MIGRATE_DDL_LOCK_TIMEOUT, for the sessions that migrate."""
    apply(settings, check_interval, statement_timeout=_ms(settings.statement_timeout),
          lock_timeout=_ms(settings.ddl_lock_timeout))


def wait_and_apply(settings: Settings, url: URL) -> None:
    """Wait for the database, then set the session options every later connection carries."""
    if apply_after_login(settings, wait_for_database(url, settings.wait_timeout)):
        _probe(url)


def _probe(url: URL) -> None:
    # Commands without the lock: their first connection carrying the options is this one.
    try:
        with sessions.connect(url):
            pass
    except psycopg.Error as e:
        raise connection_error(url, e) from None


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))
