"""Fleets: every target of DATABASE_URLS_FILE migrated by a runner process of its own, a few at a time.

alembic's `context` and `op` are module-level proxies that each env.py run
installs, so two runs in threads of one process would corrupt each other: each
target is a child `python -m runner <command>` with its own DATABASE_URL and
ALEMBIC_X_ARGS, and so every guarantee of a single run (wait, its own lock,
baseline, guard, lineage, read-back). Its termination log, in a temporary
directory, is its result. The heads are checked once, here, before any target
is touched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from . import commands, log, telemetry
from .errors import EXIT_OK, ConfigError, Interrupted, TargetsFailed
from .report import Report
from .settings import Settings, parse_url

logger = logging.getLogger("runner.fleet")

COMMANDS = ("upgrade", "check", "wait")
# Variables a child must not see: it is one target, not a fleet, and the sidecars quit once, after the fleet.
_PARENT_ONLY = ("DATABASE_URL", "DATABASE_URL_FILE", "DATABASE_URLS_FILE", "MIGRATE_FLEET_CONCURRENCY",
                "MIGRATE_FLEET_CANARY", "MIGRATE_FLEET_SHARDS", "JOB_COMPLETION_INDEX", "MIGRATE_QUIT_URLS",
                "MIGRATE_TERMINATION_LOG", "ALEMBIC_X_ARGS", "ALEMBIC_SECTION")
# After forwarding SIGTERM: a child cancels its statement and rolls back in well under a second; one stuck
# longer is killed before Kubernetes' default 30 s grace ends (the server then ends its sessions, lock and all).
FORWARD_GRACE = 20.0
_POLL = 0.05


@dataclass(frozen=True)
class Target:
    """One line of DATABASE_URLS_FILE."""

    position: int  # among the targets only, 0-based: what sharding counts
    line: int
    url: str  # as written: the child parses it as DATABASE_URL
    x_args: tuple[str, ...]
    label: str  # the URL with its password masked, and the -x items

    def environment(self, settings: Settings, workdir: Path, trace: dict[str, str] | None = None) -> dict[str, str]:
        """The child's variables; `trace` (telemetry.propagation) replaces the TRACEPARENT and TRACESTATE it
        would inherit, so that its run is a span of the fleet's trace."""
        env = {name: value for name, value in os.environ.items() if name not in _PARENT_ONLY}
        if trace:
            env.pop("TRACESTATE", None)  # the fleet's, if it has one, comes with its TRACEPARENT
            env.update(trace)
        env.update(DATABASE_URL=self.url, MIGRATE_TERMINATION_LOG=str(self.summary_path(workdir)),
                   ALEMBIC_SECTION=settings.alembic_section)
        x_args = [*settings.x_arguments(), *self.x_args]
        if x_args:
            env["ALEMBIC_X_ARGS"] = " ".join(x_args)
        return env

    def span_attributes(self) -> dict:
        """The attributes of its span in the fleet's trace: never the user or the password (nor the query)."""
        url = make_url(self.url)
        shown = URL.create(url.drivername, host=url.host, port=url.port, database=url.database).render_as_string()
        attributes = {**telemetry.database_attributes(url), f"{telemetry.PREFIX}fleet.position": self.position,
                      f"{telemetry.PREFIX}fleet.target": log.redact(" ".join([shown, *self.x_args]))}
        if self.x_args:
            attributes[f"{telemetry.PREFIX}fleet.x_args"] = list(self.x_args)
        return attributes

    def span_name(self) -> str:
        """`target <database>` (and its -x items, which tell tenants of one database apart)."""
        return log.redact(" ".join(["target", make_url(self.url).database or f"line {self.line}", *self.x_args]))

    def summary_path(self, workdir: Path) -> Path:
        return workdir / f"{self.position}.json"

    def output_path(self, workdir: Path) -> Path:
        return workdir / f"{self.position}.log"


