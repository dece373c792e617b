"""The fast no-op (runner/fastpath.py) answers exactly as the full path does, or leaves the answer to it.

Differential: a database is brought to a state once, then copied (CREATE DATABASE ... TEMPLATE) into
twins; one runner runs with the fast path on one twin, one with MIGRATE_FAST_PATH=false on the other.
Exit code, summary outcome, from/to revisions, applied and pending must be equal, and for `upgrade`
the version rows and schema of the twins too. Each case also says whether the fast path may answer:
where it must not (the scripts or settings changed, no lineage, a standby...), its log must show it
did not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runner import fastpath
from runner.lineage import PREFIX

from .conftest import RUNNER_PASSWORD, RUNNER_ROLE, Result, run_runner, runner_env, version_rows
from .fidelity import run_alembic, schema_dump, sqlalchemy_url, version_table_rows
from .projects import Rev, add_revisions, chain, make_project
from .postgres import wait_for_replay
from .test_flask import app_env, flask_project  # noqa: F401 (a fixture)
from .test_ha import pair  # noqa: F401 (a fixture)

SUMMARY = ("outcome", "exit_code", "from_revision", "to_revision", "applied", "pending", "target")


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    """Three revisions in a line; tests that change the scripts copy it first."""
    return make_project(tmp_path_factory.mktemp("fastpath") / "line", chain(3))


def fresh(postgres) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name, RUNNER_ROLE)
    return name


def url_of(postgres, name: str) -> str:
    return postgres.url(name, RUNNER_ROLE, RUNNER_PASSWORD)


def migrated(postgres, ini: Path, **extra: str) -> str:
    """A new database brought to the heads by the runner (which records the lineage and its digest)."""
    name = fresh(postgres)
    postgres.execute(f'CREATE SCHEMA elsewhere AUTHORIZATION "{RUNNER_ROLE}"', database=name)
    done = run_runner(runner_env(url_of(postgres, name), ini, **extra), "upgrade", cwd=ini.parent)
    assert done.returncode == 0, done
    return name


def twins(postgres, source: str) -> tuple[str, str]:
    made = []
    for _ in range(2):
        name = f"t_{uuid.uuid4().hex[:12]}"
        postgres.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}" OWNER "{RUNNER_ROLE}"')
        made.append(name)
    return made[0], made[1]


def took_fast_path(result: Result) -> bool:
    return any(record.get("fast_path") is True for record in result.records)


def compare(postgres, source: str, ini: Path, command: str, *, url=None, **extra: str) -> Result:
    """Run `command` on twins of `source`, with and without the fast path; assert the same answer; return the
    fast one's result. `url(name)` makes DATABASE_URL (default: the runner role's password URL)."""
    fast_db, full_db = twins(postgres, source)
    make_url = url or (lambda name: url_of(postgres, name))
    fast = run_runner(runner_env(make_url(fast_db), ini, MIGRATE_LOG_LEVEL="DEBUG", **extra), command, cwd=ini.parent)
    full = run_runner(runner_env(make_url(full_db), ini, MIGRATE_FAST_PATH="false", **extra), command,
                      cwd=ini.parent)
    assert fast.returncode == full.returncode, (fast, full)
    assert {k: fast.last[k] for k in SUMMARY} == {k: full.last[k] for k in SUMMARY}, (fast, full)
    assert not took_fast_path(full), full
    assert RUNNER_PASSWORD not in fast.output and "p%25w%40rd" not in fast.output
    if command == "upgrade":
        assert version_table_rows(postgres, fast_db) == version_table_rows(postgres, full_db)
        assert schema_dump(postgres, fast_db) == schema_dump(postgres, full_db)
    return fast


def copy_project(ini: Path, root: Path) -> Path:
    shutil.copytree(ini.parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    copied = root / ini.name
    copied.write_text(copied.read_text().replace(str(ini.parent), str(root)))  # script_location is absolute
    return copied


# -- at the heads, unchanged: answered fast, alike ----------------------------------------------------
@pytest.mark.parametrize("command", ["upgrade", "check", "wait"])
def test_at_the_heads_each_command_answers_fast_and_as_the_full_path(postgres, line, command):
    fast = compare(postgres, migrated(postgres, line), line, command)
    assert took_fast_path(fast) and fast.returncode == 0 and fast.last["outcome"] == "current"
    assert fast.last["to_revision"] == ["r0003"]
    # Not a line of alembic's or of the full path's: env.py did not run.
    assert not any(record["logger"].startswith("alembic") for record in fast.records)


def imported(argv: list[str], env: dict, cwd: Path) -> tuple[int, set[str]]:
    """The exit code of `python -m runner <argv>`, and the top-level packages it imported (-X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "runner", *argv], env=env, capture_output=True,
                          text=True, timeout=120, cwd=cwd)
    return proc.returncode, {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                             if line.startswith("import time:")}


