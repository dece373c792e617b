"""The history table: a row per run and per revision applied, reverted or stamped, written with the version change.

Opt-in (MIGRATE_HISTORY). The table `history` lives in a schema of its own
(MIGRATE_HISTORY_SCHEMA, default `migration_runner`), so that autogenerate and
`alembic check`, which look at the default schema only unless include_schemas
is set, never see it; each row names the version table it belongs to, so that
several applications in one database share it.

A revision's row is written by an on_version_apply callback, inside the
transaction that changes the version table: a revision that rolled back leaves
no row, one that committed always has its row. The first such transaction of a
run also writes the run's own row (outcome `running`); `finish`, as the runner
exits, completes it with the outcome, the exit code and the revisions reached.
A run that changed nothing and succeeded writes nothing: a no-op is the common
case (every pod start) and would bury the runs that did something, and a
no-op path that never loads alembic could not write it anyway. A failed run
that committed nothing still gets its row, saying that it failed.

The table is created on first use, under the lock, before env.py runs: a role
that cannot create it (or write to it) gets a warning and the run goes on
without history, as with the lineage comment.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import URL

from . import database, sessions
from .lock import key_for

logger = logging.getLogger("runner.history")

TABLE = "history"
# Serialises the first creation of the table by runners of different applications (different locks).
_CREATE_KEY = key_for("migration-runner:history")

_DDL = """
    CREATE TABLE IF NOT EXISTS {table} (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id text NOT NULL,
        version_schema text NOT NULL,
        version_table text NOT NULL,
        entry text NOT NULL CHECK (entry IN ('run', 'revision')),
        command text,
        -- a revision's row: applied, reverted or stamped, its script file, the file's sha256 and its duration
        action text,
        revision text,
        script text,
        sha256 text,
        seconds double precision,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        -- the run's row, completed as the runner exits
        ended_at timestamptz,
        outcome text,
        exit_code integer,
        from_revisions text,
        to_revisions text,
        image text,
        host text
    );
    CREATE UNIQUE INDEX IF NOT EXISTS history_run ON {table} (run_id) WHERE entry = 'run';
    CREATE INDEX IF NOT EXISTS history_version_table ON {table} (version_schema, version_table, id);
"""


@dataclass
class Recorder:
    """One run's history: where the table is, and what this run wrote so far."""

    schema: str
    url: URL  # the runner's own sessions'
    command: str
    image: str | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    host: str = field(default_factory=socket.gethostname)  # the pod's name in Kubernetes
    version_table: tuple[str, str] | None = None  # (schema, table), once env.py's state is read

    @property
    def table(self) -> str:
        return qualified(self.schema)

    def callback(self, state, progress, script):
        """An on_version_apply callback writing each step's row (and the run's, once) in the step's transaction."""
        self.version_table = (state.schema, state.table)
        insert_run = text(
            f"INSERT INTO {self.table} (run_id, version_schema, version_table, entry, command, started_at, "
            f"from_revisions, image, host, outcome) "
            f"SELECT :run, :vschema, :vtable, 'run', :command, CAST(:started AS timestamptz), :before, :image, :host, "
            f"'running' WHERE NOT EXISTS (SELECT 1 FROM {self.table} WHERE run_id = :run AND entry = 'run')")
        insert_step = text(
            f"INSERT INTO {self.table} (run_id, version_schema, version_table, entry, command, action, revision, "
            f"script, sha256, seconds, image, host) VALUES (:run, :vschema, :vtable, 'revision', :command, :action, "
            f":revision, :script, :sha256, :seconds, :image, :host)")
        common = {"run": self.run_id, "vschema": state.schema, "vtable": state.table, "command": self.command,
                  "image": self.image, "host": self.host}
        before = " ".join(state.current)

        def record_step(ctx, step, **_) -> None:
            connection = ctx.connection
            connection.execute(insert_run, {**common, "started": self.started, "before": before})
            if step.is_stamp:
                action, moved, seconds = "stamped", step.up_revision_ids, 0.0
            else:
                action = "applied" if step.is_upgrade else "reverted"
                moved = (step.up_revision_id,)
                seconds = round(time.monotonic() - progress.started, 3)
            for revision in moved:
                path, digest = file_of(script, revision)
                connection.execute(insert_step, {**common, "action": action, "revision": revision, "script": path,
                                                 "sha256": digest, "seconds": seconds})

        return record_step


