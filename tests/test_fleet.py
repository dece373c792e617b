"""Fleets (DATABASE_URLS_FILE): many databases and tenant schemas, each migrated by a runner process of its own."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from alembic import command
from alembic.config import Config

from runner.lock import derive_key, key_for
from runner.report import TERMINATION_LOG_LIMIT, _fit
from runner.settings import Settings

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, advisory_locks, assert_consistent, finish, run_runner,
                       runner_env, start_runner, tables, version_rows)
from .postgres import free_port
from .projects import Rev, chain, make_project, write_env
from .test_cli import running_query, wait_for

# Schema per tenant, the tenant chosen with -x tenant=NAME: its tables and its version table in its schema.
TENANT_ENV = '''
from alembic import context
from sqlalchemy import engine_from_config, pool, text

config = context.config
tenant = context.get_x_argument(as_dictionary=True)["tenant"]
engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
with engine.connect() as connection:
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{tenant}"'))
    connection.execute(text(f'SET search_path TO "{tenant}"'))
    connection.commit()
    context.configure(connection=connection, target_metadata=None, version_table_schema=tenant)
    with context.begin_transaction():
        context.run_migrations()
'''


def databases(postgres, n: int) -> list[str]:
    """n fresh databases owned by the runner role; their URLs."""
    names = [f"f_{uuid.uuid4().hex[:12]}" for _ in range(n)]
    for name in names:
        postgres.create_database(name, RUNNER_ROLE)
    return [postgres.url(name, RUNNER_ROLE, RUNNER_PASSWORD) for name in names]


def targets_file(path: Path, lines: list[str]) -> Path:
    path.write_text("# the fleet\n\n" + "\n".join(lines) + "\n")
    return path


def fleet_env(ini: Path, urls_file: Path, termination: Path | None = None, **extra) -> dict:
    env = runner_env(None, ini, DATABASE_URLS_FILE=str(urls_file), **extra)
    if termination is not None:
        env["MIGRATE_TERMINATION_LOG"] = str(termination)
    return env


def target_lines(result) -> list[dict]:
    return [r for r in result.records if r["event"].startswith("target ")]


def state(url: str) -> tuple:
    return tuple(version_rows(url)), tuple(tables(url))


def failing_at_2(url: str) -> None:
    """A database at r0001 that already has r_2, so that revision r0002 fails (exit 7)."""
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE r_1 (id int); CREATE TABLE r_2 (id int)")
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('r0001')")


def legacy(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE customers (id int)")


def test_fifty_databases_twenty_tenants_and_three_broken_targets(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    urls = databases(postgres, 53)
    good, broken, legacy_url, twin = urls[:50], urls[50], urls[51], urls[52]
    failing_at_2(broken)
    legacy(legacy_url)
    tenants = make_project(tmp_path / "tenants", chain(3, prefix="t"))
    write_env(tenants.parent, TENANT_ENV)
    (shared,) = databases(postgres, 1)
    unreachable = f"postgresql://u:{quote(RUNNER_PASSWORD, safe='')}@127.0.0.1:{free_port()}/gone"
    lines = [*good, broken, unreachable, legacy_url]
    termination = tmp_path / "termination-log"
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls", lines), termination,
                                  MIGRATE_FLEET_CONCURRENCY="8", MIGRATE_WAIT_TIMEOUT="2"), timeout=600)
    # Three failures with three codes (7, 3, 6): the fleet's own code.
    assert result.returncode == 13, result
    for url in good:
        assert_consistent(url, ["r0003"])
        assert advisory_locks(postgres, url.rsplit("/", 1)[1]) == []
    assert version_rows(broken) == ["r0001"]
    assert version_rows(legacy_url) == [] and tables(legacy_url) == ["customers"]
    # Each target's state is what plain alembic leaves.
    config = Config(str(ini))
    config.set_main_option("sqlalchemy.url", twin.replace("%", "%%"))
    command.upgrade(config, "heads")
    assert {state(url) for url in good} == {state(twin)}
    rows = {row["target"]: row for row in result.last["targets"]}
    assert len(rows) == len(lines) and len(target_lines(result)) == len(lines)
    codes = sorted(row["exit_code"] for row in rows.values() if row["exit_code"])
    assert codes == [3, 6, 7]
    assert result.last["counts"] == {"upgraded": 50, "RevisionFailed": 1, "DatabaseUnreachable": 1,
                                     "LegacyDatabase": 1}
    assert all(row["to_revision"] == ["r0003"] for row in rows.values() if row["exit_code"] == 0)
    assert RUNNER_PASSWORD not in result.output and "p%25w%40rd" not in result.output
    written = termination.read_text()
    assert len(written.encode()) <= TERMINATION_LOG_LIMIT and RUNNER_PASSWORD not in written
    summary = json.loads(written)
    assert summary["exit_code"] == 13 and summary["counts"] == result.last["counts"]
    assert [row["exit_code"] for row in summary["targets"][:3]] == [7, 3, 6]  # the failed first
    assert "53 targets" in summary["targets_truncated"]

    # Twenty tenants in one database, by -x: each at the heads in its own schema, none waiting for another.
    tenant_lines = [f"{shared} tenant=acme{i}" for i in range(20)]
    result = run_runner(fleet_env(tenants, targets_file(tmp_path / "tenants.txt", tenant_lines),
                                  MIGRATE_FLEET_CONCURRENCY="8"), timeout=600)
    assert result.returncode == 0, result
    assert result.last["counts"] == {"upgraded": 20}
    with psycopg.connect(shared) as conn:
        for i in range(20):
            assert conn.execute(f"SELECT version_num FROM acme{i}.alembic_version").fetchall() == [("t0003",)]
            assert sorted(r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (f"acme{i}",))) == \
                ["alembic_version", "t_1", "t_2", "t_3"]
    assert {row["target"].split()[-1] for row in result.last["targets"]} == {f"tenant=acme{i}" for i in range(20)}
    assert all(":***@" in row["target"] for row in result.last["targets"])


def test_tenants_of_one_database_do_not_wait_for_each_other(postgres, tmp_path):
    tenants = make_project(tmp_path / "tenants", chain(2, prefix="t"))
    write_env(tenants.parent, TENANT_ENV)
    (shared,) = databases(postgres, 1)
    name = shared.rsplit("/", 1)[1]
    path = targets_file(tmp_path / "tenants.txt", [f"{shared} -x tenant=held", f"{shared} tenant=free"])
    with psycopg.connect(shared, autocommit=True) as holder:
        # What a single run with -x tenant=held takes: the fleet's target must wait for it, the other not.
        holder.execute("SELECT pg_advisory_lock(%s)", (derive_key(name, "public", "alembic_version",
                                                                  ["tenant=held"]),))
        result = run_runner(fleet_env(tenants, path, MIGRATE_LOCK_TIMEOUT="1"), timeout=300)
    assert result.returncode == 4, result
    assert [row["outcome"] for row in result.last["targets"]] == ["LockTimeout", "upgraded"]


def _mixed(postgres, tmp_path, name: str) -> tuple[Path, list[str]]:
    urls = databases(postgres, 6)
    failing_at_2(urls[2])
    legacy(urls[4])
    return targets_file(tmp_path / name, urls), urls


def test_concurrency_one_and_eight_leave_the_same_end_states(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    ends, results = [], []
    for concurrency in ("1", "8"):
        path, urls = _mixed(postgres, tmp_path, f"urls-{concurrency}")
        result = run_runner(fleet_env(ini, path, MIGRATE_FLEET_CONCURRENCY=concurrency), timeout=300)
        ends.append([state(url) for url in urls])
        results.append(result)
    assert ends[0] == ends[1]
    assert [r.returncode for r in results] == [13, 13], results
    assert results[0].last["counts"] == results[1].last["counts"] == {"upgraded": 4, "RevisionFailed": 1,
                                                                      "LegacyDatabase": 1}
    # In file order, whatever finished first.
    assert [[row["outcome"] for row in r.last["targets"]] for r in results][0] == \
        [[row["outcome"] for row in r.last["targets"]] for r in results][1]


def test_failures_sharing_one_code_exit_with_it(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    urls = databases(postgres, 3)
    failing_at_2(urls[0])
    failing_at_2(urls[2])
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls", urls)), timeout=300)
    assert result.returncode == 7, result
    assert result.last["outcome"] == "TargetsFailed" and result.last["counts"] == {"RevisionFailed": 2,
                                                                                   "upgraded": 1}
    assert_consistent(urls[1], ["r0003"])


def test_a_failing_canary_touches_no_other_target(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    urls = databases(postgres, 5)
    failing_at_2(urls[1])
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls", urls), MIGRATE_FLEET_CANARY="2"),
                        timeout=300)
    assert result.returncode == 7, result
    assert_consistent(urls[0], ["r0003"])
    for url in urls[2:]:
        assert version_rows(url) == [] and tables(url) == []
    assert [row["outcome"] for row in result.last["targets"]] == ["upgraded", "RevisionFailed"] + ["not run"] * 3
    assert "canary failed" in result.last["event"] and len(target_lines(result)) == 2
    # A canary that passes lets the rest run.
    failing = urls.pop(1)
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls2", urls), MIGRATE_FLEET_CANARY="2"),
                        timeout=300)
    assert result.returncode == 0, result
    for url in urls:
        assert_consistent(url, ["r0003"])
    assert version_rows(failing) == ["r0001"]


def test_two_fleets_at_once_apply_each_revision_once_per_target(postgres, tmp_path):
    # Each revision notes itself in a table: applied twice, it would show twice.
    revisions = [Rev("a1", None, ["CREATE TABLE applied (revision text)", "INSERT INTO applied VALUES ('a1')"])]
    revisions += [Rev(f"a{i}", f"a{i - 1}", ["SELECT pg_sleep(0.2)", f"INSERT INTO applied VALUES ('a{i}')"])
                  for i in range(2, 5)]
    ini = make_project(tmp_path / "p", revisions)
    urls = databases(postgres, 5)
    path = targets_file(tmp_path / "urls", urls)
    procs = [start_runner(fleet_env(ini, path, MIGRATE_FLEET_CONCURRENCY="3")) for _ in range(2)]
    results = [finish(proc, timeout=300) for proc in procs]
    assert [r.returncode for r in results] == [0, 0], results
    for url in urls:
        with psycopg.connect(url) as conn:
            assert sorted(r[0] for r in conn.execute("SELECT revision FROM applied")) == ["a1", "a2", "a3", "a4"]
        assert version_rows(url) == ["a4"]
    outcomes = [row["outcome"] for r in results for row in r.last["targets"]]
    assert sorted(outcomes) == ["current"] * 5 + ["upgraded"] * 5


def test_sigterm_mid_fleet_stops_every_target_cleanly(postgres, tmp_path):
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["CREATE TABLE r_1 (id int)"]),
                                        Rev("r0002", "r0001", ["SELECT pg_sleep(60)", "CREATE TABLE r_2 (id int)"])])
    urls = databases(postgres, 5)
    names = [url.rsplit("/", 1)[1] for url in urls]
    proc = start_runner(fleet_env(ini, targets_file(tmp_path / "urls", urls), MIGRATE_FLEET_CONCURRENCY="2"))
    wait_for(lambda: all(running_query(postgres, name, "pg_sleep") for name in names[:2]), timeout=60)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=60)
    assert result.returncode == 143, result
    assert time.monotonic() - sent < 15
    for url, name in zip(urls, names):
        assert version_rows(url) == [] and tables(url) == []  # r0001 and r0002 in one transaction, rolled back
        assert advisory_locks(postgres, name) == []
        assert not running_query(postgres, name, "pg_sleep")
    assert [row["outcome"] for row in result.last["targets"]] == ["interrupted"] * 2 + ["not run"] * 3
    assert result.last["outcome"] == "interrupted"


def test_three_shards_cover_every_target_exactly_once(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    urls = databases(postgres, 7)
    path = targets_file(tmp_path / "urls", urls)
    seen = []
    for index in range(3):
        result = run_runner(fleet_env(ini, path, MIGRATE_FLEET_SHARDS="3", JOB_COMPLETION_INDEX=str(index)),
                            timeout=300)
        assert result.returncode == 0, result
        seen += [row["target"] for row in result.last["targets"]]
    assert len(seen) == len(urls) and len(set(seen)) == len(urls)
    for url in urls:
        assert_consistent(url, ["r0002"])
    assert seen[0].split("/")[-1] == urls[0].split("/")[-1]  # index 0 takes positions 0, 3, 6
    assert [s.split("/")[-1] for s in seen] == [u.split("/")[-1] for u in (urls[0::3] + urls[1::3] + urls[2::3])]
    assert all(":***@" in target for target in seen)
    # Without the index, or with one outside the shards: exit 2 before anything is touched.
    result = run_runner(fleet_env(ini, path, MIGRATE_FLEET_SHARDS="3"))
    assert result.returncode == 2 and "JOB_COMPLETION_INDEX" in result.last["event"], result
    result = run_runner(fleet_env(ini, path, MIGRATE_FLEET_SHARDS="3", JOB_COMPLETION_INDEX="3"))
    assert result.returncode == 2, result


def test_check_and_wait_on_a_fleet(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    urls = databases(postgres, 3)
    path = targets_file(tmp_path / "urls", urls)
    pending = run_runner(fleet_env(ini, path), "check")
    assert pending.returncode == 9 and pending.last["counts"] == {"PendingRevisions": 3}, pending
    assert run_runner(fleet_env(ini, path)).returncode == 0
    for verb in ("check", "wait"):
        result = run_runner(fleet_env(ini, path), verb)
        assert result.returncode == 0 and len(result.last["targets"]) == 3, result


def test_multiple_heads_are_refused_once_before_any_target(postgres, tmp_path):
    ini = make_project(tmp_path / "p", [Rev("a", None), Rev("b", "a"), Rev("c", "a")])
    urls = databases(postgres, 2)
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls", urls)))
    assert result.returncode == 5, result
    assert all(version_rows(url) == [] for url in urls) and "targets" not in result.last


def test_file_errors_never_echo_the_url(tmp_path, project):
    path = targets_file(tmp_path / "urls", ["postgresql://u:s3cr3t-pw@host/db", "mysql://u:s3cr3t-pw@host/db"])
    result = run_runner(fleet_env(project, path))
    assert result.returncode == 2 and "line 4" in result.last["event"], result
    assert "s3cr3t-pw" not in result.output
    empty = targets_file(tmp_path / "empty", ["# nothing"])
    assert run_runner(fleet_env(project, empty)).returncode == 2
    both = run_runner(fleet_env(project, path, DATABASE_URL="postgresql://u@h/d"))
    assert both.returncode == 2, both


def test_lock_key_includes_x_arguments_and_keeps_the_old_key_without():
    assert derive_key("shop", "public", "alembic_version") == key_for("migration-runner:shop:public.alembic_version")
    acme = derive_key("shop", "public", "alembic_version", ["tenant=acme"])
    assert acme != derive_key("shop", "public", "alembic_version", ["tenant=umbrella"])
    assert acme != derive_key("shop", "public", "alembic_version")
    assert derive_key("shop", "public", "v", ["a=1", "b=2"]) == derive_key("shop", "public", "v", ["b=2", "a=1"])


def test_termination_log_of_many_targets_fits_failed_first():
    rows = [{"target": f"postgresql://app:***@db-{i}.example/shop tenant=t{i}", "outcome": "upgraded",
             "exit_code": 0, "from_revision": [], "to_revision": ["r0003"], "duration": 1.0} for i in range(500)]
    rows[250] = {**rows[250], "outcome": "RevisionFailed", "exit_code": 7, "message": "revision r0002 failed"}
    rows[400] = {**rows[400], "outcome": "not run", "exit_code": None}
    summary = {"command": "upgrade", "outcome": "TargetsFailed", "exit_code": 7, "message": "1 failed",
               "counts": {"upgraded": 498, "RevisionFailed": 1, "not run": 1}, "targets": rows}
    text = _fit(summary)
    assert len(text.encode()) <= TERMINATION_LOG_LIMIT
    fitted = json.loads(text)
    assert fitted["counts"] == summary["counts"]
    assert [row["exit_code"] for row in fitted["targets"][:2]] == [7, None]
    kept = len(fitted["targets"])
    assert 2 < kept < 500 and fitted["targets_truncated"].startswith(f"{500 - kept} of 500 targets left out")
    small = {**summary, "targets": rows[:3], "counts": {"upgraded": 3}}
    assert json.loads(_fit(small)) == small


def test_a_childs_trace_context_is_the_fleets_when_tracing_else_the_callers(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from runner import telemetry
    from runner.fleet import Target

    settings = SimpleNamespace(alembic_section="alembic", x_arguments=lambda: [])
    target = Target(0, 1, "postgresql://u:pw@h/db", (), "postgresql://u:***@h/db")
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    monkeypatch.setenv("TRACEPARENT", caller)
    monkeypatch.setenv("TRACESTATE", "vendor=x")
    # Telemetry off (no endpoint in this process): nothing to propagate, the caller's context passes through.
    assert telemetry.propagation() == {} and telemetry.open_span("target db") is None
    env = target.environment(settings, tmp_path, telemetry.propagation())
    assert (env["TRACEPARENT"], env["TRACESTATE"]) == (caller, "vendor=x")
    # On: the fleet's span replaces both, its TRACESTATE only if it has one.
    ours = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"
    env = target.environment(settings, tmp_path, {"TRACEPARENT": ours})
    assert env["TRACEPARENT"] == ours and "TRACESTATE" not in env


def test_fleet_settings_are_documented_variables():
    fields = Settings.model_fields
    assert fields["fleet_concurrency"].default == 4 and fields["fleet_canary"].default == 0
    assert fields["database_urls_file"].alias == "DATABASE_URLS_FILE"


@pytest.mark.slow
def test_fleet_benchmark_quick_mode_runs():
    """bench/fleet.py's short mode end to end, so that it cannot rot; no timing is asserted."""
    import subprocess
    import sys

    from .conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), "--quick"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| concurrency | wall (s) |" in proc.stdout and "concurrency 4:" in proc.stdout


def test_password_file_serves_every_target_login(postgres, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    urls = databases(postgres, 2)
    bare = [url.replace(":" + quote(RUNNER_PASSWORD, safe=""), "", 1) for url in urls]
    assert all(RUNNER_PASSWORD not in url and "p%25" not in url for url in bare)
    secret = tmp_path / "password"
    secret.write_text(RUNNER_PASSWORD + "\n")
    result = run_runner(fleet_env(ini, targets_file(tmp_path / "urls", bare), DATABASE_PASSWORD_FILE=str(secret)))
    assert result.returncode == 0, result
    for url in urls:
        assert_consistent(url, ["r0002"])
    assert RUNNER_PASSWORD not in result.output
