"""End-to-end: the console script against a real PostgreSQL, one behaviour a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from .conftest import (RUNNER, RUNNER_PASSWORD, RUNNER_ROLE, advisory_locks, assert_consistent, finish,
                       run_runner, runner_env, start_runner, tables, version_rows)
from .postgres import Postgres, free_port
from .projects import COOKBOOK_ENV, Rev, add_revisions, chain, make_project, write_env


def wait_for(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def running_query(postgres: Postgres, database: str, fragment: str) -> bool:
    rows = postgres.execute("SELECT query FROM pg_stat_activity WHERE datname = %s AND state = 'active'",
                            params=(database,))
    return any(fragment in q for (q,) in rows)


# -- the happy path ------------------------------------------------------------
def test_fresh_database_is_upgraded_then_second_run_is_a_no_op(database_url, project, postgres, database):
    first = run_runner(runner_env(database_url, project))
    assert first.returncode == 0, first
    assert_consistent(database_url, ["r0003"])
    assert [r["revision"] for r in first.records if "revision" in r and r.get("seconds") is not None] == \
        ["r0001", "r0002", "r0003"]
    summary = first.last
    assert summary["outcome"] == "upgraded" and summary["from_revision"] == [] and summary["to_revision"] == ["r0003"]
    assert summary["applied"] == ["r0001", "r0002", "r0003"] and "lock_wait" in summary and "duration" in summary

    second = run_runner(runner_env(database_url, project))
    assert second.returncode == 0, second
    assert second.last["outcome"] == "current" and "already at heads" in second.last["event"]
    assert not any("Running upgrade" in e for e in second.events())
    assert advisory_locks(postgres, database) == []


def test_text_mode_shows_each_step(database_url, project):
    result = run_runner(runner_env(database_url, project, MIGRATE_LOG_FORMAT="text"))
    assert result.returncode == 0, result
    out = result.output
    for step in ("head r0003", "is up", "acquired", "database is fresh", "ran r0002", "upgraded: base -> r0003"):
        assert step in out, (step, out)


def test_the_summary_is_the_last_line_whatever_the_log_level(database_url, project):
    result = run_runner(runner_env(database_url, project, MIGRATE_LOG_LEVEL="WARNING"))
    assert result.returncode == 0, result
    assert [r["event"] for r in result.records] == [result.last["event"]]  # nothing else at WARNING
    assert result.last["outcome"] == "upgraded" and result.last["level"] == "info"


def test_a_misspelt_variable_is_named_not_ignored_in_silence(database_url, project):
    result = run_runner(runner_env(database_url, project, MIGRATE_BASELINE_REVISON="r0001"))
    assert result.returncode == 0, result
    warning = next(r for r in result.records if r["level"] == "warning")
    assert "MIGRATE_BASELINE_REVISON" in warning["event"] and warning["unknown_variables"] == ["MIGRATE_BASELINE_REVISON"]


def test_python_dash_m_runner_is_the_same_command(database_url, project):
    proc = subprocess.run([sys.executable, "-m", "runner", "upgrade"], env=runner_env(database_url, project),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert version_rows(database_url) == ["r0003"]


def test_env_py_is_offered_no_connection_as_under_alembics_cli(database_url, tmp_path):
    # With a connection in config.attributes, a cookbook env.py would skip its own engine set-up
    # (driver, connect_args): it must build it, as it does under `alembic upgrade heads`.
    ini = make_project(tmp_path / "p", chain(2))
    write_env(tmp_path / "p", COOKBOOK_ENV)
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 0, result
    assert_consistent(database_url, ["r0002"])
    assert "offered: False" in result.output, result


def test_every_connection_carries_application_name_and_session_settings(database_url, tmp_path):
    probe = Rev("r0001", None, [
        "CREATE TABLE probe AS SELECT current_setting('application_name') AS app, "
        "current_setting('client_connection_check_interval') AS check_interval, "
        "current_setting('statement_timeout') AS statement_timeout, "
        "current_setting('lock_timeout') AS lock_timeout, "
        "current_setting('idle_session_timeout') AS idle"])
    ini = make_project(tmp_path / "p", [probe])
    env = runner_env(database_url, ini, MIGRATE_APPLICATION_NAME="billing-migrate",
                     MIGRATE_STATEMENT_TIMEOUT="90", MIGRATE_DDL_LOCK_TIMEOUT="1.5")
    result = run_runner(env)
    assert result.returncode == 0, result
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT app, check_interval, statement_timeout, lock_timeout, idle FROM probe").fetchone()
    assert row == ("billing-migrate", "2s", "90s", "1500ms", "0")



@pytest.mark.parametrize("command", ["upgrade", "check", "plan", "wait"])
def test_every_login_carries_the_application_name_from_the_first(tmp_path, command):
    # The server logs each login with its application_name: the first (the wait) included,
    # so a runner stuck waiting for the lock is recognisable in pg_stat_activity from the start.
    server = Postgres(settings={"log_connections": "on"}).start()
    try:
        server.create_database("named")
        ini = make_project(tmp_path / "p", chain(2))
        env = runner_env(server.url("named"), ini, MIGRATE_APPLICATION_NAME="named-runner", MIGRATE_WAIT_TIMEOUT="1")
        result = run_runner(env, command)
        assert result.returncode in (0, 9), result
        logins = [line for line in server.log.read_text().splitlines()
                  if "connection authorized" in line and "database=named" in line]
    finally:
        server.destroy()
    assert logins and all("application_name=named-runner" in line for line in logins), logins

# -- configuration errors: exit 2, no connection --------------------------------
@pytest.mark.parametrize("variable, value, words", [
    ("MIGRATE_WAIT_TIMEOUT", "soon", "MIGRATE_WAIT_TIMEOUT"),
    ("MIGRATE_LOCK_TIMEOUT", "-1", "MIGRATE_LOCK_TIMEOUT"),
    ("MIGRATE_LOCK_KEY", "9223372036854775808", "MIGRATE_LOCK_KEY"),
    ("MIGRATE_LOG_FORMAT", "xml", "MIGRATE_LOG_FORMAT"),
    ("MIGRATE_ALLOW_MULTIPLE_HEADS", "perhaps", "MIGRATE_ALLOW_MULTIPLE_HEADS"),
])
def test_invalid_setting_exits_2_naming_the_variable(project, variable, value, words):
    # The URL points at a closed port: a connection attempt would show as exit 3.
    env = runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", project, **{variable: value})
    result = run_runner(env)
    assert result.returncode == 2, result
    assert words in result.last["event"] and len(result.records) == 1


def test_both_url_sources_set_is_a_configuration_error(project, tmp_path, database_url):
    url_file = tmp_path / "url"
    url_file.write_text(database_url)
    result = run_runner(runner_env(database_url, project, DATABASE_URL_FILE=url_file))
    assert result.returncode == 2 and "exactly one" in result.last["event"], result


def test_no_url_is_a_configuration_error(project):
    result = run_runner(runner_env(None, project))
    assert result.returncode == 2 and "DATABASE_URL" in result.last["event"], result


@pytest.mark.parametrize("url", ["mysql://u:pw@h/db", "not a url", "postgresql://u:pw@h"])
def test_unusable_url_is_a_configuration_error_that_does_not_echo_it(project, url):
    result = run_runner(runner_env(url, project))
    assert result.returncode == 2, result
    assert "DATABASE_URL" in result.last["event"] and "pw" not in result.output


def test_missing_alembic_ini_names_the_path(database_url, tmp_path):
    missing = tmp_path / "nowhere" / "alembic.ini"
    result = run_runner(runner_env(database_url, missing))
    assert result.returncode == 2 and str(missing) in result.last["event"], result


def test_url_file_with_newline_through_a_kubernetes_style_symlink(database_url, project, tmp_path):
    # Kubernetes mounts a Secret key as <dir>/key -> ..data/key -> ..<timestamp>/key.
    stamp = tmp_path / "secret" / "..2026_11_21_00_00_00.1"
    stamp.mkdir(parents=True)
    (stamp / "url").write_text(database_url + "\n")
    (tmp_path / "secret" / "..data").symlink_to(stamp.name)
    (tmp_path / "secret" / "url").symlink_to("..data/url")
    env = runner_env(None, project, DATABASE_URL_FILE=tmp_path / "secret" / "url")
    result = run_runner(env)
    assert result.returncode == 0, result
    assert version_rows(database_url) == ["r0003"]


def test_unreadable_url_file_is_a_configuration_error(project, tmp_path):
    result = run_runner(runner_env(None, project, DATABASE_URL_FILE=tmp_path / "absent"))
    assert result.returncode == 2 and "DATABASE_URL_FILE" in result.last["event"], result


# -- scripts -----------------------------------------------------------------------
def two_heads(root: Path) -> Path:
    return make_project(root, [Rev("base1", None, ["CREATE TABLE r_base (id int)"]),
                               Rev("left", "base1", ["CREATE TABLE r_left (id int)"], message="left branch"),
                               Rev("right", "base1", ["CREATE TABLE r_right (id int)"], message="right branch")])


def test_two_heads_are_refused_with_the_merge_command_and_no_connection(tmp_path):
    ini = two_heads(tmp_path / "p")
    result = run_runner(runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", ini))
    assert result.returncode == 5, result
    event = result.last["event"]
    assert 'alembic merge -m "merge heads" left right' in event or 'alembic merge -m "merge heads" right left' in event
    assert "parent base1" in event and "left branch" in event


def test_two_heads_allowed_upgrades_both(database_url, tmp_path):
    ini = two_heads(tmp_path / "p")
    result = run_runner(runner_env(database_url, ini, MIGRATE_ALLOW_MULTIPLE_HEADS="true"))
    assert result.returncode == 0, result
    assert version_rows(database_url) == ["left", "right"]
    assert {"r_base", "r_left", "r_right"} <= set(tables(database_url))


# -- database state ---------------------------------------------------------------
def make_legacy(url: str) -> None:
    with psycopg.connect(url) as conn:
        for name in ("customers", "invoices", "r_1"):
            conn.execute(f"CREATE TABLE {name} (id int)")


def test_legacy_database_without_baseline_exits_6_and_writes_nothing(database_url, project):
    make_legacy(database_url)
    result = run_runner(runner_env(database_url, project))
    assert result.returncode == 6, result
    event = result.last["event"]
    assert "3 tables" in event and "customers" in event and "MIGRATE_BASELINE_REVISION" in event
    assert "no version table" in event
    assert version_rows(database_url) == [] and "alembic_version" not in tables(database_url)


def test_legacy_database_with_baseline_is_stamped_then_upgraded(database_url, project):
    make_legacy(database_url)
    result = run_runner(runner_env(database_url, project, MIGRATE_BASELINE_REVISION="r0001"))
    assert result.returncode == 0, result
    assert any("stamping baseline r0001" in e for e in result.events())
    assert result.last["applied"] == ["r0002", "r0003"]
    assert_consistent(database_url, ["r0003"])


def test_baseline_base_upgrades_a_legacy_database_from_the_first_revision(database_url, tmp_path):
    # Applications that create their base tables in code, then run every revision from base.
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["ALTER TABLE accounts ADD COLUMN email text"]),
                                        Rev("r0002", "r0001", ["CREATE TABLE r_2 (id int)"])])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int)")
    result = run_runner(runner_env(database_url, ini, MIGRATE_BASELINE_REVISION="base"))
    assert result.returncode == 0, result
    assert result.last["applied"] == ["r0001", "r0002"] and result.last["from_revision"] == []
    assert version_rows(database_url) == ["r0002"] and "r_2" in tables(database_url)


def test_unknown_baseline_exits_6_naming_it(database_url, project):
    make_legacy(database_url)
    result = run_runner(runner_env(database_url, project, MIGRATE_BASELINE_REVISION="deadbeef"))
    assert result.returncode == 6 and "deadbeef" in result.last["event"], result
    assert version_rows(database_url) == []


def test_empty_version_table_and_no_tables_is_fresh(database_url, project):
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    result = run_runner(runner_env(database_url, project))
    assert result.returncode == 0, result
    assert_consistent(database_url, ["r0003"])


def test_database_ahead_of_the_scripts_exits_8_with_allow_ahead_never_and_writes_nothing(database_url, project,
                                                                                          tmp_path):
    newer = make_project(tmp_path / "newer", chain(5))
    assert run_runner(runner_env(database_url, newer)).returncode == 0
    result = run_runner(runner_env(database_url, project, MIGRATE_ALLOW_AHEAD="never"))
    assert result.returncode == 8, result
    assert "r0005" in result.last["event"] and "newer" in result.last["event"]
    assert version_rows(database_url) == ["r0005"]


def test_failing_revision_exits_7_naming_it_and_leaves_the_database_consistent(database_url, tmp_path):
    revs = chain(2) + [Rev("r0003", "r0002", ["CREATE TABLE r_3 (id int)", "SELECT 1/0"], message="divides")]
    ini = make_project(tmp_path / "p", revs)
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 7, result
    event = result.last["event"]
    assert "r0003" in event and "SQLSTATE 22012" in event and "division by zero" in event
    # One transaction for the run (the generic env.py): everything rolled back.
    assert "the database is at base" in event
    assert_consistent(database_url, [])


def test_failure_after_committed_revisions_reports_where_the_database_is(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    add_revisions(tmp_path / "p", [Rev("r0003", "r0002", ["SELECT no_such_function()"])])
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 7 and "the database is at r0002" in result.last["event"], result
    assert "SQLSTATE 42883" in result.last["event"]
    assert_consistent(database_url, ["r0002"])


# -- reaching the database ----------------------------------------------------------
def test_unreachable_database_exits_3_naming_host_and_port(project):
    port = free_port()
    result = run_runner(runner_env(f"postgresql://u:pw@127.0.0.1:{port}/db", project, MIGRATE_WAIT_TIMEOUT="2"))
    assert result.returncode == 3, result
    assert f"127.0.0.1:{port}" in result.last["event"] and "MIGRATE_WAIT_TIMEOUT" in result.last["event"]
    assert sum("not ready" in e for e in result.events()) >= 2  # each retry is logged


def test_runner_waits_for_a_database_that_starts_later(project, tmp_path):
    server = Postgres()
    server.init()
    proc = start_runner(runner_env(server.url("postgres"), project, MIGRATE_WAIT_TIMEOUT="60"))
    try:
        time.sleep(3)
        assert proc.poll() is None, "the runner should still be waiting"
        server.start()
        result = finish(proc, timeout=60)
        assert result.returncode == 0, result
        assert any("not ready" in e for e in result.events())
        assert version_rows(server.url("postgres")) == ["r0003"]
    finally:
        proc.kill()
        server.destroy()


@pytest.mark.parametrize("case", ["wrong password", "missing database"])
def test_refusals_that_waiting_cannot_cure_fail_fast(postgres, database, project, case):
    url = (postgres.url(database, RUNNER_ROLE, "not-the-password") if case == "wrong password"
           else postgres.url("no_such_db", RUNNER_ROLE, RUNNER_PASSWORD))
    started = time.monotonic()
    result = run_runner(runner_env(url, project, MIGRATE_WAIT_TIMEOUT="60"))
    assert result.returncode == 3, result
    assert time.monotonic() - started < 15
    words = "authentication failed" if case == "wrong password" else "does not exist"
    assert words in result.last["event"]


# -- secrets -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_special_character_password_works_and_never_appears(postgres, database, project, fmt, where, tmp_path):
    if where == "userinfo":
        url = postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD)
    else:
        url = f"postgresql://{RUNNER_ROLE}@127.0.0.1:{postgres.port}/{database}?password={quote(RUNNER_PASSWORD, safe='')}"
    ok = run_runner(runner_env(url, project, MIGRATE_LOG_FORMAT=fmt, MIGRATE_LOG_LEVEL="DEBUG"))
    assert ok.returncode == 0, ok
    # A failure path prints the most: a revision error and the missing-database refusal.
    bad = run_runner(runner_env(url.replace(database, "no_such_db"), project, MIGRATE_LOG_FORMAT=fmt))
    assert bad.returncode == 3, bad
    for result in (ok, bad):
        for form in (RUNNER_PASSWORD, quote(RUNNER_PASSWORD, safe=""), quote(RUNNER_PASSWORD)):
            assert form not in result.output


def test_a_print_in_env_py_becomes_a_json_line_without_the_password(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(1))
    env_py = tmp_path / "p" / "migrations" / "env.py"
    env_py.write_text(env_py.read_text().replace(
        "target_metadata = None",
        "target_metadata = None\nprint('env.py sees', config.get_main_option('sqlalchemy.url'))"))
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 0, result
    seen = [r for r in result.records if r["event"].startswith("env.py sees")]
    assert len(seen) == 1 and seen[0]["logger"] == "stdout" and "***" in seen[0]["event"]
    assert quote(RUNNER_PASSWORD, safe="") not in result.output


def test_json_mode_every_line_is_an_object_including_alembics_own(database_url, project):
    result = run_runner(runner_env(database_url, project))
    assert result.returncode == 0, result
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == len(result.records) > 5
    assert all({"time", "level", "event"} <= set(r) for r in result.records)
    running = [r for r in result.records if r["event"].startswith("Running upgrade")]
    assert len(running) == 3 and running[0]["logger"] == "alembic.runtime.migration"


# -- several runners -----------------------------------------------------------------
def test_ten_runners_at_once_apply_every_revision_exactly_once(database_url, tmp_path, postgres, database):
    ini = make_project(tmp_path / "p", chain(20))
    procs = [start_runner(runner_env(database_url, ini)) for _ in range(10)]
    results = [finish(p) for p in procs]
    assert [r.returncode for r in results] == [0] * 10, [r for r in results if r.returncode]
    applied = [rev for r in results for rev in r.last["applied"]]
    assert sorted(applied) == [f"r{i:04d}" for i in range(1, 21)]
    assert sum(r.last["outcome"] == "upgraded" for r in results) == 1
    assert_consistent(database_url, ["r0020"])
    assert advisory_locks(postgres, database) == []


def test_lock_timeout_exits_4_naming_the_holder(database_url, project, postgres, database):
    with psycopg.connect(database_url, autocommit=True, application_name="someone-else") as holder:
        key = _derived_key(database)
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        result = run_runner(runner_env(database_url, project, MIGRATE_LOCK_TIMEOUT="2"))
        holder_pid = holder.info.backend_pid
    assert result.returncode == 4, result
    event = result.last["event"]
    assert f"SELECT pg_terminate_backend({holder_pid})" in event
    assert "someone-else" in event and "MIGRATE_LOCK_TIMEOUT" in event and "pg_terminate_backend" in event
    assert any("waiting for lock" in e and "someone-else" in e for e in result.events())
    assert version_rows(database_url) == []


def _derived_key(database: str) -> int:
    from runner.lock import derive_key

    return derive_key(database, "public", "alembic_version")


def test_explicit_lock_key_is_used(database_url, project):
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(42)")
        blocked = run_runner(runner_env(database_url, project, MIGRATE_LOCK_KEY="42", MIGRATE_LOCK_TIMEOUT="1"))
        free = run_runner(runner_env(database_url, project, MIGRATE_LOCK_KEY="-42"))
    assert blocked.returncode == 4 and free.returncode == 0, (blocked, free)


def test_lock_session_turns_off_idle_timeouts(database_url, tmp_path, postgres, database):
    postgres.execute(f'ALTER ROLE "{RUNNER_ROLE}" IN DATABASE "{database}" SET idle_session_timeout = 1000')
    slow = Rev("r0001", None, ["SELECT pg_sleep(3)", "CREATE TABLE r_1 (id int)"])
    ini = make_project(tmp_path / "p", [slow])
    result = run_runner(runner_env(database_url, ini))
    assert result.returncode == 0, result
    assert_consistent(database_url, ["r0001"])


# -- signals -------------------------------------------------------------------------
def slow_project(root: Path, seconds: int = 60) -> Path:
    return make_project(root, [Rev("r0001", None, ["CREATE TABLE r_1 (id int)"]),
                               Rev("r0002", "r0001", [f"SELECT pg_sleep({seconds})", "CREATE TABLE r_2 (id int)"])])


def test_sigkill_inside_a_migration_then_the_next_runner_finishes(database_url, tmp_path, postgres, database):
    ini = slow_project(tmp_path / "p")
    proc = start_runner(runner_env(database_url, ini))
    wait_for(lambda: running_query(postgres, database, "pg_sleep"))
    proc.kill()
    proc.wait(10)
    fast = make_project(tmp_path / "fast", chain(2))
    started = time.monotonic()
    result = run_runner(runner_env(database_url, fast))
    assert result.returncode == 0, result
    assert time.monotonic() - started < 20
    assert_consistent(database_url, ["r0002"])
    assert advisory_locks(postgres, database) == []
    # client_connection_check_interval: the server ended the orphaned statement.
    wait_for(lambda: not running_query(postgres, database, "pg_sleep"), timeout=15)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_inside_a_migration_cancels_rolls_back_and_releases(database_url, tmp_path, postgres, database,
                                                                     signum, code):
    ini = slow_project(tmp_path / "p")
    proc = start_runner(runner_env(database_url, ini))
    wait_for(lambda: running_query(postgres, database, "pg_sleep"))
    sent = time.monotonic()
    proc.send_signal(signum)
    result = finish(proc, timeout=30)
    assert result.returncode == code, result
    assert time.monotonic() - sent < 10
    assert signum.name in result.last["event"]
    assert_consistent(database_url, [])
    assert advisory_locks(postgres, database) == []
    assert not running_query(postgres, database, "pg_sleep")


def test_sigterm_while_waiting_for_the_lock(database_url, project, postgres, database):
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_derived_key(database),))
        proc = start_runner(runner_env(database_url, project))
        wait_for(lambda: len(advisory_locks(postgres, database)) == 1 and running_runner(postgres, database))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=30)
    assert result.returncode == 143, result
    assert version_rows(database_url) == []


def running_runner(postgres: Postgres, database: str) -> bool:
    rows = postgres.execute("SELECT 1 FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                            params=(database, "migration-runner"))
    return bool(rows)


def test_sigterm_while_waiting_for_the_database(project):
    proc = start_runner(runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", project,
                                   MIGRATE_WAIT_TIMEOUT="60"))
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=15)
    assert result.returncode == 143, result
