"""Connections: the servers a URL names, the session settings every connection carries, drivers' errors.

Session settings travel in libpq's environment (PGAPPNAME, PGOPTIONS), not
only in our own connect calls, so that connections a user's env.py opens
itself carry them too; drivers that do not read libpq's environment (asyncpg,
pg8000) get the same settings by SQL (`settings_sql`) when they connect.
"""

from __future__ import annotations

import os
import re
import socket

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

# Options the user set for libpq themselves come first; ours are added after.
_USER_PGOPTIONS = os.environ.get("PGOPTIONS", "")


def endpoint(url: URL) -> str:
    """host:port as a person would name the server (no credentials); a,b,... for a multi-host URL."""
    default_host = os.environ.get("PGHOST") or "localhost"
    default_port = os.environ.get("PGPORT") or "5432"
    try:
        listed = hosts(url)
    except ValueError:  # refused by parse_url before anything connects; named as given all the same
        listed = [(str(url.query.get("host") or url.host or default_host), None)]
    return ",".join(f"{host or default_host}:{port or default_port}" for host, port in listed or [(None, None)])


def hosts(url: URL) -> list[tuple[str | None, str | None]]:
    """(host, port) for each server the URL lists, in the order libpq tries them; [] when it names none.

    Three forms, as SQLAlchemy's PostgreSQL dialects read them: `user@host:port/db`;
    `?host=a:5432&host=b:5432` (the query's host repeated, each with its port); and
    libpq's `?host=a,b&port=5432,5433` (a port for each host, or none). A single
    `?host=a:5432` is host and port, as SQLAlchemy reads it.
    Raises ValueError, saying what is wrong, for a list SQLAlchemy's dialects would refuse.
    """
    given, ports = url.query.get("host"), url.query.get("port")
    if given is not None and "[" in str(given):
        # SQLAlchemy's dialects split host=HOST:PORT at every colon: [::1]:5432 would crash them.
        raise ValueError("an IPv6 address in the query's host list cannot be read by SQLAlchemy; name the "
                         "servers by host name")
    if isinstance(ports, tuple):
        raise ValueError("`port` is given more than once; list the ports as port=5432,5433")
    if given is None:
        if url.host is None and ports is None:
            return []
        return [(url.host, str(ports or url.port or "") or None)]
    if isinstance(given, str) and ports is None and re.fullmatch(r"[A-Za-z0-9.-]*:\d*", given):
        given = (given,)
    if isinstance(given, tuple):
        if ports is not None:
            raise ValueError("host=HOST:PORT items and a `port` parameter cannot be mixed; use "
                             "host=a:5432&host=b:5432, or host=a,b&port=5432,5432")
        listed = [tuple(item.rsplit(":", 1)) if ":" in item else (item, None) for item in given]
    else:
        names = given.split(",")
        port_list = str(ports).split(",") if ports is not None else [str(url.port or "")] * len(names)
        if len(port_list) != len(names):
            raise ValueError(f"{len(names)} hosts but {len(port_list)} port{'s' * (len(port_list) > 1)}; "
                             f"give a port for each host (port=5432,5432), or none")
        listed = list(zip(names, port_list))
    return [(host or None, port or None) for host, port in listed]


# The settings connections opened from now on carry: name -> value (ms for the timeouts).
_session: dict[str, str] = {}


def set_session_options(application_name: str, **settings: int | None) -> None:
    """Make every connection opened from now on carry these settings (ms values)."""
    os.environ["PGAPPNAME"] = application_name
    _session.clear()
    _session["application_name"] = application_name
    _session.update({name: str(value) for name, value in settings.items() if value is not None})
    ours = [f"-c {name}={value}" for name, value in settings.items() if value is not None]
    options = " ".join([_USER_PGOPTIONS, *ours]).strip()
    if options:
        os.environ["PGOPTIONS"] = options
    else:
        os.environ.pop("PGOPTIONS", None)


@contextmanager
def tagged() -> Iterator[None]:
    """Inside the `with`, every new connection of any driver gets the session settings by SQL.

    libpq's drivers read them from the environment already; asyncpg and pg8000 do not.
    """
    from sqlalchemy import event, pool

    def on_connect(dbapi_connection, record) -> None:
        select_on(dbapi_connection, settings_sql())

    event.listen(pool.Pool, "connect", on_connect)
    try:
        yield
    finally:
        event.remove(pool.Pool, "connect", on_connect)


