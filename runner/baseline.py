"""Prove a baseline before stamping it: the legacy schema must be what the revision builds.

`prove` builds the baseline revision's schema in a scratch database by running
env.py's own `alembic upgrade <baseline>` there, reads both schemas from the
catalog (tables, columns with types and nullability, primary keys, unique
constraints, indexes, foreign keys) and refuses the stamp, listing every
difference, when they differ. It writes nothing to the database it proves: every
connection env.py opens during the build must be to the scratch database and
must not see this runner's advisory lock (which only the proven database shows,
however its URL is spelled), or it is refused before its first statement. The
scratch database is created on the same server (the role needs CREATEDB), named
for the proven database and its lock so that the lock's holder alone uses it,
and dropped on every path; one a SIGKILL left is dropped by the next proof. Or
it is given (MIGRATE_SCRATCH_DATABASE_URL): its schemas are dropped before and
after, under an advisory lock of its own, as services may share it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import psycopg
from alembic import command as alembic_command
from alembic.config import Config
from psycopg import sql
from sqlalchemy import event, pool
from sqlalchemy.engine import URL

from . import database, envpy, guard, revisions, sessions, telemetry
from .errors import ConfigError, DatabaseUnreachable, Interrupted, LegacyDatabase, LockTimeout, RunnerError
from .lock import Lock, key_for, lock_ids

logger = logging.getLogger("runner.baseline")

# (table, kind, name, definition) rows for the tables of the schemas `schemas`, leaving out the
# version table and the tables of extensions (PostGIS's spatial_ref_sys). Definitions come from
# PostgreSQL's own deparsers, so two schemas built differently compare alike exactly when
# PostgreSQL would describe them alike.
_SNAPSHOT = """
    WITH tables AS (
        SELECT c.oid, CASE WHEN n.nspname = %(version_schema)s THEN c.relname
                           ELSE n.nspname || '.' || c.relname END AS label
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%(schemas)s)
           AND NOT (n.nspname = %(version_schema)s AND c.relname = %(version_table)s)
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                                       AND d.deptype = 'e'))
    SELECT t.label, 'table', '', '' FROM tables t
    UNION ALL
    SELECT t.label, 'column', a.attname,
           format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE ' NULL' END
      FROM tables t JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT t.label, CASE k.contype WHEN 'p' THEN 'primary key' WHEN 'u' THEN 'unique constraint'
                                   ELSE 'foreign key' END,
           CASE k.contype WHEN 'p' THEN '' ELSE k.conname END, pg_get_constraintdef(k.oid, true)
      FROM tables t JOIN pg_constraint k ON k.conrelid = t.oid AND k.contype IN ('p', 'u', 'f')
    UNION ALL
    SELECT t.label, 'index', i.relname,
           CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END
           || regexp_replace(pg_get_indexdef(x.indexrelid), '^.* USING ', 'USING ')
      FROM tables t JOIN pg_index x ON x.indrelid = t.oid JOIN pg_class i ON i.oid = x.indexrelid
     WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid AND k.contype IN ('p', 'u'))
"""

# Run without parameters: its % are LIKE's.
_SCHEMAS = ("SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema', "
            "'pg_toast') AND nspname NOT LIKE 'pg_temp_%' AND nspname NOT LIKE 'pg_toast_temp_%'")


def scratch_name(database_name: str, lock_key: int) -> str:
    """The created scratch database's name: the same every run for one proven database and its lock."""
    return "migration_runner_scratch_" + hashlib.sha256(f"{database_name}:{lock_key}".encode()).hexdigest()[:16]