HEAVY = {"alembic", "sqlalchemy", "flask", "mako"}


def test_the_fast_path_help_and_version_import_neither_alembic_nor_sqlalchemy(postgres, line):
    env = runner_env(url_of(postgres, migrated(postgres, line)), line)
    code, modules = imported(["check"], env, line.parent)
    assert code == 0 and "psycopg" in modules and not modules & HEAVY, sorted(modules & HEAVY)
    for flag in ("--help", "--version"):
        code, modules = imported([flag], env, line.parent)
        assert code == 0 and not modules & (HEAVY | {"psycopg"}), (flag, sorted(modules & (HEAVY | {"psycopg"})))
    # The full path, for contrast: the same check with the fast path off loads them.
    code, modules = imported(["check"], {**env, "MIGRATE_FAST_PATH": "false"}, line.parent)
    assert code == 0 and {"alembic", "sqlalchemy"} <= modules


def test_a_password_file_still_applies_to_the_fast_paths_login(postgres, line, tmp_path):
    secret = tmp_path / "password"
    secret.write_text(RUNNER_PASSWORD + "\n")
    bare = lambda name: f"postgresql://{RUNNER_ROLE}@{postgres.host}:{postgres.port}/{name}"  # noqa: E731
    fast = compare(postgres, migrated(postgres, line), line, "check", url=bare, DATABASE_PASSWORD_FILE=str(secret))
    assert took_fast_path(fast) and fast.returncode == 0


def test_a_run_through_another_endpoint_upgrades_by_the_full_path_but_checks_fast(postgres, line):
    # The lock the recording runner held there proves no transaction pooler; another host name proves nothing.
    source = migrated(postgres, line)
    other_host = lambda name: postgres.url(name, RUNNER_ROLE, RUNNER_PASSWORD, host="localhost")  # noqa: E731
    assert not took_fast_path(compare(postgres, source, line, "upgrade", url=other_host))
    assert took_fast_path(compare(postgres, source, line, "check", url=other_host))


# -- the scripts changed since the database was migrated --------------------------------------------
def _added(root: Path) -> None:
    add_revisions(root, [Rev("r0004", "r0003", ["CREATE TABLE r_4 (id int)"])])


def _edited(root: Path) -> None:
    path = root / "migrations" / "versions" / "r0003.py"
    path.write_text(path.read_text() + "\n# edited after it ran\n")


def _removed(root: Path) -> None:
    (root / "migrations" / "versions" / "r0003.py").unlink()


def _merged(root: Path) -> None:
    add_revisions(root, [Rev("b0001", "r0002", ["CREATE TABLE b_1 (id int)"]),
                         Rev("m0001", ("r0003", "b0001"), [])])


@pytest.mark.parametrize("change", [_added, _edited, _removed, _merged], ids=["added", "edited", "removed", "merge"])
@pytest.mark.parametrize("command", ["upgrade", "check"])
def test_changed_scripts_are_left_to_the_full_path(postgres, line, tmp_path, change, command):
    source = migrated(postgres, line)
    ini = copy_project(line, tmp_path / "changed")
    change(ini.parent)
    fast = compare(postgres, source, ini, command)
    assert not took_fast_path(fast)


@pytest.mark.parametrize("allow", ["descendants", "always", "never"])
def test_an_ahead_database_answers_as_the_full_path_under_each_allow_ahead(postgres, line, tmp_path, allow):
    ini = copy_project(line, tmp_path / "newer")
    _added(ini.parent)
    source = migrated(postgres, ini)  # the newer image migrated it; this image (`line`) is older
    for command in ("upgrade", "check"):
        fast = compare(postgres, source, line, command, MIGRATE_ALLOW_AHEAD=allow)
        assert not took_fast_path(fast) and fast.returncode == (8 if allow == "never" else 0)


def test_a_merge_at_its_head_answers_fast(postgres, tmp_path):
    ini = make_project(tmp_path / "merge", chain(2))
    _merged_in_line(ini.parent)
    fast = compare(postgres, migrated(postgres, ini), ini, "upgrade")
    assert took_fast_path(fast) and fast.last["to_revision"] == ["m0001"]


