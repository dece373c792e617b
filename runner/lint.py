"""Linting revisions before they deploy: alembic's offline SQL of each, one at a time, through squawk.

squawk knows which PostgreSQL statements take locks that stall traffic (a plain
CREATE INDEX, SET NOT NULL, a volatile default) but needs SQL; alembic renders
any revision as SQL offline. Each revision is rendered alone, from its down
revision, so that a table an earlier revision created counts as existing, and
with the transactions alembic would open around it, minus the statements on the
version table, which are alembic's, not the project's.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import to_tuple

from . import envpy, revisions
from .errors import ConfigError

logger = logging.getLogger("runner.lint")

# squawk rules whose advice the runner carries out itself, so they are off unless asked for:
# it sets lock_timeout (MIGRATE_DDL_LOCK_TIMEOUT) and statement_timeout (MIGRATE_STATEMENT_TIMEOUT)
# on every migration session, where a SET in the revision would only repeat them.
RUNNER_MAKES_MOOT = ("require-lock-timeout", "require-statement-timeout", "require-timeout-settings")


@dataclass
class Finding:
    """One squawk finding in one revision's SQL."""

    revision: str
    rule: str
    line: int  # 1-based, in the revision's SQL
    message: str
    statement: str  # the statement's first line

    def __str__(self) -> str:
        return f"{self.revision} line {self.line}: {self.rule}: {self.message} ({self.statement})"


@dataclass
class Rendered:
    """A revision's offline SQL, or why it has none."""

    revision: str
    title: str
    sql: str = ""
    failure: str = ""


def squawk() -> str:
    """The squawk executable, or ConfigError naming the extra that installs it."""
    found = shutil.which("squawk", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise ConfigError("lint needs squawk, which is not installed: pip install 'migration-runner[lint]' "
                          "(the squawk-cli package)")
    return found


def render(config: Config, script: ScriptDirectory, revision) -> Rendered:
    """`revision`'s upgrade as alembic's offline SQL, without the version table's statements."""
    rendered = Rendered(revision.revision, revisions.title(revision.doc))
    downs = to_tuple(revision.down_revision, default=())
    buffer = io.StringIO()
    config.output_buffer = buffer
    found = []

    def steps(current, context):
        found.append(context.version_table)
        return [step for step in script._upgrade_revs(revision.revision, downs)
                if step.revision.revision == revision.revision]

    try:
        envpy.run(config, script, steps, as_sql=True, starting_rev=",".join(downs) or None,
                  destination_rev=revision.revision)
    except Exception as e:
        rendered.failure = f"cannot be rendered offline (does it need a live database?): {type(e).__name__}: " \
                           f"{str(e).splitlines()[0] if str(e) else ''}"
        return rendered
    finally:
        config.output_buffer = None
    rendered.sql = _without_version_table(buffer.getvalue(), found[0] if found else "alembic_version")
    return rendered


def _without_version_table(sql: str, table: str) -> str:
    """alembic's offline SQL minus its comments and the statements that create or write the version table."""
    ours = re.compile(rf"^\s*(CREATE TABLE|INSERT INTO|UPDATE|DELETE FROM)\s+(\S+\.)?\"?{re.escape(table)}\"?[\s(]",
                      re.IGNORECASE)
    kept = []
    for statement in re.split(r";\s*\n", sql):
        lines = [line for line in statement.splitlines() if line.strip() and not line.lstrip().startswith("--")]
        if lines and not ours.match("\n".join(lines) + " "):
            kept.append("\n".join(lines) + ";")
    return "\n\n".join(kept) + ("\n" if kept else "")


def check(rendered: list[Rendered], exclude: list[str]) -> list[Finding]:
    """squawk's findings for every rendered revision, in the order given."""
    with tempfile.TemporaryDirectory(prefix="migration-runner-lint-") as directory:
        files = {}
        for item in rendered:
            if item.sql.strip():
                path = Path(directory) / f"{len(files):05d}.sql"
                path.write_text(item.sql)
                files[str(path)] = item
        if not files:
            return []
        command = [squawk(), "--reporter", "json"]
        if exclude:
            command.append("--exclude=" + ",".join(exclude))
        proc = subprocess.run([*command, *files], capture_output=True, text=True, timeout=120, cwd=directory)
        try:
            raw = json.loads(proc.stdout or "[]")
        except ValueError:
            raise ConfigError(f"squawk failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}") from None
    findings = []
    for violation in raw:
        item = files.get(violation["file"]) or files.get(str(Path(directory) / violation["file"]))
        if item is None:
            continue
        lines = item.sql.splitlines()
        line = int(violation.get("line", 0)) + 1
        findings.append(Finding(item.revision, violation["rule_name"], line, violation["message"],
                                lines[line - 1].strip() if 0 < line <= len(lines) else ""))
    order = {item.revision: i for i, item in enumerate(rendered)}
    return sorted(findings, key=lambda f: (order[f.revision], f.line))


def lint_revisions(config: Config, script: ScriptDirectory, targets: list, exclude: list[str]) -> tuple[list, list]:
    """(findings, revisions that cannot be rendered offline) for `targets`, oldest first."""
    rendered = [render(config, script, revision) for revision in targets]
    failures = [item for item in rendered if item.failure]
    return check([item for item in rendered if not item.failure], exclude), failures