@telemetry.traced("prove baseline", lambda config_for, baseline, **_: {"migration.revision": baseline})
def prove(config_for: Callable[[URL], Config], baseline: str, *, url: URL, given: URL, schema: str, table: str,
          lock: Lock, scratch: URL | None, lock_timeout: float) -> None:
    """Build `baseline` in a scratch database through env.py and compare it with the database at `url`;
    LegacyDatabase listing the differences when they differ. `config_for(u)` is alembic's config with
    sqlalchemy.url `u`; `given` is DATABASE_URL as the user wrote it (env.py's driver), `url` the
    runner's; `schema`.`table` the version table; `lock` the runner's advisory lock on the proven
    database; `scratch` MIGRATE_SCRATCH_DATABASE_URL if set, whose own lock is waited for `lock_timeout`."""
    with scratch_database(url, given, lock, scratch, lock_timeout) as (runner_scratch, env_scratch):
        logger.info("building baseline %s in scratch database %s to compare it with the legacy schema",
                    baseline, runner_scratch.database, extra={"baseline": baseline, "scratch": runner_scratch.database})
        _build(config_for(env_scratch), baseline, env_scratch, lock)
        with sessions.connect(runner_scratch) as connection:
            schemas = sorted({schema, *(name for name, in connection.execute(_SCHEMAS))})
            built = snapshot(connection, schemas, schema, table)
    with sessions.connect(url) as connection:
        legacy = snapshot(connection, schemas, schema, table)
    differences = compare(legacy, built)
    for difference in differences:
        logger.warning("baseline %s: %s", baseline, difference, extra={"baseline": baseline, "difference": difference})
    if differences:
        raise LegacyDatabase(
            f"MIGRATE_BASELINE_REVISION={baseline} does not match the legacy schema ({len(differences)} "
            f"difference{'' if len(differences) == 1 else 's'}, nothing written): " + "; ".join(differences))
    logger.info("baseline %s matches the legacy schema (%d tables in %s)", baseline,
                len({key[0] for key in legacy}), ", ".join(schemas), extra={"baseline": baseline})


def snapshot(connection: psycopg.Connection, schemas: list[str], version_schema: str, version_table: str) -> dict:
    """(table, kind, name) -> definition for every table, column, key, constraint and index in `schemas`."""
    rows = connection.execute(_SNAPSHOT, {"schemas": schemas, "version_schema": version_schema,
                                          "version_table": version_table})
    return {(table, kind, name): definition for table, kind, name, definition in rows}


def compare(legacy: dict, built: dict) -> list[str]:
    """Each difference, in words, sorted by table; a table missing on either side is one difference."""
    tables_legacy = {key[0] for key in legacy}
    tables_built = {key[0] for key in built}
    differences = [f"table {t} is missing (the baseline creates it)" for t in sorted(tables_built - tables_legacy)]
    differences += [f"table {t} is not in the baseline" for t in sorted(tables_legacy - tables_built)]
    for key in sorted(set(legacy) | set(built)):
        table, kind, name = key
        if table not in tables_legacy & tables_built or key[1] == "table":
            continue
        what = f"{kind} {table}.{name}" if kind == "column" else f"{kind} {name} on {table}" if name else f"{kind} of {table}"
        if key not in legacy:
            differences.append(f"{what} is missing (baseline: {built[key]})")
        elif key not in built:
            differences.append(f"{what} is not in the baseline ({legacy[key]})")
        elif legacy[key] != built[key]:
            differences.append(f"{what} is {legacy[key]}, the baseline has {built[key]}")
    return differences


def _build(config: Config, baseline: str, env_scratch: URL, lock: Lock) -> None:
    """`alembic upgrade <baseline>` through env.py, on the scratch database and nowhere else."""
    elsewhere: list[str] = []
    try:
        with confined(env_scratch, lock, elsewhere):
            alembic_command.upgrade(config, baseline)
    except Exception as e:
        if elsewhere:
            raise ConfigError(
                f"MIGRATE_VERIFY_BASELINE: env.py connected to database {elsewhere[0]!r} while building the "
                f"baseline in the scratch database; it must build its engine from the URL alembic gives it "
                f"(config.get_main_option('sqlalchemy.url')) or from DATABASE_URL. Nothing was written") from None
        if isinstance(e, RunnerError):  # a password that could not be fetched, say
            raise
        if database.is_disconnect(e):
            raise DatabaseUnreachable(f"lost the scratch database while building the baseline: "
                                      f"{database.first_line(e)}") from None
        error = envpy.failure(e)
        raise type(error)(f"MIGRATE_VERIFY_BASELINE: building baseline {baseline} in the scratch database failed "
                          f"({type(e).__name__}: {database.first_line(e)}); nothing was written") from None


