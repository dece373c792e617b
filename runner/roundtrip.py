"""`roundtrip`: prove in a scratch database that each revision's downgrade undoes its upgrade.

For each revision above `--from` (default base), oldest first, in a scratch
database (baseline's: created on the server, or MIGRATE_SCRATCH_DATABASE_URL;
never DATABASE_URL's database, and dropped on every path): run its upgrade
alone through env.py and read the catalog; run its downgrade alone and compare
with the catalog before its upgrade; run its upgrade again and compare with the
catalog after the first one. Each step is one run of env.py with that one
migration step, as `alembic upgrade <rev>` / `alembic downgrade` would run it,
so env.py's driver, transactions and version table behave as in production. A
downgrade that raises, undoes nothing, or leaves something other than before is
reported with what differs, and the command exits 12. The catalog is what the
baseline proof compares (tables, columns, keys, constraints, indexes) plus
schemas, types, sequences, views, functions and check constraints.
"""

from __future__ import annotations

import logging
from typing import Callable

from alembic import command as alembic_command
from alembic.config import Config
from alembic.runtime.migration import MigrationStep
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from . import baseline, database, envpy, revisions, sessions
from .errors import (EXIT_OK, ConfigError, DatabaseUnreachable, Irreversible, LockTimeout, RevisionFailed,
                     RunnerError)
from .lock import Lock, key_for
from .report import Report

logger = logging.getLogger("runner.roundtrip")

# Objects the baseline's snapshot leaves out, as (label, definition); extension members are not the project's.
_MORE = """
    SELECT 'schema ' || n.nspname, '' FROM pg_namespace n WHERE n.nspname = ANY(%(schemas)s)
    UNION ALL
    SELECT CASE t.typtype WHEN 'e' THEN 'enum ' WHEN 'd' THEN 'domain ' ELSE 'type ' END
           || n.nspname || '.' || t.typname,
           CASE t.typtype WHEN 'e' THEN (SELECT string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder)
                                           FROM pg_enum e WHERE e.enumtypid = t.oid)
                          WHEN 'd' THEN format_type(t.typbasetype, t.typtypmod) ELSE '' END
      FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
     WHERE n.nspname = ANY(%(schemas)s) AND t.typtype IN ('e', 'd', 'r', 'm')
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = t.oid AND d.deptype = 'e')
    UNION ALL
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence ' WHEN 'v' THEN 'view ' ELSE 'materialized view ' END
           || n.nspname || '.' || c.relname,
           CASE WHEN c.relkind = 'S' THEN '' ELSE pg_get_viewdef(c.oid) END
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('S', 'v', 'm')
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid))
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = ANY(%(schemas)s) AND p.prokind IN ('f', 'p')
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
    UNION ALL
    SELECT 'check constraint ' || k.conname || ' on ' || n.nspname || '.' || c.relname, pg_get_constraintdef(k.oid)
      FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ANY(%(schemas)s) AND k.contype = 'c'
"""


class _StepFailed(Exception):
    """A step's env.py run raised: the error, in one line."""


