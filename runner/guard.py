"""The guard that follows the lock: no migration work outlives the lock, whatever env.py's driver.

While the runner migrates, every connection the process opens through SQLAlchemy
(those env.py opens, through psycopg 3 or 2, asyncpg, pg8000, sync or async) is a
migration session (the runner's own sessions, `sessions`, do not go through
SQLAlchemy and write nothing to the migrated database). On connecting, in one
statement of plain SQL run on the connection's own cursor (no parameters, so no
paramstyle), it

- takes the lock's fence key shared, so that a later holder of the lock waits
  until this session has ended;
- proves that it reaches the database the lock protects: it must see the
  lock's session holding the lock there, otherwise the lock protects nothing
  and the runner stops (exit 2) before anything is written;
- gets the runner's session settings (application_name, timeouts), which
  drivers that ignore libpq's environment would otherwise miss.

A watchdog thread follows the lock's session. Once it is lost the migration
sessions are cut client-side and ended server-side, and SQLAlchemy's commit
event refuses every further commit. Statements in flight are seen through
SQLAlchemy's cursor events, not through any driver's state.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from . import database, sessions
from .errors import ConfigError, DatabaseUnreachable
from .lock import CHECK_GRACE, Lock, lock_ids

logger = logging.getLogger("runner.guard")


class LockLost(DatabaseUnreachable):
    """The lock's session was lost while migrating; the migration was stopped."""


@contextmanager
def guarded_by(lock: Lock, *, interval: float = 0.2, grace: float = CHECK_GRACE, progress=None,
               report_every: float = 15.0) -> Iterator["Watchdog"]:
    """Let the body of the `with` migrate only while the lock's session holds the lock.

    `progress` (migrate.Progress) tells the watchdog which revision runs since when: every
    `report_every` seconds of one revision it logs what the server says its sessions do.
    """
    watchdog = Watchdog(lock, interval=interval, grace=grace, progress=progress, report_every=report_every)

    def on_connect(dbapi_connection, record) -> None:
        if lock.lost:
            raise LockLost(f"refusing a new migration connection: {lock.lost}")
        pid = join(lock, dbapi_connection)
        record.info["runner_pid"] = pid
        watchdog.track(pid, dbapi_connection)

    def before_commit(connection) -> None:
        if not _still_held(lock):
            lock.lost = lock.lost or "the advisory lock's session was lost before a commit"
            raise LockLost(lock.lost)

    def before_execute(connection, *args) -> None:
        if lock.lost:  # a statement in an autocommit block would commit itself: none once the lock is gone
            raise LockLost(lock.lost)
        pid = _pid(connection)
        if pid is not None:
            watchdog.in_flight[pid] = time.monotonic()

    def after_execute(connection, *args) -> None:
        watchdog.in_flight.pop(_pid(connection), None)

    def on_error(context) -> None:
        if context.connection is not None:
            watchdog.in_flight.pop(_pid(context.connection), None)

    listeners = [(Pool, "connect", on_connect), (Engine, "commit", before_commit),
                 (Engine, "before_cursor_execute", before_execute), (Engine, "after_cursor_execute", after_execute),
                 (Engine, "handle_error", on_error)]
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    watchdog.start()
    global _active
    _active = watchdog
    try:
        yield watchdog
    except Exception as e:
        if lock.lost and not isinstance(e, LockLost):
            raise LockLost(lock.lost) from e
        raise
    except KeyboardInterrupt:
        # A driver that waits in Python (asyncpg's event loop) lets the signal through at once, before the
        # signal thread has cancelled its statement: cancel it here, while the lock is still held, so that
        # nothing of this run is still running on the server once the runner has exited.
        watchdog.cancel_in_flight()
        raise
    finally:
        _active = None
        watchdog.stop()
        for target, name, fn in listeners:
            event.remove(target, name, fn)
    if lock.lost:
        raise LockLost(lock.lost)


# The watchdog of the migration under way, for a signal to reach.
_active: Watchdog | None = None

# Connections a signal severs besides the migration's (`interruptible`): work outside the guard.
_interruptible: list = []


@contextmanager
def interruptible(connections: list) -> Iterator[None]:
    """Inside the `with`, a SIGTERM or SIGINT severs the DBAPI connections in `connections` (any driver,
    appended as they are made).

    For work that runs through env.py outside the guard (the baseline's scratch build), where no
    watchdog can cancel the statement on the server: severed, a driver blocked in C (psycopg2) returns
    at once, and the signal's handler runs. What the severed session leaves on the server goes with
    the scratch database it was building.
    """
    _interruptible.append(connections)
    try:
        yield
    finally:
        # By identity, not list.remove's equality: two lists still empty are equal, and a nested one's
        # exit must not take the outer one off.
        for index, registered in enumerate(_interruptible):
            if registered is connections:
                del _interruptible[index]
                break


