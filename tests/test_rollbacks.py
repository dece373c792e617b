"""Rollbacks end to end: an older image on a newer database, the lineage, and `downgrade` under the lock.

Two versions of one project: v1 has revisions 1-4, v2 has 1-6; v3 shares 1-3 with
them and then branches. Every test runs the console script against a real
PostgreSQL and reads the database back.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from runner import lineage

from .conftest import (advisory_locks, assert_consistent, finish, run_runner, runner_env, start_runner, tables,
                       version_rows)
from .envs import driver_params
from .fidelity import Twins, run_alembic, schema_dump, sqlalchemy_url
from .projects import Rev, add_revisions, chain, make_project, write_env
from .test_cli import _derived_key, running_runner, wait_for
from .test_faults import no_locks_left, sleeping_pid, use_driver

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core


@pytest.fixture
def v1(tmp_path) -> Path:
    return make_project(tmp_path / "v1", chain(4))


@pytest.fixture
def v2(tmp_path) -> Path:
    return make_project(tmp_path / "v2", chain(6))


def comment(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT obj_description('alembic_version'::regclass, 'pg_class')").fetchone()[0]


def snapshot(postgres, database: str, url: str) -> tuple:
    """Everything a run could change: the schema, the version rows and the version table's comment."""
    return schema_dump(postgres, database), version_rows(url), comment(url)


@pytest.mark.parametrize("command", ["upgrade", "check", "wait", "plan"])
def test_an_older_image_on_a_newer_database_exits_0_and_changes_nothing(postgres, database, database_url, v1, v2,
                                                                        command):
    assert run_runner(runner_env(database_url, v2, MIGRATE_IMAGE="app:2")).returncode == 0
    before = snapshot(postgres, database, database_url)
    started = time.monotonic()
    result = run_runner(runner_env(database_url, v1, MIGRATE_WAIT_TIMEOUT="60"), command)
    assert result.returncode == 0, result
    assert time.monotonic() - started < 20  # wait returns at once, it does not wait out its 60 s
    assert result.last["outcome"] in ("ahead", "planned")
    warning = next(r for r in result.records if r["level"] == "warning")
    assert "r0006" in warning["event"] and "r0004" in warning["event"] and "app:2" in warning["event"]
    assert warning["proven"] is True
    assert snapshot(postgres, database, database_url) == before


@pytest.mark.parametrize("command", ["upgrade", "check", "wait"])
def test_allow_ahead_never_exits_8_naming_the_downgrade_and_the_image(database_url, v1, v2, command):
    assert run_runner(runner_env(database_url, v2, MIGRATE_IMAGE="app:2")).returncode == 0
    result = run_runner(runner_env(database_url, v1, MIGRATE_ALLOW_AHEAD="never"), command)
    assert result.returncode == 8, result
    assert "`migration-runner downgrade r0004`" in result.last["event"] and "app:2" in result.last["event"]
    assert version_rows(database_url) == ["r0006"]


def test_a_database_migrated_by_plain_alembic_is_ahead_only_with_always(postgres, database, database_url, v1, v2):
    assert run_alembic(v2, sqlalchemy_url(database_url), "upgrade", "heads").returncode == 0
    assert comment(database_url) is None
    refused = run_runner(runner_env(database_url, v1))
    assert refused.returncode == 8, refused
    assert "plain alembic" in refused.last["event"] and "MIGRATE_ALLOW_AHEAD=always" in refused.last["event"]
    assert "`migration-runner downgrade r0004`" in refused.last["event"]
    before = snapshot(postgres, database, database_url)
    for command in ("upgrade", "check", "wait"):
        allowed = run_runner(runner_env(database_url, v1, MIGRATE_ALLOW_AHEAD="always"), command)
        assert allowed.returncode == 0, allowed
        warning = next(r for r in allowed.records if r["level"] == "warning")
        assert warning["proven"] is False and "unproven" in warning["event"]
    assert snapshot(postgres, database, database_url) == before


def test_a_branch_the_newer_image_never_saw_is_exit_8_naming_where_they_meet(database_url, v2, tmp_path):
    v3 = make_project(tmp_path / "v3", chain(3) + [Rev("x0004", "r0003", ["CREATE TABLE x_4 (id int)"]),
                                                   Rev("x0005", "x0004", ["CREATE TABLE x_5 (id int)"])])
    assert run_runner(runner_env(database_url, v3, MIGRATE_IMAGE="app:3")).returncode == 0
    for allow in ("descendants", "never"):
        result = run_runner(runner_env(database_url, v2, MIGRATE_ALLOW_AHEAD=allow))
        assert result.returncode == 8, result
        assert "x0005" in result.last["event"] and "`migration-runner downgrade r0003`" in result.last["event"]
        assert "app:3" in result.last["event"]
        assert ("never saw" in result.last["event"]) == (allow == "descendants")
    assert version_rows(database_url) == ["x0005"] and "r_4" not in tables(database_url)


