"""The runner adapts to the project, not the project to the runner (#21): lab cases beside the real applications.

Each shape is something real projects do that a template does not, run once with the
project's own command (plain `alembic`, `flask db upgrade`) and once with the runner:
- a logging configuration the project validates at import (Airflow checks its
  `task_log_reader` handler): it must take effect as under plain alembic;
- env.py's own code creating tables before `run_migrations()` on an empty
  database (MLflow's flow): not a legacy database, also with eight runners at once;
- Flask-Migrate's `Migrate` directory as the script location whatever the ini
  says (`script_location = .`, as ihatemoney ships);
- an application factory that writes, or migrates, as it is created: with
  DATABASE_URL set it is created under the lock, and what it applied is reported.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import psycopg
import pytest

from .conftest import (RUNNER_PASSWORD, advisory_locks, finish, run_runner, runner_env, start_runner, tables,
                       version_rows)
from .fidelity import Twins
from .projects import Rev, chain, make_project
from .test_env_shapes import ImportTimeRev, assert_json_lines_only, insert_in_env
from .test_flask import FlaskProject, app_env, flask_env, make_flask_project, run_flask

# -- the project's logging configuration takes effect -----------------------------------------
# As Airflow's settings do at import: configure, then check the configuration took effect.
VALIDATED_LOGGING = '''
import logging
import logging.config


class DropNoise(logging.Filter):
    def filter(self, record):
        return "noise" not in record.getMessage()


_early = logging.getLogger("myapp.early")  # exists before the configuration: disable_existing_loggers applies
logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": True,
    "formatters": {"plain": {"format": "PROJECT %(levelname)s [%(name)s] %(message)s"}},
    "filters": {"drop_noise": {"()": DropNoise}},
    "handlers": {"task": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain",
                          "filters": ["drop_noise"]}},
    "loggers": {"myapp.task": {"handlers": ["task"], "level": "INFO", "propagate": False}},
})
if "task" not in [handler.name for handler in logging.getLogger("myapp.task").handlers]:
    raise RuntimeError("Configured task_log_reader 'task' was not a handler of the 'myapp.task' logger.")
logging.getLogger("myapp.task").info("task logger ready")
logging.getLogger("myapp.task").info("some noise")
_early.warning("the early logger was not disabled")
'''

URL_LINE = '''
logging.getLogger("myapp.task").info("connecting to %s", config.get_main_option("sqlalchemy.url"))
'''


def project_lines(output: str) -> list[str]:
    """What the project's own handler printed, wherever it stands in a line (plain text or a JSON event)."""
    return re.findall(r"PROJECT [A-Z]+ \[[\w.]+\] [^\"\n]*", output)


def upgraded_like_alembic(postgres, ini: Path):
    """Plain alembic on one twin, the runner on the other: both exit 0, the runner upgraded r0001-r0003."""
    twins = Twins.create(postgres)
    plain = twins.run_alembic(ini)
    assert plain.returncode == 0, plain
    result = run_runner(runner_env(twins.url("runner"), ini))
    assert result.returncode == 0, result
    assert result.last["outcome"] == "upgraded" and result.last["applied"] == ["r0001", "r0002", "r0003"], result
    return twins, plain, result


def test_a_logging_configuration_the_project_validates_takes_effect_as_under_alembic(postgres, tmp_path):
    root = tmp_path / "p"
    ini = make_project(root, chain(3))
    insert_in_env(root, VALIDATED_LOGGING + URL_LINE)
    twins, plain, result = upgraded_like_alembic(postgres, ini)
    twins.assert_same()
    # The project's handler, formatter and filter as alembic runs them; its disabled logger silent in both.
    expected = ["PROJECT INFO [myapp.task] task logger ready", "PROJECT INFO [myapp.task] connecting to"]
    assert [line[:len(e)] for line, e in zip(project_lines(plain.output), expected)] == expected, plain.output
    ours = project_lines(result.output)
    assert [line[:len(e)] for line, e in zip(ours, expected)] == expected, result.output
    assert len(ours) == 2, result.output
    for output in (plain.output, result.output):
        assert "some noise" not in output and "early logger" not in output
    # Through the runner the project's lines are JSON events like the rest, the password masked.
    assert_json_lines_only(result)
    assert "runner:***@" in ours[1] and RUNNER_PASSWORD not in result.output, ours
    # The runner's own lines and alembic's, once each, survive the project's disable_existing_loggers.
    events = result.events()
    assert sum(bool(re.search(r"lock -?\d+ acquired", e)) for e in events) == 1, events
    assert sum(e.startswith("Running upgrade  -> r0001") for e in events) == 1, events


def test_heads_loads_revisions_that_validate_their_logging_at_import(tmp_path):
    revs = chain(2)
    revs[1] = ImportTimeRev(**vars(revs[1]), module_code=VALIDATED_LOGGING)
    ini = make_project(tmp_path / "p", revs)
    result = run_runner(runner_env("postgresql://u:pw@127.0.0.1:1/db", ini), "heads")
    assert result.returncode == 0, result
    assert result.last["to_revision"] == ["r0002"], result
    assert_json_lines_only(result)


