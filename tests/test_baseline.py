"""MIGRATE_VERIFY_BASELINE: a baseline is stamped only on a legacy schema that is what the revision builds.

Each legacy database is made by hand, in SQL, as an application that predates
Alembic made it; the baseline revision's schema is built by the runner in a
scratch database through env.py. A refusal must write nothing, and no scratch
database may outlive a run, however it ends.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from runner import baseline
from runner.cli import _raise_interrupted
from runner.errors import Interrupted

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, advisory_locks, finish, run_runner, runner_env, start_runner,
                       version_rows)
from .fidelity import schema_dump, sqlalchemy_url
from .postgres import Postgres
from .projects import Rev, make_project
from .test_cli import wait_for

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core

USERS = ("CREATE TABLE users (id serial PRIMARY KEY, email varchar(100) NOT NULL, name text)",
         "CREATE UNIQUE INDEX ix_users_email ON users (email)")
ORDERS = ("CREATE TABLE orders (id serial PRIMARY KEY, user_id integer NOT NULL REFERENCES users (id), "
          "total numeric(10, 2), CONSTRAINT uq_orders_user_total UNIQUE (user_id, total))",
          "CREATE INDEX ix_orders_user ON orders (user_id)")
REVISIONS = [
    Rev("b0001", None, list(USERS), message="users"),
    Rev("b0002", "b0001", list(ORDERS), message="orders"),
    Rev("b0003", "b0002", ["CREATE TABLE invoices (id serial PRIMARY KEY, order_id integer REFERENCES orders (id))"],
        message="invoices"),
]


@pytest.fixture
def ini(tmp_path):
    return make_project(tmp_path / "p", REVISIONS)


def legacy(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def scratch_databases(postgres) -> list[str]:
    return [row[0] for row in postgres.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'migration_runner_scratch_%'")]


def building(postgres) -> bool:
    """env.py's session in the scratch database is running the slow baseline revision."""
    return bool(postgres.execute("SELECT 1 FROM pg_stat_activity WHERE datname LIKE 'migration_runner_scratch_%' "
                                 "AND state = 'active' AND query LIKE '%pg_sleep(60)%'"))


def verifying(database_url: str, ini, **extra) -> dict:
    return runner_env(database_url, ini, MIGRATE_BASELINE_REVISION="b0002", MIGRATE_VERIFY_BASELINE="true", **extra)


def test_matching_baseline_is_stamped_then_upgraded(postgres, database, database_url, ini):
    legacy(database_url, *USERS, *ORDERS)
    result = run_runner(verifying(database_url, ini), "upgrade")
    assert result.returncode == 0, result
    assert result.last["applied"] == ["b0003"]
    assert "baseline b0002 matches the legacy schema" in result.output
    # The scratch build's revisions are not announced as if they ran here, env.py's fileConfig notwithstanding.
    assert "Running upgrade b0002 -> b0003" in result.output and "-> b0001" not in result.output, result.output
    assert version_rows(database_url) == ["b0003"]
    assert scratch_databases(postgres) == []
    assert RUNNER_PASSWORD not in result.output


@pytest.mark.parametrize("change, expected", [
    (("DROP TABLE orders",), "table orders is missing"),
    (("ALTER TABLE users DROP COLUMN name",), "column users.name is missing (baseline: text NULL)"),
    (("ALTER TABLE users ALTER COLUMN email TYPE varchar(200)",),
     "column users.email is character varying(200) NOT NULL, the baseline has character varying(100) NOT NULL"),
    (("ALTER TABLE users ALTER COLUMN email DROP NOT NULL",), "column users.email is character varying(100) NULL"),
    (("DROP INDEX ix_orders_user",), "index ix_orders_user on orders is missing"),
    (("DROP INDEX ix_users_email", "CREATE INDEX ix_users_email ON users (email)"),
     "index ix_users_email on users is USING btree (email), the baseline has UNIQUE USING btree (email)"),
    (("ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey",), "foreign key orders_user_id_fkey on orders is missing"),
    (("ALTER TABLE orders DROP CONSTRAINT uq_orders_user_total",), "unique constraint uq_orders_user_total on orders"),
    (("CREATE TABLE audit (id int)",), "table audit is not in the baseline"),
    (("ALTER TABLE orders DROP CONSTRAINT orders_pkey",), "primary key of orders is missing"),
], ids=["table", "column", "type", "nullability", "index", "unique index", "foreign key", "unique constraint",
        "extra table", "primary key"])
