"""The advisory lock that lets one runner migrate a database at a time.

The lock is session-level, on a dedicated autocommit connection, and taken by
polling ``pg_try_advisory_lock``: a waiter blocked inside ``pg_advisory_lock``
would wait on a virtual transaction that ``CREATE INDEX CONCURRENTLY`` in the
holder waits for in turn, and the two deadlock. The lock goes with its session,
so a killed runner's lock is released by the server when the session ends.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psycopg
import tenacity
from psycopg.rows import dict_row
from sqlalchemy.engine import URL

from . import database, sessions, telemetry
from .errors import ConfigError, LockTimeout
from .wait import connection_error

logger = logging.getLogger("runner.lock")

# A session must not be dropped by a role's or server's idle timeouts while it
# holds the lock. set_config through pg_settings skips names an older server lacks.
_KEEP_SESSION = (
    "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN "
    "('idle_session_timeout', 'idle_in_transaction_session_timeout', 'statement_timeout', 'lock_timeout')"
)

_HOLDERS = """
    SELECT l.pid, a.application_name, host(a.client_addr) AS client_addr,
           a.backend_start, a.state, a.query
      FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def derive_key(database_name: str, schema: str, table: str, x_args: list[str] | tuple[str, ...] = ()) -> int:
    """First 8 bytes of sha256("migration-runner:<database>:<schema>.<table>"), signed big-endian; with -x
    items, " -x " and the items sorted, space-separated, are appended to the name.

    Tenants of one database that env.py selects with -x (its own version table schema, set only once
    env.py runs) must not wait for each other; without -x the key is what it always was."""
    name = f"migration-runner:{database_name}:{schema}.{table}"
    if x_args:
        name += " -x " + " ".join(sorted(x_args))
    return key_for(name)


