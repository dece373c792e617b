"""The no-op proven without alembic or SQLAlchemy: one login, two short queries, against the lineage's digest.

Nearly every run of `upgrade`, `check` and `wait` finds the database at the
heads, and most of such a run would be importing alembic and SQLAlchemy and
running env.py to learn it. When the runner migrates, it records with the
lineage (runner/lineage.py, the version table's comment) a digest of everything
that decides what env.py does and which heads the scripts have: every file
under the script location (env.py and the revisions), the ini file, the
settings env.py sees (section, -x arguments, version table, target, baseline,
multiple heads) and the environment variables env.py's source names. A later
run whose inputs hash the same asks the database, on psycopg alone, for the
table carrying that digest, its version rows and pg_is_in_recovery(); it
answers only when the rows are exactly the heads recorded with the digest, and
the table is the one env.py reads. Anything else (no digest recorded, another
digest, a table env.py would not read, a standby for `upgrade`, a URL form or
setting it does not handle, any error) falls through, silently but for a
debug line, to the full path, which gives every other answer.

What it cannot see: env.py choosing its version table from something outside
those inputs (a file outside the script location, a variable not named in
env.py), and env.py doing work of its own on every run (a no-op skips env.py).
MIGRATE_FAST_PATH=false turns it off.
"""

from __future__ import annotations

import configparser
import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qsl

from . import credentials, database, startup
from .errors import EXIT_OK
from .lineage import PREFIX
from .report import Report

logger = logging.getLogger("runner")

COMMANDS = ("upgrade", "check", "wait")
FORMAT = 1  # of the digest: a change of what goes in makes every recorded digest a stranger

# Environment variables never hashed: their values are secrets, and a digest sits in a comment anyone may read.
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|URL|CREDENTIAL", re.IGNORECASE)
_NAMES = re.compile(rb"\b[A-Z][A-Z0-9_]{2,}\b")

# URLs the fast path reads itself; any other form (several hosts, IPv6, a socket directory, a driver's own
# parameters) is left to the full path and SQLAlchemy's reading of it.
_URL = re.compile(r"(?P<scheme>[a-z0-9+]+)://(?:(?P<user>[^:/@?#\[\]]*)(?::(?P<password>[^@/?#]*))?@)?"
                  r"(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>\d{1,5}))?/(?P<dbname>[A-Za-z0-9._-]+)"
                  r"(?:\?(?P<query>[^#]*))?")
_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg")
# Query parameters passed to libpq as they are, by every libpq driver and by the runner's own sessions.
_LIBPQ = frozenset({"sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name",
                    "target_session_attrs", "options", "keepalives", "keepalives_idle", "keepalives_interval",
                    "keepalives_count", "tcp_user_timeout", "gssencmode", "channel_binding", "require_auth"})

_FIND = f"""
    SELECT n.nspname, c.relname, pg_is_in_recovery(), j.rec -> 'heads', j.rec -> 'fast'
      FROM pg_description d
      JOIN pg_class c ON c.oid = d.objoid AND c.relkind IN ('r', 'p')
      JOIN pg_namespace n ON n.oid = c.relnamespace
     CROSS JOIN LATERAL (SELECT substr(d.description, {len(PREFIX) + 1})::jsonb AS rec) j
     WHERE d.classoid = 'pg_class'::regclass AND d.objsubid = 0
       AND left(d.description, {len(PREFIX)}) = %(prefix)s
       AND strpos(d.description, %(digest)s) > 0
       AND has_table_privilege(c.oid, 'SELECT')
       AND (%(schema)s::text IS NULL AND pg_table_is_visible(c.oid) OR n.nspname = %(schema)s)
       AND (%(table)s::text IS NULL OR c.relname = %(table)s)
"""


def answer(settings, command: str, report: Report) -> int | None:
    """The exit code of `command` proven here (the report filled in as the full path would), or None to run it."""
    if command not in COMMANDS or not settings.fast_path:
        return None
    try:
        why = _answer(settings, command, report)
    except Exception as e:  # the full path meets whatever this was, and says it properly
        why = f"{type(e).__name__}"
    if why is None:
        return EXIT_OK
    logger.debug("fast path not taken (%s): running the full path", why, extra={"fast_path": why})
    return None