_current: list[Recorder] = []


def begin(enabled: bool, schema: str, url: URL, command: str, image: str | None) -> Recorder | None:
    """The run's Recorder, the table created if need be; None (with a warning) when history is off or cannot be
    written by this role."""
    _current.clear()
    if not enabled:
        return None
    recorder = Recorder(schema, url, command, image)
    try:
        with sessions.connect(url) as connection:
            problem = _prepare(connection, recorder.table, schema)
    except psycopg.Error as e:
        problem = f"SQLSTATE {database.sqlstate(e)}: {database.first_line(e)}"
    if problem:
        logger.warning("MIGRATE_HISTORY: not recording this run in %s.%s (%s); the %s goes on", schema, TABLE,
                       problem, command, extra={"history": f"{schema}.{TABLE}"})
        return None
    _current.append(recorder)
    return recorder


def _prepare(connection: psycopg.Connection, table: str, schema: str) -> str | None:
    """Create the table if it is not there; why this role cannot record, or None."""
    found = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
    if not found:
        # CREATE SCHEMA IF NOT EXISTS checks the CREATE privilege before it looks: ask only when it is missing.
        try:
            with connection.transaction():
                connection.execute(f"SELECT pg_advisory_xact_lock({_CREATE_KEY})")
                if not connection.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)",
                                          (schema,)).fetchone()[0]:
                    connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                connection.execute(_DDL.format(table=table))
        except psycopg.Error as e:
            if database.sqlstate(e) == "42501":
                return f"the role cannot create it: {database.first_line(e)}"
            raise
    # Asked one by one: has_table_privilege with a list is true when any one of them is held. An INSERT refused
    # inside the migration's transaction would abort the migration itself.
    allowed = connection.execute(
        "SELECT has_schema_privilege(%(schema)s, 'USAGE') AND has_table_privilege(%(table)s, 'SELECT') "
        "AND has_table_privilege(%(table)s, 'INSERT') AND has_table_privilege(%(table)s, 'UPDATE')",
        {"schema": schema, "table": table}).fetchone()[0]
    return None if allowed else "the role needs USAGE on the schema and SELECT, INSERT and UPDATE on the table"


def finish(outcome: str, exit_code: int, before: tuple[str, ...], after: tuple[str, ...]) -> None:
    """Complete the run's row as the runner exits; a failed run that committed nothing gets a row of its own."""
    if not _current:
        return
    recorder = _current.pop()
    if recorder.version_table is None:  # env.py never read the state: no version table to file it under
        return
    done = {"run": recorder.run_id, "outcome": outcome, "code": exit_code, "after": " ".join(after)}
    try:
        with sessions.connect(recorder.url) as connection:
            updated = connection.execute(
                f"UPDATE {recorder.table} SET ended_at = clock_timestamp(), outcome = %(outcome)s, "
                f"exit_code = %(code)s, to_revisions = %(after)s WHERE run_id = %(run)s AND entry = 'run'",
                done).rowcount
            if not updated and exit_code != 0:
                connection.execute(
                    f"INSERT INTO {recorder.table} (run_id, version_schema, version_table, entry, command, "
                    f"started_at, ended_at, outcome, exit_code, from_revisions, to_revisions, image, host) "
                    f"VALUES (%(run)s, %(vschema)s, %(vtable)s, 'run', %(command)s, %(started)s, clock_timestamp(), "
                    f"%(outcome)s, %(code)s, %(before)s, %(after)s, %(image)s, %(host)s)",
                    {**done, "vschema": recorder.version_table[0], "vtable": recorder.version_table[1],
                     "command": recorder.command, "started": recorder.started, "before": " ".join(before),
                     "image": recorder.image, "host": recorder.host})
    except Exception as e:  # on the way out, after the outcome is known: a warning, never a second failure
        logger.warning("MIGRATE_HISTORY: could not record the end of this run in %s.%s: %s", recorder.schema,
                       TABLE, database.first_line(e))


