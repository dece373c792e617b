"""The only module that writes: stamp a baseline, upgrade to heads.

Both go through alembic with the user's own env.py, so whatever it configures
(target metadata, version table, transaction per migration) is honoured.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import tenacity
from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from psycopg import pq
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import Pool

from .errors import ConfigError, DatabaseUnreachable, RevisionFailed, RunnerError
from .lock import CHECK_GRACE, Lock, sever

logger = logging.getLogger("runner.migrate")


@dataclass
class Progress:
    """What an upgrade did so far: applied revisions and the one running now."""

    applied: list[str] = field(default_factory=list)
    running: object | None = None  # the Script being applied
    # Commits made while the running revision's upgrade() ran (alembic's autocommit_block):
    # a revision that committed part of itself did not roll back entirely.
    committed_inside: int = 0
    inside: bool = False


def stamp(config: Config, revision: str) -> None:
    """Record `revision` in the version table without running any migration."""
    command.stamp(config, revision)
    logger.info("stamped baseline %s", revision, extra={"baseline": revision})


def upgrade(config: Config, script: ScriptDirectory, progress: Progress) -> None:
    """Apply every pending revision up to the heads, logging each one."""

    def steps(current, context):
        # What command.upgrade does, with each revision timed as it runs.
        revisions = script._upgrade_revs("heads", current)
        for step in revisions:
            step.migration_fn = _timed(step.migration_fn, step.revision, progress)
        return revisions

    with EnvironmentContext(config, script, fn=steps, destination_rev="heads"):
        script.run_env()


def _timed(migration_fn, revision, progress: Progress):
    # alembic logs "Running upgrade ..." from the function's name: keep it.
    @functools.wraps(migration_fn)
    def timed_upgrade(**kwargs):
        progress.running = revision
        progress.committed_inside = 0
        started = time.monotonic()
        progress.inside = True
        try:
            migration_fn(**kwargs)
        finally:
            progress.inside = False
        seconds = time.monotonic() - started
        progress.applied.append(revision.revision)
        logger.info("applied %s (%s) in %.2fs", revision.revision, revision.doc or "", seconds,
                    extra={"revision": revision.revision, "seconds": round(seconds, 3)})

    return timed_upgrade


@contextmanager
def guarded_by(lock: Lock, *, interval: float = 0.2,
               grace: float = CHECK_GRACE) -> Iterator["Watchdog"]:
    """Migrate only while the lock's session holds the lock.

    Every connection opened inside the `with` (the runner's and env.py's own) is a
    migration session: it holds the lock's fence key shared while it lives, and a
    watchdog thread follows it. If the lock's session is lost (the server then
    releases the lock and another runner may take it), the watchdog cancels the
    statements in flight and shuts the migration sessions down, and no commit is
    let through: nothing this runner has not committed yet may be committed then.
    """
    watchdog = Watchdog(lock, interval=interval, grace=grace)

    def on_connect(dbapi_connection, record) -> None:
        if lock.lost:
            raise DatabaseUnreachable(f"refusing a new migration connection: {lock.lost}")
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        try:
            pid = dbapi_connection.execute("SELECT pg_backend_pid(), pg_advisory_lock_shared(%s)",
                                           (lock.fence,)).fetchone()[0]
        finally:
            dbapi_connection.autocommit = autocommit
        watchdog.track(pid, dbapi_connection)

    def before_commit(connection) -> None:
        try:
            held = lock.held()
        except Exception:
            held = False
        if not held:
            lock.lost = lock.lost or "the advisory lock's session was lost before a commit"
            raise LockLost(lock.lost)

    event.listen(Pool, "connect", on_connect)
    event.listen(Engine, "commit", before_commit)
    watchdog.start()
    try:
        yield watchdog
    except Exception as e:
        if lock.lost and not isinstance(e, LockLost):
            raise LockLost(lock.lost) from e
        raise
    finally:
        watchdog.stop()
        event.remove(Engine, "commit", before_commit)
        event.remove(Pool, "connect", on_connect)
    if lock.lost:
        raise LockLost(lock.lost)


class LockLost(DatabaseUnreachable):
    """The lock's session was lost while migrating; the migration was stopped."""