def _answer(settings, command: str, report: Report) -> str | None:
    """None once the report is filled in with the answer; else why not."""
    if settings.target != "heads":
        return "MIGRATE_TARGET is not heads"
    found = digest(settings)
    if found is None:
        return "the project's inputs cannot be hashed (FLASK_APP, pyproject.toml, version_locations, a package)"
    params = connect_params(settings)
    if params is None:
        return "a URL form the fast path does not read"
    credentials.configure(settings, SimpleNamespace(**params["url"]), engines=False)
    database.set_session_options(settings.application_name)
    with startup.importing():
        import psycopg  # here: --help and --version do without it

    explicit = settings.model_fields_set
    session = psycopg.connect(autocommit=True, **credentials.fill(params["libpq"]))
    try:
        why = _ask(session, settings, command, report, found, params, explicit)
    except BaseException:
        session.close()
        raise
    if why is not None and command == "upgrade":
        # Falling through to the full path: its wait's first login is this session (see take_session).
        global _kept
        _kept = session
    else:
        session.close()
    return why


# The fast path's session, left open for `upgrade`'s full path when the fast path fell through.
_kept = None


def take_session():
    """The session the fast path logged in with and left open (then the caller's to close), or None.

    A full `upgrade` takes it as the wait's first login (wait.first_login), which then checks the
    server as it checks any login: one login fewer than logging in again."""
    global _kept
    session, _kept = _kept, None
    if session is not None and session.closed:
        return None
    return session


def release() -> None:
    """Close the fast path's session if nobody took it."""
    session = take_session()
    if session is not None:
        session.close()


def _ask(session, settings, command: str, report: Report, found: str, params: dict, explicit) -> str | None:
    """The fast path's answer on `session`: None once the report is filled in, else why not."""
    rows = session.execute(_FIND, {
        "prefix": PREFIX, "digest": found,
        "schema": settings.version_table_schema if "version_table_schema" in explicit else None,
        "table": settings.version_table if "version_table" in explicit else None}).fetchall()
    if len(rows) != 1:
        return f"{len(rows)} version tables carry this digest"
    schema, table, standby, heads, fast = rows[0]
    if not isinstance(fast, dict) or fast.get("digest") != found:
        return "another digest recorded"
    if command == "upgrade" and standby:
        return "a standby (upgrade waits for the primary)"
    if command == "upgrade" and fast.get("endpoint") != params["endpoint"]:
        # The runner that recorded it held the lock there, which a transaction pooler refuses.
        return "recorded through another endpoint"
    from psycopg import sql

    current = tuple(row[0] for row in session.execute(
        sql.SQL("SELECT version_num FROM {}").format(sql.Identifier(schema, table))))
    if not current or not isinstance(heads, list) or sorted(current) != sorted(heads):
        return "not at the recorded heads"
    report.from_revision = report.to_revision = current
    report.target = "heads"
    names = ", ".join(current)
    report.outcome = "current"
    report.message = f"already at heads: {names}" if command == "upgrade" else f"at heads: {names}"
    logger.info("database is current at %s: the lineage on %s.%s records these scripts and settings (fast path, "
                "env.py not run; MIGRATE_FAST_PATH=false runs it)", names, schema, table,
                extra={"state": "current", "current": list(current), "fast_path": True})
    return None


def record(settings) -> dict:
    """What the lineage records for a later fast path: the digest, and the endpoint `upgrade` reached."""
    found = digest(settings)
    if found is None:
        return {}
    params = connect_params(settings)
    return {"digest": found, "endpoint": params["endpoint"] if params else None}


def digest(settings) -> str | None:
    """sha256 of what decides env.py's version table and the scripts' heads; None when it cannot be told."""
    try:
        return _digest(settings, os.getcwd())
    except TypeError:  # settings that cannot be a cache key
        return _digest.__wrapped__(settings, os.getcwd())


