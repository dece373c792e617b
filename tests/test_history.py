"""MIGRATE_HISTORY: a row per run and per revision, written with the version change; `verify` catches edits.

Every case reads the history table back from a real server and compares it with
what the run did (the version table, the script files' sha256), so that each
fails without the feature: with no history table, no row is there to read.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import psycopg
import pytest

from runner import history

from . import envs
from .conftest import RUNNER_PASSWORD, finish, run_runner, runner_env, start_runner, tables, version_rows
from .fidelity import Twins, run_alembic, sqlalchemy_url
from .projects import Rev, chain, make_project, write_env
from .test_docs import README

HISTORY = {"MIGRATE_HISTORY": "true"}

# The chain's tables as models, for `verify` and `alembic check`.
MODELS = '''
import sqlalchemy as sa

target_metadata = sa.MetaData()
for i in (1, 2, 3):
    sa.Table(f"r_{i}", target_metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.Text))
'''


def readme_include_name() -> str:
    """The README's one line for include_schemas=True projects, as it is printed there."""
    [line] = [line.strip() for line in README.read_text().splitlines() if "include_name=lambda" in line]
    return line.removesuffix(")")


def rows(url: str, entry: str) -> list[dict]:
    with psycopg.connect(url) as conn:
        cursor = conn.execute("SELECT * FROM migration_runner.history WHERE entry = %s ORDER BY id", (entry,))
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def sha256(ini: Path, revision: str) -> str:
    return hashlib.sha256((ini.parent / "migrations" / "versions" / f"{revision}.py").read_bytes()).hexdigest()


def models_project(root: Path, revisions: list[Rev], readme_filter: bool = False, **configure) -> Path:
    ini = make_project(root, revisions)
    source = envs.own_engine(**configure).replace("target_metadata = None", MODELS)
    if readme_filter:
        source = source.replace("include_schemas=True", f"include_schemas=True, {readme_include_name()}")
        assert "include_name=lambda" in source
    write_env(root, source)
    return ini


def test_upgrade_records_the_run_and_each_revision_and_a_no_op_records_nothing(database_url, project):
    env = runner_env(database_url, project, MIGRATE_IMAGE="registry.example/app:42", **HISTORY)
    result = run_runner(env)
    assert result.returncode == 0, result
    [run] = rows(database_url, "run")
    assert (run["command"], run["outcome"], run["exit_code"]) == ("upgrade", "upgraded", 0)
    assert (run["from_revisions"], run["to_revisions"]) == ("", "r0003")
    assert run["image"] == "registry.example/app:42" and run["host"]
    assert run["ended_at"] >= run["started_at"]
    steps = rows(database_url, "revision")
    assert [(s["action"], s["revision"], s["run_id"]) for s in steps] == [
        ("applied", f"r000{i}", run["run_id"]) for i in (1, 2, 3)]
    for step in steps:
        assert step["sha256"] == sha256(project, step["revision"])
        assert step["script"] == f"versions/{step['revision']}.py"
        assert step["seconds"] >= 0 and step["version_table"] == "alembic_version"

    # A no-op (every pod start) writes nothing: the history stays the runs that changed something.
    again = run_runner(env)
    assert again.returncode == 0 and again.last["outcome"] == "current", again
    assert len(rows(database_url, "run")) == 1 and len(rows(database_url, "revision")) == 3

    shown = run_runner(env, "history", "--limit", "5")
    assert shown.returncode == 0, shown
    [listed] = [r for r in shown.records if r.get("event") == "history"]
    assert listed["run_id"] == run["run_id"] and listed["to_revision"] == ["r0003"]
    assert [r["revision"] for r in listed["revisions"]] == ["r0001", "r0002", "r0003"]
    text = run_runner({**env, "MIGRATE_LOG_FORMAT": "text"}, "history")
    assert text.returncode == 0 and "upgrade upgraded (exit 0)" in text.stdout, text
    assert "applied r0002 (versions/r0002.py" in text.stdout