def test_mismatch_is_refused_with_nothing_written(postgres, database, database_url, ini, change, expected):
    legacy(database_url, *USERS, *ORDERS, *change)
    before = schema_dump(postgres, database)
    result = run_runner(verifying(database_url, ini), "upgrade")
    assert result.returncode == 6, result
    assert expected in result.last["event"], result.last["event"]
    assert "nothing written" in result.last["event"]
    # Each difference also on a line of its own.
    assert any(expected in r.get("difference", "") for r in result.records), result
    assert schema_dump(postgres, database) == before
    assert version_rows(database_url) == []
    assert scratch_databases(postgres) == []
    assert advisory_locks(postgres, database) == []


def test_without_verification_the_same_mismatch_is_stamped(database_url, ini):
    # What the setting is for: the plain stamp believes the operator and lets b0003 fail later.
    legacy(database_url, *USERS)
    result = run_runner(runner_env(database_url, ini, MIGRATE_BASELINE_REVISION="b0002"), "upgrade")
    assert result.returncode == 7, result


def test_role_without_createdb_is_told_what_to_do(postgres, database, ini):
    postgres.create_role("nocreatedb", "ncd-pw")
    postgres.execute(f'ALTER DATABASE "{database}" OWNER TO nocreatedb')
    url = postgres.url(database, "nocreatedb", "ncd-pw")
    legacy(url, *USERS, *ORDERS)
    result = run_runner(verifying(url, ini), "upgrade")
    assert result.returncode == 2, result
    assert "CREATEDB" in result.last["event"] and "MIGRATE_SCRATCH_DATABASE_URL" in result.last["event"]
    assert version_rows(url) == []


def test_given_scratch_database_is_used_and_emptied(postgres, database, database_url, ini):
    scratch = database + "_scratch"
    postgres.create_database(scratch, RUNNER_ROLE)
    scratch_url = postgres.url(scratch, RUNNER_ROLE, RUNNER_PASSWORD)
    legacy(scratch_url, "CREATE TABLE left_by_a_killed_run (id int)")
    legacy(database_url, *USERS, "CREATE TABLE orders (id int)")
    env = verifying(database_url, ini, MIGRATE_SCRATCH_DATABASE_URL=scratch_url)
    refused = run_runner(env, "upgrade")
    assert refused.returncode == 6, refused
    # The leftover was dropped before the build, or it would read as a table "not in the baseline".
    assert "left_by_a_killed_run" not in refused.output
    assert postgres.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", scratch) == [(0,)]
    legacy(database_url, "DROP TABLE orders", *ORDERS)
    done = run_runner(env, "upgrade")
    assert done.returncode == 0, done
    assert version_rows(database_url) == ["b0003"]
    assert postgres.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", scratch) == [(0,)]
    assert RUNNER_PASSWORD not in refused.output + done.output


def test_scratch_url_naming_the_migrated_database_is_refused_however_spelled(postgres, database, database_url, ini):
    legacy(database_url, *USERS, *ORDERS)
    before = schema_dump(postgres, database)
    # Another host name for the same server: only the runner's own lock, visible there, tells.
    alias = postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD, host="localhost")
    result = run_runner(verifying(database_url, ini, MIGRATE_SCRATCH_DATABASE_URL=alias), "upgrade")
    assert result.returncode == 2, result
    assert "names the database being migrated" in result.last["event"]
    assert schema_dump(postgres, database) == before  # its tables were not dropped as a scratch's would be
    assert version_rows(database_url) == []
    assert RUNNER_PASSWORD not in result.output


def test_env_py_on_the_real_database_is_stopped_even_when_the_scratch_has_its_name(tmp_path, postgres, database,
                                                                                   database_url):
    """The scratch database on another server, named as the real one: the name alone cannot tell them apart."""
    other = Postgres().start()
    try:
        other.create_role(RUNNER_ROLE, RUNNER_PASSWORD)
        other.create_database(database, RUNNER_ROLE)
        scratch_url = other.url(database, RUNNER_ROLE, RUNNER_PASSWORD)
        ini = make_project(tmp_path / "p", REVISIONS)
        env = tmp_path / "p" / "migrations" / "env.py"
        # env.py with the application's own URL baked in, as Flask-Migrate's takes the application's.
        env.write_text(env.read_text().replace(
            'config.get_section(config.config_ini_section, {})',
            f'{{"sqlalchemy.url": {sqlalchemy_url(database_url)!r}}}'))
        legacy(database_url, *USERS)  # b0002's orders table is missing: a build here would add it
        before = schema_dump(postgres, database)
        result = run_runner(verifying(database_url, ini, MIGRATE_SCRATCH_DATABASE_URL=scratch_url), "upgrade")
        assert result.returncode == 2, result
        assert "must build its engine from the URL alembic gives it" in result.last["event"]
        assert schema_dump(postgres, database) == before
        assert version_rows(database_url) == []
    finally:
        other.destroy()


