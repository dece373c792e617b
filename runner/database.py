"""Connections: the URL every session uses, and the session settings they carry.

Session settings travel in libpq's environment (PGAPPNAME, PGOPTIONS), not
only in our own connect calls, so that connections a user's env.py opens
itself carry them too.
"""

from __future__ import annotations

import functools
import os

from sqlalchemy import create_engine, pool
from sqlalchemy.engine import URL, Connection, Engine

# A runner must notice a dead peer even while it waits on a long statement:
# keepalives detect a silent network, tcp_user_timeout unacknowledged writes.
LIBPQ_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


# Options the user set for libpq themselves come first; ours are added after.
_USER_PGOPTIONS = os.environ.get("PGOPTIONS", "")


def with_defaults(url: URL) -> URL:
    """The URL plus our libpq defaults for every parameter the user did not set."""
    return url.update_query_dict({k: v for k, v in LIBPQ_DEFAULTS.items() if k not in url.query})


def endpoint(url: URL) -> str:
    """host:port as a person would name the server (no credentials)."""
    host = url.host or url.query.get("host") or os.environ.get("PGHOST") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = url.port or url.query.get("port") or os.environ.get("PGPORT") or 5432
    return f"{host}:{port}"


@functools.cache
def engine(url: URL) -> Engine:
    """The process's one engine for `url`: a new connection each time (no pool to go stale).

    Shared so that SQLAlchemy sets its dialect up from the server once, not once per step.
    """
    return create_engine(url, poolclass=pool.NullPool)


def set_session_options(application_name: str, **settings: int) -> None:
    """Make every connection opened from now on carry these settings (ms values)."""
    os.environ["PGAPPNAME"] = application_name
    ours = [f"-c {name}={value}" for name, value in settings.items() if value is not None]
    options = " ".join([_USER_PGOPTIONS, *ours]).strip()
    if options:
        os.environ["PGOPTIONS"] = options
    else:
        os.environ.pop("PGOPTIONS", None)


def server_version(connection: Connection) -> int:
    """server_version_num, e.g. 160002."""
    return int(connection.exec_driver_sql("SHOW server_version_num").scalar_one())
