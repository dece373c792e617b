"""migration-runner: bring a PostgreSQL database to the Alembic heads, safely."""


def package_version() -> str:
    """The installed version; looked up only when asked (scanning the installed packages costs time)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("migration-runner")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0"
