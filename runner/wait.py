"""Wait for the database to accept a login, retrying only what time can cure."""

from __future__ import annotations

import logging
import time

import psycopg
import tenacity
from sqlalchemy.engine import URL

from . import credentials, database, sessions, telemetry
from .database import first_line, invalid_reason
from .errors import ConfigError, DatabaseUnreachable, RunnerError

logger = logging.getLogger("runner.wait")

# Refusals that no amount of waiting changes, by the words libpq uses.
FATAL = {
    "password authentication failed": "authentication failed",
    "authentication failed": "authentication failed",
    "no pg_hba.conf entry": "no pg_hba.conf entry allows this login",
    "does not exist": "does not exist",
    "certificate verify failed": "TLS verification failed (check sslmode and sslrootcert)",
    "server certificate for": "TLS verification failed: the server's certificate does not match the host name (sslmode=verify-full)",
    "root certificate file": "TLS verification failed: the CA file cannot be read (sslrootcert)",
    "server does not support SSL": "the server does not support SSL but sslmode requires it",
}

def fatal_reason(error: BaseException) -> str | None:
    """Why this connection error cannot be cured by waiting, or None if it can."""
    text = str(error)
    return next((reason for words, reason in FATAL.items() if words in text), None) or invalid_reason(error)




def refusal(url: URL, error: BaseException) -> RunnerError:
    """The error for a login that waiting cannot cure: the URL's parameters (2) or the server's refusal (3)."""
    invalid = invalid_reason(error)
    if invalid:
        return ConfigError(f"DATABASE_URL: {invalid}: {first_line(error)}")
    return DatabaseUnreachable(f"database {database.endpoint(url)} refused the connection: "
                               f"{fatal_reason(error)}: {first_line(error)}")


def connection_error(url: URL, error: BaseException) -> RunnerError:
    """A connection that failed after the wait: a proxy refusing our session options, or the database."""
    # PgBouncer refuses the `options` startup parameter unless told to ignore it.
    if "unsupported startup parameter" in str(error):
        return ConfigError(
            "a proxy in front of PostgreSQL (PgBouncer?) refused the startup parameter `options` that carries "
            "the runner's session settings; connect to PostgreSQL directly, or to a session-pooled port with "
            "`ignore_startup_parameters = options`")
    return DatabaseUnreachable(f"database {database.endpoint(url)}: {first_line(error)}")


def wait_for_database(url: URL, timeout: float, sleep=time.sleep) -> int:
    """Connect until a login succeeds or `timeout` seconds pass; returns server_version_num."""
    version, session = first_login(url, timeout, sleep)
    session.close()
    return version


class OnStandby(Exception):
    """`first_login(primary=True)` reached a server in recovery: a standby, which a failover may yet promote."""

    def __init__(self, server: str) -> None:
        super().__init__(f"connected to a read-only standby at {server} (pg_is_in_recovery() is true)")
        self.server = server


@telemetry.traced("wait for the database", lambda url, *_, **__: telemetry.database(url))
def first_login(url: URL, timeout: float, sleep=time.sleep, *, primary: bool = False,
                session: psycopg.Connection | None = None) -> tuple[int, psycopg.Connection]:
    """`wait_for_database`, keeping the session that logged in open (no transaction): the caller closes it.

    With `primary`, a login that reaches a standby counts as the database not being up yet:
    the commands that write wait for a writable primary (a failover under way) and then
    exit 3 naming the host, rather than fail on the standby's first write.
    `session`, an open autocommit session to `url` (the fast path's), is the first attempt's
    login: checked as a new one would be, and closed if it does not pass.
    """
    where = database.endpoint(url)
    given = [session] if session is not None else []

    def attempt() -> tuple[int, psycopg.Connection]:
        # Autocommit, so idle outside a transaction: a transaction-pooling proxy must not pin a backend to it.
        connection = given.pop() if given else sessions.connect(url)
        try:
            version = sessions.server_version(connection)
            if primary and connection.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                raise OnStandby(_server(connection, where))
        except BaseException:
            connection.close()
            raise
        return version, connection

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        if isinstance(error, OnStandby):
            logger.info("%s; waiting for a writable primary; retry %d in %.1fs", error, state.attempt_number,
                        state.next_action.sleep, extra={"attempt": state.attempt_number, "standby": error.server})
            return
        logger.info(
            "database %s not ready (%s); retry %d in %.1fs",
            where, first_line(state.outcome.exception()), state.attempt_number, state.next_action.sleep,
            extra={"attempt": state.attempt_number},
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=2),
        # A password command that failed (a token service briefly down), or a rotated password refused
        # before its file caught up, is waited out like the database.
        retry=tenacity.retry_if_exception(lambda e: credentials.cured_by_waiting(e) or isinstance(e, OnStandby)
                                          or isinstance(e, psycopg.Error) and fatal_reason(e) is None),
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )
    try:
        version, session = retrying(attempt)
    except OnStandby as e:
        raise DatabaseUnreachable(f"database {where}: no writable primary after {timeout:g}s "
                                  f"(MIGRATE_WAIT_TIMEOUT), only a read-only standby at {e.server} "
                                  f"(pg_is_in_recovery() is true); {_primary_hint(url)}") from None
    except psycopg.Error as e:
        if fatal_reason(e):
            raise refusal(url, e) from None
        if _standbys_only(e):
            raise DatabaseUnreachable(
                f"database {where}: no writable primary after {timeout:g}s (MIGRATE_WAIT_TIMEOUT), libpq turned "
                f"down the read-only standbys it reached (target_session_attrs="
                f"{url.query.get('target_session_attrs')}): {first_line(e)}") from None
        raise DatabaseUnreachable(
            f"database {where} not reachable after {timeout:g}s (MIGRATE_WAIT_TIMEOUT): {first_line(e)}") from None
    server = _server(session, where)
    # Of a multi-host URL's servers, say which one answered.
    reached = f", at {server}" if "," in where and server != where else ""
    logger.info("database %s is up (PostgreSQL %d.%d%s)", where, version // 10000, version % 10000, reached,
                extra={"server_version": version, "server": server})
    return version, session


def _server(connection: psycopg.Connection, where: str) -> str:
    """host:port of the server a session reached (which of a multi-host URL's), else the URL's `where`."""
    reached = database.server_reached(connection)
    return f"{reached[0]}:{reached[1]}" if reached else where


def _primary_hint(url: URL) -> str:
    """What to change so that the runner's logins reach the primary."""
    attrs = url.query.get("target_session_attrs")
    if attrs in ("read-write", "primary"):
        return f"target_session_attrs={attrs} is set: the failover is not over; run again once it is"
    given = f"target_session_attrs={attrs} lets libpq settle for a standby, and " if attrs else ""
    return (f"{given}upgrade and downgrade need the primary: point DATABASE_URL at the primary's service, or "
            f"list every host of the cluster with target_session_attrs=read-write (or primary), e.g. "
            f"?host=a:5432&host=b:5432&target_session_attrs=read-write")


# libpq's words when target_session_attrs turned a server down.
_NOT_PRIMARY = ("session is read-only", "server is in hot standby mode")


def _standbys_only(error: BaseException) -> bool:
    """Whether libpq refused the servers it reached for being standbys (target_session_attrs)."""
    text = str(getattr(error, "orig", error) or error)
    return any(words in text for words in _NOT_PRIMARY)
