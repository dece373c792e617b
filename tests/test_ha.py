"""High availability, on real streaming replication: a primary and a hot standby made by `pg_basebackup -R`.

- `upgrade` and `downgrade` pointed at a standby wait for a writable primary, then exit 3 naming the
  host and target_session_attrs; the read-only commands read from the standby;
- multi-host URLs (`?host=a:5432&host=b:5432`, `?host=a,b&port=...`) reach every session of the
  runner and env.py's (psycopg 3, psycopg2, asyncpg), give the same lock key in any order, and
  never show the password;
- the primary stopped (immediate) in the middle of a revision: exit 3 with nothing half done,
  and after `pg_ctl promote` the next runners reach the heads on the promoted standby.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from urllib.parse import quote, urlencode

import pytest

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, Result, assert_consistent, advisory_locks, run_runner,
                       runner_env, start_runner, tables, version_rows)
from .postgres import Postgres, in_recovery, promote, standby_of, wait_for_replay
from .projects import Rev, add_revisions, chain, make_project


@pytest.fixture(scope="module")
def pair():
    """A primary and its hot standby, shared by the tests that leave both running."""
    primary = Postgres().start()
    primary.create_role(RUNNER_ROLE, RUNNER_PASSWORD, "CREATEDB")
    standby = standby_of(primary)
    yield primary, standby
    standby.destroy()
    primary.destroy()


def fresh_database(primary: Postgres, standby: Postgres) -> str:
    """A new database owned by the runner role, replicated to the standby."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    primary.create_database(name, RUNNER_ROLE)
    wait_for_replay(standby, primary)
    return name


def multi_host_url(database: str, servers: list[Postgres], form: str = "repeated", driver: str = "",
                   **params: str) -> str:
    """A multi-host URL for the runner role: `repeated` is ?host=a:p&host=b:q, `lists` is ?host=a,b&port=p,q."""
    if form == "repeated":
        query = [("host", f"{s.host}:{s.port}") for s in servers]
    else:
        query = [("host", ",".join(s.host for s in servers)), ("port", ",".join(str(s.port) for s in servers))]
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    user_info = f"{quote(RUNNER_ROLE, safe='')}:{quote(RUNNER_PASSWORD, safe='')}"
    return f"{scheme}://{user_info}@/{database}?" + urlencode([*query, *params.items()], safe=":,")


def direct_url(server: Postgres, database: str) -> str:
    return server.url(database, RUNNER_ROLE, RUNNER_PASSWORD)


def messages(result: Result, pattern: str) -> list[str]:
    return [r["event"] for r in result.records if re.search(pattern, r["event"])]


def lock_key(result: Result) -> int:
    return next(r["lock_key"] for r in result.records if r["event"].startswith("lock ") and "acquired" in r["event"])


def assert_no_password(result: Result) -> None:
    assert RUNNER_PASSWORD not in result.output and quote(RUNNER_PASSWORD, safe="") not in result.output


# -- a standby is not a primary -------------------------------------------------------------------
@pytest.mark.parametrize("command", [["upgrade"], ["downgrade", "base"]])
@pytest.mark.parametrize("target", ["standby", "standby first, no target_session_attrs",
                                    "standby alone, target_session_attrs=read-write"])
def test_writing_commands_on_a_standby_wait_for_a_primary_then_exit_3(pair, tmp_path, command, target):
    primary, standby = pair
    database = fresh_database(primary, standby)
    ini = make_project(tmp_path / "p", chain(2))
    url = {"standby": direct_url(standby, database),
           "standby first, no target_session_attrs": multi_host_url(database, [standby, primary]),
           "standby alone, target_session_attrs=read-write": multi_host_url(
               database, [standby], target_session_attrs="read-write")}[target]
    started = time.monotonic()
    result = run_runner(runner_env(url, ini, MIGRATE_WAIT_TIMEOUT="3"), *command)
    elapsed = time.monotonic() - started

    assert result.returncode == 3, result
    # It waited, saying so at each try, with the server it reached (libpq itself turns the standby
    # down when target_session_attrs asks for a writable session).
    refused = target.endswith("target_session_attrs=read-write")
    waits = messages(result, "not ready .*session is read-only" if refused else "connected to a read-only standby")
    assert len(waits) >= 2 and all(f"{standby.port}" in line for line in waits), result
    assert elapsed >= 3, elapsed
    message = result.last["event"]
    assert "\n" not in message and f"127.0.0.1:{standby.port}" in message, message
    assert "MIGRATE_WAIT_TIMEOUT" in message and "no writable primary" in message, message
    assert "target_session_attrs=read-write" in message, message
    assert result.last["exit_code"] == 3
    assert_no_password(result)
    # Nothing was written anywhere.
    assert version_rows(direct_url(primary, database)) == [] and tables(direct_url(primary, database)) == []