def file_of(script, revision: str) -> tuple[str | None, str | None]:
    """A revision's script file (relative to the scripts' directory) and its sha256; None for an unknown one."""
    try:
        found = script.get_revision(revision)
    except Exception:
        found = None
    if found is None or not found.path:
        return None, None
    path = Path(found.path)
    try:
        relative = str(path.relative_to(script.dir))
    except ValueError:
        relative = str(path)
    return relative, hashlib.sha256(path.read_bytes()).hexdigest()


def qualified(schema: str) -> str:
    """The table's name, quoted, for SQL text (psycopg's and SQLAlchemy's alike)."""
    return '"' + schema.replace('"', '""') + '"."' + TABLE + '"'


def _exists(connection: psycopg.Connection, schema: str) -> bool:
    return connection.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified(schema),)).fetchone()[0]


def edited(url: URL, schema: str, state, script) -> list[str]:
    """`verify`: applied revisions whose script file changed since (sha256), or that the scripts no longer have."""
    with sessions.connect(url) as connection:
        if not _exists(connection, schema):
            return []
        rows = connection.execute(
            f"SELECT DISTINCT ON (revision) revision, action, script, sha256 FROM {qualified(schema)} "
            f"WHERE entry = 'revision' AND version_schema = %s AND version_table = %s ORDER BY revision, id DESC",
            (state.schema, state.table)).fetchall()
    applied = {r.revision for r in script.iterate_revisions(state.current, "base")} if state.current else set()
    findings = []
    for revision, action, recorded_path, recorded in rows:
        if action != "applied":  # reverted since, or stamped (its upgrade never ran here)
            continue
        path, digest = file_of(script, revision)
        if path is None:
            findings.append(f"revision {revision} ({recorded_path}) was applied but the scripts no longer contain it")
        elif revision in applied and recorded and digest != recorded:
            findings.append(f"revision {revision} ({path}) was edited after it was applied: sha256 "
                            f"{recorded[:12]}… when it ran, {digest[:12]}… now")
    return findings


def show(url: URL, schema: str, state, limit: int, as_json: bool) -> int:
    """Print the newest `limit` runs of the version table in `state`, newest first; returns how many."""
    with sessions.connect(url) as connection:
        if not _exists(connection, schema):
            return 0
        runs = connection.execute(
            f'SELECT run_id, command, started_at, ended_at, outcome, exit_code, from_revisions, to_revisions, image, '
            f"host FROM {qualified(schema)} WHERE entry = 'run' AND version_schema = %s AND version_table = %s "
            f'ORDER BY id DESC LIMIT %s', (state.schema, state.table, limit)).fetchall()
        steps = connection.execute(
            f"SELECT run_id, action, revision, script, sha256, seconds, started_at FROM {qualified(schema)} "
            f"WHERE entry = 'revision' AND run_id = ANY(%s) ORDER BY id", ([run[0] for run in runs],)).fetchall()
    out = sys.__stdout__
    for run_id, command, started, ended, outcome, code, before, after, image, host in runs:
        mine = [step for step in steps if step[0] == run_id]
        if as_json:
            out.write(json.dumps({
                "event": "history", "run_id": run_id, "command": command, "started_at": _iso(started),
                "ended_at": _iso(ended), "outcome": outcome, "exit_code": code,
                "from_revision": (before or "").split(), "to_revision": (after or "").split(), "image": image,
                "host": host, "revisions": [{"action": a, "revision": r, "script": p, "sha256": d, "seconds": s,
                                             "at": _iso(t)} for _, a, r, p, d, s, t in mine]}) + "\n")
            continue
        took = f" in {(ended - started).total_seconds():.1f}s" if ended else ""
        out.write(f"{_iso(started)} {command} {outcome}"
                  f"{'' if code is None else f' (exit {code})'}{took}: {before or 'base'} -> "
                  f"{after or ('?' if ended is None else 'base')}, image {image or '-'}, host {host or '-'}\n")
        for _, action, revision, path, digest, seconds, _ in mine:
            out.write(f"    {action} {revision} ({path or '?'}, sha256 {(digest or '?')[:12]}) in {seconds or 0:.2f}s\n")
    out.flush()
    return len(runs)


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")
