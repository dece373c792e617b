"""Read-only questions about the scripts and the database: heads, state, what is pending."""

from __future__ import annotations

import argparse
import configparser
import tomllib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psycopg
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from psycopg import sql
from sqlalchemy import MetaData, Table, text
from sqlalchemy.engine import URL, Connection

from . import envpy, lineage, log, target, telemetry
from .errors import ConfigError, DatabaseAhead, LegacyDatabase, MultipleHeads

logger = logging.getLogger("runner")

# What a framework does to every Config it builds, applied last by load_config: while FLASK_APP's
# application context is entered, Flask-Migrate's defaults and callbacks (runner/flaskapp.py).
config_hooks: list[Callable[[Config], Config]] = []


def load_config(path: Path, url: URL | None = None, *, section: str = "alembic", x_args: list[str] = (),
                cwd: Path | None = None) -> Config:
    """alembic's Config as its command line makes it, with sqlalchemy.url set to the runner's URL.

    `path` is alembic.ini or a pyproject.toml; the other file of the pair is found as
    alembic's CLI finds it (beside `path`, or in the working directory), then
    `section` is `-n` and `x_args` are the `-x` options.
    """
    ini, toml = _config_files(path, cwd or Path.cwd())
    try:
        for file in (ini, toml):
            if file is not None:
                file.open().close()
        config = Config(str(ini) if ini else None, toml_file=str(toml) if toml else None, ini_section=section,
                        cmd_opts=argparse.Namespace(x=list(x_args), config=str(ini or toml), name=section))
        config.file_config  # parse now, so a broken file is a config error here
        config.toml_alembic_config
    except (OSError, configparser.Error, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"ALEMBIC_CONFIG: cannot read {ini or toml}: {str(e).splitlines()[0]}") from None
    if ini is not None and not config.file_config.has_section(section):
        sections = ", ".join(config.file_config.sections()) or "none"
        raise ConfigError(f"ALEMBIC_SECTION: {ini} has no [{section}] section (it has: {sections}); "
                          f"name the section to use with ALEMBIC_SECTION or -n")
    if config.get_main_option("databases"):
        raise ConfigError(
            f"{ini} lists `databases` (alembic's multidb template): the runner locks and checks only the database "
            f"DATABASE_URL names; run one runner per database, each with an alembic.ini of one database")
    if url is not None:
        # configparser interpolates %: a percent-encoded password must be doubled.
        config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    for hook in config_hooks:
        config = hook(config)
    return config


def _config_files(path: Path, cwd: Path) -> tuple[Path | None, Path | None]:
    """(alembic.ini, pyproject.toml) for ALEMBIC_CONFIG=`path`; either may be absent, not both."""
    if path.name == "pyproject.toml":
        if not path.is_file():
            raise ConfigError(f"ALEMBIC_CONFIG: {path} does not exist or is not a file")
        ini = next((p for p in (path.with_name("alembic.ini"), cwd / "alembic.ini") if p.is_file()), None)
        return ini, path
    toml = next((p for p in (path.with_name("pyproject.toml"), cwd / "pyproject.toml") if _has_alembic_table(p)), None)
    if path.is_file():
        return path, toml
    if toml is None:
        raise ConfigError(f"ALEMBIC_CONFIG: {path} does not exist or is not a file (nor is there a pyproject.toml "
                          f"with [tool.alembic] beside it or in {cwd})")
    return None, toml


