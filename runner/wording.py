"""How the log and the summary word revisions and counts: `base` for no revision, `1 table`, `2 tables`."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def names(revisions: tuple[str, ...] | list[str]) -> str:
    return ", ".join(revisions) or "base"
