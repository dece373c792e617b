"""env.py sources for the fidelity tests, each a function returning the text of an env.py.

Every env.py reads sqlalchemy.url as alembic and the runner both set it
(`postgresql+psycopg://...` under SQLAlchemy 2, `postgresql+psycopg2://...` under
1.4) and, where it builds its own engine, switches the driver itself the way
projects do: `make_url(url).set(drivername=...)`.

The SQLAlchemy installed decides, here and only here, which driver a plain
`postgresql://` URL means (DEFAULT_DRIVER) and which drivers env.py can use at all
(driver_params: psycopg 3 cases are skipped under 1.4, which has no dialect for it).
"""

from __future__ import annotations

import pytest
import sqlalchemy

SQLALCHEMY_14 = int(sqlalchemy.__version__.split(".")[0]) < 2
# What SQLAlchemy, so env.py, reads `postgresql://` as: psycopg 3 from SQLAlchemy 2.0, psycopg2 before.
DEFAULT_DRIVER = "psycopg2" if SQLALCHEMY_14 else "psycopg"
# create_engine's keyword arguments for the 2.0-style Connection (commit as you go) on either version.
FUTURE = {"future": True} if SQLALCHEMY_14 else {}
PSYCOPG3_DRIVERS = ("psycopg", "psycopg_async")
NO_PSYCOPG3 = (f"SQLAlchemy {sqlalchemy.__version__} has no psycopg 3 dialect (postgresql+psycopg and "
               "+psycopg_async came with SQLAlchemy 2.0)")

SYNC_DRIVERS = ("psycopg", "psycopg2", "pg8000")
ASYNC_DRIVERS = ("asyncpg", "psycopg_async")
DRIVERS = SYNC_DRIVERS + ASYNC_DRIVERS
FOREIGN_DRIVERS = tuple(d for d in DRIVERS if d != DEFAULT_DRIVER)


def driver_params(drivers=DRIVERS) -> list:
    """`drivers` for pytest.mark.parametrize, the psycopg 3 ones skipped (with the reason) under SQLAlchemy 1.4."""
    return [pytest.param(d, id=d, marks=pytest.mark.skipif(SQLALCHEMY_14 and d in PSYCOPG3_DRIVERS,
                                                            reason=NO_PSYCOPG3))
            for d in drivers]


def _configure_args(options: dict) -> str:
    """Extra keyword arguments for context.configure, as source text."""
    return "".join(f", {name}={value!r}" for name, value in options.items())


def _url_lines(driver: str, database: str | None) -> str:
    changes = f"drivername={f'postgresql+{driver}'!r}"
    if database is not None:
        changes += f", database={database!r}"
    return f'url = make_url(config.get_main_option("sqlalchemy.url")).set({changes})'


def own_engine(driver: str = DEFAULT_DRIVER, database: str | None = None, **configure) -> str:
    """env.py that builds its own engine with `driver`: sync like `alembic init`'s generic
    template, async (asyncpg, psycopg_async) like `alembic init -t async`.

    `database` swaps the database name in the URL; `configure` goes to context.configure
    (version_table, version_table_schema, transaction_per_migration, ...).
    """
    args = _configure_args(configure)
    if driver in ASYNC_DRIVERS:
        return f'''
import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
target_metadata = None


def do_run_migrations(connection):
    context.configure(connection=connection, target_metadata=target_metadata{args})
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations():
    {_url_lines(driver, database)}
    connectable = create_async_engine(url, poolclass=pool.NullPool)
    async with connectable.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await connectable.dispose()


asyncio.run(run_async_migrations())
'''
    return f'''
from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

config = context.config
target_metadata = None


def run_migrations_online():
    {_url_lines(driver, database)}
    connectable = create_engine(url, poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata{args})
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
'''


def cookbook(**configure) -> str:
    """The env.py of alembic's cookbook, "Sharing a Connection across one or more programmatic
    migration commands": the connection in config.attributes if there is one, else its own engine."""
    args = _configure_args(configure)
    return f'''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
target_metadata = None


def run_migrations_online():
    connectable = config.attributes.get("connection", None)

    if connectable is None:
        # only create Engine if we don't have a Connection from the outside
        connectable = engine_from_config(
            config.get_section(config.config_ini_section, {{}}),
            prefix="sqlalchemy.",
            poolclass=pool.NullPool,
        )
        with connectable.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata{args})
            with context.begin_transaction():
                context.run_migrations()
    else:
        context.configure(connection=connectable, target_metadata=target_metadata{args})
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline mode is not used here")
run_migrations_online()
'''


def exits_at_top(statement: str) -> str:
    """env.py whose first statement ends the process (`sys.exit(0)`, `raise SystemExit(...)`);
    the ordinary env.py after it never runs."""
    return f"import sys\n\n{statement}\n" + own_engine()


def returns_before_connecting() -> str:
    """env.py that decides there is nothing to do and returns without connecting."""
    return '''
from alembic import context

config = context.config


def run_migrations_online():
    if config.get_main_option("script_location"):  # say, a feature flag that is off
        return
    raise AssertionError("unreachable")


run_migrations_online()
'''


def configures_without_running(use_offered_connection: bool) -> str:
    """env.py that connects and configures the context, opens its transaction, and then
    returns without calling context.run_migrations(): with its own engine, or with the
    connection offered in config.attributes (the runner's) when there is one."""
    get_connection = ('config.attributes.get("connection") or stack.enter_context(own.connect())'
                      if use_offered_connection else "stack.enter_context(own.connect())")
    return f'''
from contextlib import ExitStack

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config

with ExitStack() as stack:
    own = engine_from_config(config.get_section(config.config_ini_section, {{}}), prefix="sqlalchemy.",
                             poolclass=pool.NullPool)
    connection = {get_connection}
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        pass  # forgot context.run_migrations()
'''