def prove(config_for: Callable[[URL], Config], script: ScriptDirectory, report: Report, *, url: URL, given: URL,
          scratch: URL | None, lock_timeout: float, start: str | None) -> int:
    """Round-trip every revision above `start` in a scratch database; Irreversible listing those that fail."""
    todo = revisions.above(script, start)
    # A lock of its own on DATABASE_URL's database (not the migration's): it names the scratch database, shows
    # which database env.py must never reach, and keeps two roundtrips of one database from sharing a scratch.
    key = key_for(f"migration-runner:roundtrip:{url.database}")
    with sessions.connect(url) as holder:
        holder.execute(f"SET lock_timeout = {max(1, int(lock_timeout * 1000))}")
        try:
            holder.execute(f"SELECT pg_advisory_lock({key})")
        except Exception as e:
            if database.sqlstate(e) == "55P03":
                raise LockTimeout(f"roundtrip: another roundtrip of database {url.database} held its lock for "
                                  f"longer than {lock_timeout:g}s (MIGRATE_LOCK_TIMEOUT)") from None
            raise
        holder.execute("RESET lock_timeout")
        lock = Lock(key=key, connection=holder, pid=holder.info.backend_pid, waited=0.0, url=url)
        with baseline.scratch_database(url, given, lock, scratch, lock_timeout, "roundtrip") as (mine, theirs):
            logger.info("round-tripping %d revision%s above %s in scratch database %s", len(todo),
                        "" if len(todo) == 1 else "s", start or "base", mine.database,
                        extra={"scratch": mine.database, "revisions": [r.revision for r in todo]})
            trip = _Trip(config_for(theirs), script, mine, theirs, lock)
            if start:
                trip.build((start,), f"building --from {start}")
            failed = {}
            for revision in todo:
                findings = trip.revision(revision)
                for finding in findings:
                    logger.warning("%s (%s): %s", revision.revision, revisions.title(revision.doc), finding,
                                   extra={"revision": revision.revision, "difference": finding})
                if findings:
                    failed[revision.revision] = findings
                else:
                    logger.info("%s (%s) round-trips", revision.revision, revisions.title(revision.doc),
                                extra={"revision": revision.revision})
    report.to_revision = tuple(script.get_heads())
    if failed:
        raise Irreversible(f"{len(failed)} of {len(todo)} revision{'' if len(todo) == 1 else 's'} do not "
                           f"round-trip: " + "; ".join(f"{rev}: {', '.join(found)}" for rev, found in failed.items()))
    report.outcome = "round-tripped"
    report.message = (f"roundtrip: {len(todo)} revision{'' if len(todo) == 1 else 's'} above {start or 'base'}, "
                      f"each downgrade undoes its upgrade and the upgrade after it builds the same schema")
    return EXIT_OK