def test_downgrade_records_the_reverted_revisions(database_url, project):
    env = runner_env(database_url, project, **HISTORY)
    assert run_runner(env).returncode == 0
    result = run_runner(env, "downgrade", "r0001")
    assert result.returncode == 0, result
    runs = rows(database_url, "run")
    assert [(r["command"], r["outcome"], r["from_revisions"], r["to_revisions"]) for r in runs] == [
        ("upgrade", "upgraded", "", "r0003"), ("downgrade", "downgraded", "r0003", "r0001")]
    reverted = [(s["action"], s["revision"]) for s in rows(database_url, "revision") if s["run_id"] == runs[1]["run_id"]]
    assert reverted == [("reverted", "r0003"), ("reverted", "r0002")]
    newest = run_runner(env, "history", "--limit", "1")
    assert [r["command"] for r in newest.records if r.get("event") == "history"] == ["downgrade"], newest


def test_a_baseline_stamp_is_recorded(database_url, project):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE r_1 (id serial PRIMARY KEY, note text)")
    result = run_runner(runner_env(database_url, project, MIGRATE_BASELINE_REVISION="r0001", **HISTORY))
    assert result.returncode == 0, result
    assert [(s["action"], s["revision"]) for s in rows(database_url, "revision")] == [
        ("stamped", "r0001"), ("applied", "r0002"), ("applied", "r0003")]


@pytest.mark.parametrize("per_migration", [True, False], ids=["transaction_per_migration", "one_transaction"])
def test_a_failing_run_records_what_committed_and_that_it_failed(tmp_path, database_url, per_migration):
    revs = chain(3)
    revs[2].sql = ["SELECT 1/0"]
    ini = make_project(tmp_path / "p", revs)
    write_env(ini.parent, envs.own_engine(transaction_per_migration=per_migration))
    result = run_runner(runner_env(database_url, ini, **HISTORY))
    assert result.returncode == 7, result
    committed = ["r0001", "r0002"] if per_migration else []
    assert version_rows(database_url) == committed[-1:]
    [run] = rows(database_url, "run")
    assert (run["outcome"], run["exit_code"], run["to_revisions"]) == ("RevisionFailed", 7, " ".join(committed[-1:]))
    assert [s["revision"] for s in rows(database_url, "revision")] == committed


def test_concurrent_runners_record_each_revision_once(tmp_path, database_url):
    revs = chain(3)
    revs[1].sql.append("SELECT pg_sleep(2)")
    ini = make_project(tmp_path / "p", revs)
    env = runner_env(database_url, ini, **HISTORY)
    procs = [start_runner(env) for _ in range(2)]
    results = [finish(proc) for proc in procs]
    assert [r.returncode for r in results] == [0, 0], results
    assert sorted(r.last["outcome"] for r in results) == ["current", "upgraded"]
    assert [s["revision"] for s in rows(database_url, "revision")] == ["r0001", "r0002", "r0003"]
    assert len(rows(database_url, "run")) == 1


@pytest.mark.parametrize("case", ["no CREATE", "SELECT only"])
def test_a_role_that_cannot_write_the_history_gets_a_warning_and_the_upgrade_goes_on(postgres, project, case):
    name, role = f"t_{uuid.uuid4().hex[:12]}", f"nocreate_{uuid.uuid4().hex[:8]}"
    postgres.create_role(role, RUNNER_PASSWORD)
    postgres.create_database(name)  # owned by the superuser: the role may not CREATE SCHEMA in it
    postgres.execute(f'GRANT CREATE, USAGE ON SCHEMA public TO "{role}"', database=name)
    if case == "SELECT only":  # made by its owner, readable but not writable by the role
        postgres.execute("CREATE SCHEMA migration_runner", database=name)
        postgres.execute(history._DDL.format(table=history.qualified("migration_runner")), database=name)
        postgres.execute(f'GRANT USAGE ON SCHEMA migration_runner TO "{role}"; '
                         f'GRANT SELECT ON migration_runner.history TO "{role}"', database=name)
    url = postgres.url(name, role, RUNNER_PASSWORD)
    result = run_runner(runner_env(url, project, **HISTORY))
    assert result.returncode == 0, result
    [warning] = [r for r in result.records if "MIGRATE_HISTORY" in r.get("event", "")]
    assert warning["level"] == "warning", warning
    assert ("cannot create" if case == "no CREATE" else "needs USAGE on the schema") in warning["event"], warning
    assert version_rows(url) == ["r0003"] and tables(url) == ["alembic_version", "r_1", "r_2", "r_3"]
    schema = postgres.execute("SELECT to_regnamespace('migration_runner')", database=name)
    if case == "no CREATE":
        assert schema == [(None,)]
    else:
        assert postgres.execute("SELECT count(*) FROM migration_runner.history", database=name) == [(0,)]


