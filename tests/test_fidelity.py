"""The runner against plain `alembic upgrade heads`: same project, twin databases, same end state.

Each test builds an Alembic project with a particular env.py (tests/envs.py), migrates one
database with alembic and its twin with the runner, and compares the two (pg_dump
--schema-only and the version rows). For the runner it also checks the summary's
"applied" list against what is committed, and that no advisory lock is left.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from . import envs
from .conftest import (RUNNER_ROLE, Result, advisory_locks, run_runner, runner_env, summary, tables,
                       version_rows)
from .fidelity import Twins, version_table_rows
from .projects import Rev, add_revisions, chain, make_project, write_env

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core


# -- helpers ----------------------------------------------------------------------------------
def revisions(n: int) -> list[str]:
    """r0001..r000n, the ids of chain(n)."""
    return [f"r{i:04d}" for i in range(1, n + 1)]


def project(tmp_path, revs: list[Rev], env: str | None = None):
    """An `alembic init` project with these revisions and, if given, this env.py; returns its alembic.ini."""
    ini = make_project(tmp_path / "project", revs)
    if env is not None:
        write_env(ini.parent, env)
    return ini


def failing_at(n: int, position: int, sql: str) -> list[Rev]:
    """chain(n) whose revision at `position` (1-based) runs `sql` instead of creating its table."""
    revs = chain(n)
    revs[position - 1].sql = [sql]
    return revs


def committed(url: str) -> list[str]:
    """The chain's revisions committed in the database: base up to its version row."""
    heads = version_rows(url)
    assert len(heads) <= 1, heads
    return revisions(int(heads[0][1:])) if heads else []




def assert_runner_honest(twins: Twins, result: Result) -> None:
    """The summary's applied list is what the database committed, and no advisory lock is left."""
    assert summary(result)["applied"] == committed(twins.url("runner")), result
    assert advisory_locks(twins.postgres, twins.runner) == []


def assert_untouched(postgres, database: str) -> None:
    url = postgres.url(database)
    assert version_table_rows(postgres, database) == {}
    assert tables(url) == []


def fetch_one(url: str, sql: str) -> tuple:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchone()


# -- 1. env.py with its own engine, on each driver ----------------------------------------------
@pytest.mark.parametrize("driver", envs.driver_params())
def test_own_engine_upgrade_matches_alembic(postgres, tmp_path, driver):
    ini = project(tmp_path, chain(4), envs.own_engine(driver))
    twins = Twins.create(postgres)

    plain = twins.run_alembic(ini)
    result = twins.run_runner(ini)

    assert plain.returncode == 0, plain
    assert result.returncode == 0, result
    assert summary(result)["outcome"] == "upgraded"
    assert summary(result)["applied"] == revisions(4)
    twins.assert_same()
    assert_runner_honest(twins, result)


@pytest.mark.parametrize("driver", envs.driver_params())
def test_own_engine_failing_revision_matches_alembic(postgres, tmp_path, driver):
    ini = project(tmp_path, failing_at(4, 3, "SELECT 1/0"), envs.own_engine(driver))
    twins = Twins.create(postgres)

    plain = twins.run_alembic(ini)
    result = twins.run_runner(ini)

    assert plain.returncode != 0, plain
    assert committed(twins.url("plain")) == []  # one transaction: nothing stays
    assert result.returncode == 7, result
    assert summary(result)["exit_code"] == 7
    assert "r0003" in summary(result)["event"] and "22012" in summary(result)["event"], result
    twins.assert_same()
    assert_runner_honest(twins, result)


# -- 2. the cookbook env.py: the runner's connection, with and without transaction_per_migration --
TPM = pytest.mark.parametrize("per_migration", [False, True], ids=["one-transaction", "transaction-per-migration"])


@TPM
def test_cookbook_upgrade_matches_alembic(postgres, tmp_path, per_migration):
    ini = project(tmp_path, chain(4), envs.cookbook(transaction_per_migration=per_migration))
    twins = Twins.create(postgres)

    plain = twins.run_alembic(ini)
    result = twins.run_runner(ini)

    assert plain.returncode == 0, plain
    assert result.returncode == 0, result
    assert summary(result)["applied"] == revisions(4)
    twins.assert_same()
    assert_runner_honest(twins, result)