def test_env_py_that_ignores_the_url_is_stopped_before_it_writes(tmp_path, postgres, database, database_url):
    ini = make_project(tmp_path / "p", REVISIONS)
    env = tmp_path / "p" / "migrations" / "env.py"
    # env.py with the application's own URL baked in: it would build the baseline on the real database.
    env.write_text(env.read_text().replace(
        'config.get_section(config.config_ini_section, {})',
        f'{{"sqlalchemy.url": {sqlalchemy_url(database_url)!r}}}'))
    legacy(database_url, *USERS, *ORDERS)
    before = schema_dump(postgres, database)
    result = run_runner(verifying(database_url, ini), "upgrade")
    assert result.returncode == 2, result
    assert "must build its engine from the URL alembic gives it" in result.last["event"]
    assert schema_dump(postgres, database) == before
    assert scratch_databases(postgres) == []


SLOW = [Rev("b0001", None, [*USERS, "SELECT pg_sleep(60)"], message="users, slowly"), *REVISIONS[1:]]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_killed_while_building_leaves_nothing_the_next_run_keeps(tmp_path, postgres, database, database_url,
                                                                 signum, code):
    ini = make_project(tmp_path / "p", SLOW)
    legacy(database_url, *USERS, *ORDERS)
    before = schema_dump(postgres, database)
    proc = start_runner(verifying(database_url, ini), "upgrade")
    try:
        # The scratch build is under way: env.py's session there sleeps in b0001.
        wait_for(lambda: building(postgres), timeout=60)
        assert len(scratch_databases(postgres)) == 1
        proc.send_signal(signum)
        result = finish(proc, timeout=60)
    finally:
        proc.kill()
    assert result.returncode == code, result
    if signum == signal.SIGTERM:
        assert scratch_databases(postgres) == []
    else:
        assert len(scratch_databases(postgres)) == 1  # what SIGKILL leaves, for the next run to clean
    assert schema_dump(postgres, database) == before
    assert version_rows(database_url) == []
    wait_for(lambda: advisory_locks(postgres, database) == [], timeout=30)

    # The next run (a retry of the Job) drops any leftover, proves the baseline and stamps it.
    ini_fast = make_project(tmp_path / "q", REVISIONS)
    started = time.monotonic()
    done = run_runner(verifying(database_url, ini_fast), "upgrade")
    assert done.returncode == 0, done
    assert time.monotonic() - started < 60
    assert version_rows(database_url) == ["b0003"]
    assert scratch_databases(postgres) == []


def test_no_verification_without_a_legacy_database(postgres, database_url, ini):
    assert run_runner(runner_env(database_url, ini), "upgrade").returncode == 0
    result = run_runner(verifying(database_url, ini), "upgrade")
    assert result.returncode == 0, result
    assert "scratch" not in result.output
    assert scratch_databases(postgres) == []


def test_a_signal_as_the_scratch_database_is_dropped_does_not_leave_it(postgres, database, database_url, monkeypatch):
    # The interruption being cleaned up after may be handled late (psycopg2 runs Python code while it
    # reports a severed session), or a second SIGTERM arrive: either way the drop it cuts short is redone.
    url = make_url(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    lock = baseline.Lock(key=42, connection=None, pid=0, waited=0.0)
    admin, dropping = baseline._admin, []

    def signalled_as_it_drops(url, statement, *args, **kwargs):
        if statement.startswith("DROP"):
            dropping.append(statement)
            if len(dropping) == 2:  # the drop after the build, not the leftover's before it
                os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler raises at the next bytecode
        return admin(url, statement, *args, **kwargs)

    monkeypatch.setattr(baseline, "_admin", signalled_as_it_drops)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with pytest.raises(Interrupted):
            with baseline.scratch_database(url, url, lock, None, 5.0) as (runner_scratch, _):
                assert scratch_databases(postgres) == [runner_scratch.database]
                raise Interrupted(signal.SIGTERM)  # as the build's handler raises it
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(dropping) == 3 and scratch_databases(postgres) == []
