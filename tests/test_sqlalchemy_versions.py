"""The runner on whichever SQLAlchemy the application has, 1.4 (from 1.4.36) or 2.x.

SQLAlchemy 1.4 has no psycopg 3 dialect: there `postgresql://` means psycopg2 to
env.py, a URL naming psycopg 3 is exit 2, and the runner's own sessions, which
use psycopg 3 directly, never need SQLAlchemy's dialect for it.
"""

import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy

from .conftest import finish, run_runner, runner_env, start_runner, version_rows
from .projects import make_project
from .test_baseline import SLOW, USERS, ORDERS, building, legacy, scratch_databases, verifying
from .test_cli import wait_for

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core

SQLALCHEMY_14 = int(sqlalchemy.__version__.split(".")[0]) < 2
only_on_14 = pytest.mark.skipif(not SQLALCHEMY_14, reason="SQLAlchemy 2 has the psycopg 3 dialect")


@only_on_14
@pytest.mark.parametrize("scheme, instead", [("postgresql+psycopg", "postgresql+psycopg2://"),
                                             ("postgresql+psycopg_async", "postgresql+asyncpg://")])
def test_a_psycopg3_url_under_sqlalchemy_14_is_exit_2_naming_the_version(project, database_url, scheme, instead):
    url = database_url.replace("postgresql://", f"{scheme}://", 1)
    result = run_runner(runner_env(url, project), "upgrade")
    summary = result.last["event"]
    assert result.returncode == 2, result
    assert f"{scheme}:// needs SQLAlchemy 2" in summary
    assert f"SQLAlchemy {sqlalchemy.__version__} is installed" in summary
    assert instead in summary, summary
    assert version_rows(database_url) == []


@only_on_14
@pytest.mark.parametrize("url, words", [
    ("postgresql+asyncpg://u:pw@/db?host=a:5432&host=b:5432", "asyncpg dialect of SQLAlchemy"),
    ("postgresql+asyncpg://u:pw@/db?host=a,b&port=5432,5432", "asyncpg dialect of SQLAlchemy"),
    ("postgresql://u:pw@/db?host=a:6432", "reads ?host=HOST:PORT as a host name"),
])
def test_host_forms_sqlalchemy_14_misreads_are_exit_2_before_connecting(project, url, words):
    # The runner's own sessions read them; env.py's dialect would not, and fail only once the lock is held.
    result = run_runner(runner_env(url, project), "check")
    assert result.returncode == 2 and words in result.last["event"], result
    assert sqlalchemy.__version__ in result.last["event"] and "pw@" not in result.output


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_the_plain_schemes_mean_the_installed_sqlalchemys_default_driver(monkeypatch, scheme):
    from runner.settings import Settings

    monkeypatch.setenv("DATABASE_URL", f"{scheme}://u:pw@db:5432/shop")
    expected = "postgresql+psycopg2" if SQLALCHEMY_14 else "postgresql+psycopg"
    assert Settings.from_env().url().drivername == expected


@only_on_14
def test_under_sqlalchemy_14_a_plain_url_upgrades_through_psycopg2(project, database_url):
    result = run_runner(runner_env(database_url, project), "upgrade")
    assert result.returncode == 0, result
    assert version_rows(database_url) == ["r0003"]


# Run as the console script runs, with SQLAlchemy's psycopg 3 dialect (where there is one) made unusable.
_WITHOUT_THE_DIALECT = """
import sys

try:
    from sqlalchemy.dialects.postgresql import psycopg as dialect
except ImportError:  # SQLAlchemy 1.4: no such dialect
    dialect = None

if dialect is not None:
    def refuse(*args, **kwargs):
        sys.stderr.write("SQLAlchemy's psycopg 3 dialect was used\\n")
        raise SystemExit(99)

    for name in ("PGDialect_psycopg", "PGDialectAsync_psycopg"):
        setattr(getattr(dialect, name), "__init__", refuse)

from runner.startup import run

sys.argv = ["migration-runner", *sys.argv[1:]]
run()
"""


@pytest.mark.parametrize("command", ["upgrade", "check"])
def test_the_runners_own_sessions_never_use_sqlalchemys_psycopg_dialect(project, database_url, command):
    # env.py on psycopg2: every session through SQLAlchemy is env.py's; the wait, the lock, the probe
    # and the read-backs are the runner's own, on psycopg 3 without SQLAlchemy.
    url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    if command == "check":
        assert run_runner(runner_env(url, project), "upgrade").returncode == 0
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_THE_DIALECT, command], env=runner_env(url, project),
                          capture_output=True, text=True, timeout=120, cwd=project.parent)
    assert proc.returncode == 0 and "dialect was used" not in proc.stderr, proc.stderr[-3000:]
    assert version_rows(database_url) == ["r0003"]


def test_sigterm_while_psycopg2_builds_the_baseline_stops_at_once(tmp_path, postgres, database_url):
    # psycopg2, SQLAlchemy 1.4's default, waits in C, where no Python signal handler runs: outside the
    # guard, the runner must cut the scratch build's session itself rather than wait out its statement.
    ini = make_project(tmp_path / "p", SLOW)
    legacy(database_url, *USERS, *ORDERS)
    url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    proc = start_runner(verifying(url, ini), "upgrade")
    try:
        wait_for(lambda: building(postgres), timeout=60)  # env.py's session sleeps 60 s in b0001
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=50)
    finally:
        proc.kill()
    assert result.returncode == 143 and time.monotonic() - signalled < 20, result
    assert scratch_databases(postgres) == [] and version_rows(database_url) == [], result.stdout[-3000:]
