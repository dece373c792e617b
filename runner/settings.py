"""Every setting, read from the environment; the only place a variable is named."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from functools import cache
from typing import TYPE_CHECKING

# pydantic looks its plugins up among every installed distribution's entry points as it builds its
# first model (about 10 ms among a test environment's packages, on every run); none is meant for the
# runner's own settings. Off while this module builds them, and restored at its end: a project's models
# still get theirs, the lookup being cached only once it has run.
_PLUGINS_SETTING = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"

from pydantic import Field, SecretStr, ValidationError, field_validator  # noqa: E402
from pydantic_settings import BaseSettings, SettingsConfigDict  # noqa: E402

from . import database
from .errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

INT64 = 2**63


@cache
def _sqlalchemy() -> dict:
    """SQLALCHEMY_VERSION, SQLALCHEMY_VERSION_INFO, SQLALCHEMY_2, PLAIN_DRIVER and DRIVERS, on first use:
    importing SQLAlchemy costs a no-op proven without it (runner/fastpath.py) a third of its time."""
    from sqlalchemy import __version__ as version

    info = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    # What the plain schemes mean to env.py: psycopg 3 under SQLAlchemy 2; under 1.4, which has no
    # psycopg 3 dialect, psycopg2, 1.4's own default for postgresql://.
    plain = "postgresql+psycopg" if info >= (2,) else "postgresql+psycopg2"
    # URL schemes accepted, and the driver env.py receives for each: the application's own URL
    # works as it is. The runner's own sessions always use psycopg 3 (sessions.for_runner), without SQLAlchemy.
    drivers = {
        "postgres": plain,
        "postgresql": plain,
        "postgresql+psycopg": "postgresql+psycopg",
        "postgresql+psycopg_async": "postgresql+psycopg_async",
        "postgresql+psycopg2": "postgresql+psycopg2",
        "postgresql+asyncpg": "postgresql+asyncpg",
        "postgresql+pg8000": "postgresql+pg8000",
    }
    return {"SQLALCHEMY_VERSION": version, "SQLALCHEMY_VERSION_INFO": info, "SQLALCHEMY_2": info >= (2,),
            "PLAIN_DRIVER": plain, "DRIVERS": drivers}


def __getattr__(name: str):
    # The SQLAlchemy-derived constants above, imported as before (`from .settings import DRIVERS`); any other
    # name (the import system asks for __path__) must not import SQLAlchemy.
    if name in _SQLALCHEMY_NAMES:
        return _sqlalchemy()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SQLALCHEMY_NAMES = ("SQLALCHEMY_VERSION", "SQLALCHEMY_VERSION_INFO", "SQLALCHEMY_2", "PLAIN_DRIVER", "DRIVERS")


class Settings(BaseSettings):
    """The runner's configuration. Each field's alias is its environment variable."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", frozen=True)

    database_url: SecretStr | None = Field(
        None, alias="DATABASE_URL",
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db); percent-encode special characters. A "
                    "primary with standbys: every host, libpq picking the writable one "
                    "(postgresql://user:pass@/db?host=a:5432&host=b:5432&target_session_attrs=read-write).")
    database_url_file: Path | None = Field(
        None, alias="DATABASE_URL_FILE",
        description="File holding the URL (a mounted Secret); exactly one of this and DATABASE_URL.")
    database_urls_file: Path | None = Field(
        None, alias="DATABASE_URLS_FILE",
        description="A fleet: a file with one target per line, a URL optionally followed by `-x` items for env.py "
                    "(`postgresql://app@db/shop tenant=acme`; blank lines and `#` comments ignored), each migrated "
                    "by a runner process of its own; instead of DATABASE_URL (see Fleets).")
    fleet_concurrency: int = Field(
        4, ge=1, le=256, alias="MIGRATE_FLEET_CONCURRENCY",
        description="A fleet: how many targets are migrated at once.")
    fleet_canary: int = Field(
        0, ge=0, alias="MIGRATE_FLEET_CANARY",
        description="A fleet: migrate the first N targets (of this shard) first, and touch no other if one fails.")
    fleet_shards: int = Field(
        1, ge=1, alias="MIGRATE_FLEET_SHARDS",
        description="A fleet split across the K pods of an Indexed Job: a pod takes the targets whose position "
                    "(0-based, counting targets only) modulo K is its JOB_COMPLETION_INDEX.")
    job_completion_index: int | None = Field(
        None, ge=0, alias="JOB_COMPLETION_INDEX",
        description="Set by Kubernetes in an Indexed Job's pods: the shard of the fleet this pod migrates.")
    database_password_file: Path | None = Field(
        None, alias="DATABASE_PASSWORD_FILE",
        description="File holding the password, read again at every login, so that a Vault agent or a CSI driver "
                    "can rotate it (one trailing newline dropped); the URL then holds no password.")
    password_command: str | None = Field(
        None, alias="MIGRATE_PASSWORD_COMMAND",
        description="Command run at every login (split like a shell's words, no shell: `sh -c '...'` for a "
                    "pipeline) whose stdout is the password: an IAM token (`aws rds generate-db-auth-token ...`); "
                    "the URL then holds no password. A failure is exit 3.")
    password_command_timeout: float = Field(
        30, gt=0, alias="MIGRATE_PASSWORD_COMMAND_TIMEOUT",
        description="Seconds MIGRATE_PASSWORD_COMMAND may run before it is killed, with what it started (exit 3).")
    alembic_config: Path = Field(
        Path("alembic.ini"), alias="ALEMBIC_CONFIG",
        description="Path of alembic.ini, or of a pyproject.toml with [tool.alembic] (alembic -c); with FLASK_APP, "
                    "default `alembic.ini` in Flask-Migrate's directory (`migrations/alembic.ini`).")
    alembic_section: str = Field(
        "alembic", min_length=1, alias="ALEMBIC_SECTION",
        description="Section of alembic.ini holding script_location and the URL (alembic -n).")
    alembic_x_args: str | None = Field(
        None, alias="ALEMBIC_X_ARGS",
        description="Whitespace-separated key=value items for env.py's context.get_x_argument(), each one alembic -x.")
    flask_app: str | None = Field(
        None, alias="FLASK_APP",
        description="A Flask application, as for the `flask` command (`module`, `module:app`, "
                    "`module:create_app()`): commands run in its app context, as `flask db upgrade`; "
                    "ALEMBIC_CONFIG then defaults to Flask-Migrate's `migrations/alembic.ini`, and DATABASE_URL to "
                    "the URL of the application's engine.")
    wait_timeout: float = Field(
        60, ge=0, alias="MIGRATE_WAIT_TIMEOUT",
        description="Seconds to wait for the database to accept connections.")
    lock_timeout: float = Field(
        300, ge=0, alias="MIGRATE_LOCK_TIMEOUT",
        description="Seconds to wait for the advisory lock held by another runner.")
    lock_key: int | None = Field(
        None, ge=-INT64, lt=INT64, alias="MIGRATE_LOCK_KEY",
        description="Advisory lock key (signed 64-bit); default derived from database and version table.")
    baseline_revision: str | None = Field(
        None, alias="MIGRATE_BASELINE_REVISION",
        description="Revision to stamp on a database that has tables but no version table; `base` upgrades it from the first revision.")
    verify_baseline: bool = Field(
        False, alias="MIGRATE_VERIFY_BASELINE",
        description="Before stamping MIGRATE_BASELINE_REVISION, build that revision's schema in a scratch database "
                    "and refuse the stamp (exit 6, nothing written) unless the legacy schema matches it.")
    scratch_database_url: SecretStr | None = Field(
        None, alias="MIGRATE_SCRATCH_DATABASE_URL",
        description="Database MIGRATE_VERIFY_BASELINE builds the baseline in, and `roundtrip` proves downgrades in, "
                    "owned by its role: every schema in it is dropped before and after; default a database it "
                    "creates and drops on the same server (the role needs CREATEDB).")
    allow_multiple_heads: bool = Field(
        False, alias="MIGRATE_ALLOW_MULTIPLE_HEADS",
        description="Upgrade every head instead of refusing scripts with several heads in one branch (heads that "
                    "are each the one head of a branch label of their own, such as `expand` and `contract`, need "
                    "no setting).")
    target: str = Field(
        "heads", min_length=1, alias="MIGRATE_TARGET",
        description="What `upgrade` brings the database to, and what `check` and `wait` answer for: `heads`, "
                    "`<branch label>@head` (`expand@head` before a rolling deploy, `heads` after it), a revision id "
                    "or `<branch label>@<revision>`; a database at or beyond it is left as it is. One the scripts "
                    "do not have is exit 2.")
    allow_ahead: Literal["descendants", "always", "never"] = Field(
        "descendants", alias="MIGRATE_ALLOW_AHEAD",
        description="A database at revisions the scripts do not know (an older image after a rollback): `descendants` "
                    "exits 0 when the lineage the runner records proves they descend from the scripts' heads and "
                    "none is on a branch labelled `contract`, "
                    "`always` exits 0 regardless, `never` exits 8.")
    image: str | None = Field(
        None, alias="MIGRATE_IMAGE",
        description="The image the runner runs from (the chart sets it): recorded with the lineage, so that an "
                    "older image's exit 8 names the image to downgrade with.")
    history: bool = Field(
        False, alias="MIGRATE_HISTORY",
        description="Record each run that changes the version table, and each revision it applies, reverts or stamps "
                    "(duration, sha256 of its file, image, host), in MIGRATE_HISTORY_SCHEMA's table `history`, in the "
                    "same transactions; `history` lists the runs, and `verify` reports applied revisions edited or "
                    "removed since (exit 10).")
    history_schema: str = Field(
        "migration_runner", min_length=1, max_length=63, alias="MIGRATE_HISTORY_SCHEMA",
        description="Schema of the history table, created on first use; its own, so that autogenerate and "
                    "`alembic check` do not see it.")
    fast_path: bool = Field(
        True, alias="MIGRATE_FAST_PATH",
        description="Answer `upgrade`, `check` and `wait` on a database already at the heads without alembic, in one "
                    "login, when the lineage the runner recorded as it last migrated has the digest of these scripts "
                    "and settings; anything else runs the full path. A troubleshooting aid: `false` always runs "
                    "env.py (needed if env.py does work of its own on every run, or picks its version table from "
                    "files outside the script location or variables it does not name).")
    version_table: str = Field(
        "alembic_version", min_length=1, alias="MIGRATE_VERSION_TABLE",
        description="Alembic version table; must match env.py's version_table.")
    version_table_schema: str | None = Field(
        None, alias="MIGRATE_VERSION_TABLE_SCHEMA",
        description="Schema of the version table and of the tables a legacy check counts; default current_schema().")
    application_name: str = Field(
        "migration-runner", min_length=1, max_length=63, alias="MIGRATE_APPLICATION_NAME",
        description="application_name of every connection, shown in pg_stat_activity.")
    connection_check_interval: float = Field(
        2, ge=0, alias="MIGRATE_CONNECTION_CHECK_INTERVAL",
        description="Seconds between the server's checks that the runner is still connected (PostgreSQL 14+; 0 turns off).")
    statement_timeout: float | None = Field(
        None, gt=0, alias="MIGRATE_STATEMENT_TIMEOUT",
        description="statement_timeout in seconds for migration sessions (not the lock wait).")
    ddl_lock_timeout: float | None = Field(
        None, gt=0, alias="MIGRATE_DDL_LOCK_TIMEOUT",
        description="lock_timeout in seconds for migration sessions, so DDL does not queue behind live traffic.")
    ddl_lock_retries: int = Field(
        0, ge=0, le=100, alias="MIGRATE_DDL_LOCK_RETRIES",
        description="Times to retry, with backoff, a revision that rolled back on MIGRATE_DDL_LOCK_TIMEOUT.")
    progress_interval: float = Field(
        15, gt=0, alias="MIGRATE_PROGRESS_INTERVAL",
        description="Seconds between lines saying a long revision is still running, and on what it waits.")
    otel_flush_timeout: float = Field(
        1, gt=0, alias="MIGRATE_OTEL_FLUSH_TIMEOUT",
        description="Seconds the runner gives the OpenTelemetry collector, at exit, to take the run's traces and "
                    "metrics (the otel extra, with OTEL_EXPORTER_OTLP_ENDPOINT set: see Tracing and metrics); a "
                    "collector down or slower costs a warning, never the exit code.")
    termination_log: Path | None = Field(
        None, alias="MIGRATE_TERMINATION_LOG",
        description="File for the final JSON summary; default /dev/termination-log when it is writable.")
    log_format: Literal["text", "json"] | None = Field(
        None, alias="MIGRATE_LOG_FORMAT",
        description="text or json; default text on a terminal, json otherwise.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", alias="MIGRATE_LOG_LEVEL", description="DEBUG, INFO, WARNING or ERROR.")
    lint_exclude: str | None = Field(
        None, alias="MIGRATE_LINT_EXCLUDE",
        description="squawk rules `lint` leaves out, comma- or whitespace-separated, besides those the runner makes "
                    "moot (require-lock-timeout, require-statement-timeout, require-timeout-settings).")
    quit_urls: str | None = Field(
        None, alias="MIGRATE_QUIT_URLS",
        description="http(s) URLs, whitespace- or comma-separated, POSTed once each as the runner exits, whatever "
                    "its exit code, so that sidecars stop and a Job's pod completes (Istio "
                    "`http://127.0.0.1:15020/quitquitquit`, Cloud SQL Auth Proxy with --quitquitquit "
                    "`http://127.0.0.1:9091/quitquitquit`).")

    @field_validator("quit_urls")
    @classmethod
    def _http_urls(cls, value):
        if value is not None:
            for number, url in enumerate(split_list(value), 1):
                # Never echoed: the URL may carry a password.
                if not is_quit_url(url):
                    raise ValueError(f"URL {number} is not an http:// or https:// URL with a host and a valid port")
        return value

    @field_validator("log_level", "log_format", "allow_ahead", mode="before")
    @classmethod
    def _case_insensitive(cls, value, info):
        if isinstance(value, str):
            return value.upper() if info.field_name == "log_level" else value.strip().lower()
        return value

    def url(self) -> URL:
        """The database URL, from the variable or the file, with the driver env.py gets (DRIVERS)."""
        if self.database_url is not None and self.database_url_file is not None:
            raise ConfigError("DATABASE_URL and DATABASE_URL_FILE are both set; set exactly one")
        if self.database_url is None and self.database_url_file is None:
            raise ConfigError("set DATABASE_URL or DATABASE_URL_FILE")
        if self.database_url is not None:
            name, raw = "DATABASE_URL", self.database_url.get_secret_value()
        else:
            name, path = "DATABASE_URL_FILE", self.database_url_file
            try:
                raw = path.read_text()
            except OSError as e:
                raise ConfigError(f"DATABASE_URL_FILE: cannot read {path}: {e.strerror}") from None
        return parse_url(raw.strip(), name)

    def scratch_url(self) -> URL | None:
        """MIGRATE_SCRATCH_DATABASE_URL parsed, if set."""
        if self.scratch_database_url is None:
            return None
        return parse_url(self.scratch_database_url.get_secret_value().strip(), "MIGRATE_SCRATCH_DATABASE_URL")

    def x_arguments(self) -> list[str]:
        """ALEMBIC_X_ARGS as the list alembic's `-x` options make."""
        return (self.alembic_x_args or "").split()

    def lint_exclusions(self) -> list[str]:
        """MIGRATE_LINT_EXCLUDE as a list of squawk rule names."""
        return split_list(self.lint_exclude or "")

    def quit_url_list(self) -> list[str]:
        """MIGRATE_QUIT_URLS as a list."""
        return split_list(self.quit_urls or "")

    @classmethod
    def from_env(cls) -> "Settings":
        """Read the environment, translating validation errors to one ConfigError line."""
        try:
            return cls()
        except ValidationError as e:
            raise ConfigError("; ".join(_describe(err) for err in e.errors())) from None