# pg_stat_activity for the migration sessions, with who blocks each one waiting on a lock.
_ACTIVITY = """
    SELECT a.pid, a.state, extract(epoch FROM clock_timestamp() - a.state_change)::float8,
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
      `grace` seconds: the lock is lost; cancel and sever every migration session;
    - a migration session the client waits on is idle on the server for longer
      than `grace` (the reply was lost on a half-open connection) or gone: sever it;
    - a migration session waits on a lock: remember who blocks it, so that a
      lock_timeout failure can name the blocking session after the wait is over.
    """

    def __init__(self, lock: Lock, interval: float, grace: float) -> None:
        self.lock = lock
        self.interval = interval
        self.grace = grace
        self.sessions: dict[int, object] = {}  # backend pid -> psycopg connection
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

    def _busy(self) -> dict[int, object]:
        live = {}
        for pid, conn in list(self.sessions.items()):
            if conn.closed:
                self.sessions.pop(pid, None)
            elif conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
                live[pid] = conn
        return live

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            busy = self._busy()
            # Once a second when idle; at every tick while a statement runs, to see lock waits.
            if not busy and time.monotonic() - self._last_check < 1.0:
                continue
            self._last_check = time.monotonic()
            try:
                if not self.lock.held(self.grace):
                    self._lose("the advisory lock's session no longer holds the lock")
                    return
                if self.sessions:
                    self._check_sessions(busy)
            except Exception as e:
                if self._stop.is_set():
                    return
                self._lose(f"the advisory lock's session was lost ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no answer'})")
                return

    def _check_sessions(self, busy: dict[int, object]) -> None:
        rows = self.lock.query(_ACTIVITY, {"pids": list(self.sessions)}, self.grace)
        seen = set()
        for pid, state, idle_for, blockers in rows:
            seen.add(pid)
            if blockers:
                self.blockers = blockers
            if pid in busy and state not in ("active", "fastpath function call") and idle_for > self.grace:
                logger.error("migration session %d waits for a reply the server sent %.0fs ago: "
                             "the connection is half-open; closing it", pid, idle_for)
                self._end(pid, busy[pid])
        for pid in set(busy) - seen:
            logger.error("migration session %d is gone from the server while the runner waits on it; closing it", pid)
            self._end(pid, busy[pid])

    def _end(self, pid: int, conn) -> None:
        sever(conn)
        try:
            self.lock.query("SELECT pg_terminate_backend(%s)", (pid,), self.grace)
        except Exception:
            pass

    def _lose(self, why: str) -> None:
        self.lock.lost = why
        logger.error("%s: cancelling the migration so that no two runners migrate at once", why)
        for conn in list(self.sessions.values()):
            try:
                conn.cancel_safe(timeout=3)
            except Exception:
                pass
            sever(conn)
        # The lock's session and the migration sessions may live on at the server
        # if the network dropped them silently: end them from a new connection,
        # the migration sessions first so that their work rolls back before the lock goes.
        _terminate(self.lock, list(self.sessions))
        sever(self.lock.connection.connection.dbapi_connection)


def _terminate(lock: Lock, pids: list[int]) -> None:
    import psycopg

    try:
        url = lock.connection.engine.url
        params = {**url.query, **url.translate_connect_args(username="user", database="dbname"), "connect_timeout": 3}
        with psycopg.connect(autocommit=True, **params) as conn:
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


