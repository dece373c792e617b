"""End-to-end: the console script on env.py shapes real projects have, one behaviour a test.

Projects configure logging themselves (dictConfig, basicConfig, fileConfig, a handler
on the root logger, a quieter alembic logger), in env.py, in a module it imports or in
a revision file at import time; they pass driver options the runner does not know;
their revisions cannot always run offline; their env.py or revisions raise, or call
sys.exit(). The runner must still end in one documented exit code, with its own log
lines, JSON lines only in JSON mode, and its summary written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, Result, advisory_locks, assert_consistent, run_runner,
                       runner_env, version_rows)
from .postgres import free_port
from .projects import Rev, chain, make_project

ENV_ANCHOR = "config = context.config\n"
REV_ANCHOR = "import sqlalchemy as sa\n"


# -- logging configured by the project ------------------------------------------------
def dict_config(level: str = "INFO", disable_existing_loggers: bool | None = False) -> str:
    """A dictConfig call as applications write it: a StreamHandler on stderr, a plain formatter."""
    disable = "" if disable_existing_loggers is None else \
        f'\n    "disable_existing_loggers": {disable_existing_loggers!r},'
    return f'''
import logging.config
logging.config.dictConfig({{
    "version": 1,{disable}
    "formatters": {{"plain": {{"format": "%(asctime)s %(levelname)s [%(name)s] %(message)s"}}}},
    "handlers": {{"console": {{"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                               "formatter": "plain"}}}},
    "root": {{"level": {level!r}, "handlers": ["console"]}},
}})
'''


BASIC_CONFIG = '''
import logging
import sys
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
'''

FILE_CONFIG = '''
import logging.config
logging.config.fileConfig(config.config_file_name)
'''

ROOT_HANDLER = '''
import logging
import sys
logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))
logging.getLogger().setLevel(logging.INFO)
'''

QUIET_ALEMBIC = '''
import logging
logging.getLogger("alembic").setLevel(logging.WARNING)
'''

IMPORTED_MODULE = '''
from myapp.log_config import configure_logging
configure_logging()
'''


@dataclass
class ImportTimeRev(Rev):
    """A revision whose file runs `module_code` when alembic imports it."""

    module_code: str = ""

    def source(self) -> str:
        text = super().source()
        assert REV_ANCHOR in text
        return text.replace(REV_ANCHOR, REV_ANCHOR + self.module_code, 1)


def insert_in_env(root: Path, code: str) -> None:
    """`code` right after `config = context.config` in the project's env.py."""
    env_py = root / "migrations" / "env.py"
    text = env_py.read_text()
    assert ENV_ANCHOR in text
    env_py.write_text(text.replace(ENV_ANCHOR, ENV_ANCHOR + code, 1))


def logging_project(root: Path, where: str) -> Path:
    """A three-revision project whose logging is configured as `where` says; returns its alembic.ini."""
    if where == "dictConfig in a revision at import":
        revs = chain(3)
        revs[1] = ImportTimeRev(**vars(revs[1]), module_code=dict_config("INFO"))
        return make_project(root, revs)
    ini = make_project(root, chain(3))
    if where == "dictConfig in a module env.py imports":
        package = root / "myapp"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "log_config.py").write_text(
            "def configure_logging():\n" + "".join(f"    {line}\n" for line in dict_config("INFO", None).splitlines()))
        insert_in_env(root, IMPORTED_MODULE)
    elif where != "generic template's fileConfig":
        insert_in_env(root, LOGGING_IN_ENV[where])
    return ini


LOGGING_IN_ENV = {
    "dictConfig, root INFO": dict_config("INFO"),
    "dictConfig, root WARNING": dict_config("WARNING"),
    "basicConfig": BASIC_CONFIG,
    "fileConfig called again": FILE_CONFIG,
    "StreamHandler added to root": ROOT_HANDLER,
    "alembic logger at WARNING": QUIET_ALEMBIC,
}
LOGGING_SHAPES = [*LOGGING_IN_ENV, "generic template's fileConfig", "dictConfig in a module env.py imports",
                  "dictConfig in a revision at import"]