# -- tables env.py's own code creates are not the database's past --------------------------------
# MLflow's flow: the application's pre-Alembic tables made in code, then every revision from base.
CREATES_BEFORE_MIGRATING = '''
from sqlalchemy import engine_from_config as _engine_from_config, pool as _pool
_setup = _engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                             poolclass=_pool.NullPool)
with _setup.begin() as _connection:
    _connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS experiments (id serial PRIMARY KEY, name text)")
    _connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS runs (id serial PRIMARY KEY, experiment int)")
_setup.dispose()
'''


def creating_project(root: Path) -> Path:
    ini = make_project(root, chain(3))
    insert_in_env(root, CREATES_BEFORE_MIGRATING)
    return ini


def test_tables_env_py_creates_before_migrating_do_not_make_an_empty_database_legacy(postgres, tmp_path):
    ini = creating_project(tmp_path / "p")
    twins, _, result = upgraded_like_alembic(postgres, ini)
    assert any("made by env.py's own code in this run" in e for e in result.events()), result
    twins.assert_same()
    again = run_runner(runner_env(twins.url("runner"), ini))
    assert again.returncode == 0 and again.last["outcome"] == "current", again
    twins.assert_same()


def test_eight_runners_at_once_on_an_empty_database_with_env_py_creating_tables(postgres, database, database_url,
                                                                                tmp_path):
    ini = creating_project(tmp_path / "p")
    procs = [start_runner(runner_env(database_url, ini)) for _ in range(8)]
    results = [finish(proc) for proc in procs]
    assert [r.returncode for r in results] == [0] * 8, [r for r in results if r.returncode]
    assert sorted(rev for r in results for rev in r.last["applied"]) == ["r0001", "r0002", "r0003"]
    assert sorted(r.last["outcome"] for r in results) == ["current"] * 7 + ["upgraded"]
    assert version_rows(database_url) == ["r0003"]
    assert {"experiments", "runs", "r_1", "r_2", "r_3"} <= set(tables(database_url))
    assert advisory_locks(postgres, database) == []


def test_tables_that_were_there_before_the_run_still_make_it_legacy(database_url, tmp_path):
    ini = creating_project(tmp_path / "p")
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE experiments (id serial PRIMARY KEY, name text)")
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 6, result
    assert "experiments" in result.last["event"] and "runs" not in result.last["event"], result
    # Nothing of the migration written (what env.py's own setup code committed is its own, as under alembic).
    assert version_rows(database_url) == [] and not [t for t in tables(database_url) if t.startswith("r_")]


# -- Flask-Migrate's directory is the script location, as `flask db upgrade` has it --------------------
@pytest.fixture(scope="module")
def shipped_project(postgres, tmp_path_factory) -> FlaskProject:
    """The Flask application with `script_location = .` in migrations/alembic.ini, as ihatemoney ships it."""
    project = make_flask_project(postgres, tmp_path_factory.mktemp("dot") / "app")
    ini = project.root / "migrations" / "alembic.ini"
    ini.write_text(ini.read_text().replace("[alembic]\n", "[alembic]\nscript_location = .\n", 1))
    return project


def test_the_migrate_directory_wins_over_the_ini_script_location(postgres, shipped_project):
    twins = Twins.create(postgres)
    plain = run_flask(shipped_project, twins.url("plain"), "db", "upgrade")
    assert plain.returncode == 0, plain
    result = run_runner(app_env(twins.url("runner")), cwd=shipped_project.root)
    assert result.returncode == 0, result
    assert result.last["applied"] == shipped_project.revisions, result
    twins.assert_same()


# -- an application factory that writes, or migrates, as it is created ------------------------------
def test_six_runners_at_once_with_a_factory_that_writes_and_migrates_as_it_is_created(
        postgres, database, database_url, shipped_project):
    env = app_env(database_url, database_url, SHOP_REGISTER_NODE="1", SHOP_UPGRADE_AT_START="1")
    procs = [start_runner(env, cwd=shipped_project.root) for _ in range(6)]
    results = [finish(proc) for proc in procs]
    assert [r.returncode for r in results] == [0] * 6, [r for r in results if r.returncode]
    # The factory ran every revision once, under the lock of the runner that created it: that runner
    # reports them, the others find the database at the heads.
    assert sorted(rev for r in results for rev in r.last["applied"]) == sorted(shipped_project.revisions)
    upgraded = [r for r in results if r.last["outcome"] == "upgraded"]
    assert len(upgraded) == 1 and upgraded[0].last["from_revision"] == [], [r.last for r in results]
    events = upgraded[0].events()
    locked = next(i for i, e in enumerate(events) if re.search(r"lock -?\d+ acquired", e))
    migrated = next(i for i, e in enumerate(events) if "ran migrations itself while it was created" in e)
    assert locked < migrated, events
    assert version_rows(database_url) == [shipped_project.head]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT seen FROM shop_nodes").fetchall() == [(6,)]
    assert advisory_locks(postgres, database) == []


def test_a_factory_that_migrates_before_the_lock_is_reported_honestly(postgres, database_url, shipped_project):
    """Without DATABASE_URL the application must be created first to know the database: said in a warning,
    and the revisions its factory applied are this run's, not `already at heads`."""
    result = run_runner(app_env(database_url, SHOP_UPGRADE_AT_START="1"), cwd=shipped_project.root)
    assert result.returncode == 0, result
    assert any("is created before the lock" in e for e in result.events()), result.events()
    assert result.last["outcome"] == "upgraded" and result.last["applied"] == shipped_project.revisions, result.last
    assert version_rows(database_url) == [shipped_project.head]
