"""Expand and contract (#23): MIGRATE_TARGET, heads per labelled branch, and rolling back on either side.

The lab is the README's worked example ("Expand and contract"): its revision files are read
from the README itself, so the example cannot drift from what is tested. Release 1 has a
table and two empty revisions starting the `expand` and `contract` branches (the contract
one depending on the expand one, as OpenStack lays them out); release 2 renames a column
without downtime: its expand revision adds the new column, its contract revision (depending
on the expand one) drops the old. Each application version is a plain SQL query.

A rolling release is run end to end by the runner, and by plain `alembic upgrade expand@head`
and `alembic upgrade heads` on a twin database; `pg_dump --schema-only` and the version rows
are compared after each step.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import psycopg
import pytest

from .conftest import RUNNER_PASSWORD, finish, run_runner, runner_env, start_runner, version_rows
from .fidelity import Twins
from .projects import Rev, make_project

README = Path(__file__).resolve().parent.parent / "README.md"

# What each application version runs: release 1 knows `name`, release 2 only `display_name`.
OLD_CODE = ["INSERT INTO account (name) VALUES ('written by release 1')", "SELECT id, name FROM account"]
NEW_CODE = ["INSERT INTO account (display_name) VALUES ('written by release 2')",
            "SELECT id, display_name FROM account"]


def readme_revisions() -> dict[str, tuple[str, str]]:
    """The worked example's revision files: {file name: (release, source)}, read from the README's section."""
    text = README.read_text()
    section = text[text.index("## Expand and contract"):]
    section = section[:section.index("\n## ", 1)]
    found = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        first = block.splitlines()[0]
        match = re.match(r"# migrations/versions/(\S+\.py)\s+\(release (\d)\)", first)
        assert match, first
        found[match.group(1)] = (match.group(2), block)
    assert len(found) == 5, sorted(found)
    return found


def release(root: Path, number: int) -> Path:
    """An `alembic init` project holding the README's revisions of releases up to `number`; its alembic.ini."""
    ini = make_project(root, [])
    for name, (of_release, source) in readme_revisions().items():
        if int(of_release) <= number:
            (root / "migrations" / "versions" / name).write_text(source)
    return ini


def application(url: str, statements: list[str]) -> str | None:
    """Run one application version's queries; None when they all work, else the database's error."""
    try:
        with psycopg.connect(url) as conn:
            for statement in statements:
                conn.execute(statement)
        return None
    except psycopg.Error as e:
        return f"{type(e).__name__}: {e.diag.message_primary}"


@pytest.fixture
def releases(tmp_path) -> tuple[Path, Path]:
    return release(tmp_path / "release1", 1), release(tmp_path / "release2", 2)