def cancel_on_signals() -> None:
    """On SIGTERM or SIGINT, cancel the statements in flight on the server, whatever the driver.

    Python runs a signal handler only between bytecodes: a driver blocked in C (psycopg2,
    pg8000 in a socket read) would hold it back until its statement ends. The C-level
    handler writes to the wakeup fd at once; a thread reading it cancels the migration's
    statements through the lock's session, the call returns, and the handler runs.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def wait_for_signals() -> None:
        while os.read(read_fd, 16):
            watchdog = _active
            if watchdog is not None:
                watchdog.cancel_in_flight()
            for connections in list(_interruptible):
                for connection in list(connections):
                    database.sever(connection)

    threading.Thread(target=wait_for_signals, name="signal-cancel", daemon=True).start()


def join(lock: Lock, dbapi_connection) -> int:
    """Make a new connection a migration session of `lock`; returns its backend pid."""
    ids = lock_ids(lock.key)
    columns = [
        "pg_backend_pid()",
        f"pg_advisory_lock_shared({int(lock.fence)})",
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        f" AND pid = {int(lock.pid)} AND classid::bigint = {ids['classid']} AND objid::bigint = {ids['objid']}"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        "current_database()",
        *database.settings_sql(),
    ]
    try:
        pid, _, protected, name = database.select_on(dbapi_connection, columns)[:4]
    except Exception as e:
        if database.is_disconnect(e):
            raise
        raise ConfigError(f"a connection env.py opened ({database.driver_name(dbapi_connection)}) cannot be "
                          f"guarded: {type(e).__name__}: {database.first_line(e)}") from None
    if not protected and not _still_held(lock):
        lock.lost = lock.lost or "the advisory lock's session was lost before a migration connection joined"
        raise LockLost(lock.lost)
    if not protected:
        raise ConfigError(
            f"env.py connects to database {name!r} where the runner's lock is not held: the lock protects only "
            f"the database DATABASE_URL names; make env.py use sqlalchemy.url (an env.py migrating several "
            f"databases, like alembic's multidb template, is not supported)")
    return pid


def _still_held(lock: Lock) -> bool:
    """lock.held(), a session that cannot answer counting as one that lost the lock."""
    try:
        return lock.held()
    except Exception:
        return False


def _pid(connection) -> int | None:
    try:
        return connection.connection.info.get("runner_pid")
    except Exception:  # closed or invalidated meanwhile
        return None


# pg_stat_activity for the migration sessions, with who blocks each one waiting on a lock.
_ACTIVITY = """
    SELECT a.pid, a.state, extract(epoch FROM clock_timestamp() - a.state_change)::float8,
           a.wait_event_type, a.wait_event,
           CASE WHEN a.wait_event_type = 'Lock' THEN (
               SELECT coalesce(json_agg(json_build_object(
                          'pid', b.pid, 'application_name', b.application_name, 'state', b.state,
                          'query', left(b.query, 300)) ORDER BY b.pid), '[]'::json)
                 FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))) END
      FROM pg_stat_activity a WHERE a.pid = ANY (%(pids)s)