def test_read_only_commands_read_from_a_standby(pair, tmp_path):
    primary, standby = pair
    database = fresh_database(primary, standby)
    ini = make_project(tmp_path / "p", chain(2))
    on_standby = runner_env(direct_url(standby, database), ini)

    pending = run_runner(on_standby, "check")
    assert pending.returncode == 9 and pending.last["pending"] == ["r0001", "r0002"], pending
    planned = run_runner(on_standby, "plan")
    assert planned.returncode == 0 and planned.last["pending"] == ["r0001", "r0002"], planned

    upgraded = run_runner(runner_env(direct_url(primary, database), ini))
    assert upgraded.returncode == 0, upgraded
    wait_for_replay(standby, primary)
    for command in ("check", "wait"):
        result = run_runner(on_standby, command)
        assert result.returncode == 0 and result.last["outcome"] == "current", result
        assert not messages(result, "read-only standby"), result
    assert in_recovery(standby)


# -- multi-host URLs -------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["repeated", "lists"])
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "asyncpg", "psycopg_async"])
def test_a_multi_host_url_listing_the_standby_first_migrates_the_primary(pair, tmp_path, form, driver):
    primary, standby = pair
    database = fresh_database(primary, standby)
    # env.py gets the URL as given and connects with its driver: the generic template, or the async one.
    ini = make_project(tmp_path / "p", chain(3), template="async" if driver in ("asyncpg", "psycopg_async")
                       else "generic")
    url = multi_host_url(database, [standby, primary], form, driver, target_session_attrs="read-write")

    result = run_runner(runner_env(url, ini))

    assert result.returncode == 0 and result.last["outcome"] == "upgraded", result
    assert result.last["applied"] == ["r0001", "r0002", "r0003"]
    assert not messages(result, "read-only standby"), result
    up = messages(result, r"^database .* is up")
    assert up and f"127.0.0.1:{standby.port},127.0.0.1:{primary.port}" in up[0], up
    assert up[0].endswith(f"at 127.0.0.1:{primary.port})"), up
    assert_consistent(direct_url(primary, database), ["r0003"])
    assert_no_password(result)
    # The lock was taken on the primary and released there.
    assert advisory_locks(primary, database) == []


def test_the_lock_key_does_not_depend_on_the_hosts_or_their_order(pair, tmp_path):
    primary, standby = pair
    database = fresh_database(primary, standby)
    ini = make_project(tmp_path / "p", chain(1))
    keys = []
    for url in (direct_url(primary, database),
                multi_host_url(database, [standby, primary], target_session_attrs="read-write"),
                multi_host_url(database, [primary, standby], "lists", target_session_attrs="primary")):
        result = run_runner(runner_env(url, ini))
        assert result.returncode == 0, result
        keys.append(lock_key(result))
    assert len(set(keys)) == 1, keys


@pytest.mark.parametrize("raw, servers, shown", [
    ("postgresql://u:pw@/db?host=a:5432&host=b:5433&target_session_attrs=read-write",
     [("a", "5432"), ("b", "5433")], "a:5432,b:5433"),
    ("postgresql://u:pw@/db?host=a,b&port=5432,5433", [("a", "5432"), ("b", "5433")], "a:5432,b:5433"),
    ("postgresql://u:pw@/db?host=a,b", [("a", None), ("b", None)], "a:5432,b:5432"),
    ("postgresql://u:pw@/db?host=a:6432", [("a", "6432")], "a:6432"),
    ("postgresql://u:pw@db:6543/x", [("db", "6543")], "db:6543"),
    ("postgresql://u:pw@/x?host=/run/pg", [("/run/pg", None)], "/run/pg:5432"),
])
def test_every_form_of_host_list_is_read_as_sqlalchemys_dialects_read_it(raw, servers, shown, monkeypatch):
    from runner import database, sessions
    from runner.settings import parse_url

    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    url = parse_url(raw)
    assert database.hosts(url) == servers and database.endpoint(url) == shown
    # The runner's own URL keeps the list: libpq gets the hosts and ports as psycopg's dialect joins them.
    runner_url = sessions.runner_url(url.set(drivername="postgresql+asyncpg"))
    assert database.hosts(runner_url) == servers
    params = sessions.connect_kwargs(runner_url)
    assert params["host"].split(",") == [host for host, _ in servers]
    if any(port for _, port in servers):
        assert str(params["port"]).split(",") == [port or "" for _, port in servers]


