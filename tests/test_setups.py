"""Every way people set up Alembic: templates, pyproject.toml, -x and -n, driver URLs, multidb, and what a user sees.

Where plain alembic can run the same setup, the same project runs once with
`alembic` and once with the runner on twin databases, and the two must end alike.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config

from .conftest import (RUNNER, RUNNER_ROLE, advisory_locks, finish, run_runner, runner_env, start_runner, tables,
                       version_rows)
from .fidelity import Twins, run_alembic, sqlalchemy_url
from .postgres import Postgres
from .projects import Rev, add_revisions, chain, make_project
from .test_cli import running_query, wait_for

# A revision that records which driver env.py's connection uses.
RECORD_DRIVER = Rev("r0002", "r0001", python='''
op.execute("CREATE TABLE drv (d text)")
op.execute(sa.text("INSERT INTO drv VALUES (:d)").bindparams(d=op.get_bind().dialect.driver))
''')


def driver_used(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT d FROM drv").fetchone()[0]


# -- templates --------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["generic", "async"])
def test_template_matches_alembic(postgres, tmp_path, template):
    ini = make_project(tmp_path / "p", chain(3), template=template)
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini).returncode == 0
    result = twins.run_runner(ini)
    assert result.returncode == 0, result
    assert result.last["applied"] == ["r0001", "r0002", "r0003"]
    twins.assert_same()


@pytest.mark.parametrize("template", ["pyproject", "pyproject_async"])
@pytest.mark.parametrize("where", ["beside alembic.ini", "ALEMBIC_CONFIG names pyproject.toml", "working directory"])
def test_pyproject_template_is_found_as_alembic_finds_it(postgres, tmp_path, template, where):
    root = tmp_path / "p"
    ini = make_project(root, chain(2), template=template)
    # prepend_sys_path (["."] in the template) must be honoured: env.py imports a module of the project.
    (root / "project_settings.py").write_text("SCHEMA_NOTE = 'from the project'\n")
    env = root / "migrations" / "env.py"
    env.write_text("import project_settings\n" + env.read_text())
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini).returncode == 0
    options, cwd = {"ALEMBIC_CONFIG": str(ini)}, root
    if where == "beside alembic.ini":
        # From elsewhere, as a container's entrypoint runs: prepend_sys_path "." is the working
        # directory for alembic too, so the module comes from PYTHONPATH here.
        cwd, options["PYTHONPATH"] = tmp_path, str(root)
    elif where == "ALEMBIC_CONFIG names pyproject.toml":
        options["ALEMBIC_CONFIG"] = str(root / "pyproject.toml")
    else:
        options.pop("ALEMBIC_CONFIG")
    env_vars = runner_env(twins.url("runner"), **options)
    result = run_runner(env_vars, cwd=cwd)
    assert result.returncode == 0, result
    assert result.last["applied"] == ["r0001", "r0002"]
    twins.assert_same()


def test_multidb_template_is_refused_naming_it(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(1), template="multidb")
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 2, result
    assert "multidb" in result.last["event"]
    assert version_rows(database_url) == [] and tables(database_url) == []


# -- -x and -n ----------------------------------------------------------------------------
X_ENV_PY = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
x = context.get_x_argument(as_dictionary=True)
schema = x["tenant"]  # required, as in schema-per-tenant projects
engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
with engine.connect() as connection:
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    connection.exec_driver_sql(f"SET search_path TO {schema}")
    connection.commit()
    context.configure(connection=connection, version_table_schema=schema)
    with context.begin_transaction():
        context.run_migrations()
'''


def x_project(tmp_path: Path) -> Path:
    ini = make_project(tmp_path / "p", chain(2))
    (tmp_path / "p" / "migrations" / "env.py").write_text(X_ENV_PY)
    return ini


@pytest.mark.parametrize("how", ["ALEMBIC_X_ARGS", "-x option"])
def test_x_arguments_reach_env_py_as_with_alembic_x(postgres, tmp_path, how):
    ini = x_project(tmp_path)
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini, "-x", "tenant=acme", "-x", "region=eu", "upgrade", "heads").returncode == 0
    if how == "ALEMBIC_X_ARGS":
        result = twins.run_runner(ini, ALEMBIC_X_ARGS="tenant=acme  region=eu")
    else:
        result = run_runner(runner_env(twins.url("runner"), ini), "-x", "tenant=acme", "-x", "region=eu")
    assert result.returncode == 0, result
    assert version_rows(twins.url("runner"), "acme.alembic_version") == ["r0002"]
    twins.assert_same()


def test_a_missing_x_argument_is_exit_2_with_a_summary(database_url, tmp_path):
    result = run_runner(runner_env(database_url, x_project(tmp_path)))
    assert result.returncode == 2, result
    assert "KeyError" in result.last["event"] and "tenant" in result.last["event"]
    assert result.last["command"] == "upgrade"


def section_project(tmp_path: Path) -> Path:
    ini = make_project(tmp_path / "p", chain(2))
    text = ini.read_text().replace("[alembic]", "[app]", 1)
    ini.write_text("[alembic]\nscript_location = %(here)s/nowhere\n\n" + text)
    return ini


@pytest.mark.parametrize("how", ["ALEMBIC_SECTION", "-n option"])
def test_a_named_section_is_used_as_with_alembic_n(postgres, tmp_path, how):
    ini = section_project(tmp_path)
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini, "-n", "app", "upgrade", "heads").returncode == 0
    if how == "ALEMBIC_SECTION":
        result = twins.run_runner(ini, ALEMBIC_SECTION="app")
    else:
        result = run_runner(runner_env(twins.url("runner"), ini), "-n", "app", "upgrade")
    assert result.returncode == 0, result
    twins.assert_same()


def test_a_section_without_script_location_is_named(database_url, tmp_path):
    result = run_runner(runner_env(database_url, section_project(tmp_path), ALEMBIC_SECTION="missing"))
    assert result.returncode == 2, result
    assert "[missing]" in result.last["event"] and "ALEMBIC_SECTION" in result.last["event"]
    assert "it has: alembic, app" in result.last["event"]


# -- driver URLs ---------------------------------------------------------------------------
@pytest.mark.parametrize("driver, template", [("asyncpg", "async"), ("psycopg_async", "async"),
                                              ("psycopg2", "generic"), ("pg8000", "generic")])
def test_driver_url_is_what_env_py_receives(postgres, tmp_path, driver, template):
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["CREATE TABLE r_1 (id int)"]), RECORD_DRIVER],
                       template=template)
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini, driver=driver).returncode == 0
    result = run_runner(runner_env(sqlalchemy_url(twins.url("runner"), driver), ini))
    assert result.returncode == 0, result
    assert driver_used(twins.url("runner")) == driver_used(twins.url("plain")) == driver.removesuffix("_async")
    twins.assert_same()


# -- tables created outside alembic: MIGRATE_BASELINE_REVISION=base (test_cli) --------------

# -- what a user sees ------------------------------------------------------------------------
def test_a_message_over_several_lines_is_one_line_in_text_logs(database_url, tmp_path):
    rev = Rev("r0001", None, ["CREATE TABLE r_1 (id int)"], message="add r_1\n\nWhy: reports need it.\nTicket 42.")
    ini = make_project(tmp_path / "p", [rev])
    result = run_runner(runner_env(database_url, ini, MIGRATE_LOG_FORMAT="text"))
    assert result.returncode == 0, result
    lines = result.output.splitlines()
    assert lines and all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines
    assert any("add r_1" in line for line in lines) and not any("Ticket 42" in line for line in lines)


def test_a_short_password_does_not_mangle_the_logs(postgres, database, project):
    postgres.create_role("shortpw", "up")
    postgres.execute(f'GRANT ALL ON DATABASE "{database}" TO shortpw')
    postgres.execute("GRANT ALL ON SCHEMA public TO shortpw", database=database)
    url = postgres.url(database, "shortpw", "up")
    result = run_runner(runner_env(url, project, MIGRATE_LOG_FORMAT="text"))
    assert result.returncode == 0, result
    assert "upgraded:" in result.output and "***grade" not in result.output
    assert ":up@" not in result.output


@pytest.mark.parametrize("password", ["p@ss", "50%off"])
def test_an_unencoded_password_is_named_before_connecting(postgres, database, project, password):
    url = f"postgresql://runner:{password}@{postgres.host}:{postgres.port}/{database}"
    started = time.monotonic()
    result = run_runner(runner_env(url, project, MIGRATE_WAIT_TIMEOUT="60"))
    assert result.returncode == 2, result
    assert time.monotonic() - started < 15
    assert "percent-encode" in result.last["event"]
    assert password not in result.output and "ss@" not in result.output


def test_a_long_revision_says_it_is_still_running_and_what_it_waits_on(database_url, tmp_path, postgres, database):
    root = tmp_path / "p"
    ini = make_project(root, [Rev("r0001", None, ["CREATE TABLE busy (id int)"])])
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    # The next revision sleeps, then alters a table another session holds a lock on.
    add_revisions(root, [Rev("r0002", "r0001", ["SELECT pg_sleep(2.5)", "ALTER TABLE busy ADD c int"])])
    blocker = psycopg.connect(database_url)
    blocker.execute("LOCK TABLE busy IN ACCESS SHARE MODE")
    proc = start_runner(runner_env(database_url, ini, MIGRATE_PROGRESS_INTERVAL="1"))
    try:
        wait_for(lambda: running_query(postgres, database, "ALTER TABLE busy"), timeout=30)
        time.sleep(2.5)
    finally:
        blocker.close()
    result = finish(proc, timeout=60)
    assert result.returncode == 0, result
    still = [r for r in result.records if "still running" in r["event"]]
    assert len(still) >= 2, result
    assert any("PgSleep" in r["event"] for r in still), still
    assert any("waits on Lock" in r["event"] and "blocked by pid" in r["event"] for r in still), still
    assert all(r["revision"] == "r0002" for r in still)


def test_a_waiting_runner_calls_a_migrating_holder_migrating(database_url, tmp_path, postgres, database):
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["SELECT pg_sleep(6)"])])
    first = start_runner(runner_env(database_url, ini))
    wait_for(lambda: running_query(postgres, database, "pg_sleep"), timeout=30)
    second = run_runner(runner_env(database_url, ini), timeout=60)
    finish(first)
    waiting = [r["event"] for r in second.records if r["event"].startswith("waiting for lock")]
    assert waiting, second
    assert "migrating" in waiting[0] and "pg_sleep(6)" in waiting[0], waiting[0]
    assert ", idle)" not in waiting[0], waiting[0]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_runner_and_its_stack(flag):
    proc = subprocess.run([RUNNER, flag], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for name in ("migration-runner", "alembic", "SQLAlchemy", "psycopg"):
        assert re.search(rf"{name} \d+\.\d+", proc.stdout), proc.stdout


def test_an_unknown_option_is_a_json_line_in_json_mode(project):
    proc = subprocess.run([RUNNER, "--frobnicate"], capture_output=True, text=True, timeout=30,
                          env=runner_env("postgresql://u@h/db", project))
    assert proc.returncode == 2
    records = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert records and "--frobnicate" in records[-1]["event"], records


def test_the_lock_key_is_also_a_string_in_json(database_url, project):
    result = run_runner(runner_env(database_url, project, MIGRATE_LOCK_KEY="-9223372036854775807"))
    assert result.returncode == 0, result
    acquired = next(r for r in result.records if "acquired" in r["event"])
    assert acquired["lock_key"] == -9223372036854775807 and acquired["lock_key_str"] == "-9223372036854775807"