def parse_url(raw: str, name: str = "DATABASE_URL") -> URL:
    """Parse a libpq-style URL without ever echoing it (it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    SQLALCHEMY_VERSION, SQLALCHEMY_2, DRIVERS = (_sqlalchemy()[n] for n in ("SQLALCHEMY_VERSION", "SQLALCHEMY_2",
                                                                           "DRIVERS"))
    if not raw:
        raise ConfigError(f"{name}: the URL is empty")
    _refuse_unencoded(raw, name)
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        if "," in raw.split("://", 1)[-1].split("/", 1)[0]:
            # libpq's postgresql://a:5432,b:5432/db, which SQLAlchemy (and so env.py) cannot read.
            raise ConfigError(f"{name}: list several hosts in the query, as SQLAlchemy reads them: "
                              f"postgresql://USER:PASSWORD@/DATABASE?host=a:5432&host=b:5432"
                              f"&target_session_attrs=read-write") from None
        raise ConfigError(f"{name}: not a PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE, password percent-encoded)") from None
    if url.drivername not in DRIVERS:
        raise ConfigError(f"{name}: unsupported scheme {url.drivername!r}; use one of {', '.join(sorted(DRIVERS))}")
    if not SQLALCHEMY_2 and url.drivername in _NEEDS_SQLALCHEMY_2:
        raise ConfigError(f"{name}: {url.drivername}:// needs SQLAlchemy 2 (env.py's engine would have no such "
                          f"dialect), and SQLAlchemy {SQLALCHEMY_VERSION} is installed; use "
                          f"{_NEEDS_SQLALCHEMY_2[url.drivername]} instead")
    if not url.database:
        raise ConfigError(f"{name}: the URL names no database")
    if any(mark in (url.host or "") + (url.database or "") for mark in "@ "):
        raise ConfigError(f"{name}: the URL does not parse as intended (an '@' or a space after the user info); "
                          f"{_ENCODE}")
    try:
        servers = database.hosts(url)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    ports = [url.port] if url.port is not None else []
    ports += [port for _, port in servers if port is not None]
    if any(not str(port).strip().isdigit() or not 0 < int(port) < 65536 for port in ports):
        raise ConfigError(f"{name}: the port must be between 1 and 65535")
    if len(servers) > 1 and url.drivername == "postgresql+pg8000":
        raise ConfigError(f"{name}: pg8000 cannot connect to a list of hosts; use "
                          f"{'postgresql+psycopg, ' if SQLALCHEMY_2 else ''}postgresql+psycopg2 or "
                          f"postgresql+asyncpg for a multi-host URL")
    _refuse_what_older_dialects_cannot_read(url, servers, name)
    return url.set(drivername=DRIVERS[url.drivername])


def _refuse_what_older_dialects_cannot_read(url: URL, servers: list, name: str) -> None:
    """Exit 2 for host forms the installed SQLAlchemy's dialect for env.py would misread (it would only
    fail as env.py connects, after the runner's own sessions, which read them, took the lock)."""
    SQLALCHEMY_VERSION, SQLALCHEMY_VERSION_INFO, SQLALCHEMY_2 = (
        _sqlalchemy()[n] for n in ("SQLALCHEMY_VERSION", "SQLALCHEMY_VERSION_INFO", "SQLALCHEMY_2"))
    if len(servers) > 1 and url.drivername == "postgresql+asyncpg" and SQLALCHEMY_VERSION_INFO < (2, 0, 18):
        raise ConfigError(f"{name}: the asyncpg dialect of SQLAlchemy {SQLALCHEMY_VERSION} cannot connect to a "
                          f"list of hosts (SQLAlchemy 2.0.18 and later can); use postgresql+psycopg2 for a "
                          f"multi-host URL")
    host = url.query.get("host")
    if not SQLALCHEMY_2 and isinstance(host, str) and "port" not in url.query and re.fullmatch(r"[^,:]+:\d*", host):
        # SQLAlchemy 1.4 hands a single host=HOST:PORT to the driver as a host name.
        raise ConfigError(f"{name}: SQLAlchemy {SQLALCHEMY_VERSION} reads ?host=HOST:PORT as a host name; write "
                          f"?host=HOST&port=PORT")


