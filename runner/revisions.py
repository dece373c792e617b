"""Read-only questions about the scripts and the database: heads, state, what is pending."""

from __future__ import annotations

import configparser
import logging
from dataclasses import dataclass, field
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import URL, Connection

from .errors import ConfigError, DatabaseAhead, LegacyDatabase, MultipleHeads


def load_config(path: Path, url: URL | None = None) -> Config:
    """alembic.ini, with sqlalchemy.url set to the runner's URL when there is one."""
    if not path.is_file():
        raise ConfigError(f"ALEMBIC_CONFIG: {path} does not exist or is not a file")
    try:
        path.open().close()
        config = Config(str(path))
        config.file_config  # parse now, so a broken file is a config error here
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"ALEMBIC_CONFIG: cannot read {path}: {str(e).splitlines()[0]}") from None
    if url is not None:
        # configparser interpolates %: a percent-encoded password must be doubled.
        config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def load_scripts(config: Config) -> ScriptDirectory:
    """The script directory with every revision file loaded, so a broken one is a config error here."""
    try:
        script = ScriptDirectory.from_config(config)
    except CommandError as e:
        raise ConfigError(f"ALEMBIC_CONFIG: {config.config_file_name}: {e}") from None
    try:
        script.revision_map.heads
    except Exception as e:  # a revision file that does not import, a duplicate id, a cycle
        raise ConfigError(f"cannot load the migration scripts in {script.dir}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return script


def check_single_head(script: ScriptDirectory) -> tuple[str, ...]:
    """The scripts' heads; MultipleHeads unless there is exactly one."""
    heads = tuple(script.get_heads())
    if len(heads) > 1:
        described = ", ".join(
            f"{head} (parent {_parents(script, head)}: {script.get_revision(head).doc or ''})".replace(": )", ")")
            for head in heads)
        ancestor = common_ancestor(script, heads) or "base"
        raise MultipleHeads(
            f"the scripts have {len(heads)} heads: {described}; common ancestor {ancestor}; merge them with: "
            f"{merge_command(heads)} (or set MIGRATE_ALLOW_MULTIPLE_HEADS=true)")
    return heads


def common_ancestor(script: ScriptDirectory, heads) -> str | None:
    """The newest revision every head descends from, None if they share none."""
    lineages = [[r.revision for r in script.iterate_revisions(head, "base")] for head in heads]
    shared = set.intersection(*(set(lineage) for lineage in lineages))
    return next((revision for revision in lineages[0] if revision in shared), None)


def merge_command(heads) -> str:
    return f'alembic merge -m "merge heads" {" ".join(heads)}'


def _parents(script: ScriptDirectory, revision: str) -> str:
    down = script.get_revision(revision).down_revision
    if not down:
        return "base"
    return "+".join(down) if isinstance(down, tuple) else down


@dataclass
class State:
    """What the database holds, as the runner decides what to do about it."""

    kind: str  # fresh | legacy | ahead | current | pending
    current: tuple[str, ...] = ()
    tables: list[str] = field(default_factory=list)
    unknown: tuple[str, ...] = ()
    pending: list = field(default_factory=list)  # Script objects, oldest first


def database_state(connection: Connection, script: ScriptDirectory, *, version_table: str,
                   schema: str | None) -> State:
    """Classify the database against the scripts, through alembic's MigrationContext."""
    current = current_heads(connection, version_table=version_table, schema=schema)
    if not current:
        tables = [t for t in inspect(connection).get_table_names(schema=schema) if t != version_table]
        if tables:
            return State(kind="legacy", tables=sorted(tables))
        return State(kind="fresh", pending=pending_revisions(script, ()))
    unknown = tuple(rev for rev in current if not _known(script, rev))
    if unknown:
        return State(kind="ahead", current=current, unknown=unknown)
    pending = pending_revisions(script, current)
    return State(kind="pending" if pending else "current", current=current, pending=pending)


def current_heads(connection: Connection, *, version_table: str, schema: str | None) -> tuple[str, ...]:
    """The revisions in the version table (none if it does not exist)."""
    # MigrationContext announces its dialect at INFO; that is noise for a read.
    chatty = logging.getLogger("alembic.runtime.migration")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        context = MigrationContext.configure(
            connection, opts={"version_table": version_table, "version_table_schema": schema})
        return tuple(context.get_current_heads())
    finally:
        chatty.setLevel(level)


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def pending_revisions(script: ScriptDirectory, current: tuple[str, ...]) -> list:
    """Scripts `upgrade heads` would apply from `current`, in the order it applies them."""
    steps = script._upgrade_revs("heads", current)
    return [step.revision for step in steps]


def refuse_legacy(state: State, baseline: str | None, script: ScriptDirectory) -> str:
    """The baseline to stamp on a legacy database, or LegacyDatabase saying why not."""
    if baseline is None:
        sample = ", ".join(state.tables[:5]) + (", ..." if len(state.tables) > 5 else "")
        raise LegacyDatabase(
            f"the database has {len(state.tables)} tables ({sample}) but no version table: it predates "
            f"Alembic; set MIGRATE_BASELINE_REVISION to the revision its schema matches to stamp it")
    if not _known(script, baseline):
        raise LegacyDatabase(f"MIGRATE_BASELINE_REVISION={baseline!r} is not a revision in the scripts")
    return script.get_revision(baseline).revision


def refuse_ahead(state: State) -> None:
    raise DatabaseAhead(
        f"the database is at {', '.join(state.unknown)}, which these scripts do not contain: "
        f"it was migrated by a newer version of the application; deploy that version or downgrade with it")
