"""The upgrade target (MIGRATE_TARGET) resolved against the scripts: what is pending for it, whether a state has reached it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .errors import ConfigError

HEADS = "heads"

# Targets that move with the database (`+1`, `expand@-2`) or point down (`base`): `check` and `wait`
# must answer for the same target `upgrade` reached, whenever they ask, so the target has to name
# revisions of the scripts, not a step from wherever the database happens to be.
_RELATIVE = re.compile(r"(^|@)[+-]\d+$")


@dataclass(frozen=True)
class Target:
    """An upgrade target: its name as given, and the revisions of the scripts it resolves to."""

    name: str
    revisions: tuple[str, ...]

    @property
    def is_heads(self) -> bool:
        return self.name == HEADS

    def __str__(self) -> str:
        """The target as messages name it: `heads`, or `expand@head (e2)`."""
        if self.is_heads or self.revisions == (self.name,):
            return self.name
        return f"{self.name} ({', '.join(self.revisions)})"


def resolve(script: ScriptDirectory, name: str) -> Target:
    """MIGRATE_TARGET as the revisions it names; ConfigError (exit 2) naming it when it names none."""
    name = name.strip()
    if name == HEADS:
        return Target(HEADS, tuple(script.get_heads()))
    if name in ("base", "") or ":" in name or _RELATIVE.search(name):
        raise ConfigError(f"MIGRATE_TARGET={name!r}: give heads, <branch label>@head, a revision id or "
                          f"<branch label>@<revision> (base, ranges and relative steps like +1 are refused: the "
                          f"target must name the same revisions for upgrade, check and wait)")
    try:
        found = script.get_revisions(name)
    except CommandError as e:  # an unknown id or label, `head` with several heads, an ambiguous prefix
        raise ConfigError(f"MIGRATE_TARGET={name!r} names no single target in the scripts at {script.dir}: "
                          f"{str(e).splitlines()[0]}") from None
    revisions = tuple(r.revision for r in found if r is not None)
    if not revisions:
        raise ConfigError(f"MIGRATE_TARGET={name!r} names no revision of the scripts at {script.dir}")
    return Target(name, revisions)


def reached(script: ScriptDirectory, target: Target, current: tuple[str, ...]) -> bool:
    """Whether a database at `current` (revisions the scripts know) is at or beyond every revision of `target`."""
    return set(target.revisions) <= _at_or_below(script, current)


def pending(script: ScriptDirectory, target: Target, current: tuple[str, ...]) -> list:
    """The scripts `alembic upgrade <target>` would apply from `current`, in the order it applies them;
    none when the database is already at or beyond the target (alembic itself may refuse some of those,
    such as `expand@head` on a database whose version row is a contract revision depending on it)."""
    if reached(script, target, current):
        return []
    return list(_upgrade_revisions(script, target, current))


def upgrade_steps(script: ScriptDirectory, target: Target, current: tuple[str, ...]) -> list:
    """alembic's steps for `upgrade <target>` from `current` (what command.upgrade runs); none when reached.

    New steps at each call (the caller may wrap their migration_fn), from the revisions walked once per
    scripts, target and start: a run asks for them up to three times (the state read, the upgrade, the
    summary), and on a thousand revisions each walk of alembic's revision map costs tens of milliseconds."""
    if reached(script, target, current):
        return []
    from alembic.runtime.migration import MigrationStep

    return [MigrationStep.upgrade_from_script(script.revision_map, revision)
            for revision in _upgrade_revisions(script, target, current)]


def _upgrade_revisions(script: ScriptDirectory, target: Target, current: tuple[str, ...]) -> tuple:
    """The scripts of alembic's steps for `upgrade <target>` from `current`, in order, walked once."""
    key = ("upgrade", target.name, tuple(current))
    memo = _memo(script)
    if key not in memo:
        memo[key] = tuple(step.revision for step in script._upgrade_revs(target.name, current))
    return memo[key]


def _at_or_below(script: ScriptDirectory, revisions: tuple[str, ...]) -> set[str]:
    """`revisions` and everything beneath them, dependencies (depends_on) included, as alembic walks them:
    a version row of a contract revision that depends on an expand revision stands for both."""
    key = ("below", tuple(revisions))
    memo = _memo(script)
    if key not in memo:
        memo[key] = frozenset(r.revision for revision in revisions for r in script.iterate_revisions(revision, "base"))
    return set(memo[key])


# Walks of one ScriptDirectory's revision map, by what was asked: its scripts do not change during a run
# (alembic memoizes the map itself), and a new ScriptDirectory (a new run, another project) starts afresh.
_memos: dict[int, tuple[ScriptDirectory, dict]] = {}


def _memo(script: ScriptDirectory) -> dict:
    found = _memos.get(id(script))
    if found is None or found[0] is not script:
        _memos.clear()  # one project a run: keep the last scripts' walks only
        found = _memos[id(script)] = (script, {})
    return found[1]


def at_or_below(script: ScriptDirectory, revisions: tuple[str, ...]) -> set[str]:
    """`revisions` and every revision beneath them (a new set: the caller may change it)."""
    return _at_or_below(script, revisions)
