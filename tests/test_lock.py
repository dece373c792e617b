import hashlib

import psycopg
import pytest
from sqlalchemy.engine import make_url

from runner.errors import LockTimeout
from runner.lock import advisory_lock, derive_key, holders

from .conftest import advisory_locks


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