def upgrade_retrying(engine: Engine, config: Config, script: ScriptDirectory, progress: Progress,
                     watchdog: "Watchdog", *, retries: int, read_back: Callable[[], tuple],
                     sleep=time.sleep) -> None:
    """upgrade() in a transaction; a revision that rolled back entirely on lock_timeout is retried."""

    def attempt() -> None:
        watchdog.blockers = []
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            upgrade(config, script, progress)

    def count_commit(connection) -> None:
        if progress.inside:
            progress.committed_inside += 1

    def retryable(error: BaseException) -> bool:
        return (isinstance(error, DBAPIError) and _sqlstate(error) == "55P03" and progress.committed_inside == 0
                and not watchdog.lock.lost)

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        revision = progress.running
        logger.warning("revision %s gave up waiting for a lock (lock_timeout, MIGRATE_DDL_LOCK_TIMEOUT): %s; "
                       "blocked by %s; retry %d of %d in %.1fs", revision.revision if revision else "?",
                       _database_message(error), describe_blockers(watchdog.blockers), state.attempt_number,
                       retries, state.next_action.sleep,
                       extra={"revision": revision.revision if revision else None, "attempt": state.attempt_number,
                              "blockers": watchdog.blockers})

    event.listen(Engine, "commit", count_commit)
    try:
        tenacity.Retrying(stop=tenacity.stop_after_attempt(retries + 1),
                          wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
                          retry=tenacity.retry_if_exception(retryable), before_sleep=log_retry,
                          sleep=sleep, reraise=True)(attempt)
    except DBAPIError as e:
        if _sqlstate(e) != "55P03" or watchdog.lock.lost:
            raise
        failure = explain_failure(e, progress, read_back)
        tried = f" after {retries + 1} attempts (MIGRATE_DDL_LOCK_RETRIES={retries})" if retries else ""
        raise RevisionFailed(f"{failure}{tried}; blocked by {describe_blockers(watchdog.blockers)}") from None
    finally:
        event.remove(Engine, "commit", count_commit)


def describe_blockers(blockers: list[dict]) -> str:
    if not blockers:
        return "a session that was not seen (the wait was shorter than the watchdog's sampling)"
    return "; ".join(
        f"pid {b['pid']} ({b.get('application_name') or '?'}, {b.get('state')}: "
        f"{' '.join((b.get('query') or '').split())[:200]!r})" for b in blockers)


def explain_failure(error: BaseException, progress: Progress, read_back: Callable[[], tuple]) -> RunnerError:
    """The RunnerError for an exception raised while upgrading, with where the database is now."""
    revision = progress.running
    where = f"revision {revision.revision} ({revision.doc})" if revision else "env.py, before any revision ran"
    if isinstance(error, LockLost):
        try:
            at = _revisions(read_back())
        except Exception:
            at = "unknown (the database is unreachable)"
        return LockLost(f"{error} during {where}: the migration was stopped and rolled back so that no two "
                        f"runners migrate at once; the database is at {at}")
    if isinstance(error, RunnerError):
        return error
    if isinstance(error, DBAPIError) and (error.connection_invalidated or _sqlstate(error) in (None, "")
                                          or _sqlstate(error).startswith(("08", "57P"))):
        detail = _database_message(error)
        try:
            at = _revisions(read_back())
        except Exception:
            at = "unknown (the database is unreachable)"
        return DatabaseUnreachable(f"lost the database during {where}: {detail}; the database is at {at}")
    if revision is None and not isinstance(error, DBAPIError):
        return ConfigError(f"env.py failed: {type(error).__name__}: {error}")
    detail = (f"SQLSTATE {_sqlstate(error)}: {_database_message(error)}" if isinstance(error, DBAPIError)
              else f"{type(error).__name__}: {error}")
    try:
        at = _revisions(read_back())
    except Exception as e:
        at = f"unknown ({type(e).__name__} reading it back)"
    return RevisionFailed(f"{where} failed: {detail}; the database is at {at}")


def _revisions(heads: tuple) -> str:
    return ", ".join(heads) if heads else "base (no revision)"


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None)


def _database_message(error: DBAPIError) -> str:
    diag = getattr(error.orig, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return primary or str(error.orig).strip().splitlines()[0]