def key_for(name: str) -> int:
    """An advisory lock key (signed 64-bit) for a name: the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def lock_ids(key: int) -> dict:
    # pg_locks shows a bigint key as two oids: high 32 bits in classid, low in objid.
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return {"classid": unsigned >> 32, "objid": unsigned & 0xFFFF_FFFF}


# How long a check of the lock's session may take before the session is taken
# for lost: a silently dropped connection (half-open) never answers, and TCP
# keepalives cannot see it when something on the path still acknowledges.
CHECK_GRACE = 10.0

# Whether this session still holds the lock, asked of the lock's own session.
_HELD = """
    SELECT pg_backend_pid() = %(pid)s AND EXISTS (
        SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted
           AND objsubid = 1 AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
"""


def _key_fields(key: int) -> dict:
    # JSON readers that hold numbers as doubles (jq, JavaScript) lose an int64: the key as text too.
    return {"lock_key": key, "lock_key_str": str(key)}


def fence_key(key: int) -> int:
    """The second key: every migration session holds it shared while it lives.

    A new holder of the lock takes it exclusively once (and lets it go) before it
    migrates, so it waits until no migration session of an earlier holder that
    lost its lock is still running on the server.
    """
    return key_for(f"migration-runner-fence:{key}")


@dataclass
class Lock:
    key: int
    connection: psycopg.Connection  # the lock's session, autocommit
    pid: int
    waited: float
    # Set once the lock is known lost (by the watchdog or a failed check): why.
    lost: str | None = None
    url: URL | None = None  # the URL the lock's session was opened with (the runner's)

    def __post_init__(self) -> None:
        self._mutex = threading.Lock()

    @property
    def fence(self) -> int:
        return fence_key(self.key)

    def query(self, sql: str, params: dict | None = None, grace: float = CHECK_GRACE) -> list[tuple]:
        """Run a query on the lock's session from any thread; the session is severed if it hangs."""
        raw = self.connection
        with self._mutex:
            timer = threading.Timer(grace, database.sever, (raw,))
            timer.daemon = True
            timer.start()
            try:
                cursor = raw.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
            finally:
                timer.cancel()

    def held(self, grace: float = CHECK_GRACE, *, ask_pg_locks: bool = False) -> bool:
        """Whether this session still holds the lock.

        A session-level advisory lock goes only with an unlock (the runner issues
        none while migrating) or with its session, so the session answering with
        its own backend pid proves the lock is held. That costs the server next to
        nothing; pg_locks (`ask_pg_locks`) walks every lock of a migration holding
        thousands, and contends with it for the lock manager.
        """
        if self.lost:
            return False
        if not ask_pg_locks:
            rows = self.query("SELECT pg_backend_pid() = %(pid)s", {"pid": self.pid}, grace)
            return bool(rows and rows[0][0])
        rows = self.query(_HELD, {"pid": self.pid, **lock_ids(self.key)}, grace)
        return bool(rows and rows[0][0])


def holders(connection: psycopg.Connection, key: int) -> list[dict]:
    """Who holds the lock: pid, application_name, client address, since when."""
    return _rows(connection, _HOLDERS, lock_ids(key))


def _rows(connection: psycopg.Connection, sql: str, params: dict) -> list[dict]:
    with connection.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(sql, params).fetchall()


# A runner's migration sessions hold its fence key shared: what they are doing now.
_MIGRATING = """
    SELECT a.pid, a.state, a.wait_event_type, a.wait_event,
           extract(epoch FROM clock_timestamp() - a.query_start)::float8 AS seconds, left(a.query, 200) AS query
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.mode = 'ShareLock' AND l.granted AND l.objsubid = 1
       AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     ORDER BY a.state = 'active' DESC, a.pid
"""


def migrating(connection: psycopg.Connection, key: int) -> list[dict]:
    """The migration sessions of whoever holds the lock `key` (they hold its fence key shared)."""
    return _rows(connection, _MIGRATING, lock_ids(fence_key(key)))


def describe_holders(rows: list[dict], sessions: list[dict] = ()) -> str:
    if not rows:
        return "no session holds it now"
    if sessions:
        # The lock's own session is idle while its runner migrates: say what the migration does.
        s = sessions[0]
        waits = f", waiting on {s['wait_event_type']}:{s['wait_event']}" if s["wait_event_type"] else ""
        doing = (f"migrating: session {s['pid']} {s['state']} for {s['seconds'] or 0:.0f}s{waits}, "
                 f"{' '.join((s['query'] or '').split())!r}")
    return "; ".join(
        f"pid {r['pid']} ({r['application_name'] or '?'} from {r['client_addr'] or 'local socket'}, "
        f"connected since {r['backend_start']:%Y-%m-%d %H:%M:%S%z}, {doing if sessions else r['state']})"
        if r["backend_start"] else f"pid {r['pid']}"
        for r in rows
    )


def resolve_key(connection: psycopg.Connection, key: int | None, schema: str | None, table: str,
                x_args: list[str] | tuple[str, ...] = ()) -> int:
    if key is not None:
        return key
    database_name, current_schema = connection.execute("SELECT current_database(), current_schema()").fetchone()
    return derive_key(database_name, schema or current_schema, table, x_args)


@contextmanager
def advisory_lock(url: URL, key: int | None, timeout: float, *, schema: str | None = None,
                  table: str = "alembic_version", sleep=time.sleep,
                  second_session: psycopg.Connection | None = None,
                  x_args: list[str] | tuple[str, ...] = ()) -> Iterator[Lock]:
    """Hold the advisory lock for the body of the `with`; released on every exit path.

    `second_session`, an open connection to the same database, is closed here: if the lock
    is free at once, it first serves to tell a transaction pooler (else a new one does), so
    a runner that has to wait holds one connection, not two.
    """
    def close_spare() -> None:  # closing twice is harmless
        if second_session is not None:
            second_session.close()

    try:
        connection = sessions.connect(url)  # autocommit
    except psycopg.Error as e:
        close_spare()
        raise connection_error(url, e) from None
    try:
        connection.execute(_KEEP_SESSION).fetchall()
        key = resolve_key(connection, key, schema, table, x_args)
        pid = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        started = time.monotonic()
        last_report = [None, 0.0]

        def try_lock() -> bool:
            return connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]

        def report(state: tenacity.RetryCallState) -> None:
            close_spare()
            rows = holders(connection, key)
            who = describe_holders(rows, migrating(connection, key))
            waited = time.monotonic() - started
            # Say who holds it when that changes, and every 15 s otherwise.
            if who != last_report[0] or waited - last_report[1] >= 15:
                last_report[:] = [who, waited]
                telemetry.annotate({"migration.lock.holder": who})  # on the lock's span: who it waited for
                logger.info("waiting for lock %d, held by %s; waited %.0fs of %gs",
                            key, who, waited, timeout, extra={**_key_fields(key), "holders": rows})

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_random_exponential(multiplier=0.1, max=2),
            retry=tenacity.retry_if_result(lambda acquired: not acquired),
            before_sleep=report,
            sleep=sleep,
        )
        with telemetry.span("acquire lock", {"migration.lock.key": str(key)}) as annotate:
            try:
                retrying(try_lock)
            except tenacity.RetryError:
                rows = holders(connection, key)
                pids = ", ".join(str(row["pid"]) for row in rows) or "<pid>"
                raise LockTimeout(
                    f"lock {key} not acquired within {timeout:g}s (MIGRATE_LOCK_TIMEOUT); held by "
                    f"{describe_holders(rows, migrating(connection, key))}; if that session is stuck, end it with: "
                    f"SELECT pg_terminate_backend({pids});") from None
            lock = Lock(key=key, connection=connection, pid=pid, waited=time.monotonic() - started, url=url)
            _refuse_transaction_pooling(lock, second_session)
            close_spare()
            _wait_for_fence(connection, lock.fence, max(1.0, timeout - lock.waited), sleep)
            lock.waited = time.monotonic() - started
            annotate({"migration.lock.wait": lock.waited})
        logger.info("lock %d acquired after %.1fs", key, lock.waited, extra={**_key_fields(key), "lock_wait": round(lock.waited, 3)})
        yield lock
    finally:
        close_spare()
        _release(connection, key if isinstance(key, int) else None)


