"""The one-line JSON summary every command ends with, also written where Kubernetes reads it."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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
        }


def emit(report: Report, exit_code: int, termination_log: Path | None) -> None:
    """Log the summary as the last line and write it to the termination log."""
    summary = report.summary(exit_code)
    log.summary(logging.INFO if exit_code == 0 else logging.ERROR, summary)
    path = termination_log or _default_termination_log()
    if path is None:
        return
    try:
        # Masked before encoding: JSON escapes (\u00e4, \") would hide a password from the mask.
        path.write_text(json.dumps(log.redact_values(summary))[:TERMINATION_LOG_LIMIT])
    except OSError as e:
        logger.warning("cannot write the termination log %s: %s", path, e.strerror)


def _default_termination_log() -> Path | None:
    path = KUBERNETES_TERMINATION_LOG
    return path if path.exists() and os.access(path, os.W_OK) else None
