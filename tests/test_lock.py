import hashlib

import psycopg
import pytest
from sqlalchemy.engine import make_url

from runner import sessions
from runner.errors import LockTimeout
from runner.lock import advisory_lock, derive_key, holders

from .conftest import advisory_locks

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core


def url(text: str):
    return make_url(text).set(drivername="postgresql+psycopg")


def test_derived_key_follows_the_documented_formula():
    digest = hashlib.sha256(b"migration-runner:shop:public.alembic_version").digest()
    assert derive_key("shop", "public", "alembic_version") == int.from_bytes(digest[:8], "big", signed=True)
    keys = {derive_key("shop", "public", "alembic_version"), derive_key("shop", "public", "billing_version"),
            derive_key("shop", "billing", "alembic_version"), derive_key("other", "public", "alembic_version")}
    assert len(keys) == 4 and all(-2**63 <= k < 2**63 for k in keys)


def test_lock_is_held_inside_and_released_after(database_url, postgres, database):
    with advisory_lock(url(database_url), None, timeout=5) as lock:
        assert lock.held()
        assert [row[0] for row in advisory_locks(postgres, database)] == [lock.pid]
        assert lock.key == derive_key(database, "public", "alembic_version")
    assert advisory_locks(postgres, database) == []


def test_lock_is_released_when_the_body_raises(database_url, postgres, database):
    with pytest.raises(RuntimeError):
        with advisory_lock(url(database_url), 7, timeout=5):
            raise RuntimeError("boom")
    assert advisory_locks(postgres, database) == []


def test_waits_by_polling_then_times_out_naming_the_holder(database_url):
    sleeps = []
    with psycopg.connect(database_url, autocommit=True, application_name="holder-app") as other:
        other.execute("SELECT pg_advisory_lock(99)")
        holder_pid = other.info.backend_pid
        with pytest.raises(LockTimeout) as error:
            with advisory_lock(url(database_url), 99, timeout=0.5, sleep=sleeps.append):
                pass
    assert f"pid {holder_pid}" in str(error.value) and "holder-app" in str(error.value)
    assert "pg_terminate_backend" in str(error.value)
    assert sleeps and max(sleeps) <= 2.0


def test_holders_reports_pid_application_and_client(database_url):
    with psycopg.connect(database_url, autocommit=True, application_name="holder-app") as other:
        other.execute("SELECT pg_advisory_lock(-5)")
        with advisory_lock(url(database_url), 6, timeout=5) as lock:
            rows = holders(lock.connection, -5)
    assert len(rows) == 1 and rows[0]["application_name"] == "holder-app"
    assert rows[0]["client_addr"] == "127.0.0.1" and rows[0]["backend_start"] is not None


def test_a_lost_lock_session_is_noticed(database_url, postgres):
    with advisory_lock(url(database_url), 11, timeout=5) as lock:
        postgres.execute("SELECT pg_terminate_backend(%s)", params=(lock.pid,))
        with pytest.raises(Exception):
            lock.held()


def session_of(database_url: str):
    """A session as the wait hands it to the lock: one of the runner's own."""
    return sessions.connect(url(database_url))


def _session_pid(connection) -> int:
    return connection.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_a_second_session_given_is_used_for_the_pooler_check_then_closed(database_url, postgres):
    second = session_of(database_url)
    second_pid = _session_pid(second)
    with advisory_lock(url(database_url), 21, timeout=5, second_session=second) as lock:
        assert second.closed and lock.held()
        alive = {row[0] for row in postgres.execute("SELECT pid FROM pg_stat_activity")}
    assert second_pid not in alive and lock.pid in alive


def test_a_waiter_closes_the_second_session_before_it_waits(database_url, postgres):
    second = session_of(database_url)
    second_pid = _session_pid(second)
    seen = []

    def sleep(seconds: float) -> None:
        seen.append({row[0] for row in postgres.execute("SELECT pid FROM pg_stat_activity")})

    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(22)")
        with pytest.raises(LockTimeout):
            with advisory_lock(url(database_url), 22, timeout=0.3, sleep=sleep, second_session=second):
                pass
    assert seen and all(second_pid not in alive for alive in seen) and second.closed



def test_a_second_session_ended_meanwhile_is_replaced_by_a_new_one(database_url, postgres, database):
    second = session_of(database_url)
    postgres.execute("SELECT pg_terminate_backend(%s)", params=(_session_pid(second),))
    with advisory_lock(url(database_url), 23, timeout=5, second_session=second) as lock:
        assert lock.held() and second.closed
        assert [row[0] for row in advisory_locks(postgres, database)] == [lock.pid]
    assert advisory_locks(postgres, database) == []