def _refuse_transaction_pooling(lock: Lock, second_session: psycopg.Connection | None) -> None:
    # Behind a transaction-mode pooler each statement may run on another
    # backend, and a session lock protects nothing: check it is really ours.
    # An idle pooler hands every client the same backend, so a second client
    # seeing our backend pid proves the sharing even without concurrent traffic.
    shared = _backend_pid(second_session, lock.url) == lock.pid
    same_backend = lock.connection.execute("SELECT pg_backend_pid()").fetchone()[0] == lock.pid
    if shared or not (same_backend and lock.held(ask_pg_locks=True)):
        raise ConfigError(
            "the advisory lock is not held by this session: the connection goes through a "
            "transaction-pooling proxy (e.g. PgBouncer pool_mode=transaction); point DATABASE_URL "
            "at PostgreSQL directly or at a session-pooled port")


def _backend_pid(session: psycopg.Connection | None, url: URL) -> int:
    """pg_backend_pid() as another client sees it: on `session`, or on a new one if it is gone."""
    if session is not None and not session.closed:
        try:
            return session.execute("SELECT pg_backend_pid()").fetchone()[0]
        except psycopg.Error:
            pass  # ended meanwhile (an idle_session_timeout, say): a new session tells as well
    with sessions.connect(url) as probe:
        return probe.execute("SELECT pg_backend_pid()").fetchone()[0]


def _wait_for_fence(connection: psycopg.Connection, fence: int, timeout: float, sleep) -> None:
    # A previous holder that lost its session may still have a migration
    # statement running on the server: wait until every such session is gone.
    def try_fence() -> bool:
        return connection.execute("SELECT pg_try_advisory_lock(%s)", (fence,)).fetchone()[0]

    def report(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            logger.warning("lock taken, but a migration session of the previous holder is still running; "
                           "waiting for it to end")

    try:
        tenacity.Retrying(stop=tenacity.stop_after_delay(timeout),
                          wait=tenacity.wait_random_exponential(multiplier=0.1, max=1),
                          retry=tenacity.retry_if_result(lambda acquired: not acquired),
                          before_sleep=report, sleep=sleep)(try_fence)
    except tenacity.RetryError:
        raise LockTimeout(f"a migration session of the previous lock holder was still running after {timeout:g}s "
                          f"(MIGRATE_LOCK_TIMEOUT)") from None
    connection.execute("SELECT pg_advisory_unlock(%s)", (fence,))


def _release(connection: psycopg.Connection, key: int | None) -> None:
    try:
        if key is not None and not connection.closed:  # closed: lost (broken) or closed by us
            connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
    except Exception as e:  # closing the session below releases it anyway
        logger.debug("unlock failed (%s); closing the session releases the lock", e)
    finally:
        connection.close()