# Drivers SQLAlchemy 1.4 has no dialect for, and what to use instead under it.
_NEEDS_SQLALCHEMY_2 = {"postgresql+psycopg": "postgresql+psycopg2:// (or postgresql://, which is psycopg2 under "
                                             "SQLAlchemy 1.4)",
                       "postgresql+psycopg_async": "postgresql+asyncpg:// for an async env.py"}

_ENCODE = "percent-encode special characters in the password (@ as %40, / as %2F, % as %25, : as %3A, space as %20)"


def _refuse_unencoded(raw: str, name: str) -> None:
    """Say, before connecting and without echoing it, that the user info was not percent-encoded."""
    authority = raw.split("://", 1)[-1].split("?", 1)[0]
    if "@" not in authority:
        return
    user_info, host_part = authority.rsplit("@", 1)
    if "@" in user_info.split("/", 1)[0] or "/" in host_part.split("/", 1)[0] and "@" in host_part:
        raise ConfigError(f"{name}: the URL holds more than one '@' before the host; {_ENCODE}")
    if re.search(r"%(?![0-9A-Fa-f]{2})", user_info):
        raise ConfigError(f"{name}: the user info holds a '%' that is not a percent-escape; {_ENCODE}")


def split_list(raw: str) -> list[str]:
    """A variable holding a list, its items separated by commas or whitespace."""
    return raw.replace(",", " ").split()


