"""migration-runner: bring a PostgreSQL database to the Alembic heads, safely."""


def package_version() -> str:
    """The installed version; looked up only when asked (scanning the installed packages costs time)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("migration-runner")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def stack_versions() -> str:
    """The runner's version and those of what it runs on, for --version and bug reports."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name, distribution in (("alembic", "alembic"), ("SQLAlchemy", "sqlalchemy"), ("psycopg", "psycopg")):
        try:
            parts.append(f"{name} {version(distribution)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"migration-runner {package_version()} ({', '.join(parts)}, Python {platform.python_version()})"