def test_downgrade_to_the_older_head_then_the_older_image_is_current(postgres, database, database_url, v1, v2):
    assert run_runner(runner_env(database_url, v2)).returncode == 0
    result = run_runner(runner_env(database_url, v2), "downgrade", "r0004")
    assert result.returncode == 0, result
    assert result.last["outcome"] == "downgraded" and result.last["reverted"] == ["r0006", "r0005"]
    assert result.last["from_revision"] == ["r0006"] and result.last["to_revision"] == ["r0004"]
    assert_consistent(database_url, ["r0004"])
    assert advisory_locks(postgres, database) == []
    check = run_runner(runner_env(database_url, v1, MIGRATE_ALLOW_AHEAD="never"), "check")
    assert check.returncode == 0 and check.last["outcome"] == "current", check
    again = run_runner(runner_env(database_url, v2), "downgrade", "r0004")  # a Job retried after its success
    assert again.returncode == 0 and again.last["outcome"] == "current", again
    to_base = run_runner(runner_env(database_url, v2), "downgrade", "base")
    assert to_base.returncode == 0, to_base
    assert_consistent(database_url, [])


@pytest.mark.parametrize("target, words", [
    ("nope", "not a revision of the scripts"),
    ("r0006", "not below"),  # above the database
    ("head", "give a revision id"),
    ("-1", "give a revision id"),
])
def test_downgrade_refuses_a_target_it_cannot_reach_and_changes_nothing(postgres, database, database_url, v2,
                                                                       target, words):
    assert run_runner(runner_env(database_url, v2)).returncode == 0
    assert run_runner(runner_env(database_url, v2), "downgrade", "r0003").returncode == 0
    before = snapshot(postgres, database, database_url)
    result = run_runner(runner_env(database_url, v2), "downgrade", target)
    assert result.returncode == 2, result
    assert words in result.last["event"] and result.last["reverted"] == [] and result.last["applied"] == []
    assert snapshot(postgres, database, database_url) == before
    assert advisory_locks(postgres, database) == []


def test_downgrade_from_an_image_that_lacks_the_databases_revisions_exits_8(database_url, v1, v2):
    assert run_runner(runner_env(database_url, v2)).returncode == 0
    result = run_runner(runner_env(database_url, v1), "downgrade", "r0002")
    assert result.returncode == 8, result
    assert "cannot revert" in result.last["event"] and "r0006" in result.last["event"]
    assert_consistent(database_url, ["r0006"])


def test_downgrade_leaves_the_database_where_alembic_downgrade_does(postgres, v2):
    twins = Twins.create(postgres)
    assert twins.run_alembic(v2, "upgrade", "heads").returncode == 0
    assert twins.run_runner(v2).returncode == 0
    assert twins.run_alembic(v2, "downgrade", "r0002").returncode == 0
    result = twins.run_runner(v2, "downgrade", "r0002")
    assert result.returncode == 0, result
    twins.assert_same()
    assert version_rows(twins.url("runner")) == ["r0002"]


def test_the_lineage_is_invisible_to_autogenerate_and_plain_alembic_keeps_working(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    env = (tmp_path / "p" / "migrations" / "env.py").read_text()
    tables_ = "".join(f"sa.Table('r_{i}', target_metadata, sa.Column('id', sa.Integer, primary_key=True), "
                      f"sa.Column('note', sa.Text))\n" for i in range(1, 4))
    write_env(tmp_path / "p", env.replace("target_metadata = None",
                                          "import sqlalchemy as sa\ntarget_metadata = sa.MetaData()\n" + tables_))
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    assert lineage.decode(comment(database_url)).heads == ("r0003",)
    url = sqlalchemy_url(database_url)
    checked = run_alembic(ini, url, "check")
    assert checked.returncode == 0 and "No new upgrade operations detected" in checked.output, checked
    # The check can fail: a table the metadata lacks is reported.
    write_env(tmp_path / "p", env.replace("target_metadata = None",
                                          "import sqlalchemy as sa\ntarget_metadata = sa.MetaData()\n"))
    assert run_alembic(ini, url, "check").returncode != 0
    for args in (("downgrade", "-1"), ("upgrade", "head"), ("current",)):
        done = run_alembic(ini, url, *args)
        assert done.returncode == 0, done
    assert version_rows(database_url) == ["r0003"]


def test_a_comment_of_the_users_or_a_table_the_role_does_not_own_is_left_alone(postgres, database, database_url,
                                                                            tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("COMMENT ON TABLE alembic_version IS 'kept by the platform team'")
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 0, result
    assert comment(database_url) == "kept by the platform team"
    assert any("comment of its own" in r["event"] for r in result.records if r["level"] == "warning")
    postgres.execute("COMMENT ON TABLE alembic_version IS NULL", database=database)
    postgres.execute("ALTER TABLE alembic_version OWNER TO postgres", database=database)
    postgres.execute("GRANT ALL ON alembic_version TO runner", database=database)
    add_revisions(tmp_path / "p", [Rev("r0004", "r0003", ["CREATE TABLE r_4 (id int)"])])
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 0, result
    assert any("does not own" in r["event"] for r in result.records if r["level"] == "warning")
    assert comment(database_url) is None and version_rows(database_url) == ["r0004"]


def test_downgrade_waits_for_the_lock_held_by_another_runner(postgres, database, database_url, v2):
    assert run_runner(runner_env(database_url, v2)).returncode == 0
    with psycopg.connect(database_url, autocommit=True, application_name="holder") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_derived_key(database),))
        proc = start_runner(runner_env(database_url, v2), "downgrade", "r0004")
        wait_for(lambda: running_runner(postgres, database) or proc.poll() is not None)
        time.sleep(2)
        assert proc.poll() is None, finish(proc)
        assert version_rows(database_url) == ["r0006"]
    result = finish(proc, timeout=60)
    assert result.returncode == 0, result
    assert any("waiting for lock" in e for e in result.events())
    assert result.last["lock_wait"] >= 2
    assert_consistent(database_url, ["r0004"])