class _Trip:
    """The scratch database and the steps run on it."""

    def __init__(self, config: Config, script: ScriptDirectory, mine: URL, theirs: URL, lock: Lock) -> None:
        self.config, self.script, self.mine, self.theirs, self.lock = config, script, mine, theirs, lock
        self.version = ("public", "alembic_version")  # (schema, table), as env.py names it once it has run

    def revision(self, revision) -> list[str]:
        """What is wrong with `revision`'s round trip; nothing when its downgrade undoes its upgrade."""
        before = self.snapshot()
        heads_before = self.heads()
        try:
            self.step(revision, upgrade=True)
        except _StepFailed as e:
            raise RevisionFailed(f"roundtrip: revision {revision.revision} ({revisions.title(revision.doc)}) failed "
                                 f"to upgrade in the scratch database ({e}); the revisions above it are not "
                                 f"proven") from None
        after = self.snapshot()
        heads_after = self.heads()
        try:
            self.step(revision, upgrade=False)
        except _StepFailed as e:
            self.build(heads_after, f"rebuilding after {revision.revision}'s downgrade failed")
            return [f"downgrade() raised {e}"]
        down = self.snapshot()
        findings = []
        before, after, down = self.view(before), self.view(after), self.view(down)
        if down == after and after != before:
            findings.append("downgrade() undid nothing of what upgrade() did: " + "; ".join(
                _differences(before, after, "is still there", "is still missing")))
        else:
            findings += [f"after downgrade() {d}" for d in _differences(
                before, down, "is left over", "is missing", "was")]
        if self.heads() != heads_before:
            findings.append(f"downgrade() left the version table at {', '.join(self.heads()) or 'base'}, not "
                            f"{', '.join(heads_before) or 'base'}")
        try:
            self.step(revision, upgrade=True)
        except _StepFailed as e:
            self.build(heads_after, f"rebuilding after {revision.revision}'s second upgrade failed")
            return findings + [f"upgrade() after downgrade() raised {e}"]
        findings += [f"upgraded again, {d}" for d in _differences(
            after, self.view(self.snapshot()), "is new", "is missing", "was")]
        return findings

    def step(self, revision, upgrade: bool) -> None:
        """One migration step through env.py, as alembic runs it, on the scratch database only."""
        revision_map = self.script.revision_map

        def steps(current, context):
            self.version = (context.version_table_schema or context.connection.dialect.default_schema_name,
                            context.version_table)
            if upgrade:
                return [MigrationStep.upgrade_from_script(revision_map, revision)]
            return [MigrationStep.downgrade_from_script(revision_map, revision)]

        elsewhere: list[str] = []
        try:
            with baseline.confined(self.theirs, self.lock, elsewhere):
                envpy.run(self.config, self.script, steps)
        except Exception as e:
            self._refuse(e, elsewhere)
            raise _StepFailed(f"{type(e).__name__}: {database.first_line(e) or 'no message'}") from None

    def build(self, heads: tuple[str, ...], doing: str) -> None:
        """Empty the scratch database and upgrade it to `heads`, as alembic upgrade does."""
        logger.info("roundtrip: %s: emptying the scratch database and upgrading it to %s", doing,
                    ", ".join(heads) or "base")
        with sessions.connect(self.mine) as holder:
            baseline._empty(holder)
        elsewhere: list[str] = []
        for head in heads:
            try:
                with baseline.confined(self.theirs, self.lock, elsewhere):
                    alembic_command.upgrade(self.config, head)
            except Exception as e:
                self._refuse(e, elsewhere)
                raise RevisionFailed(f"roundtrip: {doing}: upgrading the scratch database to {head} failed "
                                     f"({type(e).__name__}: {database.first_line(e)})") from None

    def _refuse(self, error: Exception, elsewhere: list[str]) -> None:
        if elsewhere:
            raise ConfigError(f"roundtrip: env.py connected to database {elsewhere[0]!r} instead of the scratch "
                              f"database; it must build its engine from the URL alembic gives it "
                              f"(config.get_main_option('sqlalchemy.url')) or from DATABASE_URL") from None
        if isinstance(error, RunnerError):
            raise error
        if database.is_disconnect(error):
            raise DatabaseUnreachable(f"roundtrip: lost the scratch database: "
                                                f"{database.first_line(error)}") from None

    def heads(self) -> tuple[str, ...]:
        with sessions.connect(self.mine) as connection:
            try:
                return tuple(sorted(revisions.version_rows(connection, version_table=self.version[1],
                                                           schema=self.version[0])))
            except Exception:
                return ()

    def snapshot(self) -> dict[tuple[str, str, str], str]:
        """Every object of the scratch database's schemas, as (table, kind, name) -> definition, each table named
        with its schema; the version table is left out by `view`, once env.py has named it."""
        with sessions.connect(self.mine) as connection:
            schemas = sorted(name for name, in connection.execute(baseline._SCHEMAS))
            found = baseline.snapshot(connection, schemas, "", "")
            found.update({("", label, ""): definition for label, definition in connection.execute(
                _MORE, {"schemas": schemas})})
        return found

    def view(self, snapshot: dict[tuple[str, str, str], str]) -> dict[tuple[str, str, str], str]:
        """A snapshot without the version table."""
        version = ".".join(self.version)
        return {key: definition for key, definition in snapshot.items() if key[0] != version}


def _label(key: tuple[str, str, str]) -> str:
    table, kind, name = key
    if not table:  # one of _MORE's: the label is whole
        return kind
    if kind == "table":
        return f"table {table}"
    if kind == "column":
        return f"column {table}.{name}"
    return f"{kind} {name} on {table}" if name else f"{kind} of {table}"


def _differences(expected: dict, found: dict, extra: str, missing: str, changed: str = "was") -> list[str]:
    """Each difference in words: what `found` has that `expected` lacks, the reverse, and what changed; a table
    on one side only is one difference, not one per column."""
    out = []
    one_side = {key[0] for key in expected if key[1] == "table"} ^ {key[0] for key in found if key[1] == "table"}
    for key in sorted(set(expected) | set(found), key=_label):
        if key[0] in one_side and key[1] != "table":
            continue
        label = _label(key)
        if key not in expected:
            out.append(f"{label} {extra}" + (f" ({found[key]})" if found[key] else ""))
        elif key not in found:
            out.append(f"{label} {missing}")
        elif expected[key] != found[key]:
            out.append(f"{label} is {found[key]} ({changed} {expected[key]})")
    return out