def read_targets(path: Path) -> list[Target]:
    """The targets of the file, each URL checked (never echoed) and its password masked from now on."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"DATABASE_URLS_FILE: cannot read {path}: {e.strerror}") from None
    targets = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        raw, x_args = words[0], tuple(word for word in words[1:] if word != "-x")
        parsed = parse_url(raw, f"DATABASE_URLS_FILE line {number}")
        log.add_url_secrets(parsed)
        shown = make_url(raw).render_as_string(hide_password=True)
        label = log.redact(" ".join([shown, *x_args]))
        targets.append(Target(len(targets), number, raw, x_args, label))
    if not targets:
        raise ConfigError(f"DATABASE_URLS_FILE: {path} lists no target (one URL per line, `#` for comments)")
    return targets


def shard(targets: list[Target], settings: Settings) -> list[Target]:
    """This pod's share: the targets whose position modulo MIGRATE_FLEET_SHARDS is JOB_COMPLETION_INDEX."""
    shards, index = settings.fleet_shards, settings.job_completion_index
    if shards == 1:
        return targets
    if index is None:
        raise ConfigError(f"MIGRATE_FLEET_SHARDS={shards} needs JOB_COMPLETION_INDEX (set by Kubernetes in an "
                          f"Indexed Job's pods)")
    if index >= shards:
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} is not below MIGRATE_FLEET_SHARDS={shards}: the Job's "
                          f"completions and the shards must match")
    return [target for target in targets if target.position % shards == index]


def run(settings: Settings, report: Report, command: str) -> int:
    """Run `command` on every target of this shard; exit 0 when all are at the heads (see `outcome`)."""
    if command == "heads":  # needs no database
        return commands.COMMANDS["heads"](settings, report)
    if command not in COMMANDS:
        raise ConfigError(f"DATABASE_URLS_FILE: `{command}` does not run on a fleet; {', '.join(COMMANDS)} do "
                          f"(run it with DATABASE_URL for one target)")
    if settings.database_url is not None or settings.database_url_file is not None:
        raise ConfigError("DATABASE_URLS_FILE and DATABASE_URL (or DATABASE_URL_FILE) are both set; set one")
    every = read_targets(settings.database_urls_file)
    targets = shard(every, settings)
    # Once for all: a project with two heads, or a MIGRATE_TARGET it lacks, touches no target.
    commands._config_and_scripts(settings, parse_url(every[0].url))
    canary = targets[:settings.fleet_canary]
    logger.info("fleet: %d of %d targets%s, %d at once%s", len(targets), len(every),
                f" (shard {settings.job_completion_index} of {settings.fleet_shards})"
                if settings.fleet_shards > 1 else "", settings.fleet_concurrency,
                f", canary the first {len(canary)}" if canary else "",
                extra={"targets_total": len(every), "targets_here": len(targets),
                       "concurrency": settings.fleet_concurrency, "canary": len(canary)})
    rows: dict[int, dict] = {}
    report.targets = []

    def record(target: Target, row: dict) -> None:
        rows[target.position] = row
        report.targets = [rows[t.position] for t in targets if t.position in rows]

    stop: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: stop.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            workdir = tempfile.TemporaryDirectory(prefix="migration-runner-fleet-")
        except OSError as e:
            raise ConfigError(f"a fleet needs a writable temporary directory (TMPDIR, else /tmp): {e.strerror}") \
                from None
        with workdir as directory:
            batches = [canary, targets[len(canary):]] if canary else [targets]
            for number, batch in enumerate(batches):
                _run_batch(batch, settings, command, Path(directory), stop, record)
                failed = [t for t in batch if t.position in rows and rows[t.position]["exit_code"] != EXIT_OK]
                if stop or (canary and number == 0 and failed):
                    break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for target in targets:
        if target.position not in rows:
            record(target, {"target": target.label, "outcome": "not run", "exit_code": None,
                            "from_revision": [], "to_revision": [], "duration": 0.0})
    if stop:
        raise Interrupted(stop[0])
    return _outcome(report, command, canary)


def _outcome(report: Report, command: str, canary: list[Target]) -> int:
    rows = report.targets
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    tally = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    failed = [row for row in rows if row["exit_code"] not in (EXIT_OK, None)]
    if not failed:
        report.outcome = "fleet done"
        report.message = f"fleet {command}: {len(rows)} targets at the heads ({tally})"
        return EXIT_OK
    codes = sorted({row["exit_code"] for row in failed})
    canary_failed = canary and all(row["outcome"] == "not run" for row in rows[len(canary):]) and any(
        row["exit_code"] not in (EXIT_OK, None) for row in rows[:len(canary)])
    first = failed[0]
    error = TargetsFailed(
        f"fleet {command}: {len(failed)} of {len(rows)} targets failed ({tally})"
        + (f"; the canary failed, so the {len(rows) - len(canary)} other targets were not touched"
           if canary_failed and len(rows) > len(canary) else "")
        + f"; first: {first['target']}: {first.get('message') or first['outcome']}")
    if len(codes) == 1:
        error.exit_code = codes[0]  # one shared code keeps the podFailurePolicy's verdict
    raise error