def test_sigterm_during_a_downgrade_rolls_it_back_and_releases_the_lock(postgres, database, database_url, tmp_path):
    revs = chain(6)
    revs[-1].undo = ["SELECT pg_sleep(60)", "DROP TABLE r_6"]
    ini = make_project(tmp_path / "p", revs)
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    proc = start_runner(runner_env(database_url, ini), "downgrade", "r0004")
    wait_for(lambda: sleeping_pid(postgres, database) or proc.poll() is not None)
    assert proc.poll() is None, finish(proc)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=60)
    assert result.returncode == 143, result
    assert result.last["outcome"] == "interrupted" and result.last["command"] == "downgrade"
    assert sleeping_pid(postgres, database) == 0
    assert_consistent(database_url, ["r0006"])
    no_locks_left(postgres, database)


@pytest.mark.parametrize("per_migration", [False, True])
def test_a_failing_downgrade_leaves_the_database_where_alembic_leaves_it(postgres, tmp_path, per_migration):
    revs = chain(6)
    revs[4].undo = ["DROP TABLE r_5", "SELECT 1/0"]  # r0005's downgrade fails after r0006's succeeded
    ini = make_project(tmp_path / "p", revs)
    if per_migration:
        env = tmp_path / "p" / "migrations" / "env.py"
        env.write_text(env.read_text().replace("target_metadata=target_metadata",
                                               "target_metadata=target_metadata, transaction_per_migration=True"))
    twins = Twins.create(postgres)
    assert twins.run_alembic(ini, "upgrade", "heads").returncode == 0
    assert twins.run_runner(ini).returncode == 0
    assert twins.run_alembic(ini, "downgrade", "r0002").returncode != 0
    result = twins.run_runner(ini, "downgrade", "r0002")
    assert result.returncode == 7, result
    at = "r0005" if per_migration else "r0006"  # r0006's downgrade committed on its own, or rolled back with r0005's
    assert f"the database is at {at}" in result.last["event"] and "SQLSTATE 22012" in result.last["event"]
    assert result.last["reverted"] == (["r0006"] if per_migration else [])
    twins.assert_same()
    assert version_rows(twins.url("runner")) == [at]
    assert advisory_locks(postgres, twins.runner) == []


@pytest.mark.parametrize("driver", driver_params(["psycopg", "psycopg2", "asyncpg", "pg8000"]))
def test_the_lineage_is_recorded_exactly_whatever_env_pys_driver(database_url, v1, tmp_path, driver):
    # Characters each driver or quoting rule could mangle: placeholders, quotes, backslashes, the dollar tag.
    image = "reg.example/app:2%s %(x)s 100% 'q' \"d\" back\\slash $lineage$ ä"
    v2 = make_project(tmp_path / "v2", chain(6))
    use_driver(tmp_path / "v2", driver)
    result = run_runner(runner_env(database_url, v2, MIGRATE_IMAGE=image))
    assert result.returncode == 0, result
    recorded = lineage.decode(comment(database_url))
    assert recorded is not None and recorded.image == image and recorded.heads == ("r0006",)
    assert recorded.graph["r0006"] == ("r0005",) and len(recorded.graph) == 6
    older = run_runner(runner_env(database_url, v1), "check")
    assert older.returncode == 0 and older.last["outcome"] == "ahead", older