"""


class Watchdog:
    """Follows the lock's session and the migration sessions from a thread.

    - the lock's session no longer holds the lock, or does not answer within
      `grace` seconds: the lock is lost; cut and end every migration session;
    - a migration session the client has waited on for longer than `grace` is
      idle on the server for as long (the reply was lost on a half-open
      connection) or gone: cut it;
    - a migration session waits on a lock: remember who blocks it, so that a
      lock_timeout failure can name the blocking session after the wait is over.
    """

    def __init__(self, lock: Lock, interval: float, grace: float, progress=None, report_every: float = 15.0) -> None:
        self.lock = lock
        self.progress = progress
        self.report_every = report_every
        self._reported = (None, 0.0)  # (revision, seconds into it) of the last "still running" line
        self.interval = interval
        self.grace = grace
        self.sessions: dict[int, object] = {}  # backend pid -> DBAPI connection
        self.in_flight: dict[int, float] = {}  # backend pid -> when the client sent its statement
        self.blockers: list[dict] = []  # the last blocking sessions seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-watchdog", daemon=True)
        self._last_check = 0.0

    def track(self, pid: int, dbapi_connection) -> None:
        self.sessions[pid] = dbapi_connection

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self.grace + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            # A statement sent since the last tick is left alone: most take milliseconds, and a migration of
            # many quick ones would otherwise be watched (two queries) at every tick. One worth watching
            # (waiting on a lock, or its reply lost) is still in flight at the next tick.
            busy = {pid: sent for pid, sent in dict(self.in_flight).items() if now - sent >= self.interval}
            # Once a second otherwise; at every tick while a statement runs long, to see lock waits.
            if not busy and now - self._last_check < 1.0:
                continue
            self._last_check = now
            try:
                held = self.lock.held(self.grace)
            except Exception as e:
                if self._stop.is_set():
                    return
                self._lose(f"the advisory lock's session was lost ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no answer'})")
                return
            if not held:
                self._lose("the advisory lock's session no longer holds the lock")
                return
            if self.sessions:
                try:
                    self._check_sessions(busy)
                except Exception as e:  # a failed look is not a lost lock: the next tick asks again
                    logger.debug("watchdog could not read the migration sessions: %s", e)

    def _check_sessions(self, busy: dict[int, float]) -> None:
        pids = list(self.sessions)  # one snapshot: a session joining meanwhile is looked at next time
        rows = self.lock.query(_ACTIVITY, {"pids": pids}, self.grace)
        now = time.monotonic()
        self._report_progress(rows, busy, now)
        seen = set()
        for pid, state, idle_for, _, _, blockers in rows:
            seen.add(pid)
            if blockers:
                self.blockers = blockers
            waited = now - busy[pid] if pid in busy else 0.0
            # state is NULL for another role's session without pg_read_all_stats: nothing to judge by.
            if state is None or idle_for is None:
                continue
            if state not in ("active", "fastpath function call") and min(waited, idle_for) > self.grace:
                logger.error("migration session %d waits for a reply the server sent %.0fs ago: "
                             "the connection is half-open; closing it", pid, idle_for)
                self._end(pid)
        for pid in set(pids) - seen:
            if pid in busy:
                logger.error("migration session %d is gone from the server while the runner waits on it; "
                             "closing it", pid)
                self._end(pid)
            self.sessions.pop(pid, None)  # closed: nothing to follow

    def cancel_in_flight(self) -> None:
        """Cancel every migration statement in flight (pg_cancel_backend through the lock's session)."""
        pids = list(self.in_flight) or list(self.sessions)
        if not pids or self.lock.lost:
            return
        try:
            self.lock.query("SELECT pg_cancel_backend(pid) FROM unnest(%(pids)s::int[]) AS pid", {"pids": pids},
                            self.grace)
        except Exception as e:
            logger.debug("could not cancel the statements in flight: %s", e)

    def _report_progress(self, rows: list, busy: dict[int, float], now: float) -> None:
        progress = self.progress
        if progress is None or not progress.inside or progress.running is None:
            return
        revision, seconds = progress.running, now - progress.started
        last_revision, last_seconds = self._reported
        due = last_seconds + self.report_every if last_revision is revision else self.report_every
        if seconds < due:
            return
        self._reported = (revision, seconds)
        sessions = []
        for pid, state, _, wait_type, wait_event, blockers in rows:
            if pid not in busy:
                continue
            line = f"session {pid} {state}" + (f", waits on {wait_type}:{wait_event}" if wait_type else "")
            if blockers:
                line += ", blocked by " + describe_blockers(blockers)
            sessions.append(line)
        logger.info("revision %s still running after %.0fs: %s", revision.revision, seconds,
                    "; ".join(sessions) or "no statement in flight", extra={"revision": revision.revision,
                                                                               "seconds": round(seconds, 1)})

    def _end(self, pid: int) -> None:
        database.sever(self.sessions.get(pid))
        try:
            self.lock.query("SELECT pg_terminate_backend(%s)", (pid,), self.grace)
        except Exception:
            pass

    def _lose(self, why: str) -> None:
        self.lock.lost = why
        logger.error("%s: cancelling the migration so that no two runners migrate at once", why)
        # Cut client-side first: a call blocked on a migration session fails at once, whatever
        # the driver. The sessions may live on at the server if the network dropped them
        # silently: end them from a new connection, the migration sessions first so that
        # their work rolls back before the lock goes.
        for connection in list(self.sessions.values()):
            database.sever(connection)
        _terminate(self.lock, list(self.sessions))
        database.sever(self.lock.connection)


def describe_blockers(blockers: list[dict]) -> str:
    """The sessions a migration session waits on: pid, application, state and query."""
    if not blockers:
        return "a session that was not seen (the wait was shorter than the watchdog's sampling)"
    return "; ".join(
        f"pid {b['pid']} ({b.get('application_name') or '?'}, {b.get('state')}: "
        f"{' '.join((b.get('query') or '').split())[:200]!r})" for b in blockers)


def _terminate(lock: Lock, pids: list[int]) -> None:
    try:
        # The lock's URL (a multi-host one's list too), aimed at the server the lock's session is on.
        with sessions.connect(lock.url, connect_timeout=3, **_server_of(lock)) as conn:
            for group in (pids, [lock.pid]):
                if not group:
                    continue
                conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (group,))
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY (%s)", (group,)).fetchone()[0]:
                    time.sleep(0.1)
    except Exception as e:
        logger.warning("could not end this runner's sessions on the server (%s: %s): the server ends them "
                       "when it notices the connection is gone", type(e).__name__, str(e).strip())


def _server_of(lock: Lock) -> dict:
    """host and port of the server the lock's session reached: of a multi-host URL's, the one that matters."""
    try:
        reached = database.server_reached(lock.connection)
    except Exception:  # closed meanwhile: the URL's list it is
        reached = None
    return {"host": reached[0], "port": reached[1]} if reached else {}
