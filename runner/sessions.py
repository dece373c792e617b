"""The runner's own sessions (wait, lock, checks, read-backs): psycopg 3 from the URL, without SQLAlchemy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg

from . import credentials, database

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

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

# Query parameters of other drivers' URLs that libpq does not know, and what they become.
_FOREIGN_PARAMETERS = {"ssl": "sslmode", "prepared_statement_cache_size": None, "command_timeout": None,
                       "timeout": "connect_timeout", "tcp_keepalive": None}
_SSL_VALUES = {"true": "require", "false": "disable"}


def runner_url(given: URL) -> URL:
    """The URL the runner's own sessions use: DATABASE_URL read for libpq, plus our defaults."""
    return with_defaults(for_runner(given))


def for_runner(url: URL) -> URL:
    """The URL for psycopg 3 (named postgresql+psycopg, whatever SQLAlchemy can load), with another
    driver's parameters translated."""
    if url.drivername == "postgresql+psycopg":
        return url
    query = {}
    for name, value in url.query.items():
        if url.drivername != "postgresql+psycopg2" and name in _FOREIGN_PARAMETERS:
            name = _FOREIGN_PARAMETERS[name]
            if name is None:
                continue
            if name == "sslmode" and isinstance(value, str):
                value = _SSL_VALUES.get(value.lower(), value)
        query[name] = value
    return url.set(drivername="postgresql+psycopg", query=query)


def with_defaults(url: URL) -> URL:
    """The URL plus our libpq defaults for every parameter the user did not set."""
    return url.update_query_dict({k: v for k, v in LIBPQ_DEFAULTS.items() if k not in url.query})


def connect_kwargs(url: URL) -> dict:
    """psycopg.connect's keyword arguments for `url`, as SQLAlchemy's psycopg dialects read a URL:
    its parts, its query as libpq parameters, and a multi-host list (`database.hosts`, either form)
    as libpq's comma lists. application_name and PGOPTIONS come from libpq's environment."""
    params = url.translate_connect_args(username="user", database="dbname")
    params.update(url.query)
    if url.query.get("host") is not None:
        listed = database.hosts(url)
        params["host"] = ",".join(host or "" for host, _ in listed)
        ports = ",".join(port or "" for _, port in listed)
        if ports.strip(","):
            params["port"] = ports
    return params


def connect(url: URL, **overrides) -> psycopg.Connection:
    """A new autocommit session to `url` (`overrides` replace its parameters), a rotating password filled in.

    Autocommit: the runner's sessions sit idle outside a transaction (a transaction-pooling proxy
    must not pin a backend to them, and an advisory lock's session holds nothing else).
    """
    return psycopg.connect(autocommit=True, **credentials.fill({**connect_kwargs(url), **overrides}))


def server_version(session: psycopg.Connection) -> int:
    """server_version_num, e.g. 160002, as the server reports it."""
    return int(session.execute("SHOW server_version_num").fetchone()[0])