def is_quit_url(url: str) -> bool:
    """An http(s) URL with a host, and a port if any that a socket can use."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a ValueError when it is not a number below 65536
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and port != 0


def quit_urls_from_env() -> list[str]:
    """The valid URLs of MIGRATE_QUIT_URLS, read on their own: when another variable is
    invalid the settings are never built, and the sidecars must be told to quit all the same."""
    return [url for url in split_list(os.environ.get("MIGRATE_QUIT_URLS", "")) if is_quit_url(url)]


# Variables whose value may hold a password: an error about them never shows it.
_UNECHOED = ("DATABASE_URL", "DATABASE_URL_FILE", "DATABASE_URLS_FILE", "MIGRATE_QUIT_URLS", "MIGRATE_SCRATCH_DATABASE_URL",
             "MIGRATE_PASSWORD_COMMAND")


def _describe(err: dict) -> str:
    variable = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if not variable:
        return message
    shown = "" if variable.split(".")[0] in _UNECHOED else f" (got {str(err.get('input'))[:40]!r})"
    return f"{variable}: {message}{shown}"


def variables() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the docs and --help read this."""
    rows = []
    for field in Settings.model_fields.values():
        default = "" if field.default is None else str(field.default)
        rows.append((field.alias, default, field.description or ""))
    return rows


if _PLUGINS_SETTING is None:
    del os.environ["PYDANTIC_DISABLE_PLUGINS"]
else:
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = _PLUGINS_SETTING
