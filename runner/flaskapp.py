"""Flask applications: Flask-Migrate projects (`flask db upgrade`) run as they are.

Flask-Migrate's env.py (its `flask` and `flask-multidb` templates) needs a Flask
application context: it reads the engine, the metadata and `Migrate(...)`'s
configure arguments from `current_app.extensions['migrate']`, and sets
`sqlalchemy.url` from the application's own engine. When FLASK_APP is set, as
for the `flask` command, the runner

- loads the application with Flask's own loader (`flask.cli.ScriptInfo`:
  `module`, `module:app`, `module:create_app(...)`, a factory found by name),
  and runs the command inside `app.app_context()`. `upgrade` and `downgrade`
  create it under the lock when DATABASE_URL names the database (a factory
  may write, or migrate, as it is created); revisions its factory applies
  itself count as the run's own (`heads_before_its_own_upgrade`);
- defaults ALEMBIC_CONFIG to `<Migrate's directory>/alembic.ini`
  (`migrations/alembic.ini`) and, as Flask-Migrate's `Migrate.get_config`,
  makes that directory the script location whatever the ini says (plus its
  `@migrate.configure` callbacks);
- takes the database URL of the application's engine (SQLALCHEMY_DATABASE_URI)
  for its own sessions when DATABASE_URL is not set; when both are set they
  must name the same database.

Flask is not a dependency of the runner: it is imported only when FLASK_APP is set.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from alembic.config import Config
from pydantic import SecretStr
from sqlalchemy.engine import URL

from . import credentials, database, log, revisions
from .errors import ConfigError, RunnerError
from .settings import Settings, parse_url

logger = logging.getLogger("runner")

# What `flask db init` writes, and Flask-Migrate's Migrate(directory=...) default.
DEFAULT_DIRECTORY = "migrations"


def loads_under_lock(settings: Settings) -> bool:
    """Whether `upgrade` and `downgrade` create the application under the lock: when DATABASE_URL (or its file)
    says which database to lock without it."""
    return settings.flask_app is not None and (settings.database_url is not None
                                               or settings.database_url_file is not None)


@contextmanager
def application(settings: Settings, *, writing: bool = False) -> Iterator[Settings]:
    """Inside FLASK_APP's application context (when it is set), with the settings the application completes.

    `writing`: a command that takes the lock afterwards creates it here, before the lock (its URL is known
    only from the application): said once, as a warning.
    """
    if settings.flask_app is None:
        yield settings
        return
    if settings.database_url is not None or settings.database_url_file is not None:
        # An application that connects while it is created logs in with the rotating password too.
        credentials.configure(settings, settings.url())
    elif writing:
        logger.warning("FLASK_APP=%s is created before the lock: its database is known only from the application "
                       "(SQLALCHEMY_DATABASE_URI); set DATABASE_URL as well so that the runner creates it under the "
                       "lock, where what its factory writes cannot race other replicas", settings.flask_app)
    app = _load(_flask_cli(), settings.flask_app)
    with app.app_context():
        migrate = app.extensions.get("migrate")
        completed = settings.model_copy(update=_from_application(app, migrate, settings))
        # Connections the application opened while it was created are not the guard's migration
        # sessions: env.py must get new ones.
        _dispose(app)
        hook = _flask_migrate_config(migrate, directory_wins="alembic_config" not in settings.model_fields_set)
        revisions.config_hooks.append(hook)
        try:
            yield completed
        finally:
            revisions.config_hooks.remove(hook)
            # Pooled connections hold the fence key while they live: close them now, not at exit.
            _dispose(app)


# The version rows before the first migration the application ran itself while it was created
# (`flask_migrate.upgrade()` in its factory), if it ran one that moved the database.
_heads_before_loading: tuple[str, ...] | None = None


def heads_before_its_own_upgrade() -> tuple[str, ...] | None:
    """Where the database was before the application upgraded it itself while it was created, if it did."""
    return _heads_before_loading


@contextmanager
def _noting_its_own_migrations() -> Iterator[None]:
    """While the application is created: note where the database was before any migration it runs itself."""
    from alembic.runtime.migration import MigrationContext

    run_migrations = MigrationContext.run_migrations

    def noted(context, **kwargs):
        global _heads_before_loading
        before = None if context.as_sql else tuple(context.get_current_heads())
        run_migrations(context, **kwargs)
        if before is not None and _heads_before_loading is None and set(context.get_current_heads()) != set(before):
            _heads_before_loading = before
            logger.warning("the application ran migrations itself while it was created (from %s to %s)",
                           ", ".join(before) or "base", ", ".join(context.get_current_heads()))

    MigrationContext.run_migrations = noted
    try:
        yield
    finally:
        MigrationContext.run_migrations = run_migrations


def _flask_cli():
    """flask.cli, or exit 2 naming what to install."""
    try:
        from flask import cli
    except ImportError as e:
        raise ConfigError(f"FLASK_APP is set but Flask cannot be imported ({e}): install the application's "
                          f"requirements (flask, flask-sqlalchemy, flask-migrate) where migration-runner "
                          f"runs") from None
    return cli


def _load(cli, import_path: str):
    """The application as `flask --app <import_path>` loads it (FLASK_DEBUG honoured; .env files are not read)."""
    info = cli.ScriptInfo(app_import_path=import_path)
    try:
        with _noting_its_own_migrations():
            return info.load_app()
    except cli.NoAppException as e:
        # An ImportError inside the application comes with its traceback: keep its first and last lines.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[0] if len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"
        raise ConfigError(f"FLASK_APP={import_path}: {detail}") from None
    except RunnerError:
        raise
    except Exception as e:  # the application's own code failed while it was imported or created
        raise ConfigError(f"FLASK_APP={import_path}: the application failed to load: {type(e).__name__}: "
                          f"{database.first_line(e)}") from None


def _from_application(app, migrate, settings: Settings) -> dict:
    """The settings the application supplies: ALEMBIC_CONFIG's default, and DATABASE_URL when it is unset."""
    update = {}
    if "alembic_config" not in settings.model_fields_set and migrate is not None:
        directory = getattr(migrate, "directory", None) or DEFAULT_DIRECTORY
        update["alembic_config"] = Path(str(directory)) / "alembic.ini"
    engine_url = _engine_url(app, migrate)
    given = settings.database_url is not None or settings.database_url_file is not None
    if engine_url is None:
        if not given:
            raise ConfigError(f"FLASK_APP={settings.flask_app}: the application has no Flask-SQLAlchemy engine "
                              f"(current_app.extensions['migrate'].db) to take the database URL from; set "
                              f"DATABASE_URL")
        return update
    raw = engine_url.render_as_string(hide_password=False)
    log.add_url_secrets(engine_url)
    ours = parse_url(raw, "the application's SQLALCHEMY_DATABASE_URI")
    if given:
        stated = settings.url()
        if _identity(stated) != _identity(ours):
            variable = "DATABASE_URL" if settings.database_url is not None else "DATABASE_URL_FILE"
            raise ConfigError(
                f"{variable} names {_describe(stated)} but the Flask application's engine "
                f"(SQLALCHEMY_DATABASE_URI), which env.py migrates, names {_describe(ours)}: the lock and the "
                f"checks must cover the database env.py migrates; unset {variable} (the runner then uses the "
                f"application's) or make both name the same database")
        return update
    logger.info("database from the Flask application's engine (SQLALCHEMY_DATABASE_URI): %s", _describe(ours),
                extra={"flask_app": settings.flask_app})
    update["database_url"] = SecretStr(raw)
    return update


