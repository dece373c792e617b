"""Running the project's env.py as alembic's own commands do.

env.py is the project's code: it builds its engine (its driver, its connect_args),
opens its transactions and names its version table. The runner never hands it a
connection; it runs it through alembic's EnvironmentContext exactly as
`alembic current` (reading, with dont_mutate), `alembic stamp` and
`alembic upgrade` do, so env.py behaves as it does under alembic's CLI.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import DBAPIError

from . import database
from .errors import ConfigError, DatabaseUnreachable, RunnerError
from .settings import SQLALCHEMY_2


# Driver modules SQLAlchemy imports for a URL, and the package that provides each.
_DRIVERS = {"asyncpg": "asyncpg", "psycopg2": "psycopg2-binary", "pg8000": "pg8000"}


class EarlyExit(Exception):
    """env.py or a revision raised SystemExit: the run stopped before its end."""

    def __init__(self, code) -> None:
        self.code = code
        super().__init__(f"sys.exit({code!r})" if not isinstance(code, str) else f"SystemExit({code!r})")


@contextmanager
def no_exit() -> Iterator[None]:
    """SystemExit from env.py or a revision as EarlyExit: the runner reports it instead of exiting."""
    try:
        yield
    except SystemExit as e:
        raise EarlyExit(e.code) from None


def run(config: Config, script: ScriptDirectory, fn, **options) -> None:
    """env.py under EnvironmentContext(config, script, fn=fn, **options), as alembic's commands run it."""
    with EnvironmentContext(config, script, fn=fn, **options), no_exit():
        script.run_env()


def failure(error: BaseException) -> RunnerError:
    """The RunnerError for env.py failing before any revision ran."""
    if isinstance(error, RunnerError):
        return error
    if isinstance(error, ModuleNotFoundError) and error.name in _DRIVERS:
        # psycopg 3 is always installed (the runner's own sessions use it), but SQLAlchemy 1.4 has no dialect for it.
        instead = ", or use postgresql+psycopg:// (sync and async)" if SQLALCHEMY_2 else ""
        return ConfigError(f"env.py's engine needs the driver {error.name!r}, which is not installed: add "
                           f"{_DRIVERS[error.name]} to the image (pip install in a derived image, or build with "
                           f"--build-arg EXTRAS=drivers){instead}")
    if isinstance(error, EarlyExit):
        return ConfigError(f"env.py exited ({error}) before running the migrations; nothing was applied")
    if database.is_disconnect(error):  # any driver's: asyncpg raises OSError from connect unwrapped
        return DatabaseUnreachable(f"env.py lost its connection to the database: {database.first_line(error)}")
    if isinstance(error, DBAPIError) or database.sqlstate(error):
        code = database.sqlstate(error)
        return ConfigError(f"env.py failed: {f'SQLSTATE {code}: ' if code else ''}{database.first_line(error)}")
    return ConfigError(f"env.py failed: {type(error).__name__}: {database.first_line(error)}")