def non_json_lines(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(value, dict):
            bad.append(line)
    return bad


def assert_json_lines_only(result: Result) -> None:
    assert non_json_lines(result.output) == [], result
    assert "Traceback" not in result.output and "RecursionError" not in result.output, result


def termination_summary(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_summary_written(last: dict, path: Path) -> None:
    """The termination log holds the summary the last log line shows."""
    written = termination_summary(path)
    assert written["message"] == last["event"], (written, last)
    assert {k: v for k, v in written.items() if k != "message"} == \
        {k: last.get(k) for k in written if k != "message"}, (written, last)


@pytest.mark.parametrize("where", LOGGING_SHAPES)
def test_project_logging_config_keeps_json_lines_and_the_summary(database_url, tmp_path, where):
    ini = logging_project(tmp_path / "p", where)
    termination = tmp_path / "termination-log"
    result = run_runner(runner_env(database_url, ini, MIGRATE_TERMINATION_LOG=termination), cwd=tmp_path / "p")
    assert result.returncode == 0, result
    assert_json_lines_only(result)
    assert result.last.get("command") == "upgrade" and result.last.get("exit_code") == 0, result
    assert_summary_written(result.last, termination)


@pytest.mark.parametrize("where", LOGGING_SHAPES)
def test_project_logging_config_keeps_the_text_summary_last(database_url, tmp_path, where):
    ini = logging_project(tmp_path / "p", where)
    result = run_runner(runner_env(database_url, ini, MIGRATE_LOG_FORMAT="text"), cwd=tmp_path / "p")
    assert result.returncode == 0, result
    assert "Traceback" not in result.output and "RecursionError" not in result.output, result
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert re.match(r"\d{2}:\d{2}:\d{2} ", last) and "upgraded:" in last, last


def test_heads_with_a_revision_configuring_logging_at_import(tmp_path):
    ini = logging_project(tmp_path / "p", "dictConfig in a revision at import")
    result = run_runner(runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", ini), "heads")
    assert result.returncode == 0, result
    assert_json_lines_only(result)
    assert result.last.get("command") == "heads" and result.last.get("to_revision") == ["r0003"], result


# -- the runner's own lines survive a project's logging config -------------------------
@pytest.mark.parametrize("where", ["env.py", "revision file at import"])
def test_runner_lines_survive_disable_existing_loggers(database_url, tmp_path, where):
    quiet = dict_config("WARNING", disable_existing_loggers=True)
    if where == "env.py":
        ini = make_project(tmp_path / "p", chain(3))
        insert_in_env(tmp_path / "p", quiet)
    else:
        revs = chain(3)
        revs[0] = ImportTimeRev(**vars(revs[0]), module_code=quiet)
        ini = make_project(tmp_path / "p", revs)
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 0, result
    assert_json_lines_only(result)
    events = result.events()
    assert any(re.search(r"lock -?\d+ acquired", e) for e in events), events
    assert result.last.get("command") == "upgrade" and result.last.get("outcome") == "upgraded", result


# -- errors without a SQLSTATE are not "database unreachable" ---------------------------
def test_unknown_connect_arg_in_env_py_is_a_configuration_error(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    env_py = tmp_path / "p" / "migrations" / "env.py"
    text = env_py.read_text()
    assert "poolclass=pool.NullPool,\n" in text
    env_py.write_text(text.replace("poolclass=pool.NullPool,\n",
                                   'poolclass=pool.NullPool,\n        connect_args={"timeout": 5},\n', 1))
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 2, result
    assert "timeout" in result.last["event"], result
    assert "Traceback" not in result.output, result


def test_unknown_connection_option_in_the_url_is_a_configuration_error(database_url, project):
    result = run_runner(runner_env(database_url + "?timeout=5", project, MIGRATE_WAIT_TIMEOUT="3"))
    assert result.returncode == 2, result
    assert "timeout" in result.last["event"], result
    assert "Traceback" not in result.output, result


# -- plan --sql on a revision that cannot run offline ----------------------------------
OFFLINE_ID = "5f1e0c9a2b7d"


@pytest.mark.parametrize("body", [
    'op.get_bind().execute(sa.text("SELECT 1")).scalar()',
    'for row in op.get_bind().execute(sa.text("SELECT id, note FROM r_1")).fetchall():\n'
    '    op.execute(sa.text("INSERT INTO r_2 (note) VALUES (:n)").bindparams(n=row.note))',
], ids=["scalar", "rows"])
def test_plan_sql_with_a_revision_that_cannot_run_offline_exits_2_naming_it(database_url, tmp_path, body):
    revs = [*chain(1), Rev(OFFLINE_ID, "r0001", ["CREATE TABLE r_2 (id serial PRIMARY KEY, note text)"], python=body,
                           message="copy notes"),
            Rev("r0003", OFFLINE_ID, ["CREATE TABLE r_3 (id int)"])]
    ini = make_project(tmp_path / "p", revs)
    result = run_runner(runner_env(database_url, ini), "plan", "--sql")
    assert result.returncode == 2, result
    # stdout holds SQL at most; the logs are JSON lines on stderr.
    assert non_json_lines(result.stderr) == [], result
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert logged, result
    last = logged[-1]
    assert last.get("command") == "plan" and OFFLINE_ID in last["event"], last
    assert "Traceback" not in result.output, result
    assert "COMMIT" not in result.stdout, result.stdout


# -- env.py or a revision raising -------------------------------------------------------
def test_env_py_raising_before_migrating_exits_2_in_one_line(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    insert_in_env(tmp_path / "p", 'raise RuntimeError("settings missing")\n')
    termination = tmp_path / "termination-log"
    result = run_runner(runner_env(database_url, ini, MIGRATE_TERMINATION_LOG=termination))
    assert result.returncode == 2, result
    assert_json_lines_only(result)
    naming = [line for line in result.output.splitlines() if "settings missing" in line]
    assert len(naming) == 1 and "RuntimeError" in result.last["event"] \
        and "settings missing" in result.last["event"], result
    assert_summary_written(result.last, termination)
    assert version_rows(database_url) == []


def test_revision_raising_exits_7_naming_it(database_url, tmp_path):
    revs = [*chain(1), Rev("r0002", "r0001", ["CREATE TABLE r_2 (id int)"],
                           python='raise ValueError("unexpected data in r_1")')]
    ini = make_project(tmp_path / "p", revs)
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 7, result
    event = result.last["event"]
    assert "r0002" in event and "ValueError" in event and "unexpected data in r_1" in event, event
    assert "Traceback" not in result.output, result


# -- sys.exit() inside a revision --------------------------------------------------------
def sys_exit_project(root: Path) -> Path:
    return make_project(root, [*chain(1), Rev("r0002", "r0001", ["CREATE TABLE r_2 (id int)"],
                                              python="import sys\nsys.exit(3)")])


def test_sys_exit_in_a_revision_exits_7_naming_it(database_url, tmp_path):
    ini = sys_exit_project(tmp_path / "p")
    termination = tmp_path / "termination-log"
    result = run_runner(runner_env(database_url, ini, MIGRATE_TERMINATION_LOG=termination))
    assert result.returncode == 7, result
    assert "r0002" in result.last["event"], result
    assert termination_summary(termination)["exit_code"] == 7


def test_sys_exit_in_a_revision_rolls_back_and_releases_the_lock(database_url, tmp_path, postgres, database):
    ini = sys_exit_project(tmp_path / "p")
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode != 0, result
    # One transaction for the run (the generic env.py): r0001 and r0002's table rolled back with it.
    assert_consistent(database_url, [])
    assert advisory_locks(postgres, database) == []


# -- env.py as another role, or running the migrations more than once ---------------------------
OTHER_ROLE_ENV = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
# The application's own credentials: another role than DATABASE_URL's, on the same database.
from sqlalchemy.engine import make_url
url = make_url(config.get_main_option("sqlalchemy.url")).set(username="envpy_role", password="envpy-pw")
config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''


def test_env_py_logging_in_as_another_role_is_followed_not_taken_for_a_lost_lock(postgres, database, tmp_path):
    # pg_stat_activity hides another role's state (NULL) from a role without pg_read_all_stats:
    # the watchdog must not read that as its lock being lost.
    postgres.create_role("envpy_role", "envpy-pw")
    postgres.execute(f'GRANT ALL ON DATABASE "{database}" TO envpy_role')
    postgres.execute("GRANT ALL ON SCHEMA public TO envpy_role", database=database)
    root = tmp_path / "p"
    reader = postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD)
    ini = make_project(root, [Rev("r0001", None, ["CREATE TABLE r_1 (id int)"]),
                              Rev("r0002", "r0001", ["SELECT pg_sleep(2.5)", "CREATE TABLE r_2 (id int)"])])
    (root / "migrations" / "env.py").write_text(OTHER_ROLE_ENV)
    # Unless DATABASE_URL's role may read the version table, the runner cannot prove success: exit 2, saying so.
    unreadable = run_runner(runner_env(reader, ini))
    assert unreadable.returncode == 2, unreadable
    assert "needs SELECT on it" in unreadable.last["event"] and "public.alembic_version" in unreadable.last["event"]
    postgres.execute("GRANT SELECT ON public.alembic_version TO runner; DELETE FROM public.alembic_version; "
                     "DROP TABLE r_1, r_2", database=database)
    result = run_runner(runner_env(reader, ini))
    assert result.returncode == 0, "\n".join(r["event"] for r in result.records)
    assert result.last["applied"] == ["r0001", "r0002"]
    assert postgres.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'r_2'", database=database) == [
        ("envpy_role",)]


TENANT_LOOP_ENV = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
for tenant in ("acme", "globex"):
    with engine.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {tenant}")
        connection.exec_driver_sql(f"SET search_path TO {tenant}")
        connection.commit()
        context.configure(connection=connection, version_table_schema=tenant)
        with context.begin_transaction():
            context.run_migrations()
'''


@pytest.mark.parametrize("command", ["upgrade", "check"])
def test_env_py_running_the_migrations_twice_is_refused_alike_by_every_command(database_url, tmp_path, command):
    root = tmp_path / "p"
    ini = make_project(root, chain(2))
    (root / "migrations" / "env.py").write_text(TENANT_LOOP_ENV)
    result = run_runner(runner_env(database_url, ini), command)
    assert result.returncode == 2, result.last["event"]
    assert "more than once" in result.last["event"]
    # Refused at the second run_migrations: the first tenant, done by then, is consistent; the second untouched.
    assert version_rows(database_url, "acme.alembic_version") == ([] if command == "check" else ["r0002"])
    assert version_rows(database_url, "globex.alembic_version") == []
