"""`migration-runner lint`: each revision's offline SQL through squawk (the lint extra), against a real PostgreSQL."""

from __future__ import annotations

import pytest

from runner import lint
from runner.errors import ConfigError

from .conftest import run_runner, runner_env, version_rows
from .projects import Rev, chain, make_project

BLOCKING_INDEX = Rev("r0003", "r0002", ["CREATE INDEX ix_r1_note ON r_1 (note)"], message="index r_1 by note")
CONCURRENT_INDEX = Rev("r0004", "r0003", message="index r_2 concurrently", python='''
with op.get_context().autocommit_block():
    op.create_index("ix_r2_note", "r_2", ["note"], postgresql_concurrently=True, if_not_exists=True)
''')
# Clean as squawk sees it: bigint identity keys (squawk prefers both), nothing that blocks.
CLEAN = [Rev("r0001", None, ["CREATE TABLE r_1 (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text)"]),
         Rev("r0002", "r0001", ["CREATE TABLE r_2 (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text)"])]


def findings(result) -> list[dict]:
    return [r for r in result.records if r.get("rule")]


def test_a_blocking_index_on_an_existing_table_is_exit_11_naming_the_revision(tmp_path):
    ini = make_project(tmp_path / "p", CLEAN + [BLOCKING_INDEX, CONCURRENT_INDEX])
    result = run_runner(runner_env(None, ini), "lint", "--from", "base")  # no database: what CI runs
    assert result.returncode == 11, result
    found = findings(result)
    assert [(f["revision"], f["rule"]) for f in found] == [("r0003", "require-concurrent-index-creation")], found
    assert "CREATE INDEX ix_r1_note ON r_1 (note)" in found[0]["event"] and found[0]["line"] >= 1
    assert "r0003" in result.last["event"] and result.last["outcome"] == "LintFindings"
    assert result.last["pending"] == ["r0001", "r0002", "r0003", "r0004"]


def test_a_concurrent_index_in_an_autocommit_block_passes(tmp_path):
    ini = make_project(tmp_path / "p", CLEAN + [Rev("r0003", "r0002"), CONCURRENT_INDEX])
    result = run_runner(runner_env(None, ini), "lint", "--from", "r0002")
    assert result.returncode == 0, result
    assert findings(result) == [] and result.last["pending"] == ["r0003", "r0004"]


def test_without_from_only_the_pending_revisions_are_linted(database_url, tmp_path):
    ini = make_project(tmp_path / "p", CLEAN + [BLOCKING_INDEX])
    assert run_runner(runner_env(database_url, ini)).returncode == 0  # r0003, the blocking one, is applied
    from .projects import add_revisions
    add_revisions(tmp_path / "p", [Rev("r0004", "r0003", ["ALTER TABLE r_1 ALTER COLUMN note SET NOT NULL"])])
    result = run_runner(runner_env(database_url, ini), "lint")
    assert result.returncode == 11, result
    assert [(f["revision"], f["rule"]) for f in findings(result)] == [("r0004", "adding-not-nullable-field")]
    assert version_rows(database_url) == ["r0003"]  # lint changes nothing


@pytest.mark.parametrize("baseline, linted", [(None, None), ("base", ["r0001", "r0002", "r0003"]),
                                               ("r0002", ["r0003"])])
def test_a_legacy_database_lints_what_upgrade_would_apply(database_url, tmp_path, baseline, linted):
    import psycopg
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE r_1 (id int)")
    ini = make_project(tmp_path / "p", CLEAN + [BLOCKING_INDEX])
    env = runner_env(database_url, ini, **({"MIGRATE_BASELINE_REVISION": baseline} if baseline else {}))
    result = run_runner(env, "lint")
    if linted is None:  # upgrade would refuse it: so does lint, as plan does
        assert result.returncode == 6 and "MIGRATE_BASELINE_REVISION" in result.last["event"], result
        return
    assert result.returncode == 11, result
    assert result.last["pending"] == linted
    assert [f["revision"] for f in findings(result)] == ["r0003"]


def test_rules_the_runner_makes_moot_are_off_and_more_can_be_excluded(tmp_path):
    ini = make_project(tmp_path / "p", CLEAN + [BLOCKING_INDEX])
    result = run_runner(runner_env(None, ini), "lint", "--from", "base")
    assert not {"require-lock-timeout", "require-statement-timeout"} & {f["rule"] for f in findings(result)}
    assert any("MIGRATE_DDL_LOCK_TIMEOUT" in r["event"] for r in result.records if r["level"] == "warning")
    excluded = run_runner(runner_env(None, ini, MIGRATE_LINT_EXCLUDE="require-concurrent-index-creation",
                                     MIGRATE_DDL_LOCK_TIMEOUT="5"), "lint", "--from", "base")
    assert excluded.returncode == 0 and findings(excluded) == [], excluded
    assert not any(r["level"] == "warning" for r in excluded.records)


def test_a_revision_that_cannot_be_rendered_offline_is_reported_not_a_crash(tmp_path):
    live = Rev("r0003", "r0002", message="needs the database", python='''
rows = op.get_bind().execute(sa.text("SELECT 1")).fetchall()
''')
    ini = make_project(tmp_path / "p", CLEAN + [live, Rev("r0004", "r0003", ["CREATE INDEX ix ON r_2 (note)"])])
    result = run_runner(runner_env(None, ini), "lint", "--from", "base")
    assert result.returncode == 11, result  # r0004's finding still counts
    warnings = [r["event"] for r in result.records if r["level"] == "warning"]
    assert any("r0003" in w and "cannot be rendered offline" in w for w in warnings), warnings
    assert [f["revision"] for f in findings(result)] == ["r0004"]
    assert "1 revision not linted" in result.last["event"]


def test_an_unknown_from_revision_is_exit_2(tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    result = run_runner(runner_env(None, ini), "lint", "--from", "nope")
    assert result.returncode == 2 and "nope" in result.last["event"], result


def test_missing_squawk_names_the_extra(monkeypatch):
    monkeypatch.setattr(lint.shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(ConfigError, match=r"migration-runner\[lint\]"):
        lint.squawk()