def _merged_in_line(root: Path) -> None:
    add_revisions(root, [Rev("b0001", "r0001", ["CREATE TABLE b_1 (id int)"]),
                         Rev("m0001", ("r0002", "b0001"), [])])


# -- what env.py does depends on settings -------------------------------------------------------------
ENV_CHOOSING_TABLE = '''
import os
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
x = context.get_x_argument(as_dictionary=True)
table = x.get("table") or os.environ.get("FASTPATH_TEST_TABLE") or (
    "section_versions" if config.config_ini_section != "alembic" else "alembic_version")
schema = x.get("schema")  # `elsewhere`, made by the test, is not on the search_path
engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None, version_table=table,
                      version_table_schema=schema)
    with context.begin_transaction():
        context.run_migrations()
'''


@pytest.fixture(scope="module")
def choosing(tmp_path_factory) -> Path:
    """A project whose env.py takes its version table from -x, a variable it names, or the ini section."""
    ini = make_project(tmp_path_factory.mktemp("fastpath") / "choosing", chain(2))
    (ini.parent / "migrations" / "env.py").write_text(ENV_CHOOSING_TABLE)
    text = ini.read_text()
    section = text[text.index("[alembic]"):].split("\n[", 1)[0].replace("[alembic]", "[other]", 1)
    ini.write_text(text + "\n" + section + "\n")
    return ini


@pytest.mark.parametrize("migrated_with, run_with", [
    ({"ALEMBIC_X_ARGS": "table=first"}, {"ALEMBIC_X_ARGS": "table=second"}),
    ({"FASTPATH_TEST_TABLE": "first"}, {"FASTPATH_TEST_TABLE": "second"}),
    ({}, {"ALEMBIC_SECTION": "other"}),
    ({}, {"MIGRATE_TARGET": "r0001"}),
], ids=["ALEMBIC_X_ARGS", "variable-env.py-names", "ALEMBIC_SECTION", "MIGRATE_TARGET"])
@pytest.mark.parametrize("command", ["upgrade", "check"])
def test_settings_that_change_what_env_py_does_are_left_to_the_full_path(postgres, choosing, migrated_with,
                                                                         run_with, command):
    source = migrated(postgres, choosing, **migrated_with)
    fast = compare(postgres, source, choosing, command, **{**migrated_with, **run_with})
    assert not took_fast_path(fast)


@pytest.mark.parametrize("x_args", ["table=first", "table=my_versions schema=elsewhere"])
def test_a_version_table_env_py_names_is_answered_as_the_full_path(postgres, choosing, x_args):
    # Another name: on the search_path, so proven. Another schema, not on the search_path: env.py's to name,
    # not the fast path's to guess, so left to the full path.
    source = migrated(postgres, choosing, ALEMBIC_X_ARGS=x_args)
    for command in ("upgrade", "check"):
        fast = compare(postgres, source, choosing, command, ALEMBIC_X_ARGS=x_args)
        assert fast.returncode == 0 and took_fast_path(fast) == ("schema" not in x_args)


def test_a_version_table_schema_set_by_the_variable_answers_fast(postgres, choosing):
    extra = {"ALEMBIC_X_ARGS": "table=my_versions schema=elsewhere", "MIGRATE_VERSION_TABLE": "my_versions",
             "MIGRATE_VERSION_TABLE_SCHEMA": "elsewhere"}
    fast = compare(postgres, migrated(postgres, choosing, **extra), choosing, "check", **extra)
    assert took_fast_path(fast) and fast.returncode == 0


# -- databases the runner's lineage does not describe ---------------------------------------------------
def test_a_database_migrated_by_plain_alembic_is_left_to_the_full_path(postgres, line):
    source = fresh(postgres)
    assert run_alembic(line, sqlalchemy_url(url_of(postgres, source))).returncode == 0
    for command in ("upgrade", "check"):
        assert not took_fast_path(compare(postgres, source, line, command))


@pytest.mark.parametrize("comment", ["NULL", "'a comment of the team''s own'"], ids=["lost", "foreign"])
def test_a_lost_or_foreign_comment_is_left_to_the_full_path(postgres, line, comment):
    source = migrated(postgres, line)
    postgres.execute(f"COMMENT ON TABLE alembic_version IS {comment}", database=source)
    for command in ("upgrade", "check"):
        assert not took_fast_path(compare(postgres, source, line, command))


