"""`roundtrip`: each revision's downgrade is proven in a scratch database; exit 12 names those that do not undo.

The database DATABASE_URL names is never touched (its schema is compared before
and after), and no scratch database outlives a run, SIGTERM included.
"""

from __future__ import annotations

import signal

import pytest

from .conftest import finish, run_runner, runner_env, start_runner, tables
from .projects import Rev, chain, make_project
from .test_baseline import scratch_databases
from .test_cli import wait_for

T = "CREATE TABLE t (id serial PRIMARY KEY, note text NOT NULL)"


def roundtrip(tmp_path, database_url, revs: list[Rev], *args: str, **extra: str):
    ini = make_project(tmp_path / "p", revs)
    return run_runner(runner_env(database_url, ini, **extra), "roundtrip", *args)


@pytest.mark.core
def test_a_history_that_round_trips_exits_0_and_leaves_the_database_alone(postgres, tmp_path, database_url):
    revs = [Rev("a1", None, [T, "CREATE INDEX ix_note ON t (note)"], undo=["DROP TABLE t"]),
            Rev("a2", "a1", ["CREATE TYPE mood AS ENUM ('ok', 'sad')", "ALTER TABLE t ADD COLUMN m mood"],
                undo=["ALTER TABLE t DROP COLUMN m", "DROP TYPE mood"]),
            Rev("a3", "a2", ["CREATE VIEW v AS SELECT id FROM t"], undo=["DROP VIEW v"])]
    result = roundtrip(tmp_path, database_url, revs)
    assert result.returncode == 0, result
    assert result.last["outcome"] == "round-tripped" and "3 revisions above base" in result.last["event"]
    assert tables(database_url) == []  # DATABASE_URL's database: nothing built there
    assert scratch_databases(postgres) == []


@pytest.mark.parametrize("case, revision, expected", [
    ("forgets the index", Rev("b2", "b1", ["ALTER TABLE t ADD COLUMN x int", "CREATE INDEX ix_note ON t (note)"],
                              undo=["ALTER TABLE t DROP COLUMN x"]),
     "after downgrade() index ix_note on public.t is left over"),
    ("raises", Rev("b2", "b1", ["ALTER TABLE t ADD COLUMN x int"], python="", undo=["SELECT 1/0"]),
     "downgrade() raised"),
    ("pass", Rev("b2", "b1", ["CREATE TABLE u (id int)"]),
     "downgrade() undid nothing of what upgrade() did: table public.u is still there"),
    ("data loss", Rev("b2", "b1", ["ALTER TABLE t DROP COLUMN note"],
                      undo=["ALTER TABLE t ADD COLUMN note text"]),
     "after downgrade() column public.t.note is text NULL (was text NOT NULL)"),
], ids=["forgets-index", "raises", "pass", "data-loss"])
def test_a_downgrade_that_does_not_undo_exits_12_naming_it(postgres, tmp_path, database_url, case, revision,
                                                             expected):
    revs = [Rev("b1", None, [T], undo=["DROP TABLE t"]), revision,
            Rev("b3", "b2", ["CREATE TABLE w (id int)"], undo=["DROP TABLE w"])]
    result = roundtrip(tmp_path, database_url, revs)
    assert result.returncode == 12, result
    assert result.last["outcome"] == "Irreversible"
    message = result.last["event"]
    assert message.startswith("1 of 3 revisions do not round-trip: b2: "), message
    assert expected in message, message
    # The revisions after it are still proven: b3 round-trips.
    assert any(r.get("revision") == "b3" and r["event"].endswith("round-trips") for r in result.records), result
    assert "Traceback" not in result.output
    assert scratch_databases(postgres) == [] and tables(database_url) == []


def test_from_builds_the_start_and_proves_only_what_is_above(tmp_path, database_url):
    revs = chain(3)
    revs[0].undo = []  # below --from: never downgraded
    result = roundtrip(tmp_path, database_url, revs, "--from", "r0001")
    assert result.returncode == 0, result
    assert "2 revisions above r0001" in result.last["event"]


def test_a_given_scratch_database_is_used_and_emptied(postgres, tmp_path, database_url, database):
    postgres.create_database(f"{database}_scratch", "runner")
    scratch = database_url.replace(f"/{database}", f"/{database}_scratch")
    revs = [Rev("c1", None, [T])]  # downgrade forgets the table
    result = roundtrip(tmp_path, database_url, revs, MIGRATE_SCRATCH_DATABASE_URL=scratch)
    assert result.returncode == 12 and "table public.t is still there" in result.last["event"], result
    assert tables(scratch) == [] and scratch_databases(postgres) == []


def test_sigterm_mid_run_leaves_no_scratch_database(postgres, tmp_path, database_url):
    revs = [Rev("d1", None, [T], undo=["DROP TABLE t"]),
            Rev("d2", "d1", ["SELECT pg_sleep(60)"])]
    ini = make_project(tmp_path / "p", revs)
    proc = start_runner(runner_env(database_url, ini), "roundtrip")
    try:
        wait_for(lambda: postgres.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname LIKE 'migration_runner_scratch_%' "
            "AND state = 'active' AND query LIKE '%pg_sleep(60)%'"), timeout=60)
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result.returncode == 143, result
    assert scratch_databases(postgres) == [], result


def test_the_database_url_database_is_refused_as_scratch(postgres, tmp_path, database_url, database):
    postgres.execute("CREATE TABLE keep (id int)", database=database)  # what emptying a scratch would drop
    result = roundtrip(tmp_path, database_url, [Rev("e1", None, [T])], MIGRATE_SCRATCH_DATABASE_URL=database_url)
    assert result.returncode == 2, result
    assert "MIGRATE_SCRATCH_DATABASE_URL names the database being migrated" in result.last["event"], result
    assert tables(database_url) == ["keep"] and scratch_databases(postgres) == []
