"""migration-runner: bring a PostgreSQL database to the Alembic heads, safely."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("migration-runner")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