def _run_batch(batch: list[Target], settings: Settings, command: str, workdir: Path, stop: list[int],
               record) -> None:
    """Migrate `batch`, MIGRATE_FLEET_CONCURRENCY at a time; on a signal start none, forward it, and wait."""
    queue = list(batch)
    running: dict[Target, tuple[subprocess.Popen, float, object]] = {}  # and its span (None: telemetry off)
    forwarded_at = None
    try:
        while queue or running:
            while queue and not stop and len(running) < settings.fleet_concurrency:
                target = queue.pop(0)
                span = telemetry.open_span(target.span_name(), target.span_attributes()) \
                    if telemetry.recording() else None
                try:
                    process = _start(target, settings, command, workdir, telemetry.propagation(span))
                except BaseException as e:
                    telemetry.close_span(span, error=(type(e).__name__, str(e)))
                    raise
                running[target] = (process, time.monotonic(), span)
            for target, (process, started, span) in list(running.items()):
                if process.poll() is not None:
                    del running[target]
                    row = _finish(target, process, time.monotonic() - started, workdir)
                    record(target, row)
                    _close(span, row)
            if stop:
                queue.clear()
                if forwarded_at is None:
                    forwarded_at = time.monotonic()
                    for process, _, _ in running.values():
                        _signal(process, stop[0])
                    if running:
                        logger.warning("%s: stopping %d targets in flight (each rolls back and releases its lock)",
                                       signal.Signals(stop[0]).name, len(running))
                elif time.monotonic() - forwarded_at > FORWARD_GRACE:
                    for process, _, _ in running.values():
                        _signal(process, signal.SIGKILL)
            if running:
                time.sleep(_POLL)
    finally:
        for _, _, span in running.values():  # only when the loop itself failed: ended, if not waited for
            telemetry.close_span(span, error=("abandoned", "the fleet stopped waiting for this target"))


def _close(span, row: dict) -> None:
    """End a target's span with its outcome; an error exactly when its runner exited non-zero."""
    attributes = {f"{telemetry.PREFIX}exit_code": row["exit_code"], f"{telemetry.PREFIX}outcome": row["outcome"]}
    failed = row["exit_code"] != EXIT_OK
    telemetry.close_span(span, attributes, (row["outcome"], row.get("message") or row["outcome"]) if failed else None)


def _start(target: Target, settings: Settings, command: str, workdir: Path,
           trace: dict[str, str] | None = None) -> subprocess.Popen:
    with open(target.output_path(workdir), "wb") as output:
        # Its own session: a terminal's Ctrl-C reaches the children through this process, once.
        return subprocess.Popen([sys.executable, "-m", "runner", command],
                                env=target.environment(settings, workdir, trace),
                                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def _finish(target: Target, process: subprocess.Popen, duration: float, workdir: Path) -> dict:
    """The target's row, from the summary its runner wrote; one log line saying how it ended."""
    code = process.returncode if process.returncode >= 0 else 128 - process.returncode
    try:
        summary = json.loads(target.summary_path(workdir).read_text())
    except (OSError, ValueError):
        summary = None
    if summary is None:  # killed before its summary: its output's end says why
        tail = target.output_path(workdir).read_text(errors="replace").strip().splitlines()[-3:]
        summary = {"outcome": "lost", "message": log.redact(" | ".join(tail)) or f"exited {code} with no summary"}
    row = {"target": target.label, "outcome": summary.get("outcome", "lost"), "exit_code": code,
           "from_revision": summary.get("from_revision", []), "to_revision": summary.get("to_revision", []),
           "duration": round(duration, 3)}
    if code != EXIT_OK:
        row["message"] = summary.get("message", "")
    logger.log(logging.INFO if code == EXIT_OK else logging.ERROR, "target %s: %s (exit %d, %.1fs)", target.label,
               summary.get("message") or row["outcome"], code, duration,
               extra={key: value for key, value in row.items() if key != "message"})
    return row
