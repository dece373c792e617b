"""Differential testing against plain alembic: twin databases, one migrated by each, then compared.

Plain `alembic upgrade heads` is the reference. The same project runs once with the
alembic command and once with the runner, each on its own database created alike;
afterwards `pg_dump --schema-only` and the version rows of the two must be equal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pgserver._commands import POSTGRES_BIN_PATH

from runner.lineage import MARK

from .conftest import RUNNER_PASSWORD, RUNNER_ROLE, Result, run_runner, runner_env
from .envs import DEFAULT_DRIVER
from .postgres import Postgres

ALEMBIC = shutil.which("alembic", path=str(Path(sys.executable).parent)) or "alembic"


def sqlalchemy_url(libpq_url: str, driver: str = DEFAULT_DRIVER) -> str:
    """The URL as env.py receives it in sqlalchemy.url for a `postgresql://` DATABASE_URL (by default, with the
    driver the installed SQLAlchemy reads `postgresql://` as)."""
    return libpq_url.replace("postgresql://", f"postgresql+{driver}://", 1)


def run_alembic(ini: Path, url: str, *args: str, env: dict | None = None, timeout: float = 120) -> Result:
    """`alembic -c <ini> <args>` (default `upgrade heads`) with sqlalchemy.url set as the runner sets it.

    The URL goes into a sibling copy of the ini (the project's own is left alone), so
    `%(here)s` and every other option resolve exactly as for the runner.
    """
    text = ini.read_text()
    line = f"sqlalchemy.url = {url.replace('%', '%%')}"
    if re.search(r"(?m)^sqlalchemy\.url\s*=.*$", text):
        text = re.sub(r"(?m)^sqlalchemy\.url\s*=.*$", lambda _: line, text, count=1)
    else:
        text = re.sub(r"(?m)^\[alembic\]\s*$", lambda _: f"[alembic]\n{line}", text, count=1)
    plain = ini.with_name(f"plain-{uuid.uuid4().hex[:8]}.ini")
    plain.write_text(text)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG"))}
    try:
        proc = subprocess.run([ALEMBIC, "-c", str(plain), *(args or ("upgrade", "heads"))],
                              env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                              cwd=ini.parent)
    finally:
        plain.unlink()
    return Result(proc.returncode, proc.stdout, proc.stderr)


def schema_dump(postgres: Postgres, database: str) -> str:
    """pg_dump --schema-only, without comments, the lines that differ between any two dumps, and the lineage
    the runner records as the version table's comment (its one intended difference from plain alembic)."""
    proc = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_dump"), "--schema-only", "--no-owner", "--no-privileges",
         "-h", postgres.host, "-p", str(postgres.port), "-U", "postgres", database],
        env={**os.environ, "PGPASSWORD": "super-secret-pw"}, capture_output=True, text=True, timeout=60, check=True)
    keep = [line for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))
            and not (line.startswith("COMMENT ON TABLE ") and f" IS '{MARK} " in line)]
    return "\n".join(keep)


def version_table_rows(postgres: Postgres, database: str) -> dict[str, list[str]]:
    """Every table with a version_num column (any schema, any name): its rows, sorted."""
    found = {}
    with postgres.connect(database) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.columns WHERE column_name = 'version_num' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
        for schema, table in tables:
            rows = conn.execute(f'SELECT version_num FROM "{schema}"."{table}"').fetchall()
            found[f"{schema}.{table}"] = sorted(r[0] for r in rows)
    return found


@dataclass
class Twins:
    """Two empty databases owned by the runner's role: `plain` for alembic, `runner` for migration-runner."""

    postgres: Postgres
    plain: str
    runner: str

    @classmethod
    def create(cls, postgres: Postgres, setup_sql: list[str] = ()) -> "Twins":
        twins = cls(postgres, f"t_{uuid.uuid4().hex[:12]}", f"t_{uuid.uuid4().hex[:12]}")
        for name in (twins.plain, twins.runner):
            postgres.create_database(name, RUNNER_ROLE)
            for statement in setup_sql:
                postgres.execute(statement, database=name)
        return twins

    def url(self, which: str) -> str:
        return self.postgres.url(getattr(self, which), RUNNER_ROLE, RUNNER_PASSWORD)

    def run_alembic(self, ini: Path, *args: str, driver: str = DEFAULT_DRIVER, env: dict | None = None) -> Result:
        return run_alembic(ini, sqlalchemy_url(self.url("plain"), driver), *args, env=env)

    def run_runner(self, ini: Path, *args: str, **extra: str) -> Result:
        return run_runner(runner_env(self.url("runner"), ini, **extra), *args)

    def assert_same(self) -> None:
        """Both databases hold the same schema and the same version rows."""
        assert version_table_rows(self.postgres, self.plain) == version_table_rows(self.postgres, self.runner)
        assert schema_dump(self.postgres, self.plain) == schema_dump(self.postgres, self.runner)