@pytest.mark.parametrize("include_schemas, readme_filter", [(False, False), (True, True), (True, False)],
                         ids=["default", "include_schemas-readme-filter", "include_schemas-unfiltered"])
def test_alembic_check_and_verify_ignore_the_history(tmp_path, database_url, include_schemas, readme_filter):
    configure = {"include_schemas": True} if include_schemas else {}
    ini = models_project(tmp_path / "p", chain(3), readme_filter, **configure)
    env = runner_env(database_url, ini, **HISTORY)
    assert run_runner(env).returncode == 0
    assert rows(database_url, "run")  # the history is there to be ignored
    check = run_alembic(ini, sqlalchemy_url(database_url), "check")
    if include_schemas and not readme_filter:  # what the README's line is for: alembic sees the table
        assert check.returncode != 0 and "remove_table" in check.output and "history" in check.output, check
    else:
        assert check.returncode == 0 and "No new upgrade operations detected" in check.output, check
    # The runner's own verify leaves the schema out by itself.
    verified = run_runner(env, "verify")
    assert verified.returncode == 0, verified


def test_verify_reports_an_edited_and_a_removed_applied_revision(tmp_path, database_url):
    revs = chain(3)
    ini = models_project(tmp_path / "p", revs)
    env = runner_env(database_url, ini, **HISTORY)
    assert run_runner(env).returncode == 0
    unedited = run_runner(env, "verify")
    assert unedited.returncode == 0 and unedited.last["outcome"] == "verified", unedited

    versions = ini.parent / "migrations" / "versions"
    edited = versions / "r0002.py"
    edited.write_text(edited.read_text().replace("note text", "note varchar(10)"))
    result = run_runner(env, "verify")
    assert result.returncode == 10, result
    assert "revision r0002 (versions/r0002.py) was edited after it was applied" in result.last["event"]
    assert "revision r0001" not in result.last["event"] and "revision r0003" not in result.last["event"]
    # Plain verify, without the history, sees nothing: the schema matches the models.
    assert run_runner(runner_env(database_url, ini), "verify").returncode == 0

    # r0001 squashed away: r0002 now starts the history, r0001 stays applied in the database.
    (versions / "r0001.py").unlink()
    edited.write_text(edited.read_text().replace("down_revision = 'r0001'", "down_revision = None"))
    removed = run_runner(env, "verify")
    assert removed.returncode == 10, removed
    assert ("revision r0001 (versions/r0001.py) was applied but the scripts no longer contain it"
            in removed.last["event"]), removed


def test_history_with_nothing_recorded(database_url, project):
    result = run_runner(runner_env(database_url, project), "history")
    assert result.returncode == 0 and "no run of public.alembic_version recorded" in result.last["event"], result
    assert not [r for r in result.records if r.get("event") == "history"]
    json.dumps(result.last)


@pytest.mark.core
@pytest.mark.parametrize("driver", envs.driver_params((envs.DEFAULT_DRIVER, "asyncpg", "pg8000")))
def test_with_history_the_database_is_where_plain_alembic_leaves_it(postgres, tmp_path, driver):
    """Differential: upgrade then downgrade by alembic and by the runner with the history on, through a sync and an
    async driver and pg8000 (its own paramstyle); the two databases are alike once the runner's schema is set aside."""
    ini = make_project(tmp_path / "p", chain(3))
    write_env(ini.parent, envs.own_engine(driver, transaction_per_migration=True))
    twins = Twins.create(postgres)
    for args in (("upgrade", "heads"), ("downgrade", "r0001")):
        assert twins.run_alembic(ini, *args, driver=driver).returncode == 0
        result = twins.run_runner(ini, *args[:1], *(args[1:] if args[0] == "downgrade" else ()), **HISTORY)
        assert result.returncode == 0, result
    url = twins.url("runner")
    assert [(s["action"], s["revision"]) for s in rows(url, "revision")] == [
        ("applied", "r0001"), ("applied", "r0002"), ("applied", "r0003"), ("reverted", "r0003"),
        ("reverted", "r0002")]
    postgres.execute("DROP SCHEMA migration_runner CASCADE", database=twins.runner)
    twins.assert_same()