@TPM
def test_cookbook_failing_last_revision_matches_alembic(postgres, tmp_path, per_migration):
    # Revision 4 creates a table that revision 1 created: DuplicateTable.
    revs = failing_at(4, 4, "CREATE TABLE r_1 (id int)")
    ini = project(tmp_path, revs, envs.cookbook(transaction_per_migration=per_migration))
    twins = Twins.create(postgres)
    expected = revisions(3) if per_migration else []

    plain = twins.run_alembic(ini)
    result = twins.run_runner(ini)

    assert plain.returncode != 0, plain
    assert committed(twins.url("plain")) == expected
    assert result.returncode == 7, result
    assert summary(result)["exit_code"] == 7
    assert summary(result)["applied"] == expected, result
    twins.assert_same()
    assert_runner_honest(twins, result)


# -- 3. CREATE INDEX CONCURRENTLY in alembic's autocommit_block -------------------------------------
CONCURRENT_INDEX = [
    Rev("r0001", None, ["CREATE TABLE r_1 (id serial PRIMARY KEY, note text)"], message="create r_1"),
    Rev("r0002", "r0001", python='with op.get_context().autocommit_block():\n'
                                 '    op.execute("CREATE INDEX CONCURRENTLY r_1_note ON r_1 (note)")',
        message="index r_1 concurrently"),
    Rev("r0003", "r0002", ["CREATE TABLE r_3 (id serial PRIMARY KEY, note text)"], message="create r_3"),
]


@pytest.mark.parametrize("env", [None, envs.cookbook()], ids=["generic-template", "cookbook"])
def test_concurrent_index_in_autocommit_block_matches_alembic(postgres, tmp_path, env):
    ini = project(tmp_path, CONCURRENT_INDEX, env)
    twins = Twins.create(postgres)

    plain = twins.run_alembic(ini)
    result = twins.run_runner(ini)

    assert plain.returncode == 0, plain
    assert result.returncode == 0, result
    assert summary(result)["applied"] == revisions(3)
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'r_1_note'::regclass"
    assert fetch_one(twins.url("runner"), valid) == (True,)
    twins.assert_same()
    assert_runner_honest(twins, result)


# -- 4. the version table named only in env.py ----------------------------------------------------
ENV_BUILDERS = pytest.mark.parametrize("build", [envs.own_engine, envs.cookbook], ids=["own-engine", "cookbook"])


def _second_run_is_current(postgres, tmp_path, env: str, setup_sql: list[str], expected_rows: dict) -> None:
    ini = project(tmp_path, chain(3), env)
    twins = Twins.create(postgres, setup_sql)

    plain = twins.run_alembic(ini)
    first = twins.run_runner(ini)
    second = twins.run_runner(ini)

    assert plain.returncode == 0, plain
    assert version_table_rows(postgres, twins.plain) == expected_rows
    assert first.returncode == 0, first
    assert summary(first)["applied"] == revisions(3), first
    assert second.returncode == 0, second
    assert summary(second)["outcome"] == "current", second
    assert summary(second)["applied"] == [], second
    assert not [event for event in second.events() if "stamp" in event.lower()], second
    twins.assert_same()
    assert advisory_locks(postgres, twins.runner) == []


@ENV_BUILDERS
def test_version_table_schema_in_env_py_only(postgres, tmp_path, build):
    _second_run_is_current(postgres, tmp_path, build(version_table_schema="app"),
                           [f'CREATE SCHEMA app AUTHORIZATION "{RUNNER_ROLE}"'],
                           {"app.alembic_version": ["r0003"]})


@ENV_BUILDERS
def test_version_table_name_in_env_py_only(postgres, tmp_path, build):
    _second_run_is_current(postgres, tmp_path, build(version_table="custom_version"), [],
                           {"public.custom_version": ["r0003"]})


# -- 5. env.py that ends early or never runs the migrations -------------------------------------------
NO_RUN = "env.py returned without calling context.run_migrations()"
EARLY = {
    "sys-exit-0": (envs.exits_at_top("sys.exit(0)"), "env.py exited (sys.exit(0))"),
    "system-exit-message": (envs.exits_at_top('raise SystemExit("no migrations today")'),
                            "env.py exited (SystemExit('no migrations today'))"),
    "returns-before-connecting": (envs.returns_before_connecting(), NO_RUN),
    "configures-own-engine-no-run": (envs.configures_without_running(use_offered_connection=False), NO_RUN),
    "configures-offered-connection-no-run": (envs.configures_without_running(use_offered_connection=True), NO_RUN),
}