def select_on(dbapi_connection, columns: list[str]) -> tuple:
    """SELECT `columns` on a DBAPI connection of any driver, then commit; returns the row.

    No parameters: each driver has its own paramstyle. Committed, because a SET made by
    set_config is undone with a rolled-back transaction (a session-level lock is not).
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT " + ", ".join(columns))
        row = tuple(cursor.fetchone())
    finally:
        cursor.close()
    dbapi_connection.commit()
    return row


def settings_sql() -> list[str]:
    """The session settings as `set_config` calls, for a SELECT list run on any driver's connection.

    Literals, not parameters: each driver has its own paramstyle, and a statement
    without parameters reads the same to all of them.
    """
    return [f"set_config({_literal(name)}, {_literal(value)}, false)" for name, value in _session.items()]


def _literal(value: str) -> str:
    # An E'' string reads backslashes the same whatever standard_conforming_strings says.
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def server_reached(dbapi_connection) -> tuple[str, int] | None:
    """(host, port) of the server a psycopg 3 connection reached: of a multi-host URL's, the one it chose."""
    info = getattr(dbapi_connection, "info", None)  # psycopg 3's ConnectionInfo
    try:
        host, port = info.host, info.port
    except Exception:  # closed meanwhile, or another driver
        return None
    return (host, port) if host and port else None


def first_line(error: BaseException) -> str:
    """The informative line of a driver's error (libpq's FATAL/ERROR line when there is one)."""
    text = " ".join(line.strip() for line in str(getattr(error, "orig", error) or error).splitlines() if line.strip())
    for marker in ("FATAL:", "ERROR:"):
        if marker in text:
            return " ".join(text[text.index(marker):].split())
    return text.removeprefix("connection failed: ").removeprefix("connection is bad: ")


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver's error (psycopg, psycopg2, asyncpg, pg8000), if it has one."""
    error = getattr(error, "orig", None) or error
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(error, attribute, None)
        if isinstance(value, str) and value:
            return value
    args = getattr(error, "args", ())
    if args and isinstance(args[0], dict):  # pg8000: the server's fields, C the code
        return args[0].get("C")
    return None


# Connection parameters libpq cannot use, by its words: the URL is wrong, not the database.
INVALID = {
    "invalid connection option": "invalid connection option",
    "invalid port number": "invalid port",
    "invalid integer value": "invalid number",
    "invalid sslmode": "invalid sslmode",
    "sslmode value": "invalid sslmode",
}


def invalid_reason(error: BaseException) -> str | None:
    """What is wrong with the connection parameters, if the error says so."""
    text = str(error)
    return next((reason for words, reason in INVALID.items() if words in text), None)


def is_disconnect(error: BaseException) -> bool:
    """Whether an error means the connection could not be made or was lost (retry can help)."""
    if getattr(error, "connection_invalidated", False):
        return True
    code = sqlstate(error)
    if code:
        return code.startswith(("08", "57P"))
    orig = getattr(error, "orig", None) or error
    # No SQLSTATE: the client failed. An unusable parameter is a configuration error; the rest
    # of libpq's connection failures are the network's or the server's.
    if invalid_reason(orig) or type(orig).__name__ == "ProgrammingError":
        return False
    return isinstance(orig, OSError) or any(
        name in ("OperationalError", "InterfaceError") or "Connection" in name for name in _class_names(orig))


def _class_names(error: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(error).__mro__]


def driver_name(dbapi_connection) -> str:
    """The driver behind a DBAPI connection (or SQLAlchemy's adapter of one), e.g. `asyncpg`."""
    inner = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    return type(inner).__module__.split(".")[0]


def sever(dbapi_connection) -> None:
    """Shut a connection's socket down from any thread, whatever its driver: a call blocked on it fails at once."""
    fd = _socket_fd(dbapi_connection) if dbapi_connection is not None else None
    if fd is None:
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _socket_fd(dbapi_connection) -> int | None:
    inner = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    for candidate in (dbapi_connection, inner):
        fileno = getattr(candidate, "fileno", None)  # psycopg 3 and 2, sync and async
        if callable(fileno):
            try:
                return fileno()
            except Exception:
                pass
    sock = getattr(inner, "_usock", None)  # pg8000
    transport = getattr(inner, "_transport", None)  # asyncpg
    if sock is None and transport is not None:
        sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else None
    except Exception:
        return None
