"""The revision graph the runner records beside the version table, and what it proves.

Whenever the runner changes the version table, it also writes, in the same
transaction, the graph of the scripts it ran with (revision -> its down
revisions) as the version table's comment. An older image, finding the
database at revisions it does not know, reads it to prove that those revisions
descend from its own heads (an expand/contract deploy rolled back) rather than
from a branch it never saw. A comment, because autogenerate and `alembic check`
skip the version table, plain alembic never touches it, and writing it needs
nothing beyond owning the version table.

The graph follows `depends_on` as well as down revisions (a contract revision that
depends on its expand revision stands for both in the version table), and records
the branch labels: a database ahead on the `contract` branch has dropped what the
older image's code may still use, which no lineage makes safe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # alembic is imported where it is used: fastpath reads MARK and PREFIX without it
    from alembic.script import ScriptDirectory

MARK = "migration-runner lineage"
PREFIX = f"{MARK} 1 "  # of the comment's text in the format encode writes
# The branch label of the revisions only the new code survives (OpenStack's and alembic's docs' name):
# an older image is never let through on a database ahead of it on this branch.
CONTRACT = "contract"


@dataclass(frozen=True)
class Lineage:
    """A recorded graph: each revision's down revisions, the heads, and the image that wrote it."""

    graph: dict[str, tuple[str, ...]]  # down revisions and depends_on
    heads: tuple[str, ...]
    image: str | None = None
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # revisions in labelled branches
    # What a later run's fast path compares (runner/fastpath.py): the digest of the scripts and settings, the endpoint.
    fast: dict = field(default_factory=dict)


def of(script: ScriptDirectory, image: str | None, fast: dict | None = None) -> Lineage:
    """The lineage of `script`, as a runner running from `image` records it."""
    walked = list(script.walk_revisions())  # once: a walk of a thousand revisions costs tens of milliseconds
    graph = {r.revision: _below(r) for r in walked}
    labels = {r.revision: tuple(sorted(r.branch_labels)) for r in walked if r.branch_labels}
    return Lineage(graph=graph, heads=tuple(script.get_heads()), image=image, labels=labels, fast=fast or {})


def _below(revision) -> tuple[str, ...]:
    """A revision's down revisions, then the revisions it depends on (alembic resolves depends_on labels)."""
    from alembic.util import to_tuple

    down = to_tuple(revision.down_revision, default=())
    return down + tuple(rev for rev in revision._all_down_revisions if rev not in down)


def encode(lineage: Lineage) -> str:
    """The comment text: one line, the mark first so that a human reading `\\dt+` knows whose it is."""
    record = {"heads": list(lineage.heads), "image": lineage.image,
              "revisions": {rev: list(down) for rev, down in sorted(lineage.graph.items())}}
    if lineage.labels:  # absent for a project without branch labels: its comment reads as before
        record["labels"] = {rev: list(labels) for rev, labels in sorted(lineage.labels.items())}
    if lineage.fast:
        record["fast"] = lineage.fast
    return PREFIX + json.dumps(record, separators=(",", ":"), sort_keys=True)


def decode(comment: str | None) -> Lineage | None:
    """The lineage a comment records; None for no comment, another's comment or a format not understood."""
    if not comment or not comment.startswith(f"{MARK} 1 "):
        return None
    try:
        record = json.loads(comment.removeprefix(f"{MARK} 1 "))
        graph = {str(rev): tuple(str(d) for d in down) for rev, down in record["revisions"].items()}
        labels = {str(rev): tuple(str(label) for label in found) for rev, found in record.get("labels", {}).items()}
        return Lineage(graph=graph, heads=tuple(record["heads"]), image=record.get("image"), labels=labels)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def is_ours(comment: str | None) -> bool:
    """Whether the runner may overwrite this comment: none yet, or one the runner wrote."""
    return not comment or comment.startswith(MARK)


@dataclass(frozen=True)
class Verdict:
    """Whether a database at revisions the scripts do not know is ahead of them, and how to go back."""

    proven: bool  # the recorded lineage shows every head of the scripts beneath the database's revisions
    why: str  # one clause saying why (not)
    # The revision to downgrade to, from the image that has the database's revisions, so that these
    # scripts can run: the newest of theirs beneath those revisions per the lineage, else (nothing
    # recorded) their single head as a guess; None when no one command can be named.
    downgrade_to: str | None
    image: str | None  # the image that recorded the lineage


def judge(recorded: Lineage | None, script: ScriptDirectory, current: tuple[str, ...]) -> Verdict:
    """Whether `recorded` proves that the database's `current` revisions descend from the scripts' heads."""
    from alembic.util import to_tuple

    heads = tuple(script.get_heads())
    guess = heads[0] if len(heads) == 1 else None
    mine = of(script, None).graph
    # A runner before depends_on was recorded wrote down revisions only: those match too.
    mine_down = {r.revision: to_tuple(r.down_revision, default=()) for r in script.walk_revisions()}
    unknown = tuple(rev for rev in current if rev not in mine)
    if recorded is None:
        return Verdict(False, "no lineage recorded by migration-runner shows where they come from "
                              "(migrated by plain alembic, or by a runner without write access to the comment?)",
                       guess, None)
    # Ids both graphs know must name the same revision: same parents, or the ids collide.
    clash = next((rev for rev, down in recorded.graph.items()
                  if rev in mine and set(down) not in (set(mine[rev]), set(mine_down[rev]))), None)
    if clash is not None:
        return Verdict(False, f"the recorded lineage gives {clash} other down revisions than these scripts do",
                       None, recorded.image)
    unrecorded = [rev for rev in unknown if rev not in recorded.graph]
    if unrecorded:
        return Verdict(False, f"the recorded lineage (of head {', '.join(recorded.heads)}) does not contain "
                              f"{', '.join(unrecorded)}", guess, recorded.image)
    below = _ancestors({**recorded.graph, **mine}, current)
    meeting = _newest_known(recorded.graph, mine, unknown)
    missing = [head for head in heads if head not in below]
    if missing:
        return Verdict(False, f"per the recorded lineage {', '.join(unknown)} do not descend from "
                              f"{', '.join(missing)} (a branch these scripts never saw)", meeting, recorded.image)
    beyond = _ancestors(recorded.graph, current) - set(mine)
    contracted = sorted(rev for rev in beyond if CONTRACT in recorded.labels.get(rev, ()))
    if contracted:
        return Verdict(False, f"per the recorded lineage the database is contracted past these scripts: "
                              f"{', '.join(contracted)} on the `{CONTRACT}` branch removed what this image's code "
                              f"may still use", meeting, recorded.image)
    by = f" (by image {recorded.image})" if recorded.image else ""
    return Verdict(True, f"the lineage recorded by migration-runner{by} shows {', '.join(current)} descending from "
                         f"{', '.join(heads)}", meeting, recorded.image)


def _ancestors(graph: dict[str, tuple[str, ...]], revisions: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = list(revisions)
    while todo:
        rev = todo.pop()
        if rev not in seen:
            seen.add(rev)
            todo.extend(graph.get(rev, ()))
    return seen


def _newest_known(recorded: dict[str, tuple[str, ...]], mine: dict[str, tuple[str, ...]],
                  unknown: tuple[str, ...]) -> str | None:
    """The first revision of the scripts met walking down from the `unknown` ones (breadth first)."""
    frontier, seen = list(unknown), set()
    while frontier:
        known = [rev for rev in frontier if rev in mine]
        if known:
            return known[0]
        seen.update(frontier)
        frontier = [down for rev in frontier for down in recorded.get(rev, ()) if down not in seen]
    return None