@functools.lru_cache(maxsize=4)
def _digest(settings, cwd: str) -> str | None:
    # Cached: a run the fast path left to the full path hashes the files once, not again as it records them.
    if settings.flask_app:  # the application's factory configures Flask-Migrate: not files we can hash
        return None
    ini = Path(settings.alembic_config).absolute()
    if ini.name == "pyproject.toml" or not ini.is_file():
        return None
    for toml in (ini.with_name("pyproject.toml"), Path.cwd() / "pyproject.toml"):
        if toml.is_file() and b"[tool.alembic" in toml.read_bytes():
            return None
    ini_bytes = ini.read_bytes()
    parser = configparser.ConfigParser({"here": str(ini.parent), "__file__": str(ini)})
    try:
        parser.read_string(ini_bytes.decode())
        location = parser.get(settings.alembic_section, "script_location", fallback=None)
        elsewhere = parser.get(settings.alembic_section, "version_locations", fallback=None)
    except (configparser.Error, UnicodeDecodeError):
        return None
    if not location or elsewhere or parser.get(settings.alembic_section, "databases", fallback=None):
        return None
    scripts = Path(location).absolute()  # alembic reads a relative script_location from the working directory
    if not scripts.is_dir():  # a package resource (`package:dir`), or missing: the full path's to read
        return None
    explicit = settings.model_fields_set
    inputs = {"format": FORMAT, "config": str(ini), "scripts": str(scripts), "section": settings.alembic_section,
              "x": settings.x_arguments(), "version_table": settings.version_table,
              "version_table_schema": settings.version_table_schema,
              "explicit": sorted({"version_table", "version_table_schema"} & explicit),
              "target": settings.target, "baseline": settings.baseline_revision,
              "verify_baseline": settings.verify_baseline, "multiple_heads": settings.allow_multiple_heads}
    h = hashlib.sha256()
    h.update(json.dumps(inputs, sort_keys=True).encode())
    h.update(b"\0ini\0" + ini_bytes)
    env_py = b""
    for relative, path in _files(scripts):
        with open(path, "rb") as f:
            data = f.read()
        if relative == "env.py":
            env_py = data
        h.update(f"\0{relative}\0{len(data)}\0".encode() + data)
    for name in sorted({m.decode() for m in _NAMES.findall(env_py + ini_bytes)}):
        if name in os.environ and not _SECRET_NAME.search(name):
            h.update(f"\0env\0{name}={os.environ[name]}".encode())
    return h.hexdigest()


def _files(top: Path) -> list[tuple[str, str]]:
    """Every file under `top` but bytecode caches, in a stable order: (its path relative to `top` in posix
    form, its path). Strings, not Paths: a thousand revisions are hashed on every run the fast path tries."""
    found = []
    root = os.fspath(top)
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        relative = os.path.relpath(directory, root)
        prefix = "" if relative == os.curdir else relative.replace(os.sep, "/") + "/"
        found.extend((prefix + name, os.path.join(directory, name)) for name in sorted(names))
    return found


def connect_params(settings) -> dict | None:
    """libpq parameters from DATABASE_URL(_FILE), for the URL forms read here; None for any other."""
    if (settings.database_url is None) == (settings.database_url_file is None):
        return None
    if settings.database_url is not None:
        raw = settings.database_url.get_secret_value()
    else:
        try:
            raw = Path(settings.database_url_file).read_text()
        except OSError:
            return None
    match = _URL.fullmatch(raw.strip())
    if match is None or match["scheme"] not in _SCHEMES:
        return None
    if match["scheme"] == "postgresql+psycopg" and not _sqlalchemy_2():
        return None
    user_info = (match["user"] or "") + (match["password"] or "")
    if re.search(r"%(?![0-9A-Fa-f]{2})", user_info):
        return None
    from urllib.parse import unquote

    query = parse_qsl(match["query"] or "", keep_blank_values=True)
    keys = [key for key, _ in query]
    if len(set(keys)) != len(keys) or not set(keys) <= _LIBPQ:
        return None
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return None
    user = unquote(match["user"]) if match["user"] is not None else None
    password = unquote(match["password"]) if match["password"] is not None else None
    libpq = {"host": match["host"], "dbname": match["dbname"], **dict(query)}
    if port:
        libpq["port"] = port
    if user:
        libpq["user"] = user
    if password:
        libpq["password"] = password
    with startup.importing():
        from .sessions import LIBPQ_DEFAULTS

    for name, value in LIBPQ_DEFAULTS.items():
        libpq.setdefault(name, value)
    # The server the lock was held on, not the database: a pooler is configured per host and port.
    where = json.dumps([match["host"], port or "", user or "", sorted(query)])
    return {"libpq": libpq, "endpoint": hashlib.sha256(where.encode()).hexdigest()[:16],
            "url": {"username": user, "password": password, "host": match["host"],
                    "port": int(port) if port else None, "query": dict(query)}}


def _sqlalchemy_2() -> bool:
    # Without importing it: postgresql+psycopg is exit 2 under SQLAlchemy 1.4 (settings.parse_url).
    from importlib.metadata import version

    return int(version("sqlalchemy").split(".")[0]) >= 2