@pytest.mark.parametrize("env, says", EARLY.values(), ids=EARLY.keys())
def test_env_py_that_runs_no_migrations_is_exit_2(postgres, tmp_path, env, says):
    ini = project(tmp_path, chain(3), env)
    twins = Twins.create(postgres)
    termination_log = tmp_path / "termination-log"

    twins.run_alembic(ini)  # exit 0 or 1 depending on the env.py; either way nothing is written
    result = twins.run_runner(ini, MIGRATE_TERMINATION_LOG=str(termination_log))

    assert says in result.last["event"], result
    assert_untouched(postgres, twins.plain)
    assert result.returncode == 2, result
    last = summary(result)
    assert last["exit_code"] == 2 and last["applied"] == [], result
    written = json.loads(termination_log.read_text())
    assert written["exit_code"] == 2
    assert written["message"] == last["event"]
    assert {k: v for k, v in written.items() if k != "message"}.items() <= last.items()
    assert_untouched(postgres, twins.runner)
    twins.assert_same()
    assert advisory_locks(postgres, twins.runner) == []


# -- 6. session settings and the fence on every driver's sessions ------------------------------------
SETTINGS_REV = Rev("r0001", None, [
    "CREATE TABLE seen AS SELECT current_setting('application_name') AS application_name, "
    "current_setting('statement_timeout') AS statement_timeout, current_setting('lock_timeout') AS lock_timeout"])

FENCE_REV = Rev("r0001", None, [
    "CREATE TABLE fenced AS SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() "
    "AND locktype = 'advisory' AND mode = 'ShareLock' AND granted) AS held"])


@pytest.mark.parametrize("driver", envs.driver_params())
def test_migration_sessions_carry_the_settings(database_url, tmp_path, driver):
    ini = project(tmp_path, [SETTINGS_REV], envs.own_engine(driver))

    result = run_runner(runner_env(database_url, ini, MIGRATE_APPLICATION_NAME="fid-runner",
                                   MIGRATE_STATEMENT_TIMEOUT="90", MIGRATE_DDL_LOCK_TIMEOUT="1.5"))

    assert result.returncode == 0, result
    seen = fetch_one(database_url, "SELECT application_name, statement_timeout, lock_timeout FROM seen")
    assert seen == ("fid-runner", "90s", "1500ms")


@pytest.mark.parametrize("driver", envs.driver_params())
def test_migration_sessions_hold_the_fence_shared(database_url, tmp_path, driver):
    ini = project(tmp_path, [FENCE_REV], envs.own_engine(driver))

    result = run_runner(runner_env(database_url, ini))

    assert result.returncode == 0, result
    assert fetch_one(database_url, "SELECT held FROM fenced") == (True,)


# -- 7. env.py that migrates another database ----------------------------------------------------------
@pytest.mark.parametrize("driver", envs.driver_params())
def test_env_py_on_another_database_is_exit_2_and_writes_nothing(postgres, database, database_url, tmp_path,
                                                                  driver):
    other = f"t_{uuid.uuid4().hex[:12]}"
    postgres.create_database(other, RUNNER_ROLE)
    ini = project(tmp_path, chain(3), envs.own_engine(driver, database=other))

    result = run_runner(runner_env(database_url, ini))

    assert result.returncode == 2, result
    assert summary(result)["exit_code"] == 2 and summary(result)["applied"] == []
    assert_untouched(postgres, database)
    assert_untouched(postgres, other)
    assert advisory_locks(postgres, database) == [] and advisory_locks(postgres, other) == []


# -- the version table where alembic's unqualified name resolves -------------------------------------
def test_version_table_found_through_the_search_path_like_alembic(postgres, tmp_path):
    # "$user",public: once a schema named after the role exists, current_schema() is that schema, but
    # alembic still reads the existing public.alembic_version (the first visible on the search path).
    root = tmp_path / "p"
    ini = make_project(root, chain(1))
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini).returncode == 0
    assert twins.run_runner(ini).returncode == 0
    for name in (twins.plain, twins.runner):
        postgres.execute(f"CREATE SCHEMA {RUNNER_ROLE} AUTHORIZATION {RUNNER_ROLE}", database=name)
    add_revisions(root, [Rev("r0002", "r0001", ["CREATE TABLE r_2 (id int)"])])
    assert twins.run_alembic(ini).returncode == 0
    result = twins.run_runner(ini)
    assert result.returncode == 0, result.last["event"]
    assert result.last["applied"] == ["r0002"]
    assert version_table_rows(postgres, twins.runner) == {"public.alembic_version": ["r0002"]}
    twins.assert_same()