def _engine_url(app, migrate) -> URL | None:
    """The URL of the engine Flask-Migrate's env.py migrates with, None without Flask-SQLAlchemy."""
    db = getattr(migrate, "db", None) if migrate is not None else app.extensions.get("sqlalchemy")
    if db is None:
        return None
    try:
        try:
            engine = db.engine  # Flask-SQLAlchemy 3 (2 too)
        except (TypeError, AttributeError):
            engine = db.get_engine()  # Alchemical, as Flask-Migrate's env.py falls back
    except Exception as e:
        raise ConfigError(f"the Flask application's database engine cannot be made: {type(e).__name__}: "
                          f"{database.first_line(e)}") from None
    return engine.url


def _identity(url: URL) -> tuple:
    """What makes two URLs the same database: server, database and role (not the driver, nor the password)."""
    return database.endpoint(url), url.database, url.username


def _describe(url: URL) -> str:
    return f"{url.username or '(default user)'}@{database.endpoint(url)}/{url.database}"


def _flask_migrate_config(migrate, *, directory_wins: bool) -> Callable[[Config], Config]:
    """What Flask-Migrate's Migrate.get_config does to alembic's Config beyond reading the ini.

    `directory_wins` (ALEMBIC_CONFIG not set, so the ini is the Migrate directory's): that directory is
    the script location whatever the ini says (`script_location = .` resolves against the working
    directory, not the ini's), as `flask db upgrade` has it. An ini named by ALEMBIC_CONFIG keeps its own.
    """

    def adjust(config: Config) -> Config:
        ini = config.config_file_name
        if ini and (directory_wins or not getattr(config, "get_alembic_option", config.get_main_option)(
                "script_location")):
            config.set_main_option("script_location", str(Path(ini).resolve().parent).replace("%", "%%"))
        callbacks = getattr(getattr(migrate, "migrate", None), "call_configure_callbacks", None)
        return callbacks(config) if callbacks else config

    return adjust


def _dispose(app) -> None:
    """Close the pooled connections of the application's engines (Flask-SQLAlchemy's `db.engines`)."""
    db = app.extensions.get("sqlalchemy")
    for engine in list(getattr(db, "engines", {}).values()) if db is not None else []:
        engine.dispose()
