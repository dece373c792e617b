"""The guard, per driver: every connection opened while migrating is a migration session of the lock."""

import asyncio
import os
import threading
import time

import psycopg
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from runner import database
from runner.errors import ConfigError, DatabaseUnreachable
from runner.guard import guarded_by
from runner.lock import advisory_lock

from .envs import FUTURE, driver_params

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core

DRIVERS = driver_params(["psycopg", "psycopg2", "pg8000", "asyncpg", "psycopg_async"])
ASYNC = {"asyncpg", "psycopg_async"}

# What a connection sees of itself: its settings and whether it holds an advisory lock shared.
SELF = text("SELECT current_setting('application_name'), current_setting('statement_timeout'), "
            "EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' "
            "AND mode = 'ShareLock' AND granted)")


@pytest.fixture(autouse=True)
def session_options():
    """The runner's session options for this test only (they live in the process's environment)."""
    saved = {name: os.environ.get(name) for name in ("PGAPPNAME", "PGOPTIONS")}
    database.set_session_options("guard-test", statement_timeout=90000)
    yield
    database._session.clear()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run_on(url: str, driver: str, work):
    """`work(connection)` on a new engine of `driver` (async drivers through run_sync), engine disposed after."""
    sa_url = make_url(url).set(drivername=f"postgresql+{driver}")
    if driver not in ASYNC:
        engine = create_engine(sa_url, poolclass=pool.NullPool, **FUTURE)
        try:
            with engine.connect() as connection:
                return work(connection)
        finally:
            engine.dispose()

    async def main():
        engine = create_async_engine(sa_url, poolclass=pool.NullPool)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def lock_url(database_url: str):
    return make_url(database_url).set(drivername="postgresql+psycopg")


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_driver_joins_as_a_migration_session(database_url, driver):
    with advisory_lock(lock_url(database_url), 101, timeout=5) as lock, guarded_by(lock) as watchdog:
        app, statement_timeout, holds_fence = run_on(database_url, driver, lambda c: tuple(c.execute(SELF).one()))
        assert len(watchdog.sessions) == 1
    assert (app, statement_timeout, holds_fence) == ("guard-test", "90s", True)


@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_a_connection_to_another_database_is_refused_before_any_statement(database_url, postgres, driver):
    name = f"other_{driver}"
    postgres.create_database(name, "runner")
    other = database_url.rsplit("/", 1)[0] + f"/{name}"
    with advisory_lock(lock_url(database_url), 102, timeout=5) as lock, guarded_by(lock):
        with pytest.raises(ConfigError, match=f"env.py connects to database '{name}' where the runner's lock "
                                              "is not held"):
            run_on(other, driver, lambda c: c.execute(text("CREATE TABLE must_not_exist (id int)")))
    assert postgres.execute("SELECT to_regclass('must_not_exist')", database=name) == [(None,)]


@pytest.mark.parametrize("driver", DRIVERS)
def test_no_commit_once_the_lock_session_is_gone(database_url, postgres, driver):
    def work(connection):
        connection.execute(text(f"CREATE TABLE committed_while_held_{driver} (id int)"))
        connection.commit()
        connection.execute(text(f"CREATE TABLE must_not_commit_{driver} (id int)"))
        postgres.execute("SELECT pg_terminate_backend(%s)", params=(lock.pid,))
        connection.commit()

    with advisory_lock(lock_url(database_url), 103, timeout=5) as lock:
        with pytest.raises(DatabaseUnreachable, match="advisory lock.s session was lost"):
            with guarded_by(lock):
                run_on(database_url, driver, work)
    with psycopg.connect(database_url) as conn:
        names = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert f"committed_while_held_{driver}" in names and f"must_not_commit_{driver}" not in names


@pytest.mark.parametrize("driver", DRIVERS)
def test_losing_the_lock_cuts_a_statement_in_flight_whatever_the_driver(database_url, postgres, driver):
    def kill_lock_soon(pid):
        time.sleep(1.5)
        postgres.execute("SELECT pg_terminate_backend(%s)", params=(pid,))

    started = time.monotonic()
    with advisory_lock(lock_url(database_url), 104, timeout=5) as lock:
        threading.Thread(target=kill_lock_soon, args=(lock.pid,), daemon=True).start()
        with pytest.raises((DatabaseUnreachable, DBAPIError)):
            with guarded_by(lock):
                run_on(database_url, driver, lambda c: c.execute(text("SELECT pg_sleep(60)")))
    assert time.monotonic() - started < 20
    rows = postgres.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'")
    assert rows == [(0,)]


def test_a_connection_joining_after_the_lock_is_lost_is_a_lost_lock_not_a_wrong_database(database_url, postgres):
    # Before the watchdog's next look (an hour away here), the connection itself finds the lock gone.
    with advisory_lock(lock_url(database_url), 105, timeout=5) as lock:
        postgres.execute("SELECT pg_terminate_backend(%s)", params=(lock.pid,))
        with pytest.raises(DatabaseUnreachable, match="lost before a migration connection joined"):
            with guarded_by(lock, interval=3600):
                run_on(database_url, "psycopg2", lambda c: c.execute(text("SELECT 1")))


def test_a_nested_interruptible_leaves_the_outer_connections_registered():
    from runner import guard

    outer, inner = [], []  # equal while both are empty: list.remove would take the outer one off
    with guard.interruptible(outer):
        with guard.interruptible(inner):
            assert guard._interruptible[-2:] == [outer, inner]
        assert len(guard._interruptible) >= 1 and guard._interruptible[-1] is outer
        outer.append("a connection made after the inner block ended")
        assert any(registered is outer for registered in guard._interruptible)
    assert not any(registered is outer or registered is inner for registered in guard._interruptible)