def test_a_runner_that_migrated_before_the_digest_was_recorded_is_left_to_the_full_path(postgres, line):
    source = migrated(postgres, line)
    # The lineage as an older runner wrote it: everything but the fast path's record.
    comment = postgres.execute("SELECT obj_description('alembic_version'::regclass)", database=source)[0][0]
    record = json.loads(comment.removeprefix(PREFIX))
    del record["fast"]
    older = PREFIX + json.dumps(record, separators=(",", ":"), sort_keys=True)
    postgres.execute(f"COMMENT ON TABLE alembic_version IS $c${older}$c$", database=source)
    assert not took_fast_path(compare(postgres, source, line, "check"))


@pytest.mark.parametrize("baseline", [None, "r0002"], ids=["legacy", "baseline-to-stamp"])
def test_a_legacy_database_is_left_to_the_full_path(postgres, line, baseline):
    source = fresh(postgres)
    postgres.execute(f'CREATE TABLE r_1 (id serial PRIMARY KEY, note text); ALTER TABLE r_1 OWNER TO "{RUNNER_ROLE}"; '
                     f'CREATE TABLE r_2 (id serial PRIMARY KEY, note text); ALTER TABLE r_2 OWNER TO "{RUNNER_ROLE}"',
                     database=source)
    extra = {"MIGRATE_BASELINE_REVISION": baseline} if baseline else {}
    for command in ("upgrade", "check"):
        assert not took_fast_path(compare(postgres, source, line, command, **extra))


def test_the_switch_turns_the_fast_path_off(postgres, line):
    url = url_of(postgres, migrated(postgres, line))
    result = run_runner(runner_env(url, line, MIGRATE_FAST_PATH="false"), "check")
    assert result.returncode == 0 and not took_fast_path(result)
    assert any(record["logger"] == "runner" and "database is current" in record["event"] for record in result.records)


# -- the digest itself ------------------------------------------------------------------------------------
def test_the_digest_covers_the_files_env_py_and_settings_but_not_bytecode(line, tmp_path, monkeypatch):
    from runner.settings import Settings

    ini = copy_project(line, tmp_path / "p")
    monkeypatch.chdir(ini.parent)
    for name in [k for k in os.environ if k.startswith(("MIGRATE_", "ALEMBIC_", "DATABASE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALEMBIC_CONFIG", str(ini))

    def digest():
        fastpath._digest.cache_clear()  # one process hashes once; here the files change in between
        return fastpath.digest(Settings())

    first = digest()
    assert first and digest() == first
    (ini.parent / "migrations" / "versions" / "__pycache__").mkdir(exist_ok=True)
    (ini.parent / "migrations" / "versions" / "__pycache__" / "r0001.cpython-311.pyc").write_bytes(b"x")
    assert digest() == first
    monkeypatch.setenv("MIGRATE_VERSION_TABLE", "alembic_version")  # the default, but now explicit
    assert digest() != first
    monkeypatch.delenv("MIGRATE_VERSION_TABLE")
    env_py = ini.parent / "migrations" / "env.py"
    env_py.write_text(env_py.read_text() + "\n")
    assert digest() not in (None, first)
    monkeypatch.setenv("FLASK_APP", "shop")
    assert digest() is None


# -- a standby; a Flask application ----------------------------------------------------------------------
def test_a_standby_answers_check_fast_and_leaves_upgrade_to_the_full_path(pair, line):
    primary, standby = pair
    source = migrated(primary, line)

    def on_standby(name: str) -> str:
        wait_for_replay(standby, primary)  # the twin made on the primary
        return standby.url(name, RUNNER_ROLE, RUNNER_PASSWORD)

    checked = compare(primary, source, line, "check", url=on_standby)
    assert took_fast_path(checked) and checked.returncode == 0
    # The full path waits for a writable primary, then exits 3: so must the fast one.
    upgraded = compare(primary, source, line, "upgrade", url=on_standby, MIGRATE_WAIT_TIMEOUT="1")
    assert not took_fast_path(upgraded) and upgraded.returncode == 3


def test_a_flask_application_is_left_to_the_full_path(postgres, flask_project):
    url = url_of(postgres, fresh(postgres))
    env = app_env(url)
    assert run_runner(env, cwd=flask_project.root).returncode == 0
    for command in ("upgrade", "check"):
        again = run_runner(env, command, cwd=flask_project.root)
        assert again.returncode == 0 and again.last["outcome"] == "current", again
        assert not took_fast_path(again)