@contextmanager
def confined(env_scratch: URL, lock: Lock, elsewhere: list[str]) -> Iterator[None]:
    """Inside the `with`, env.py runs on the scratch database and nowhere else (a connection elsewhere is
    refused, its database's name appended to `elsewhere`), quietly, and a signal severs its sessions."""
    opened: list = []  # env.py's connections to the scratch database, for a signal to sever

    def only_scratch(dbapi_connection, record, proxy) -> None:
        # env.py may build its engine from something other than sqlalchemy.url (Flask-Migrate's takes the
        # application's): refuse, before a statement runs on it, any connection that is not to the scratch
        # database. On checkout, not connect: a pool may hand out a connection it opened before.
        name, proven = _where(dbapi_connection, lock)
        if proven or name != env_scratch.database:
            elsewhere.append(name)
            raise ConfigError(f"env.py connected to {name!r}, not to the scratch database")
        opened.append(dbapi_connection)

    saved = os.environ.get("DATABASE_URL")
    # env.py that reads DATABASE_URL itself (a common pattern) builds the scratch schema too.
    os.environ["DATABASE_URL"] = env_scratch.render_as_string(hide_password=False)
    event.listen(pool.Pool, "checkout", only_scratch)
    try:
        # Quietly: its "Running upgrade" lines would read as the real run's. Outside the guard (nothing is
        # written where the lock is), so a signal cuts the build's sessions itself.
        with envpy.no_exit(), revisions.quietly(), guard.interruptible(opened):
            yield
    finally:
        event.remove(pool.Pool, "checkout", only_scratch)
        if saved is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = saved


def _where(dbapi_connection, lock: Lock) -> tuple[str, bool]:
    """current_database() of a connection, and whether it is the proven database: the one where this
    runner's advisory lock shows, whatever host name, port or alias its URL uses."""
    ids = lock_ids(lock.key)
    name, proven = database.select_on(dbapi_connection, [
        "current_database()",
        f"EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = {int(lock.pid)} "
        f"AND classid::bigint = {ids['classid']} AND objid::bigint = {ids['objid']} "
        f"AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"])
    return name, bool(proven)


# Taken in a given scratch database while it is used: services that share one take turns.
_SCRATCH_KEY = key_for("migration-runner:scratch")


@contextmanager
def scratch_database(url: URL, given: URL, lock: Lock, scratch: URL | None, lock_timeout: float,
                     purpose: str = "MIGRATE_VERIFY_BASELINE") -> Iterator[tuple[URL, URL]]:
    """An empty scratch database, as (the runner's URL, env.py's URL) of it; emptied or dropped after,
    without hiding the error that ended the build."""
    if scratch is not None:
        runner_scratch = sessions.runner_url(scratch)
        try:
            with sessions.connect(runner_scratch) as holder:
                _take(holder, lock, lock_timeout)
                _empty(holder)
                try:
                    yield runner_scratch, scratch.set(drivername=given.drivername)
                except BaseException:
                    _quietly(lambda: _empty(holder))
                    raise
                _empty(holder)
        except psycopg.Error as e:
            raise _failure(e, "use MIGRATE_SCRATCH_DATABASE_URL", purpose) from None
        return
    name = scratch_name(url.database, lock.key)
    _drop(url, name, purpose)  # a leftover of a run killed before it could drop it
    _admin(url, f'CREATE DATABASE "{name}" TEMPLATE template0', "create the scratch database", purpose=purpose)
    try:
        yield url.set(database=name), given.set(database=name)
    except BaseException:
        _quietly(lambda: _drop(url, name, purpose))
        raise
    _drop(url, name, purpose)


# DROP DATABASE ... WITH (FORCE) signals the sessions on it, then waits 5 s for them to go; a session
# severed in the middle of a statement on a loaded server may take longer. Tried this often.
_DROP_ATTEMPTS = 3


