"""Flask-Migrate projects, unchanged: FLASK_APP set, `migrations/alembic.ini` without script_location, env.py
reading the engine from the application context. The runner against `flask db upgrade` itself.

The application is tests/flask_app (an app factory, Flask-SQLAlchemy, Flask-Migrate). Its revisions are made
once per session by `flask db init` and `flask db migrate` (see its README), so they are what the installed
Flask-Migrate generates, never a stale copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, Result, advisory_locks, finish, run_runner, runner_env,
                       start_runner, tables, version_rows)
from .fidelity import Twins

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core

APP_SOURCE = Path(__file__).resolve().parent / "flask_app"
FLASK = shutil.which("flask", path=str(Path(sys.executable).parent)) or "flask"


@dataclass
class FlaskProject:
    root: Path  # the application's directory: `flask` and the runner run here
    revisions: list[str]  # oldest first

    @property
    def head(self) -> str:
        return self.revisions[-1]


def flask_env(app_url: str, **extra: str) -> dict:
    """The environment of `flask db ...`: the application and its database, nothing of the runner's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG"))}
    return {**env, "FLASK_APP": "shop", "SHOP_DATABASE_URI": app_url, **extra}


def run_flask(project: FlaskProject | Path, app_url: str, *args: str,
              flask: list[str] | tuple[str, ...] = (FLASK,)) -> Result:
    root = project.root if isinstance(project, FlaskProject) else project
    proc = subprocess.run([*flask, *args], cwd=root, env=flask_env(app_url), capture_output=True, text=True,
                          timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _init_finds_flask_migrates_templates() -> bool:
    """alembic 1.16.0 looks for `init`'s templates in its own directory only, not in the one
    Config.get_template_directory() names (a regression fixed in 1.16.1), so `flask db init` cannot find
    Flask-Migrate's templates there. Only `init` is affected: the runner never calls it."""
    from alembic.config import Config

    class Probe(Config):
        def get_template_directory(self) -> str:
            return "/probe"

    return str(Probe()._get_template_path()) == "/probe"


# `flask db init` with alembic 1.16.1's lookup of the templates, for alembic 1.16.0 (see above).
FLASK_WITH_TEMPLATES_FOUND = [sys.executable, "-c", """
import pathlib, sys
from alembic.config import Config
Config._get_template_path = lambda self: pathlib.Path(self.get_template_directory())
from flask.cli import main
sys.argv[0] = "flask"
main()
"""]


def app_env(app_url: str, database_url: str | None = None, **extra: str) -> dict:
    """The runner's environment for the application: FLASK_APP and the application's own settings only."""
    return runner_env(database_url, None, **{"FLASK_APP": "shop", "SHOP_DATABASE_URI": app_url, **extra})


def with_scheme(url: str, scheme: str) -> str:
    return url.replace("postgresql://", f"{scheme}://", 1)


def make_flask_project(postgres, root: Path, *init: str, steps: int | None = None) -> FlaskProject:
    """tests/flask_app copied to `root`, with a history made by `flask db init <init>`, then `flask db migrate`
    and `flask db upgrade` for each model step (the first `steps` of them), against a scratch database."""
    shutil.copytree(APP_SOURCE, root, ignore=shutil.ignore_patterns("__pycache__"))
    scratch = f"scratch_{uuid.uuid4().hex[:12]}"
    postgres.create_database(scratch, RUNNER_ROLE)
    url = postgres.url(scratch, RUNNER_ROLE, RUNNER_PASSWORD)
    models = sorted((root / "steps").glob("*.py"))[:steps]
    shutil.copy(models[0], root / "shop" / "models.py")
    done = run_flask(root, url, "db", "init", *init,
                     flask=[FLASK] if _init_finds_flask_migrates_templates() else FLASK_WITH_TEMPLATES_FOUND)
    assert done.returncode == 0, done
    for step in models:
        shutil.copy(step, root / "shop" / "models.py")
        for args in (("db", "migrate", "-m", step.stem.split("_", 1)[1]), ("db", "upgrade")):
            done = run_flask(root, url, *args)
            assert done.returncode == 0, done
    script = ScriptDirectory(str(root / "migrations"))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert len(revisions) == len(models) and "script_location" not in (root / "migrations" / "alembic.ini").read_text()
    return FlaskProject(root, revisions)


@pytest.fixture(scope="session")
def flask_project(postgres, tmp_path_factory) -> FlaskProject:
    """The application with Flask-Migrate's default template (`flask db init`) and four revisions."""
    return make_flask_project(postgres, tmp_path_factory.mktemp("flask") / "app")


@pytest.fixture(scope="session")
def flask_multidb_project(postgres, tmp_path_factory) -> FlaskProject:
    """The application with Flask-Migrate's multidb template (`flask db init --multidb`) and two revisions."""
    return make_flask_project(postgres, tmp_path_factory.mktemp("flask-multidb") / "app", "--multidb", steps=2)


def assert_clean(result: Result) -> None:
    """Every line a JSON object (no traceback from Flask's or the application's loggers), no password."""
    assert result.records, result
    assert RUNNER_PASSWORD not in result.output and "p%25w%40rd" not in result.output, result


# -- the runner and `flask db upgrade` end alike --------------------------------------------------
@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg2"])
def test_runner_and_flask_db_upgrade_end_identical_then_a_second_run_is_a_no_op(postgres, flask_project, scheme):
    twins = Twins.create(postgres)
    plain = run_flask(flask_project, with_scheme(twins.url("plain"), scheme), "db", "upgrade")
    assert plain.returncode == 0, plain
    env = app_env(with_scheme(twins.url("runner"), scheme))
    first = run_runner(env, cwd=flask_project.root)
    assert first.returncode == 0, first
    assert first.last["outcome"] == "upgraded" and first.last["applied"] == flask_project.revisions, first
    assert any("from the Flask application's engine" in r["event"] for r in first.records), first
    assert_clean(first)
    twins.assert_same()
    assert version_rows(twins.url("runner")) == [flask_project.head]

    again = run_runner(env, cwd=flask_project.root)
    assert again.returncode == 0, again
    assert again.last["outcome"] == "current" and again.last["applied"] == [], again
    twins.assert_same()


def test_a_failing_generated_revision_leaves_both_at_the_same_place(postgres, flask_project):
    # The last revision adds a NOT NULL column without a default: it fails on a table with rows.
    twins = Twins.create(postgres)
    before = flask_project.revisions[-2]
    for which in ("plain", "runner"):
        done = run_flask(flask_project, twins.url(which), "db", "upgrade", before)
        assert done.returncode == 0, done
        with psycopg.connect(twins.url(which)) as conn:
            conn.execute("INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada')")
    plain = run_flask(flask_project, twins.url("plain"), "db", "upgrade")
    assert plain.returncode != 0 and "NotNullViolation" in plain.output, plain
    failed = run_runner(app_env(twins.url("runner")), cwd=flask_project.root)
    assert failed.returncode == 7, failed
    assert flask_project.head in failed.last["event"] and "23502" in failed.last["event"], failed
    assert_clean(failed)
    twins.assert_same()
    assert version_rows(twins.url("runner")) == [before]


# -- many replicas, legacy databases ---------------------------------------------------------------
def test_eight_runners_at_once_apply_each_revision_once(flask_project, database_url, postgres, database):
    procs = [start_runner(app_env(database_url), cwd=flask_project.root) for _ in range(8)]
    results = [finish(p) for p in procs]
    assert [r.returncode for r in results] == [0] * 8, [r for r in results if r.returncode]
    applied = [rev for r in results for rev in r.last["applied"]]
    assert sorted(applied) == sorted(flask_project.revisions)
    assert sum(r.last["outcome"] == "upgraded" for r in results) == 1
    assert version_rows(database_url) == [flask_project.head]
    assert advisory_locks(postgres, database) == []


def test_a_legacy_database_is_refused_then_stamped_with_the_baseline(flask_project, database_url):
    baseline = flask_project.revisions[1]
    done = run_flask(flask_project, database_url, "db", "upgrade", baseline)
    assert done.returncode == 0, done
    with psycopg.connect(database_url) as conn:
        conn.execute("DROP TABLE alembic_version")
    legacy = tables(database_url)

    refused = run_runner(app_env(database_url), cwd=flask_project.root)
    assert refused.returncode == 6 and "MIGRATE_BASELINE_REVISION" in refused.last["event"], refused
    assert tables(database_url) == legacy and version_rows(database_url) == []

    # env.py takes its URL from the application: a proof in a scratch database cannot be built, and
    # env.py's connection to the real database is stopped before its first statement.
    unproven = run_runner(app_env(database_url, MIGRATE_BASELINE_REVISION=baseline, MIGRATE_VERIFY_BASELINE="true"),
                          cwd=flask_project.root)
    assert unproven.returncode == 2 and "must build its engine from the URL" in unproven.last["event"], unproven
    assert tables(database_url) == legacy and version_rows(database_url) == []

    stamped = run_runner(app_env(database_url, MIGRATE_BASELINE_REVISION=baseline), cwd=flask_project.root)
    assert stamped.returncode == 0, stamped
    assert stamped.last["applied"] == flask_project.revisions[2:], stamped
    assert version_rows(database_url) == [flask_project.head]
    assert "payments" in tables(database_url)


def test_the_application_url_without_a_password_gets_a_rotating_one(flask_project, postgres, database,
                                                                    database_url, tmp_path):
    """SQLALCHEMY_DATABASE_URI without a password, DATABASE_PASSWORD_FILE beside it (#15 with #16): the
    application's engine, which env.py migrates with, logs in with the file's password too."""
    secret = tmp_path / "password"
    secret.write_text(RUNNER_PASSWORD + "\n")
    app_url = f"postgresql://{RUNNER_ROLE}@{postgres.host}:{postgres.port}/{database}"
    result = run_runner(app_env(app_url, DATABASE_PASSWORD_FILE=str(secret)), cwd=flask_project.root)
    assert result.returncode == 0, result
    assert result.last["applied"] == flask_project.revisions
    assert version_rows(database_url) == [flask_project.head]
    assert RUNNER_PASSWORD not in result.output

    # An application that connects while it is created, DATABASE_URL naming the same database: the
    # rotating password is in place before the application is loaded.
    again = run_runner(app_env(app_url, app_url, DATABASE_PASSWORD_FILE=str(secret), SHOP_CONNECT_AT_START="1"),
                       cwd=flask_project.root)
    assert again.returncode == 0 and again.last["outcome"] == "current", again
    assert RUNNER_PASSWORD not in again.output


# -- the read-only commands in the application context ---------------------------------------------
def test_every_command_runs_in_the_application_context(flask_project, database_url):
    env = app_env(database_url, MIGRATE_WAIT_TIMEOUT="1")
    pending = run_runner(env, "check", cwd=flask_project.root)
    assert pending.returncode == 9 and pending.last["pending"] == flask_project.revisions, pending
    plan = run_runner(env, "plan", cwd=flask_project.root)
    assert plan.returncode == 0 and plan.last["pending"] == flask_project.revisions, plan
    waited = run_runner(env, "wait", cwd=flask_project.root)
    assert waited.returncode == 9, waited
    heads = run_runner(env, "heads", cwd=flask_project.root)
    assert heads.returncode == 0 and heads.last["to_revision"] == [flask_project.head], heads
    assert version_rows(database_url) == []

    assert run_runner(env, cwd=flask_project.root).returncode == 0
    for command in ("check", "wait", "plan"):
        result = run_runner(env, command, cwd=flask_project.root)
        assert result.returncode == 0, (command, result)
        assert_clean(result)
    assert run_runner(env, "plan", cwd=flask_project.root).last["pending"] == []
    verified = run_runner(env, "verify", cwd=flask_project.root)  # the models of the last step: no drift
    assert verified.returncode == 0 and verified.last["outcome"] == "verified", verified
    linted = run_runner(env, "lint", "--from", flask_project.revisions[-2], cwd=flask_project.root)
    # The last revision adds a NOT NULL column without a default: squawk names it.
    assert linted.returncode == 11 and flask_project.head in linted.last["event"], linted

    back = run_runner(env, "downgrade", flask_project.revisions[1], cwd=flask_project.root)
    assert back.returncode == 0 and back.last["reverted"] == flask_project.revisions[:1:-1], back
    assert version_rows(database_url) == [flask_project.revisions[1]] and "payments" not in tables(database_url)


def test_an_explicit_factory_call_and_alembic_config_from_another_directory(flask_project, database_url, tmp_path):
    env = app_env(database_url, FLASK_APP=f"{flask_project.root / 'shop'}:create_app()",
                  ALEMBIC_CONFIG=str(flask_project.root / "migrations" / "alembic.ini"))
    result = run_runner(env, cwd=tmp_path)
    assert result.returncode == 0 and result.last["applied"] == flask_project.revisions, result


# -- one URL is enough; two must agree --------------------------------------------------------------
def test_database_url_of_the_same_database_with_another_scheme_is_accepted(flask_project, database_url):
    result = run_runner(app_env(with_scheme(database_url, "postgresql+psycopg2"),
                                database_url=with_scheme(database_url, "postgres")), cwd=flask_project.root)
    assert result.returncode == 0, result
    assert version_rows(database_url) == [flask_project.head]


def test_database_url_naming_another_database_exits_2_naming_both(postgres, flask_project):
    twins = Twins.create(postgres)
    result = run_runner(app_env(twins.url("plain"), database_url=twins.url("runner")), cwd=flask_project.root)
    assert result.returncode == 2, result
    message = result.last["event"]
    assert f"{RUNNER_ROLE}@{postgres.host}:{postgres.port}/{twins.runner}" in message, message
    assert f"{RUNNER_ROLE}@{postgres.host}:{postgres.port}/{twins.plain}" in message, message
    assert_clean(result)
    assert version_rows(twins.url("plain")) == version_rows(twins.url("runner")) == []


# -- what a new user gets wrong ---------------------------------------------------------------------
def test_without_flask_installed_exits_2_naming_what_to_install(flask_project, database_url):
    # `flask` cannot be imported (None in sys.modules makes every import of it fail), as where it is not installed.
    code = "import sys; sys.modules['flask'] = None; from runner.startup import run; run()"
    proc = subprocess.run([sys.executable, "-c", code], env=app_env(database_url), cwd=flask_project.root,
                          capture_output=True, text=True, timeout=60)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert result.returncode == 2, result
    assert "FLASK_APP" in result.last["event"] and "flask-migrate" in result.last["event"], result
    assert len(result.records) <= 3 and "Traceback" not in result.output, result


@pytest.mark.parametrize("flask_app, words", [
    ("no_such_module", "Could not import 'no_such_module'"),
    ("shop:create_app(", "Failed to parse"),
    ("shop:nothing_here", "Failed to find attribute 'nothing_here'"),
])
def test_an_application_that_cannot_be_loaded_exits_2(flask_project, database_url, flask_app, words):
    result = run_runner(app_env(database_url, FLASK_APP=flask_app), cwd=flask_project.root)
    assert result.returncode == 2 and words in result.last["event"], result
    assert result.last["event"].startswith(f"FLASK_APP={flask_app}: "), result
    assert "Traceback" not in result.output, result


def test_an_import_error_inside_the_application_is_one_line_naming_the_missing_module(database_url, tmp_path):
    (tmp_path / "broken.py").write_text("import flask\nimport no_such_dependency\n")
    result = run_runner(app_env(database_url, FLASK_APP=str(tmp_path / "broken.py")), cwd=tmp_path)
    assert result.returncode == 2, result
    assert "ImportError" in result.last["event"] and "No module named 'no_such_dependency'" in result.last["event"]
    assert "Traceback" not in result.output and "\n" not in result.last["event"], result


def test_an_application_that_fails_while_created_exits_2_without_a_traceback(flask_project, database_url):
    env = app_env(database_url)
    del env["SHOP_DATABASE_URI"]  # create_app() reads it: KeyError
    result = run_runner(env, cwd=flask_project.root)
    assert result.returncode == 2, result
    assert "the application failed to load: KeyError" in result.last["event"], result
    assert "Traceback" not in result.output, result


def test_without_flask_app_the_ini_without_script_location_is_still_refused(flask_project, database_url):
    env = runner_env(database_url, flask_project.root / "migrations" / "alembic.ini")
    result = run_runner(env, cwd=flask_project.root)
    assert result.returncode == 2 and "script_location" in result.last["event"], result


# -- Flask-Migrate's multidb template ---------------------------------------------------------------
def test_the_multidb_template_without_binds_ends_as_flask_db_upgrade(postgres, flask_multidb_project):
    twins = Twins.create(postgres)
    plain = run_flask(flask_multidb_project, twins.url("plain"), "db", "upgrade")
    assert plain.returncode == 0, plain
    result = run_runner(app_env(twins.url("runner")), cwd=flask_multidb_project.root)
    assert result.returncode == 0 and result.last["applied"] == flask_multidb_project.revisions, result
    twins.assert_same()


def test_the_multidb_template_with_a_bind_elsewhere_exits_2_with_nothing_written(postgres, flask_multidb_project):
    # The lock covers one database: env.py's connection to the bind's database is refused as it connects.
    twins = Twins.create(postgres)
    env = app_env(twins.url("runner"), SHOP_AUDIT_DATABASE_URI=twins.url("plain"))
    result = run_runner(env, cwd=flask_multidb_project.root)
    assert result.returncode == 2 and "where the runner's lock is not held" in result.last["event"], result
    assert_clean(result)
    assert tables(twins.url("runner")) == tables(twins.url("plain")) == []
