"""The database's state as a command reads it through env.py, logged, and judged against MIGRATE_TARGET."""

from __future__ import annotations

import logging

from alembic.config import Config
from alembic.script import ScriptDirectory

from . import database, envpy, revisions, target
from .errors import EXIT_OK, PendingRevisions
from .report import Report
from .settings import Settings
from .wording import count, names

logger = logging.getLogger("runner")


def read(config: Config, script: ScriptDirectory, settings: Settings, also=None,
         goal: target.Target | None = None) -> revisions.State:
    """The database's state as env.py sees it, judged against `goal` (default heads); the MIGRATE_ version table
    variables, if set, must agree."""
    return revisions.database_state(config, script, also=also, goal=goal, **expected_version_table(settings))


def read_or_fail(config: Config, script: ScriptDirectory, settings: Settings,
                 also=None, goal: target.Target | None = None) -> revisions.State:
    """`read` for the read-only commands, env.py's connections tagged, failures as RunnerErrors."""
    try:
        with database.tagged():
            return read(config, script, settings, also, goal)
    except Exception as e:
        raise envpy.failure(e) from None


def expected_version_table(settings: Settings) -> dict[str, str | None]:
    """The version table variables the user set (unset: env.py alone says where the table is)."""
    explicit = settings.model_fields_set
    return {"version_table": settings.version_table if "version_table" in explicit else None,
            "version_table_schema": settings.version_table_schema if "version_table_schema" in explicit else None}


def log(state: revisions.State) -> None:
    detail = f" at {names(state.current)}" if state.current else ""
    if state.kind == "legacy":
        detail = f" ({count(len(state.tables), 'table')}, no version table)"
    logger.info("database is %s%s", state.kind, detail, extra={"state": state.kind, "current": list(state.current)})


def judge(state: revisions.State, report: Report, script: ScriptDirectory, settings: Settings,
          goal: target.Target | None = None) -> int:
    """Exit 0 at (or beyond) `goal` (default heads), or ahead as MIGRATE_ALLOW_AHEAD lets through; else raise
    PendingRevisions (9) or DatabaseAhead (8). The summary says which."""
    report.from_revision = report.to_revision = state.current
    if state.kind == "ahead":
        let_ahead_through(settings, state, script)
        report.outcome = "ahead"
        report.message = f"ahead of the scripts: at {names(state.current)}, heads {names(script.get_heads())}"
        return EXIT_OK
    if state.kind == "current":
        report.outcome = "current"
        report.message = (f"at heads: {names(state.current)}" if goal is None or goal.is_heads else
                          f"at or beyond {goal}: {names(state.current)}")
        return EXIT_OK
    pending = state.pending or []
    report.pending = [revision.revision for revision in pending]
    report.outcome = "pending"
    if state.kind == "legacy":
        raise PendingRevisions(f"the database has {count(len(state.tables), 'table')} but no version table: "
                               f"`upgrade` needs MIGRATE_BASELINE_REVISION")
    described = ", ".join(f"{r.revision} ({revisions.title(r.doc)})".replace(" ()", "") for r in pending)
    aim = "" if goal is None or goal.is_heads else f" for {goal}"
    raise PendingRevisions(f"{count(len(pending), 'revision')} pending{aim} at {names(state.current)}: {described}")


def let_ahead_through(settings: Settings, state: revisions.State, script: ScriptDirectory) -> None:
    """Warn about a database ahead of the scripts that MIGRATE_ALLOW_AHEAD lets through, or raise DatabaseAhead."""
    verdict = revisions.ahead(state, script, settings.allow_ahead)
    logger.warning(revisions.describe_ahead(state, script, verdict, settings.allow_ahead),
                   extra={"current": list(state.current), "heads": list(script.get_heads()),
                          "proven": verdict.proven})