@pytest.mark.parametrize("url, words", [
    ("postgresql://u:pw@a:5432,b:5432/db", "host=a:5432&host=b:5432"),
    ("postgresql://u:pw@/db?host=a,b&port=5432", "2 hosts but 1 port"),
    ("postgresql://u:pw@/db?host=a&host=b&port=5432", "cannot be mixed"),
    ("postgresql://u:pw@/db?host=a:5432&host=b:99999", "between 1 and 65535"),
    ("postgresql+pg8000://u:pw@/db?host=a:5432&host=b:5432", "pg8000 cannot connect to a list of hosts"),
])
def test_multi_host_urls_the_drivers_cannot_read_are_exit_2_before_connecting(project, url, words):
    result = run_runner(runner_env(url, project), "check")
    assert result.returncode == 2 and words in result.last["event"], result
    assert "pw@" not in result.output


# -- failover in the middle of a migration --------------------------------------------------------
class Watched:
    """A runner process whose output is read as it comes, to wait for a line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._seen = proc, [], threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: any(re.search(pattern, line) for line in self.lines)
                                       or self.proc.poll() is not None, timeout):
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {''.join(self.lines)[-3000:]}")
        assert any(re.search(pattern, line) for line in self.lines), "".join(self.lines)[-3000:]

    def finish(self, timeout: float = 120) -> Result:
        self.proc.wait(timeout)
        self._thread.join(10)
        return Result(self.proc.returncode, "".join(self.lines), "")


def test_failover_in_the_middle_of_a_revision_exits_3_and_the_next_runners_finish_on_the_promoted_standby(tmp_path):
    primary = Postgres().start()
    primary.create_role(RUNNER_ROLE, RUNNER_PASSWORD, "CREATEDB")
    standby = standby_of(primary)
    running = []
    try:
        database = fresh_database(primary, standby)
        root = tmp_path / "p"
        ini = make_project(root, chain(2))
        # What a Job's pods get: every host, the writable one chosen by libpq.
        url = multi_host_url(database, [primary, standby], target_session_attrs="read-write")
        first = run_runner(runner_env(url, ini))
        assert first.returncode == 0 and first.last["to_revision"] == ["r0002"], first
        wait_for_replay(standby, primary)

        # r0003 creates its table, then sleeps in the same transaction while the marker exists.
        marker = tmp_path / "slow"
        marker.touch()
        add_revisions(root, [Rev("r0003", "r0002", ["CREATE TABLE r_3 (id serial PRIMARY KEY)"], python=(
            f"import os\nif os.path.exists({str(marker)!r}):\n    op.execute('SELECT pg_sleep(120)')"),
            message="create r_3 slowly")])
        runner = Watched(start_runner(runner_env(url, ini, MIGRATE_WAIT_TIMEOUT="5")))
        running.append(runner.proc)
        runner.wait_for(r"Running upgrade r0002 -> r0003")
        deadline = time.monotonic() + 30
        while not primary.execute("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"):
            assert time.monotonic() < deadline and runner.proc.poll() is None, "".join(runner.lines)
            time.sleep(0.05)
        marker.unlink()

        primary.stop("immediate")
        lost = runner.finish(timeout=60)

        assert lost.returncode == 3, lost
        message = lost.last["event"]
        assert "\n" not in message and "during revision r0003" in message, message  # lost: the database or the lock
        assert lost.last["exit_code"] == 3 and lost.last["applied"] == []
        assert_no_password(lost)
        # The standby holds what was committed before, nothing of r0003.
        standby_url = direct_url(standby, database)
        assert in_recovery(standby)
        assert_consistent(standby_url, ["r0002"])

        # The Job's retry, and a runner pointed at the standby alone, both wait until it is promoted.
        retry = Watched(start_runner(runner_env(url, ini, MIGRATE_WAIT_TIMEOUT="90")))
        alone = Watched(start_runner(runner_env(standby_url, ini, MIGRATE_WAIT_TIMEOUT="90")))
        running += [retry.proc, alone.proc]
        retry.wait_for(r"not ready .*session is read-only")
        alone.wait_for(r"connected to a read-only standby at 127\.0\.0\.1:%d" % standby.port)
        promote(standby)
        results = [retry.finish(), alone.finish()]

        for result in results:
            assert result.returncode == 0, result
            assert_no_password(result)
        assert sorted(r.last["outcome"] for r in results) == ["current", "upgraded"], results
        upgraded = next(r for r in results if r.last["outcome"] == "upgraded")
        assert upgraded.last["applied"] == ["r0003"]
        assert not in_recovery(standby)
        assert_consistent(standby_url, ["r0003"])
        assert advisory_locks(standby, database) == []
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        standby.destroy()
        primary.destroy()