def test_rolling_release_expand_then_contract_like_plain_alembic(postgres, releases):
    """Release 1 deployed; release 2's expand before the rollout (both versions' code works), its contract after
    (only release 2's works); a twin migrated by plain alembic with the same targets ends up identical."""
    v1, v2 = releases
    twins = Twins.create(postgres)
    url = twins.url("runner")

    first = twins.run_runner(v1)
    assert first.returncode == 0, first
    assert twins.run_alembic(v1).returncode == 0
    twins.assert_same()
    assert application(url, OLD_CODE) is None

    heads = twins.run_runner(v2, "heads")
    assert heads.returncode == 0, heads
    assert heads.last["outcome"] == "one head per branch" and heads.last["to_revision"] == ["c2", "e2"]
    assert "c2 (contract), e2 (expand)" in heads.last["event"]

    # Before the rollout: the expand branch only.
    expand = twins.run_runner(v2, MIGRATE_TARGET="expand@head")
    assert expand.returncode == 0, expand
    assert (expand.last["outcome"], expand.last["applied"], expand.last["target"]) == ("upgraded", ["e2"], "expand@head")
    assert "(target expand@head (e2))" in expand.last["event"]
    plain = twins.run_alembic(v2, "upgrade", "expand@head")
    assert plain.returncode == 0, plain
    twins.assert_same()
    assert version_rows(url) == ["c1", "e2"]
    # Release 1 and release 2 both run on the expanded schema, side by side.
    assert application(url, OLD_CODE) is None
    assert application(url, NEW_CODE) is None
    assert application(twins.url("plain"), OLD_CODE) is None and application(twins.url("plain"), NEW_CODE) is None

    # Again with the same target: nothing to do.
    again = twins.run_runner(v2, MIGRATE_TARGET="expand@head")
    assert again.returncode == 0, again
    assert (again.last["outcome"], again.last["applied"]) == ("current", [])
    assert again.last["event"].startswith("already at or beyond expand@head (e2)")

    # After the rollout: every head.
    contract = twins.run_runner(v2)
    assert contract.returncode == 0, contract
    assert (contract.last["applied"], contract.last["target"]) == (["c2"], "heads")
    assert twins.run_alembic(v2, "upgrade", "heads").returncode == 0
    twins.assert_same()
    assert version_rows(url) == ["c2"]
    assert application(url, NEW_CODE) is None
    failed = application(url, OLD_CODE)
    assert failed is not None and 'column "name"' in failed, failed
    # What release 1 wrote during the rollout was carried over by the contract.
    with psycopg.connect(url) as conn:
        names = sorted(row[0] for row in conn.execute("SELECT display_name FROM account"))
    # Release 1 wrote twice (release 1, then the rollout), release 2 twice (the rollout, then after it).
    assert names == ["written by release 1"] * 2 + ["written by release 2"] * 2, names

    # A database already beyond the target (contracted) is a no-op for expand@head, as for plain alembic.
    beyond = twins.run_runner(v2, MIGRATE_TARGET="expand@head")
    assert beyond.returncode == 0, beyond
    assert (beyond.last["outcome"], beyond.last["applied"]) == ("current", []), beyond.last
    assert twins.run_alembic(v2, "upgrade", "expand@head").returncode == 0
    twins.assert_same()


def test_check_and_wait_answer_for_the_target(database_url, releases):
    """A new pod's init container waits for expand@head only: 0 once the expand is applied, the contract pending."""
    v1, v2 = releases
    assert run_runner(runner_env(database_url, v1)).returncode == 0
    expand_env = runner_env(database_url, v2, MIGRATE_TARGET="expand@head", MIGRATE_WAIT_TIMEOUT="60")

    before = run_runner(expand_env, "check")
    assert before.returncode == 9, before
    assert before.last["pending"] == ["e2"] and before.last["target"] == "expand@head"
    assert "pending for expand@head (e2)" in before.last["event"]
    plan = run_runner(expand_env, "plan")
    assert plan.returncode == 0 and plan.last["pending"] == ["e2"] and plan.last["to_revision"] == ["e2"], plan
    sql = run_runner(expand_env, "plan", "--sql")
    assert sql.returncode == 0, sql
    assert "ADD COLUMN display_name" in sql.stdout and "DROP COLUMN name" not in sql.stdout, sql.stdout

    waiting = start_runner(expand_env, "wait")
    time.sleep(3)
    assert waiting.poll() is None  # still waiting: the expand is not applied
    assert run_runner(expand_env).returncode == 0
    waited = finish(waiting)
    assert waited.returncode == 0, waited
    assert waited.last["outcome"] == "current" and waited.last["target"] == "expand@head"

    after = run_runner(expand_env, "check")
    assert after.returncode == 0, after
    assert after.last["event"] == "at or beyond expand@head (e2): c1, e2"
    # The default target still sees the contract pending.
    heads = run_runner(runner_env(database_url, v2), "check")
    assert heads.returncode == 9 and heads.last["pending"] == ["c2"], heads
    assert run_runner(runner_env(database_url, v2, MIGRATE_TARGET="e2"), "check").returncode == 0
    assert run_runner(runner_env(database_url, v2, MIGRATE_TARGET="contract@c2"), "check").returncode == 9


@pytest.mark.parametrize("target", ["nosuch@head", "nosuch", "head", "base", "+1", "expand@+1", "e1:e2"])
def test_a_target_the_scripts_do_not_have_is_exit_2_naming_it(database_url, releases, target):
    _, v2 = releases
    for command in ("upgrade", "check", "wait", "plan"):
        result = run_runner(runner_env(database_url, v2, MIGRATE_TARGET=target), command)
        assert result.returncode == 2, (command, result)
        assert f"MIGRATE_TARGET={target!r}" in result.last["event"], result.last["event"]
        assert RUNNER_PASSWORD not in result.output
    assert version_rows(database_url) == []  # refused before anything was written


