"""The recorded lineage: its format, and what it proves about a database ahead of the scripts."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from runner import lineage

from .projects import Rev, chain, make_project


def scripts(root: Path, revisions: list[Rev]) -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(str(make_project(root, revisions))))


@pytest.fixture
def v1(tmp_path) -> ScriptDirectory:
    return scripts(tmp_path / "v1", chain(4))


@pytest.fixture
def v2(tmp_path) -> ScriptDirectory:
    return scripts(tmp_path / "v2", chain(6))


def test_the_record_is_one_line_that_round_trips(v2):
    recorded = lineage.of(v2, "registry.example/app:2.0")
    text = lineage.encode(recorded)
    assert "\n" not in text and text.startswith(lineage.MARK)
    assert lineage.decode(text) == recorded
    assert recorded.graph["r0001"] == () and recorded.graph["r0006"] == ("r0005",)
    assert recorded.heads == ("r0006",)


@pytest.mark.parametrize("comment", [None, "", "the version table", f"{lineage.MARK} 1 not json",
                                     f"{lineage.MARK} 1 {{\"heads\": []}}", f"{lineage.MARK} 2 {{}}"])
def test_anything_else_decodes_to_no_lineage(comment):
    assert lineage.decode(comment) is None


def test_only_an_empty_comment_or_the_runners_own_may_be_overwritten(v2):
    assert lineage.is_ours(None) and lineage.is_ours("") and lineage.is_ours(lineage.encode(lineage.of(v2, None)))
    assert not lineage.is_ours("owned by the platform team")


def test_a_newer_lineage_proves_the_database_descends_from_the_older_heads(v1, v2):
    verdict = lineage.judge(lineage.of(v2, "app:2"), v1, ("r0006",))
    assert verdict.proven, verdict
    assert verdict.downgrade_to == "r0004" and verdict.image == "app:2"
    assert "r0006" in verdict.why and "r0004" in verdict.why


def test_no_lineage_proves_nothing(v1):
    verdict = lineage.judge(None, v1, ("r0006",))
    assert not verdict.proven and "plain alembic" in verdict.why
    assert verdict.downgrade_to == "r0004"  # a guess: the newer image most likely has the older head


def test_a_branch_the_scripts_never_saw_is_not_ahead(tmp_path, v2):
    # v3 shares r0001-r0003 with v2, then goes its own way.
    v3 = scripts(tmp_path / "v3", chain(3) + [Rev("x0004", "r0003"), Rev("x0005", "x0004")])
    verdict = lineage.judge(lineage.of(v3, None), v2, ("x0005",))
    assert not verdict.proven
    assert verdict.downgrade_to == "r0003"  # where v2 can take over after a downgrade
    assert "r0006" in verdict.why and "never saw" in verdict.why


def test_a_lineage_that_does_not_contain_the_databases_revision_proves_nothing(v1, v2):
    # The runner recorded v2's graph; plain alembic then took the database further.
    verdict = lineage.judge(lineage.of(v2, None), v1, ("r0007",))
    assert not verdict.proven and "r0007" in verdict.why


def test_ids_that_name_other_revisions_prove_nothing(tmp_path, v1):
    # Hand-numbered ids collide: "r0003" of this lineage has another parent than v1's.
    other = scripts(tmp_path / "other", [Rev("r0001", None), Rev("r0003", "r0001"), Rev("r0004", "r0003"),
                                         Rev("r0005", "r0004")])
    verdict = lineage.judge(lineage.of(other, None), v1, ("r0005",))
    assert not verdict.proven and "r0003" in verdict.why
    assert verdict.downgrade_to is None  # "r0004" would name another revision in that image


def test_merges_and_several_heads(tmp_path):
    base = [Rev("a", None), Rev("b1", "a"), Rev("b2", "a")]
    older = scripts(tmp_path / "older", base)  # two heads, b1 and b2
    newer = scripts(tmp_path / "newer", base + [Rev("m", ("b1", "b2")), Rev("n", "m")])
    assert lineage.judge(lineage.of(newer, None), older, ("n",)).proven
    # A database past b1 only has not got b2: not ahead of both heads.
    partial = scripts(tmp_path / "partial", base + [Rev("c", "b1")])
    verdict = lineage.judge(lineage.of(partial, None), older, ("c",))
    assert not verdict.proven and "b2" in verdict.why


def test_the_downgrade_target_starts_from_the_unknown_revisions_not_a_known_head(tmp_path):
    # The database is at (c, h2): h2 is this image's, c descends from h1, which this image never saw.
    known = scripts(tmp_path / "known", [Rev("a", None), Rev("h2", "a"), Rev("b", "a")])
    newer = scripts(tmp_path / "newer", [Rev("a", None), Rev("h2", "a"), Rev("h1", "a"), Rev("c", "h1")])
    verdict = lineage.judge(lineage.of(newer, None), known, ("c", "h2"))
    assert not verdict.proven and "b" in verdict.why
    assert verdict.downgrade_to == "a"  # not h2, which is not below the database


def test_several_heads_and_no_lineage_name_no_single_command(tmp_path):
    older = scripts(tmp_path / "older", [Rev("a", None), Rev("b1", "a"), Rev("b2", "a")])
    assert lineage.judge(None, older, ("z",)).downgrade_to is None