def _has_alembic_table(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return "alembic" in tomllib.load(f).get("tool", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False


def load_scripts(config: Config) -> ScriptDirectory:
    """The script directory with every revision file loaded, so a broken one is a config error here."""
    try:
        script = ScriptDirectory.from_config(config)
    except CommandError as e:
        where = config.config_file_name or config.toml_file_name
        hint = ""
        if "script_location" in str(e):
            hint = (f" (looked in section [{config.config_ini_section}] of {config.config_file_name}"
                    f"{' and [tool.alembic] of ' + config.toml_file_name if config.toml_file_name else ''}; "
                    f"ALEMBIC_SECTION or -n names another section)")
        raise ConfigError(f"ALEMBIC_CONFIG: {where}: {e}{hint}") from None
    try:
        with envpy.no_exit():
            script.revision_map.heads
    except Exception as e:  # a revision file that does not import (or exits), a duplicate id, a cycle
        raise ConfigError(f"cannot load the migration scripts in {script.dir}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return script


def check_single_head(script: ScriptDirectory) -> tuple[str, ...]:
    """The scripts' heads; MultipleHeads unless there is one, or each is the one head of a branch label of its own.

    Heads in distinct labelled branches are deliberate (OpenStack's `expand` and `contract`,
    alembic's docs on branch labels): `upgrade heads` applies them all. Two heads inside one
    branch, or a head outside every label beside another, are a fork nobody merged.
    """
    heads = tuple(script.get_heads())
    if len(heads) <= 1:
        return heads
    labels = branch_labels(script, heads)
    stray = [head for head in heads if not own_labels(labels, head)]
    if not stray:
        return heads
    described = ", ".join(
        f"{head} (parent {_parents(script, head)}: {title(script.get_revision(head).doc)})".replace(": )", ")")
        for head in stray)
    shared = sorted({label for head in stray for label in labels[head]})
    where = (f"{len(stray)} heads in branch {', '.join(shared)}" if shared and len(stray) > 1 else
             f"{_plural(len(stray), 'head')} outside any branch label of {'its' if len(stray) == 1 else 'their'} own"
             if not shared else
             f"head {stray[0]} shares branch {', '.join(shared)} with another head")
    ancestor = common_ancestor(script, stray if len(stray) > 1 else heads) or "base"
    others = [head for head in heads if head not in stray]
    kept = f" (besides {', '.join(describe_head(labels, head) for head in others)})" if others else ""
    raise MultipleHeads(
        f"the scripts have {where}: {described}{kept}; common ancestor {ancestor}; merge them with: "
        f"{merge_command(stray if len(stray) > 1 else heads)} (or give each branch a label of its own, or set "
        f"MIGRATE_ALLOW_MULTIPLE_HEADS=true)")


def branch_labels(script: ScriptDirectory, heads) -> dict[str, set[str]]:
    """Each head's branch labels, as alembic carries them down a labelled branch."""
    return {head: set(script.get_revision(head).branch_labels) for head in heads}


def own_labels(labels: dict[str, set[str]], head: str) -> set[str]:
    """The labels of `head` that no other head carries: the branches it alone is the head of."""
    return labels[head] - set().union(*(found for other, found in labels.items() if other != head))


def describe_head(labels: dict[str, set[str]], head: str) -> str:
    """`e2 (expand)`: a head with the branch labels it alone carries."""
    own = sorted(own_labels(labels, head))
    return f"{head} ({', '.join(own)})" if own else head


def title(doc: str | None) -> str:
    """A revision's message as one line: its first (messages may span several)."""
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


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


class NoMigrationsRun(ConfigError):
    """env.py returned without calling context.run_migrations()."""

    def __init__(self) -> None:
        super().__init__("env.py returned without calling context.run_migrations() (online mode): nothing was "
                         "read or applied through it")


class SeveralContexts(ConfigError):
    """env.py called context.run_migrations() more than once (per database, per tenant schema)."""

    def __init__(self) -> None:
        super().__init__("env.py runs the migrations more than once in one run (alembic's multidb template, a loop "
                         "over tenants?): the runner reads, locks and checks one version table; not supported")


@dataclass
class State:
    """What the database holds, as the runner decides what to do about it."""

    kind: str  # fresh | legacy | ahead | current | pending
    current: tuple[str, ...] = ()
    tables: list[str] = field(default_factory=list)
    unknown: tuple[str, ...] = ()
    pending: list = field(default_factory=list)  # Script objects, oldest first
    # Where env.py keeps the version table (the schema resolved on env.py's own connection).
    schema: str | None = None
    table: str = "alembic_version"
    lineage: lineage.Lineage | None = None  # read when the database is ahead: what proves it descends from ours


def database_state(config: Config, script: ScriptDirectory, *, version_table: str | None = None,
                   version_table_schema: str | None = None, also=None, goal: target.Target | None = None) -> State:
    """The database as env.py sees it, read by running env.py as `alembic current` does (dont_mutate).

    env.py's own engine, driver, search_path and version table options decide where
    the version table is. `version_table`/`version_table_schema`, when given (the
    MIGRATE_ variables were set), must agree with env.py. `also(context, state)`, if
    given, reads more on env.py's MigrationContext in the same run (`verify`). `goal` is the
    upgrade target pending and current are judged against (default heads).
    """
    found: list[State] = []

    def read(heads, context) -> list:
        found.append(observe(context, script, version_table=version_table, version_table_schema=version_table_schema,
                             goal=goal))
        if also is not None:
            also(context, found[-1])
        return []

    with quietly():
        envpy.run(config, script, read, dont_mutate=True)
    if not found:
        raise NoMigrationsRun()
    if len(found) > 1:
        raise SeveralContexts()
    return found[0]


@telemetry.traced("read state", result=lambda state: {
    "migration.state": state.kind, "migration.from_revisions": list(state.current),
    "migration.pending": [revision.revision for revision in state.pending or ()]})
def observe(context, script: ScriptDirectory, *, version_table: str | None = None,
            version_table_schema: str | None = None, tables_before: frozenset[int] | None = None,
            goal: target.Target | None = None) -> State:
    """The state as env.py's MigrationContext sees it, on env.py's own connection and version table.

    `tables_before` (the tables there were when the lock was taken, `existing_tables`) keeps
    tables env.py's own code made in this run from making the database legacy.
    """
    state = state_of(context.connection, script, version_table=context.version_table,
                     schema=context.version_table_schema, tables_before=tables_before, goal=goal)
    for variable, wanted, actual in (("MIGRATE_VERSION_TABLE", version_table, state.table),
                                     ("MIGRATE_VERSION_TABLE_SCHEMA", version_table_schema, state.schema)):
        if wanted is not None and wanted != actual:
            raise ConfigError(f"{variable}={wanted} but env.py keeps the version table at "
                              f"{state.schema}.{state.table}: set {variable}={actual} or unset it")
    return state


def state_of(connection: Connection, script: ScriptDirectory, *, version_table: str = "alembic_version",
             schema: str | None = None, tables_before: frozenset[int] | None = None,
             goal: target.Target | None = None) -> State:
    """Classify the database against the scripts, reading the version table on `connection`.

    With `tables_before`, only tables among them count towards a legacy database. Pending and
    current are judged against `goal` (default heads): at or beyond it is current.
    """
    schema = schema or _schema_alembic_reads(connection, version_table)
    current = current_heads(connection, version_table=version_table, schema=schema)
    where = {"schema": schema, "table": version_table}
    if not current:
        found = connection.execute(_TABLES_IN_SCHEMA, {"schema": schema, "table": version_table}).all()
        tables = [name for name, oid in found if tables_before is None or oid in tables_before]
        if len(tables) < len(found):
            made = sorted({name for name, _ in found} - set(tables))
            logger.info("%s made by env.py's own code in this run, not by the database's past: not legacy",
                        _plural(len(made), "table") + f" ({', '.join(made[:5])}{', ...' if len(made) > 5 else ''})",
                        extra={"made_in_this_run": made})
        if tables:
            _refuse_version_table_elsewhere(connection, script, version_table, schema)
            return State(kind="legacy", tables=sorted(tables), **where)
        return State(kind="fresh", pending=pending_revisions(script, (), goal), **where)
    unknown = tuple(rev for rev in current if not _known(script, rev))
    if unknown:
        recorded = lineage.decode(version_table_comment(connection, version_table=version_table, schema=schema))
        return State(kind="ahead", current=current, unknown=unknown, lineage=recorded, **where)
    pending = pending_revisions(script, current, goal)
    return State(kind="pending" if pending else "current", current=current, pending=pending, **where)


# The tables of a schema (as SQLAlchemy's get_table_names lists them: ordinary and partitioned), by oid.
_TABLES_IN_SCHEMA = text("""
    SELECT c.relname, c.oid::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND c.relname <> :table ORDER BY c.relname
""")

# Every table of the database, by oid: a table env.py makes later in the run gets a new one.
_ALL_TABLES = "SELECT c.oid::bigint FROM pg_class c WHERE c.relkind IN ('r', 'p')"


def existing_tables(query: Callable[[str], list[tuple]]) -> frozenset[int]:
    """The oids of the tables the database has now, read with `query` (the lock's session)."""
    return frozenset(row[0] for row in query(_ALL_TABLES))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# Where an unqualified name resolves, as alembic's own reads of the version table do: the
# first schema of the search_path holding it, else the one it would be created in.
_VISIBLE_SCHEMA = text("""
    SELECT coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relname = :table AND c.relkind IN ('r', 'p') AND pg_table_is_visible(c.oid)),
                    current_schema())
""")


def _schema_alembic_reads(connection: Connection, table: str) -> str:
    return connection.execute(_VISIBLE_SCHEMA, {"table": table}).scalar()


# Tables named like the version table in other schemas, with a version_num column we may read.
_VERSION_TABLES_ELSEWHERE = text("""
    SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = :table AND c.relkind IN ('r', 'p') AND n.nspname <> :schema
       AND has_table_privilege(c.oid, 'SELECT')
       AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'version_num')
""")


def _refuse_version_table_elsewhere(connection: Connection, script: ScriptDirectory, table: str, schema: str) -> None:
    # Tables but no version table where env.py looks: before calling the database legacy (and
    # perhaps stamping it), make sure this project's version table does not sit in another schema.
    for (other,) in connection.execute(_VERSION_TABLES_ELSEWHERE, {"table": table, "schema": schema}).all():
        quoted = connection.dialect.identifier_preparer.format_table(Table(table, MetaData(), schema=other))
        rows = [row[0] for row in connection.exec_driver_sql(f"SELECT version_num FROM {quoted}")]
        if any(_known(script, revision) for revision in rows):
            raise ConfigError(
                f"no version table at {schema}.{table}, where env.py looks, but {other}.{table} holds revisions of "
                f"these scripts ({', '.join(rows)}): refusing to treat the database as legacy; give env.py's "
                f"context.configure version_table_schema={other!r} (or set MIGRATE_VERSION_TABLE_SCHEMA={schema} "
                f"to confirm {schema} is right)")


_COMMENT = text("""
    SELECT obj_description(c.oid, 'pg_class') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = :table AND n.nspname = :schema
""")


def version_table_comment(connection: Connection, *, version_table: str, schema: str) -> str | None:
    """The version table's comment, where the runner records the lineage."""
    return connection.execute(_COMMENT, {"table": version_table, "schema": schema}).scalar()


def current_heads(connection: Connection, *, version_table: str, schema: str | None) -> tuple[str, ...]:
    """The revisions in the version table (none if it does not exist)."""
    with quietly():
        context = MigrationContext.configure(
            connection, opts={"version_table": version_table, "version_table_schema": schema})
        return tuple(context.get_current_heads())


def version_rows(session: psycopg.Connection, *, version_table: str, schema: str) -> tuple[str, ...]:
    """The revisions in the version table `schema`.`version_table` (none if it does not exist), read with
    plain SQL on one of the runner's own sessions, as `current_heads` reads them through alembic."""
    name = sql.Identifier(schema, version_table)
    if session.execute("SELECT to_regclass(%s)", (name.as_string(session),)).fetchone()[0] is None:
        return ()
    return tuple(row[0] for row in session.execute(sql.SQL("SELECT version_num FROM {}").format(name)))


@contextmanager
def quietly(*names: str) -> Iterator[None]:
    """The loggers `names` and their children held to WARNING inside the `with`: by default
    MigrationContext's, which announces its dialect (and each revision it runs) at INFO, noise for a read
    or a scratch build. Held at the runner's handler (log.hushed), which env.py's fileConfig cannot reset."""
    with log.hushed(*(names or ("alembic.runtime.migration",))):
        yield


def applied_between(script: ScriptDirectory, before: tuple[str, ...], after: tuple[str, ...]) -> list[str]:
    """The revisions `upgrade` applied to go from `before` to `after`, oldest first."""
    if set(before) == set(after) or not all(_known(script, revision) for revision in (*before, *after)):
        return []
    pending = pending_revisions(script, before)
    if set(after) == set(script.get_heads()):  # every revision lies beneath the heads: no walk from them
        return [r.revision for r in pending]
    reached = target.at_or_below(script, after)
    return [r.revision for r in pending if r.revision in reached]


def reverted_between(script: ScriptDirectory, before: tuple[str, ...], after: tuple[str, ...]) -> list[str]:
    """The revisions `downgrade` reverted to go from `before` to `after`, newest first."""
    if not all(_known(script, revision) for revision in (*before, *after)):
        return []
    gone = _lineage_of(script, before) - _lineage_of(script, after)
    return [r.revision for r in script.walk_revisions() if r.revision in gone]


def _lineage_of(script: ScriptDirectory, revisions_: tuple[str, ...]) -> set[str]:
    """`revisions_` and every revision beneath them."""
    return target.at_or_below(script, revisions_)


def above(script: ScriptDirectory, revision: str | None) -> list:
    """Every revision of the scripts not at or beneath `revision` (None: base), oldest first."""
    beneath = _lineage_of(script, (revision,)) if revision else set()
    return [r for r in reversed(list(script.walk_revisions())) if r.revision not in beneath]


def downgrade_target(script: ScriptDirectory, target: str, command: str = "downgrade") -> str | None:
    """The full id of a downgrade (or lint --from) target given as a revision id (or a unique prefix of one);
    None for base."""
    if target == "base":
        return None
    if target in ("head", "heads") or target.startswith(("-", "+")) or any(c in target for c in ":@"):
        raise ConfigError(f"{command} {target}: give a revision id of the scripts, or base (relative and symbolic "
                          f"targets are refused: the target should be read in the command that runs)")
    try:
        revision = script.get_revision(target)
    except CommandError as e:
        raise ConfigError(f"{command} {target}: not a revision of the scripts in {script.dir} ({e})") from None
    if revision is None:
        raise ConfigError(f"{command} {target}: not a revision of the scripts in {script.dir}")
    return revision.revision


def refuse_downgrade(state: State, script: ScriptDirectory, goal: str | None) -> None:
    """ConfigError unless the database's revisions are at `goal` (None: base) or above it; DatabaseAhead when
    the scripts do not know them (they lack the downgrade code)."""
    if state.kind == "ahead":
        recorded = state.lineage.image if state.lineage else None
        raise DatabaseAhead(f"downgrade {goal or 'base'}: the database is at {', '.join(state.current)}, which these "
                            f"scripts do not know, so they cannot revert it: run the downgrade from "
                            f"{'image ' + recorded if recorded else 'the image whose scripts contain it'}")
    if goal is None or state.current == (goal,):
        return
    if not state.current:
        raise ConfigError(f"downgrade {goal}: the database is at no revision ({state.kind}); there is nothing to "
                          f"downgrade")
    if goal not in _lineage_of(script, state.current) - set(state.current):
        raise ConfigError(f"downgrade {goal}: the database is at {', '.join(state.current)}, and {goal} is not below "
                          f"it; downgrade only goes down (upgrade goes up)")


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def pending_revisions(script: ScriptDirectory, current: tuple[str, ...], goal: target.Target | None = None) -> list:
    """Scripts `upgrade <goal>` (default heads) would apply from `current`, in the order it applies them."""
    return target.pending(script, goal or target.resolve(script, target.HEADS), current)


def refuse_legacy(state: State, baseline: str | None, script: ScriptDirectory) -> str | None:
    """The baseline to stamp on a legacy database (None for `base`: nothing to stamp, upgrade from the
    first revision), or LegacyDatabase saying why not."""
    if baseline is None:
        sample = ", ".join(state.tables[:5]) + (", ..." if len(state.tables) > 5 else "")
        raise LegacyDatabase(
            f"the database has {len(state.tables)} table{'' if len(state.tables) == 1 else 's'} ({sample}) but no "
            f"version table: it predates "
            f"Alembic; set MIGRATE_BASELINE_REVISION to the revision its schema matches to stamp it")
    if baseline == "base":
        # The application created its tables itself and its revisions start from base (mlflow does).
        return None
    if not _known(script, baseline):
        raise LegacyDatabase(f"MIGRATE_BASELINE_REVISION={baseline!r} is not a revision in the scripts "
                             f"(nor `base`)")
    return script.get_revision(baseline).revision


def ahead(state: State, script: ScriptDirectory, allow: str) -> lineage.Verdict:
    """The verdict on a database ahead of the scripts when MIGRATE_ALLOW_AHEAD=`allow` lets it through,
    else DatabaseAhead naming the downgrade that would let these scripts run."""
    verdict = lineage.judge(state.lineage, script, state.current)
    if allow == "always" or (allow == "descendants" and verdict.proven):
        return verdict
    heads = ", ".join(script.get_heads())
    image = f"image {verdict.image}" if verdict.image else f"the newer image (whose scripts contain {', '.join(state.unknown)})"
    command = (f"`migration-runner downgrade {verdict.downgrade_to}`" if verdict.downgrade_to
               else "`migration-runner downgrade <a revision of these scripts>`")
    why = verdict.why if allow == "descendants" else "MIGRATE_ALLOW_AHEAD=never"
    raise DatabaseAhead(
        f"the database is at {', '.join(state.current)}, and these scripts (head {heads}) do not know "
        f"{', '.join(state.unknown)}; {why}. To run this image, first bring the schema back with {command} run from "
        f"{image}; or deploy that image again"
        f"{'; MIGRATE_ALLOW_AHEAD=always accepts it regardless' if allow == 'descendants' else ''}")


def describe_ahead(state: State, script: ScriptDirectory, verdict: lineage.Verdict, allow: str) -> str:
    """The warning for a database let through ahead of the scripts."""
    return (f"the database is at {', '.join(state.current)}, ahead of these scripts (head "
            f"{', '.join(script.get_heads())}): {verdict.why if verdict.proven else 'unproven, ' + verdict.why}; "
            f"changing nothing (MIGRATE_ALLOW_AHEAD={allow})")
