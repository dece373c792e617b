"""The one-line JSON summary every command ends with, also written where Kubernetes reads it."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import log

logger = logging.getLogger("runner")

KUBERNETES_TERMINATION_LOG = Path("/dev/termination-log")
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LOG_LIMIT = 4096


@dataclass
class Report:
    """What a command did, filled in as it goes; cli emits it whatever the outcome."""

    command: str
    outcome: str = "failed"
    message: str = ""
    from_revision: tuple[str, ...] = ()
    to_revision: tuple[str, ...] = ()
    applied: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    target: str | None = None  # MIGRATE_TARGET, for the commands that answer for it
    lock_wait: float | None = None
    started: float = field(default_factory=time.monotonic)
    targets: list[dict] | None = None  # a fleet's: one summary per target (fleet.py)
    # Called with the exit code as the runner exits, before the sidecars stop: a command registers what must
    # outlive it here (the history row's outcome), so that cli need not import that command's modules.
    on_exit: list[Callable[[int], None]] = field(default_factory=list, repr=False, compare=False)

    def summary(self, exit_code: int) -> dict:
        return {
            "command": self.command,
            "outcome": self.outcome,
            "exit_code": exit_code,
            "message": self.message,
            "from_revision": list(self.from_revision),
            "to_revision": list(self.to_revision),
            "applied": self.applied,
            "reverted": self.reverted,
            "pending": self.pending,
            "target": self.target,
            "lock_wait": None if self.lock_wait is None else round(self.lock_wait, 3),
            "duration": round(time.monotonic() - self.started, 3),
            **({} if self.targets is None else _fleet_fields(self.targets)),
        }


def _fleet_fields(targets: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for row in targets:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    return {"counts": counts, "targets": targets}


def emit(report: Report, exit_code: int, termination_log: Path | None) -> None:
    """Log the summary as the last line and write it to the termination log."""
    summary = report.summary(exit_code)
    log.summary(logging.INFO if exit_code == 0 else logging.ERROR, summary)
    path = termination_log or _default_termination_log()
    if path is None:
        return
    try:
        # Masked before encoding: JSON escapes (\u00e4, \") would hide a password from the mask.
        path.write_text(_fit(log.redact_values(summary)))
    except OSError as e:
        logger.warning("cannot write the termination log %s: %s", path, e.strerror)


def _default_termination_log() -> Path | None:
    path = KUBERNETES_TERMINATION_LOG
    return path if path.exists() and os.access(path, os.W_OK) else None


def _fit(summary: dict) -> str:
    """The summary as JSON within Kubernetes' limit: a fleet's counts and failed targets first, then the
    others, as many as fit, and how many were left out."""
    text = json.dumps(summary)
    if len(text.encode()) <= TERMINATION_LOG_LIMIT or "targets" not in summary:
        return text.encode()[:TERMINATION_LOG_LIMIT].decode(errors="ignore")
    # Stable: the failed first, then those not run, then those at the heads, each in file order.
    rows = sorted(summary["targets"], key=lambda row: (row["exit_code"] == 0, row["exit_code"] is None))
    head = {key: summary[key] for key in ("command", "outcome", "exit_code", "counts")}
    rest = {key: value for key, value in summary.items() if key not in head and key != "targets"}
    # Largest prefix of the targets that fits, found by halving.
    low, high = 0, len(rows)
    while low < high:
        middle = (low + high + 1) // 2
        if len(_shrunk(head, rest, rows, middle).encode()) <= TERMINATION_LOG_LIMIT:
            low = middle
        else:
            high = middle - 1
    text = _shrunk(head, rest, rows, low)
    if len(text.encode()) > TERMINATION_LOG_LIMIT:  # a very long message: keep the counts at least
        text = _shrunk(head, {}, rows, 0)
    return text


def _shrunk(head: dict, rest: dict, rows: list[dict], kept: int) -> str:
    left_out = len(rows) - kept
    note = {"targets_truncated": f"{left_out} of {len(rows)} targets left out (Kubernetes keeps 4096 bytes); "
                                 f"the summary log line lists them all"} if left_out else {}
    return json.dumps({**head, **note, "targets": rows[:kept], **rest})
