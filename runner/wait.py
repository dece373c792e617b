"""Wait for the database to accept a login, retrying only what time can cure."""

from __future__ import annotations

import logging
import time

import tenacity
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from . import database
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


def first_login(url: URL, timeout: float, sleep=time.sleep) -> tuple[int, Connection]:
    """`wait_for_database`, keeping the session that logged in open (no transaction): the caller closes it."""
    where = database.endpoint(url)
    engine = database.engine(url)

    def attempt() -> tuple[int, Connection]:
        connection = engine.connect()
        try:
            version = database.server_version(connection)
            # Idle outside a transaction: a transaction-pooling proxy must not pin a backend to it.
            connection.rollback()
        except BaseException:
            connection.close()
            raise
        return version, connection

    def log_retry(state: tenacity.RetryCallState) -> None:
        logger.info(
            "database %s not ready (%s); retry %d in %.1fs",
            where, first_line(state.outcome.exception()), state.attempt_number, state.next_action.sleep,
            extra={"attempt": state.attempt_number},
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=2),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, DBAPIError) and fatal_reason(e) is None),
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )
    try:
        version, session = retrying(attempt)
    except DBAPIError as e:
        if fatal_reason(e):
            raise refusal(url, e) from None
        raise DatabaseUnreachable(
            f"database {where} not reachable after {timeout:g}s (MIGRATE_WAIT_TIMEOUT): {first_line(e)}") from None
    logger.info("database %s is up (PostgreSQL %d.%d)", where, version // 10000, version % 10000,
                extra={"server_version": version})
    return version, session
