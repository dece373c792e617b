"""Fixtures: one real PostgreSQL for the session, a fresh database per test, and the runner as a process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from .postgres import Postgres
from .projects import chain, make_project

ROOT = Path(__file__).resolve().parent.parent
RUNNER = shutil.which("migration-runner", path=str(Path(sys.executable).parent)) or "migration-runner"
RUNNER_ROLE = "runner"
# Every character that breaks naive URL or configparser handling.
RUNNER_PASSWORD = "p%w@rd:/#?&=x y'\"z"


def pytest_report_header(config) -> str:
    """Which SQLAlchemy and alembic this run is on (dev.py test runs the suite on the newest, then the `core`
    subset on SQLAlchemy 1.4), and the driver env.py's `postgresql://` URL means there."""
    import alembic
    import sqlalchemy

    from .envs import DEFAULT_DRIVER

    return (f"sqlalchemy {sqlalchemy.__version__}, alembic {alembic.__version__}; "
            f"env.py's driver for postgresql://: {DEFAULT_DRIVER}")


@pytest.fixture(scope="session")
def postgres():
    server = Postgres().start()
    server.create_role(RUNNER_ROLE, RUNNER_PASSWORD, "CREATEDB")
    yield server
    server.destroy()


@pytest.fixture
def database(postgres) -> str:
    """The name of a fresh, empty database owned by the runner role."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name, RUNNER_ROLE)
    return name


@pytest.fixture
def database_url(postgres, database) -> str:
    return postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD)


@pytest.fixture
def project(tmp_path) -> Path:
    """A project of three revisions in a line; returns its alembic.ini."""
    return make_project(tmp_path / "project", chain(3))


def runner_env(url: str | None = None, ini: Path | None = None, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG"))}
    env.update({"MIGRATE_LOG_FORMAT": "json", "MIGRATE_WAIT_TIMEOUT": "10", "MIGRATE_LOCK_TIMEOUT": "30"})
    if url:
        env["DATABASE_URL"] = url
    if ini:
        env["ALEMBIC_CONFIG"] = str(ini)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Result:
    """A finished runner process: exit code, output, and its JSON log lines."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.output.splitlines() if line.strip()]

    def events(self) -> list[str]:
        return [r["event"] for r in self.records]

    @property
    def last(self) -> dict:
        return self.records[-1]

    def __repr__(self) -> str:
        return f"Result(rc={self.returncode}, output={self.output[-3000:]!r})"


def summary(result: Result) -> dict:
    """The runner's last output line, which must be its JSON summary."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines, result
    try:
        last = json.loads(lines[-1])
    except ValueError:
        raise AssertionError(f"the last line is not JSON: {lines[-1]!r}\n{result!r}") from None
    assert isinstance(last, dict) and {"command", "outcome", "exit_code", "applied"} <= set(last), result
    return last


def run_runner(env: dict, *args: str, timeout: float = 120, cwd: Path | None = None) -> Result:
    proc = subprocess.run([RUNNER, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_runner(env: dict, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([RUNNER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 120) -> Result:
    out, _ = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, "")


# -- what the database holds ------------------------------------------------
def version_rows(url: str, table: str = "alembic_version") -> list[str]:
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        if exists is None:
            return []
        return sorted(row[0] for row in conn.execute(f"SELECT version_num FROM {table}"))


def tables(url: str, schema: str = "public") -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall()
        return sorted(r[0] for r in rows)


def advisory_locks(postgres: Postgres, database: str) -> list[tuple]:
    return postgres.execute(
        "SELECT l.pid, l.classid, l.objid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND d.datname = %s", params=(database,))


def assert_consistent(url: str, expected_heads: list[str], prefix: str = "r") -> None:
    """The version row matches the schema: exactly the chain's tables up to the head exist."""
    heads = version_rows(url)
    assert heads == sorted(expected_heads), heads
    present = [t for t in tables(url) if t.startswith(f"{prefix}_")]
    if heads:
        n = max(int(h[len(prefix):]) for h in heads if h.startswith(prefix))
        assert sorted(present) == sorted(f"{prefix}_{i}" for i in range(1, n + 1)), present
    else:
        assert present == [], present