def test_rollback_to_the_older_image_on_an_expanded_then_a_contracted_database(database_url, releases):
    """Release 1's runner on release 2's database: let through when only expanded; exit 8 naming the downgrade
    when contracted; after that downgrade (run from release 2) let through again, and release 1's code runs."""
    v1, v2 = releases
    image2 = {"MIGRATE_IMAGE": "registry/app:2.0"}
    assert run_runner(runner_env(database_url, v1)).returncode == 0
    assert run_runner(runner_env(database_url, v2, MIGRATE_TARGET="expand@head", **image2)).returncode == 0

    expanded = run_runner(runner_env(database_url, v1))
    assert expanded.returncode == 0, expanded
    assert expanded.last["outcome"] == "ahead" and expanded.last["applied"] == []
    assert any("descending from" in event for event in expanded.events()), expanded.events()
    assert run_runner(runner_env(database_url, v1), "wait").returncode == 0

    assert run_runner(runner_env(database_url, v2, **image2)).returncode == 0
    for command in ("upgrade", "check", "wait"):
        contracted = run_runner(runner_env(database_url, v1), command)
        assert contracted.returncode == 8, (command, contracted)
        message = contracted.last["event"]
        assert "the database is at c2" in message
        assert "contracted past these scripts: c2 on the `contract` branch" in message, message
        assert "`migration-runner downgrade c1` run from image registry/app:2.0" in message, message
        assert message in README.read_text()  # the README quotes it as it is
    assert version_rows(database_url) == ["c2"]
    assert application(database_url, OLD_CODE) is not None
    # MIGRATE_ALLOW_AHEAD=always lets it through all the same (the operator's call).
    assert run_runner(runner_env(database_url, v1, MIGRATE_ALLOW_AHEAD="always"), "check").returncode == 0

    down = run_runner(runner_env(database_url, v2, **image2), "downgrade", "c1")
    assert down.returncode == 0, down
    assert down.last["reverted"] == ["c2"]
    assert version_rows(database_url) == ["c1", "e2"]
    back = run_runner(runner_env(database_url, v1))
    assert back.returncode == 0 and back.last["outcome"] == "ahead", back
    assert application(database_url, OLD_CODE) is None


def test_heads_sharing_a_branch_or_without_a_label_are_still_exit_5(tmp_path, database_url):
    root = tmp_path / "forked"
    ini = release(root, 2)
    # Two expand heads on the same parent: a fork inside one branch.
    (root / "migrations" / "versions" / "e3.py").write_text(Rev("e3", "e2", message="index a").source())
    (root / "migrations" / "versions" / "e4.py").write_text(Rev("e4", "e2", message="index b").source())
    for command in ("heads", "upgrade"):
        result = run_runner(runner_env(database_url, ini), command)
        assert result.returncode == 5, result
        assert "2 heads in branch expand" in result.last["event"], result.last["event"]
        assert 'alembic merge -m "merge heads" e3 e4' in result.last["event"] or \
            'alembic merge -m "merge heads" e4 e3' in result.last["event"]
    assert version_rows(database_url) == []

    # An unlabelled head beside the labelled ones.
    stray = tmp_path / "stray"
    ini = release(stray, 2)
    (stray / "migrations" / "versions" / "x1.py").write_text(Rev("x1", "a1", message="hotfix").source())
    result = run_runner(runner_env(database_url, ini), "heads")
    assert result.returncode == 5, result
    assert "outside any branch label of its own: x1 (parent a1: hotfix)" in result.last["event"], result.last["event"]
    assert "besides c2 (contract), e2 (expand)" in result.last["event"]

    # Two plain heads, no labels at all: as before.
    plain = make_project(tmp_path / "plain", [Rev("a", None), Rev("b", "a"), Rev("c", "a")])
    result = run_runner(runner_env(database_url, plain), "heads")
    assert result.returncode == 5 and "2 heads outside any branch label" in result.last["event"], result
    # MIGRATE_ALLOW_MULTIPLE_HEADS still overrides.
    assert run_runner(runner_env(database_url, plain, MIGRATE_ALLOW_MULTIPLE_HEADS="true")).returncode == 0
