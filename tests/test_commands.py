"""End-to-end: the read-only commands (check, wait, plan, heads), the summary and the termination log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from pgserver._commands import POSTGRES_BIN_PATH

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, advisory_locks, finish, run_runner, runner_env, start_runner,
                       tables, version_rows)
from .postgres import SYSTEM_USER, free_port
from .projects import Rev, add_revisions, chain, make_project
from .test_cli import two_heads


def upgrade_to(url: str, root: Path, n: int) -> Path:
    ini = make_project(root, chain(n))
    assert run_runner(runner_env(url, ini)).returncode == 0
    return ini


# -- check ---------------------------------------------------------------------------
def test_check_on_fresh_pending_current_and_ahead(database_url, tmp_path):
    ini = make_project(tmp_path / "p", chain(3))
    fresh = run_runner(runner_env(database_url, ini), "check")
    assert fresh.returncode == 9 and fresh.last["outcome"] == "PendingRevisions", fresh
    assert fresh.last["pending"] == ["r0001", "r0002", "r0003"] and "3 revisions pending at base" in fresh.last["event"]

    upgrade_to(database_url, tmp_path / "two", 2)
    pending = run_runner(runner_env(database_url, ini), "check")
    assert pending.returncode == 9 and pending.last["pending"] == ["r0003"], pending
    assert "r0003 (create r_3)" in pending.last["event"]

    assert run_runner(runner_env(database_url, ini)).returncode == 0
    current = run_runner(runner_env(database_url, ini), "check")
    assert current.returncode == 0 and current.last["to_revision"] == ["r0003"], current

    older = make_project(tmp_path / "older", chain(1))
    # The runner recorded the lineage: r0003 descends from the older head, r0001 (test_rollbacks has more).
    ahead = run_runner(runner_env(database_url, older), "check")
    assert ahead.returncode == 0 and ahead.last["outcome"] == "ahead" and "r0003" in ahead.last["event"], ahead
    refused = run_runner(runner_env(database_url, older, MIGRATE_ALLOW_AHEAD="never"), "check")
    assert refused.returncode == 8 and "r0003" in refused.last["event"], refused
    assert version_rows(database_url) == ["r0003"]


def test_check_unreachable_exits_3(project):
    result = run_runner(runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", project,
                                   MIGRATE_WAIT_TIMEOUT="1"), "check")
    assert result.returncode == 3, result


def test_check_takes_no_lock_and_works_with_a_select_only_role(database_url, tmp_path, postgres, database):
    ini = upgrade_to(database_url, tmp_path / "p", 3)
    postgres.create_role("reader", "reader-pw")
    postgres.execute('GRANT SELECT ON alembic_version TO "reader"', database=database)
    reader_url = postgres.url(database, "reader", "reader-pw")
    from runner.lock import derive_key

    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (derive_key(database, "public", "alembic_version"),))
        result = run_runner(runner_env(reader_url, ini, MIGRATE_LOCK_TIMEOUT="1"), "check")
    assert result.returncode == 0, result
    assert not any(e.startswith(("lock ", "waiting for lock")) for e in result.events())


# -- wait ----------------------------------------------------------------------------
def test_wait_returns_soon_after_a_concurrent_upgrade_finishes(database_url, tmp_path):
    slow = make_project(tmp_path / "p", chain(2) + [Rev("r0003", "r0002", ["SELECT pg_sleep(4)",
                                                                           "CREATE TABLE r_3 (id int)"])])
    upgrade = start_runner(runner_env(database_url, slow))
    waiter = start_runner(runner_env(database_url, slow, MIGRATE_WAIT_TIMEOUT="60"), "wait")
    upgraded = finish(upgrade)
    upgrade_done = time.monotonic()
    waited = finish(waiter)
    waiter_done = time.monotonic()
    assert upgraded.returncode == 0 and waited.returncode == 0, (upgraded, waited)
    assert waited.last["outcome"] == "current"
    assert waiter_done - upgrade_done < 2.5


def test_wait_times_out_with_9(database_url, project):
    result = run_runner(runner_env(database_url, project, MIGRATE_WAIT_TIMEOUT="1.5"), "wait")
    assert result.returncode == 9 and "MIGRATE_WAIT_TIMEOUT" in result.last["event"], result
    assert version_rows(database_url) == []


def test_wait_tolerates_a_database_that_is_not_up_yet(project):
    result = run_runner(runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", project,
                                   MIGRATE_WAIT_TIMEOUT="1.5"), "wait")
    assert result.returncode == 3 and "not reachable" in result.last["event"], result


# -- plan ----------------------------------------------------------------------------
def test_plan_lists_exactly_what_upgrade_then_applies(database_url, tmp_path, postgres, database):
    upgrade_to(database_url, tmp_path / "two", 2)
    ini = make_project(tmp_path / "p", chain(5))
    plan = run_runner(runner_env(database_url, ini), "plan")
    assert plan.returncode == 0, plan
    assert plan.last["pending"] == ["r0003", "r0004", "r0005"]
    assert [e for e in plan.events() if e.startswith("would apply")] == [
        "would apply r0003: create r_3", "would apply r0004: create r_4", "would apply r0005: create r_5"]
    assert version_rows(database_url) == ["r0002"] and advisory_locks(postgres, database) == []
    upgraded = run_runner(runner_env(database_url, ini))
    assert upgraded.last["applied"] == plan.last["pending"]


def test_plan_reports_the_baseline_decision(database_url, project):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE r_1 (id int)")
    refused = run_runner(runner_env(database_url, project), "plan")
    assert refused.returncode == 6, refused
    planned = run_runner(runner_env(database_url, project, MIGRATE_BASELINE_REVISION="r0001"), "plan")
    assert planned.returncode == 0, planned
    assert any(e.startswith("would stamp baseline r0001") for e in planned.events())
    assert planned.last["pending"] == ["r0002", "r0003"] and version_rows(database_url) == []


def psql(url: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(POSTGRES_BIN_PATH / "psql"), "-v", "ON_ERROR_STOP=1", "-q", "-d", url],
                          input=sql, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("start", [0, 2])
def test_plan_sql_run_by_psql_on_a_copy_brings_it_to_heads(database_url, tmp_path, postgres, database, start):
    if start:
        upgrade_to(database_url, tmp_path / "start", start)
    ini = make_project(tmp_path / "p", chain(4))
    plan = run_runner(runner_env(database_url, ini), "plan", "--sql")
    assert plan.returncode == 0, plan
    assert "CREATE TABLE r_4" in plan.stdout and "BEGIN;" in plan.stdout
    copy = f"{database}_copy"
    postgres.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{database}" OWNER "{RUNNER_ROLE}"')
    copy_url = postgres.url(copy, RUNNER_ROLE, RUNNER_PASSWORD)
    applied = psql(copy_url, plan.stdout)
    assert applied.returncode == 0, applied.stderr
    assert version_rows(copy_url) == ["r0004"]
    assert {"r_1", "r_2", "r_3", "r_4"} <= set(tables(copy_url))
    assert version_rows(database_url) == ([f"r{start:04d}"] if start else [])


# -- heads ---------------------------------------------------------------------------
def test_heads_needs_no_database(project):
    result = run_runner(runner_env(None, project), "heads")
    assert result.returncode == 0 and result.last["to_revision"] == ["r0003"], result
    assert result.last["event"] == "single head: r0003"


def test_heads_lists_two_heads_their_ancestor_and_the_merge_command(tmp_path):
    result = run_runner(runner_env(None, two_heads(tmp_path / "p")), "heads")
    assert result.returncode == 5, result
    event = result.last["event"]
    assert "common ancestor base1" in event and "alembic merge" in event and "left" in event and "right" in event


# -- summary and termination log --------------------------------------------------------
def scenario(name: str, tmp_path: Path, url: str) -> tuple[dict, tuple[str, ...]]:
    ini = make_project(tmp_path / "p", chain(2))
    if name == "two heads":
        return runner_env(url, two_heads(tmp_path / "h")), ()
    if name == "legacy":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE old (id int)")
    if name == "failing revision":
        add_revisions(tmp_path / "p", [Rev("r0003", "r0002", ["SELECT 1/0"])])
    if name == "ahead":
        upgrade_to(url, tmp_path / "newer", 4)
        return runner_env(url, ini, MIGRATE_ALLOW_AHEAD="never"), ()
    if name == "unreachable":
        return runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", ini, MIGRATE_WAIT_TIMEOUT="1"), ()
    if name == "configuration":
        return runner_env(url, ini, MIGRATE_LOCK_TIMEOUT="never"), ()
    if name == "pending":
        return runner_env(url, ini), ("check",)
    if name == "lock timeout":
        return runner_env(url, ini, MIGRATE_LOCK_KEY="77", MIGRATE_LOCK_TIMEOUT="1"), ()
    return runner_env(url, ini), ()


@pytest.mark.parametrize("name, code, outcome", [
    ("success", 0, "upgraded"), ("configuration", 2, "ConfigError"), ("unreachable", 3, "DatabaseUnreachable"),
    ("two heads", 5, "MultipleHeads"), ("legacy", 6, "LegacyDatabase"), ("failing revision", 7, "RevisionFailed"),
    ("ahead", 8, "DatabaseAhead"), ("lock timeout", 4, "LockTimeout"), ("pending", 9, "PendingRevisions"),
])
def test_termination_log_records_the_outcome(database_url, tmp_path, name, code, outcome):
    env, args = scenario(name, tmp_path, database_url)
    log_file = tmp_path / "termination-log"
    env["MIGRATE_TERMINATION_LOG"] = str(log_file)
    with psycopg.connect(database_url, autocommit=True) as holder:
        if name == "lock timeout":
            holder.execute("SELECT pg_advisory_lock(77)")
        result = run_runner(env, *args)
    assert result.returncode == code, result
    written = json.loads(log_file.read_text())
    assert written["exit_code"] == code and written["outcome"] == outcome
    assert written["command"] == (args[0] if args else "upgrade")
    assert {"from_revision", "to_revision", "applied", "lock_wait", "duration", "message"} <= set(written)
    assert result.last["outcome"] == outcome and result.last["exit_code"] == code
    assert RUNNER_PASSWORD not in log_file.read_text()


def test_text_mode_summary_line_carries_the_json(database_url, project):
    result = run_runner(runner_env(database_url, project, MIGRATE_LOG_FORMAT="text"))
    last = result.output.strip().splitlines()[-1]
    summary = json.loads(last[last.index("{"):])
    assert summary["outcome"] == "upgraded" and summary["applied"] == ["r0001", "r0002", "r0003"]


def test_version_flag():
    proc = subprocess.run([shutil.which("migration-runner", path=str(Path(os.sys.executable).parent)), "--version"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("migration-runner ")


# -- transaction pooling ---------------------------------------------------------------------
@pytest.fixture
def pgbouncer(request, postgres):
    """PgBouncer on a free port in front of the suite's server; request.param: its ignore_startup_parameters."""
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pgbouncer is not installed (.ci/run installs it)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    import pwd
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="mr-bouncer-"))
    work.chmod(0o755)
    port = free_port()
    postgres.create_role("pooled", "pooled-pw", "CREATEDB")
    (work / "users.txt").write_text('"pooled" "pooled-pw"\n')
    (work / "pgbouncer.ini").write_text(f"""
[databases]
* = host=127.0.0.1 port={postgres.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {work}/users.txt
pool_mode = transaction
default_pool_size = 4
ignore_startup_parameters = {getattr(request, "param", "options,extra_float_digits")}
logfile = {work}/pgbouncer.log
""")
    kwargs = {}
    if os.geteuid() == 0:
        owner = pwd.getpwnam(SYSTEM_USER)
        for path in (work, work / "users.txt", work / "pgbouncer.ini"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        kwargs["user"] = SYSTEM_USER
    proc = subprocess.Popen([binary, str(work / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kwargs)
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(work, ignore_errors=True)


def test_refuses_a_transaction_pooling_proxy(postgres, pgbouncer, project):
    name = "pooled_db"
    postgres.execute(f'CREATE DATABASE "{name}" OWNER "pooled"')
    url = f"postgresql://pooled:pooled-pw@127.0.0.1:{pgbouncer}/{name}"
    result = run_runner(runner_env(url, project))
    assert result.returncode == 2, result
    assert "transaction-pooling" in result.last["event"] and "session" in result.last["event"]
    assert version_rows(postgres.url(name, "pooled", "pooled-pw")) == []
    assert advisory_locks(postgres, name) == []


@pytest.mark.parametrize("pgbouncer", ["extra_float_digits"], indirect=True)
def test_a_proxy_refusing_session_options_is_a_clear_configuration_error(postgres, pgbouncer, project):
    name = "pooled_strict"
    postgres.execute(f'CREATE DATABASE "{name}" OWNER "pooled"')
    result = run_runner(runner_env(f"postgresql://pooled:pooled-pw@127.0.0.1:{pgbouncer}/{name}", project))
    assert result.returncode == 2 and "ignore_startup_parameters" in result.last["event"], result