def _drop(url: URL, name: str, purpose: str = "MIGRATE_VERIFY_BASELINE") -> None:
    # FORCE (PostgreSQL 13+) ends the sessions a killed env.py may have left on it.
    _admin(url, f'DROP DATABASE IF EXISTS "{name}"', "drop the scratch database", force=" WITH (FORCE)",
           purpose=purpose, attempts=_DROP_ATTEMPTS)


def _quietly(cleanup: Callable[[], None]) -> None:
    """A cleanup on the way out of a failure: its own failure is logged, the first one is what is reported.

    A SIGTERM or SIGINT that arrives meanwhile (the first one may be what is being cleaned up after,
    its handler run late: psycopg2 runs Python code while it reports the severed session) does not
    leave the scratch database behind: the cleanup, which can be repeated, runs again to its end,
    then the interruption is raised."""
    interruption: Interrupted | None = None
    for _ in range(2):
        try:
            cleanup()
        except Interrupted as e:
            interruption = interruption or e
            continue
        except Exception as e:
            logger.warning("MIGRATE_VERIFY_BASELINE: the scratch database was not cleaned up: %s", e)
        break
    if interruption is not None:
        raise interruption


def _take(holder: psycopg.Connection, lock: Lock, lock_timeout: float) -> None:
    """Make sure the given scratch database is not the proven one, then take its own lock for this build."""
    _, proven = _where(holder, lock)
    if proven:
        raise ConfigError("MIGRATE_SCRATCH_DATABASE_URL names the database being migrated; it must name a "
                          "database of its own, whose schemas the runner drops")
    holder.execute(f"SET lock_timeout = {max(1, int(lock_timeout * 1000))}")
    try:
        holder.execute(f"SELECT pg_advisory_lock({_SCRATCH_KEY})")
    except psycopg.Error as e:
        if database.sqlstate(e) == "55P03":
            raise LockTimeout(f"MIGRATE_SCRATCH_DATABASE_URL is in use by another runner's baseline proof for "
                              f"longer than {lock_timeout:g}s (MIGRATE_LOCK_TIMEOUT)") from None
        raise
    holder.execute("RESET lock_timeout")


def _empty(holder: psycopg.Connection) -> None:
    """Drop every schema of the given scratch database (a killed run's leftovers too) and make `public` again.

    Not DROP OWNED, which also revokes the role's privileges on shared objects, such as
    CONNECT on the application's database.
    """
    with holder.transaction():  # all or nothing, as one statement would be
        for name, in holder.execute(_SCHEMAS).fetchall():
            holder.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
        holder.execute("CREATE SCHEMA public")


def _admin(url: URL, statement: str, doing: str, force: str = "", purpose: str = "MIGRATE_VERIFY_BASELINE",
           attempts: int = 1) -> None:
    """A statement that cannot run in a transaction, on a connection of its own; `force` added from 13 on,
    tried up to `attempts` times while the database is in use by other sessions (SQLSTATE 55006)."""
    try:
        with sessions.connect(url) as connection:  # autocommit: CREATE/DROP DATABASE refuse a transaction
            if force and sessions.server_version(connection) >= 130000:
                statement += force
            for attempt in range(1, attempts + 1):
                try:
                    connection.execute(statement)
                    return
                except psycopg.errors.ObjectInUse:
                    if attempt == attempts:
                        raise
    except psycopg.Error as e:
        raise _failure(e, doing, purpose) from None


def _failure(error: psycopg.Error, doing: str, purpose: str = "MIGRATE_VERIFY_BASELINE") -> RunnerError:
    if database.is_disconnect(error):
        return DatabaseUnreachable(f"{purpose}: cannot {doing}: {database.first_line(error)}")
    hint = ""
    if database.sqlstate(error) == "42501":
        hint = (": the role must own that database and its schemas" if "URL" in doing else
                ": grant the role CREATEDB, or set MIGRATE_SCRATCH_DATABASE_URL to a database of its own")
    return ConfigError(f"{purpose}: cannot {doing} (SQLSTATE {database.sqlstate(error)}: "
                       f"{database.first_line(error)}){hint}")
