"""Faults and load: cut and half-open connections, restarts, fifty runners, live traffic, TLS, roles, signals.

Every test ends by checking the database: the version row agrees with the schema
and no advisory lock (the runner's lock or its fence) is left held.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from .conftest import (RUNNER_PASSWORD, RUNNER_ROLE, advisory_locks, assert_consistent, finish, run_runner,
                       runner_env, start_runner, tables, version_rows)
from .envs import DEFAULT_DRIVER, driver_params
from .postgres import SYSTEM_USER, Postgres, _as_root, _ids, free_port
from .projects import Rev, chain, make_project
from .proxy import Proxy, TlsTerminator
from .test_cli import running_query, slow_project, wait_for

# Marked `core`, the lean part of this module that also runs on SQLAlchemy 1.4 (python3 dev.py test-sa14):
# the faults that go through env.py's driver and the guard (a cut or half-open lock session, signals, DDL lock
# retries, SQLSTATEs read from a driver's error, TLS). Not there: what depends on neither SQLAlchemy nor the
# driver and costs much (fifty runners, restarts of servers of their own, the runner's half-open sessions).


@pytest.fixture
def proxy(postgres):
    with Proxy(postgres.host, postgres.port) as p:
        yield p


class Monitor:
    """Samples pg_stat_activity for one database from a thread: connections, concurrent slow statements."""

    def __init__(self, postgres: Postgres, database: str, fragment: str = "pg_sleep", interval: float = 0.05):
        self.postgres, self.database, self.fragment, self.interval = postgres, database, fragment, interval
        self.peak_connections = 0
        self.peak_running = 0  # distinct backends running `fragment` at one moment
        # Per client (application_name): the most sessions one held, and, in the samples where `fragment` ran
        # with at least `clients` connected, the fewest clients holding two or more at once.
        self.clients = 0
        self.peak_per_client = 0
        self.fewest_doubled: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.postgres.connect() as conn:
            while not self._stop.is_set():
                rows = conn.execute("SELECT state, query, application_name FROM pg_stat_activity WHERE datname = %s "
                                    "AND pid <> pg_backend_pid()", (self.database,)).fetchall()
                self.samples += 1
                self.peak_connections = max(self.peak_connections, len(rows))
                running = sum(1 for state, query, _ in rows if state == "active" and self.fragment in (query or ""))
                self.peak_running = max(self.peak_running, running)
                per_client = Counter(name for _, _, name in rows)
                self.peak_per_client = max([self.peak_per_client, *per_client.values()])
                if self.clients and running and len(per_client) >= self.clients:
                    doubled = sum(1 for n in per_client.values() if n >= 2)
                    self.fewest_doubled = min(doubled, self.fewest_doubled if self.fewest_doubled is not None else doubled)
                self._stop.wait(self.interval)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def finish_all(procs: list, timeout: float = 300) -> list:
    """Finish processes together: one waiting on a full output pipe must not stall the others."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(procs)) as pool:
        return list(pool.map(lambda p: finish(p, timeout=timeout), procs))


def no_locks_left(postgres: Postgres, database: str, timeout: float = 15) -> None:
    wait_for(lambda: advisory_locks(postgres, database) == [], timeout=timeout)


def lock_holder(postgres: Postgres, database: str) -> int:
    rows = postgres.execute("SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                            "WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted "
                            "AND d.datname = %s", params=(database,))
    return rows[0][0] if rows else 0


def link_of(proxy: Proxy, postgres: Postgres, pid: int):
    """The proxy link that carries the session of backend `pid`."""
    (port,), = postgres.execute("SELECT client_port FROM pg_stat_activity WHERE pid = %s", params=(pid,))
    return next(link for link in proxy.open_links() if link.server.getsockname()[1] == port)


def sleeping_pid(postgres: Postgres, database: str) -> int:
    rows = postgres.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                            "AND query LIKE %s", params=(database, "%pg_sleep%"))
    return rows[0][0] if rows else 0


# -- the lock and the migration fail together -------------------------------------
# The runner sets sqlalchemy.url to DATABASE_URL as postgresql+psycopg:// (postgresql+psycopg2://
# under SQLAlchemy 1.4); a project on another driver swaps it in env.py before building its engine.
SWAP_DRIVER = '''
from sqlalchemy.engine import make_url
config.set_main_option("sqlalchemy.url", make_url(config.get_main_option("sqlalchemy.url"))
                       .set(drivername={drivername!r}).render_as_string(hide_password=False).replace("%", "%%"))
'''


def use_driver(root: Path, driver: str) -> None:
    """Make the project's env.py connect through `driver`: the default one (the generic template as it
    is: psycopg, or psycopg2 under SQLAlchemy 1.4), psycopg or psycopg2 (the generic template), or asyncpg
    (the template `alembic init -t async` writes)."""
    if driver == DEFAULT_DRIVER:
        return
    if driver == "asyncpg":
        import alembic

        from .projects import write_env

        write_env(root, (Path(alembic.__file__).parent / "templates" / "async" / "env.py").read_text())
    env_py = root / "migrations" / "env.py"
    text, anchor = env_py.read_text(), "config = context.config\n"
    assert anchor in text
    env_py.write_text(text.replace(anchor, anchor + SWAP_DRIVER.format(drivername=f"postgresql+{driver}"), 1))


@pytest.mark.core
@pytest.mark.parametrize("driver", driver_params(["psycopg", "psycopg2", "asyncpg"]))
def test_cutting_the_lock_session_stops_the_migration_before_another_runner_migrates(
        postgres, database, database_url, proxy, tmp_path, driver):
    ini = slow_project(tmp_path / "p", seconds=6)
    use_driver(tmp_path / "p", driver)
    with Monitor(postgres, database) as monitor:
        first = start_runner(runner_env(proxy.url(database_url), ini))
        wait_for(lambda: sleeping_pid(postgres, database) or first.poll() is not None)
        assert first.poll() is None, finish(first)  # it should be inside r0002, not finished
        # A second runner, not through the proxy, waits for the lock meanwhile.
        second = start_runner(runner_env(database_url, ini, MIGRATE_LOCK_TIMEOUT="60"))
        time.sleep(0.5)
        proxy.cut(link_of(proxy, postgres, lock_holder(postgres, database)))
        cut = time.monotonic()
        lost = finish(first, timeout=30)
        stopped_after = time.monotonic() - cut
        done = finish(second, timeout=90)
    assert lost.returncode == 3, lost
    assert stopped_after < 20
    event = lost.last["event"]
    assert "lock" in event and "no two runners migrate at once" in event and "r0002" in event
    assert done.returncode == 0, done
    assert done.last["applied"] == ["r0001", "r0002"] or done.last["applied"] == ["r0002"]
    # The first runner's sleeping statement was gone before the second one's began.
    assert monitor.peak_running == 1, monitor.peak_running
    assert_consistent(database_url, ["r0002"])
    no_locks_left(postgres, database)


def test_cutting_every_connection_exits_3_and_the_next_runner_finishes(postgres, database, database_url, proxy,
                                                                        tmp_path):
    ini = slow_project(tmp_path / "p", seconds=30)
    proc = start_runner(runner_env(proxy.url(database_url), ini))
    wait_for(lambda: sleeping_pid(postgres, database))
    proxy.cut_all()
    result = finish(proc, timeout=30)
    assert result.returncode == 3, result
    assert "r0002" in result.last["event"]
    wait_for(lambda: not running_query(postgres, database, "pg_sleep"), timeout=15)
    assert_consistent(database_url, [])  # one transaction for the run: nothing committed
    no_locks_left(postgres, database)
    fast = make_project(tmp_path / "fast", chain(2))
    assert run_runner(runner_env(database_url, fast)).returncode == 0
    assert_consistent(database_url, ["r0002"])
    no_locks_left(postgres, database)


# -- half-open network ----------------------------------------------------------------
def test_half_open_network_is_noticed_and_the_next_runner_succeeds(postgres, database, database_url, proxy,
                                                                   tmp_path):
    ini = slow_project(tmp_path / "p", seconds=30)
    proc = start_runner(runner_env(proxy.url(database_url), ini))
    wait_for(lambda: sleeping_pid(postgres, database))
    proxy.half_open()  # every open connection: nothing is forwarded, nothing is closed
    frozen = time.monotonic()
    result = finish(proc, timeout=60)
    noticed = time.monotonic() - frozen
    assert result.returncode == 3, result
    assert noticed < 30, noticed
    assert "lock" in result.last["event"], result.output
    # The runner ended its own server sessions through a new connection.
    fast = make_project(tmp_path / "fast", chain(2))
    started = time.monotonic()
    after = run_runner(runner_env(database_url, fast))
    assert after.returncode == 0, after
    assert time.monotonic() - started < 20
    assert_consistent(database_url, ["r0002"])
    no_locks_left(postgres, database)


@pytest.mark.core
def test_half_open_migration_connection_alone_is_noticed(postgres, database, database_url, proxy, tmp_path):
    # The lock's session stays healthy; only the reply to the migration statement is lost.
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["CREATE TABLE r_1 (id int)"]),
                                        Rev("r0002", "r0001", ["SELECT pg_sleep(2)", "CREATE TABLE r_2 (id int)"])])
    proc = start_runner(runner_env(proxy.url(database_url), ini))
    pid = wait_for(lambda: sleeping_pid(postgres, database))
    proxy.half_open(link_of(proxy, postgres, pid))
    frozen = time.monotonic()
    result = finish(proc, timeout=60)
    assert result.returncode == 3, result
    assert time.monotonic() - frozen < 30
    assert "half-open" in result.output
    assert_consistent(database_url, [])
    no_locks_left(postgres, database)
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    assert_consistent(database_url, ["r0002"])


# -- the database restarts mid-migration --------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_restart_during_a_migration(tmp_path, mode):
    server = Postgres().start()
    try:
        server.create_role(RUNNER_ROLE, RUNNER_PASSWORD, "CREATEDB")
        server.create_database("app", RUNNER_ROLE)
        url = server.url("app", RUNNER_ROLE, RUNNER_PASSWORD)
        ini = slow_project(tmp_path / "p", seconds=8)
        proc = start_runner(runner_env(url, ini))
        wait_for(lambda: sleeping_pid(server, "app"))
        server.restart(mode)
        result = finish(proc, timeout=30)
        assert result.returncode == 3, result
        event = result.last["event"]
        assert "r0002" in event and ("lost" in event or "terminat" in event), event
        assert "Traceback" not in result.output
        again = run_runner(runner_env(url, ini))
        assert again.returncode == 0, again
        assert_consistent(url, ["r0002"])
        assert advisory_locks(server, "app") == []
    finally:
        server.destroy()


# -- fifty runners --------------------------------------------------------------------------
@pytest.mark.slow
def test_fifty_runners_on_a_fresh_database_with_200_revisions(postgres, tmp_path, record_property):
    ini = make_project(tmp_path / "p", chain(200))
    databases = []
    for _ in range(3):
        name = f"t_fifty_{len(databases)}_{os.getpid()}_{int(time.time() * 1000) % 100000}"
        postgres.create_database(name, RUNNER_ROLE)
        databases.append(name)
    single_db, fifty_db, noop_db = databases
    url = {name: postgres.url(name, RUNNER_ROLE, RUNNER_PASSWORD) for name in databases}

    started = time.monotonic()
    alone = run_runner(runner_env(url[single_db], ini), timeout=180)
    single = time.monotonic() - started
    assert alone.returncode == 0, alone

    def fifty(database: str) -> tuple[float, list, Monitor]:
        with Monitor(postgres, database, fragment="CREATE TABLE") as monitor:
            monitor.clients = 5  # the winner and some waiters
            begun = time.monotonic()
            # Each runner under its own application_name (its first login too, made before the runner sets it).
            procs = [start_runner(runner_env(url[database], ini, MIGRATE_LOCK_TIMEOUT="300",
                                             MIGRATE_APPLICATION_NAME=f"runner-{i}", PGAPPNAME=f"runner-{i}"))
                     for i in range(50)]
            results = finish_all(procs)
            return time.monotonic() - begun, results, monitor

    # The same fifty processes on a database already at heads: what starting them costs on this machine.
    assert run_runner(runner_env(url[noop_db], ini), timeout=180).returncode == 0
    noop, noop_results, _ = fifty(noop_db)
    assert all(r.returncode == 0 for r in noop_results)

    wall, results, monitor = fifty(fifty_db)
    assert [r.returncode for r in results] == [0] * 50, [r for r in results if r.returncode][:2]
    applied = [rev for r in results for rev in r.last.get("applied", [])]
    assert sorted(applied) == [f"r{i:04d}" for i in range(1, 201)]  # each revision exactly once
    assert sum(r.last["outcome"] == "upgraded" for r in results) == 1
    assert_consistent(url[fifty_db], ["r0200"])
    for name in databases:
        assert advisory_locks(postgres, name) == []
    # Waiters hold one connection each and poll: no flood. A runner holds two at most: the lock's and the
    # migration's, or, as it starts, the lock's and the spare that tells a transaction pooler (closed before
    # it waits). While the winner migrated with waiters connected, at some moment the winner and at most a few
    # runners still starting held two (under CI's load, one more was always starting: 2); the waiters, one each.
    # A spare kept while waiting gives about forty.
    assert monitor.peak_per_client <= 2, monitor.peak_per_client
    assert monitor.fewest_doubled is not None and monitor.fewest_doubled <= 5, (monitor.fewest_doubled,
                                                                                 monitor.samples)
    # Spares overlapping as fifty interpreters start on two cores; a spare held while waiting would give ~100.
    assert monitor.peak_connections <= 50 + 15, monitor.peak_connections
    record_property("single_runner_seconds", round(single, 2))
    record_property("fifty_runners_seconds", round(wall, 2))
    record_property("fifty_noop_runners_seconds", round(noop, 2))
    record_property("peak_connections", monitor.peak_connections)
    print(f"\nfifty runners: single {single:.1f}s, fifty {wall:.1f}s, fifty no-op {noop:.1f}s, "
          f"peak connections {monitor.peak_connections}, at most {monitor.peak_per_client} a runner, "
          f"{monitor.fewest_doubled} holding two while waiters polled ({monitor.samples} samples)")
    # Within 1.5x of one runner, once the cost of starting fifty interpreters on this machine's
    # cores (measured above on a migrated database) is set aside.
    assert wall <= 1.5 * max(single, noop) + 5, (single, noop, wall)


# -- CREATE INDEX CONCURRENTLY while others wait ----------------------------------------------
@pytest.mark.core
def test_create_index_concurrently_while_runners_wait(postgres, database, database_url, tmp_path):
    concurrently = Rev("r0002", "r0001", python='''
op.execute("SELECT pg_sleep(2)")
with op.get_context().autocommit_block():
    op.execute("CREATE INDEX CONCURRENTLY r_1_note ON r_1 (note)")
op.execute("CREATE TABLE r_2 (id int)")
''')
    ini = make_project(tmp_path / "p", [chain(1)[0], concurrently, *chain(3)[2:]])
    procs = [start_runner(runner_env(database_url, ini, MIGRATE_LOCK_TIMEOUT="60")) for _ in range(5)]
    results = finish_all(procs, timeout=90)
    assert [r.returncode for r in results] == [0] * 5, [r for r in results if r.returncode][:2]
    assert_consistent(database_url, ["r0003"])
    (valid,), = postgres.execute("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                 "WHERE c.relname = 'r_1_note'", database=database)
    assert valid
    assert advisory_locks(postgres, database) == []


# -- idle_session_timeout on the role ---------------------------------------------------------
def test_role_idle_session_timeout_shorter_than_the_migration(postgres, database, database_url, tmp_path):
    postgres.execute(f'ALTER ROLE "{RUNNER_ROLE}" IN DATABASE "{database}" SET idle_session_timeout = 2000')
    slow = Rev("r0001", None, python='''
import time
op.execute("CREATE TABLE r_1 (id int)")
time.sleep(5)
op.execute("SELECT pg_sleep(0.1)")
''')
    ini = make_project(tmp_path / "p", [slow, *chain(2)[1:]])
    with Monitor(postgres, database, fragment="CREATE TABLE") as monitor:
        procs = [start_runner(runner_env(database_url, ini)) for _ in range(2)]
        results = finish_all(procs, timeout=60)
    # It kept its lock (the lock's session turned the timeout off) or noticed the loss and stopped.
    for result in results:
        assert result.returncode in (0, 3), result
        if result.returncode == 3:
            assert "lock" in result.last["event"]
    assert monitor.peak_running <= 1
    assert any(r.returncode == 0 for r in results), results
    assert_consistent(database_url, ["r0002"])
    assert advisory_locks(postgres, database) == []


# -- live traffic: lock_timeout, retries, the blocking session named ----------------------------
def _traffic(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with psycopg.connect(url, autocommit=True, application_name="app-reader") as conn:
        while not stop.is_set():
            begun = time.monotonic()
            conn.execute("SELECT count(*) FROM r_1").fetchone()
            latencies.append(time.monotonic() - begun)
            time.sleep(0.02)


def _commit_at_second_attempt(url: str, holder: psycopg.Connection, timeout: float = 60) -> None:
    attempts, deadline = set(), time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as watcher:
        while len(attempts) < 2 and time.monotonic() < deadline:
            attempts |= {row[0] for row in watcher.execute(
                "SELECT query_start FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'ALTER TABLE r_1%'")}
            time.sleep(0.05)
    holder.commit()


@pytest.mark.core
@pytest.mark.parametrize("holder_leaves", [False, True])
def test_ddl_lock_timeout_retries_then_names_the_blocking_session(postgres, database, database_url, tmp_path,
                                                                   holder_leaves):
    ini = make_project(tmp_path / "p", chain(1))
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    alter = Rev("r0002", "r0001", ["ALTER TABLE r_1 ADD COLUMN extra int", "CREATE TABLE r_2 (id int)"])
    from .projects import add_revisions
    add_revisions(tmp_path / "p", [alter])

    stop, latencies = threading.Event(), []
    holder = psycopg.connect(database_url, application_name="app-holder")
    holder.execute("SELECT * FROM r_1 /* long report */").fetchall()  # ACCESS SHARE until commit
    reader = threading.Thread(target=_traffic, args=(database_url, stop, latencies), daemon=True)
    reader.start()
    if holder_leaves:
        # Once the runner's ALTER has given up once and waits again (a second statement start): not after a
        # fixed delay, which a loaded machine's slow start outlasts.
        threading.Thread(target=_commit_at_second_attempt, args=(database_url, holder), daemon=True).start()
    try:
        result = run_runner(runner_env(database_url, ini, MIGRATE_DDL_LOCK_TIMEOUT="1",
                                       MIGRATE_DDL_LOCK_RETRIES="3"), timeout=120)
    finally:
        stop.set()
        reader.join(10)
        holder.close()
    worst = max(latencies)
    print(f"\nworst application query while the DDL waited: {worst:.2f}s (lock_timeout 1s)")
    assert worst < 1 + 1.5, worst  # readers queue behind the DDL for at most about its lock_timeout
    retries = [r for r in result.records if "gave up waiting for a lock" in r["event"]]
    if not holder_leaves:
        assert result.returncode == 7, result
        assert len(retries) == 3
        event = result.last["event"]
        assert "r0002" in event and "55P03" in event and "MIGRATE_DDL_LOCK_RETRIES=3" in event
        assert "app-holder" in event and "long report" in event and "idle in transaction" in event
        assert_consistent(database_url, ["r0001"])
        assert "extra" not in _columns(database_url, "r_1")
    else:
        assert result.returncode == 0, result
        assert 1 <= len(retries) <= 3 and "app-holder" in retries[0]["event"]
        assert_consistent(database_url, ["r0002"])
        assert "extra" in _columns(database_url, "r_1")
    assert advisory_locks(postgres, database) == []


def _columns(url: str, table: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_name = %s", (table,))]


@pytest.mark.core
def test_retries_do_not_apply_to_other_failures(database_url, tmp_path):
    ini = make_project(tmp_path / "p", [Rev("r0001", None, ["SELECT 1/0"])])
    result = run_runner(runner_env(database_url, ini, MIGRATE_DDL_LOCK_TIMEOUT="1", MIGRATE_DDL_LOCK_RETRIES="3"))
    assert result.returncode == 7 and "22012" in result.last["event"], result
    assert not any("gave up waiting" in e for e in result.events())


# -- TLS -------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)


@pytest.fixture(scope="module")
def tls_server(postgres, tmp_path_factory):
    """The session's server behind a TLS endpoint whose certificate (for `localhost`) the tests make."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path_factory.mktemp("certs")
    _make_ca(certs, "right-ca")
    _make_ca(certs, "wrong-ca")
    (certs / "san.cnf").write_text("subjectAltName = DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
             "-out", "server.csr", cwd=certs)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "right-ca.crt", "-CAkey", "right-ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt", cwd=certs)
    with TlsTerminator(postgres.host, postgres.port, str(certs / "server.crt"), str(certs / "server.key")) as tls:
        yield tls, certs


@pytest.mark.core
@pytest.mark.parametrize("case", ["right", "wrong CA", "wrong host"])
def test_tls_verify_full(tls_server, postgres, database, database_url, tmp_path, case):
    tls, certs = tls_server
    host = "127.0.0.1" if case == "wrong host" else "localhost"
    ca = certs / ("wrong-ca.crt" if case == "wrong CA" else "right-ca.crt")
    url = (postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD, host=host, port=tls.port)
           + f"?sslmode=verify-full&sslrootcert={ca}")
    ini = make_project(tmp_path / "p", chain(2))
    started = time.monotonic()
    result = run_runner(runner_env(url, ini, MIGRATE_WAIT_TIMEOUT="60"))
    if case == "right":
        assert result.returncode == 0, result
        assert_consistent(database_url, ["r0002"])
    else:
        assert result.returncode == 3, result
        assert time.monotonic() - started < 15  # at once, not after MIGRATE_WAIT_TIMEOUT
        event = result.last["event"]
        assert "sslmode" in event, event
        assert RUNNER_PASSWORD not in result.output
        assert version_rows(database_url) == []
    assert advisory_locks(postgres, database) == []


# -- least privilege ------------------------------------------------------------------------
@pytest.mark.core
def test_migrator_role_succeeds_and_application_role_exits_7_naming_the_object(postgres, tmp_path):
    suffix = f"{os.getpid()}_{int(time.time() * 1000) % 100000}"
    db, migrator, app = f"t_priv_{suffix}", f"migrator_{suffix}", f"app_{suffix}"
    postgres.create_role(migrator, "migrator-pw")
    postgres.create_role(app, "app-pw")
    postgres.create_database(db)
    postgres.execute(f'CREATE SCHEMA app AUTHORIZATION "{migrator}"', database=db)
    postgres.execute(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC', database=db)
    for role in (migrator, app):
        postgres.execute(f'ALTER ROLE "{role}" IN DATABASE "{db}" SET search_path = app')
    ini = make_project(tmp_path / "p", chain(2))
    as_migrator = postgres.url(db, migrator, "migrator-pw")
    result = run_runner(runner_env(as_migrator, ini))
    assert result.returncode == 0, result
    postgres.execute(f'GRANT USAGE ON SCHEMA app TO "{app}"; GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA app '
                     f'TO "{app}"; GRANT USAGE ON ALL SEQUENCES IN SCHEMA app TO "{app}"', database=db)
    from .projects import add_revisions
    add_revisions(tmp_path / "p", [Rev("r0003", "r0002", ["INSERT INTO r_1 (note) VALUES ('half')",
                                                          "ALTER TABLE r_1 ADD COLUMN extra int"])])
    as_app = postgres.url(db, app, "app-pw")
    denied = run_runner(runner_env(as_app, ini))
    assert denied.returncode == 7, denied
    event = denied.last["event"]
    assert "r0003" in event and "42501" in event and "r_1" in event and "the database is at r0002" in event
    with psycopg.connect(as_migrator) as conn:
        assert conn.execute("SELECT count(*) FROM r_1").fetchone()[0] == 0  # nothing half done
    assert version_rows(as_migrator) == ["r0002"]
    assert advisory_locks(postgres, db) == []
    assert run_runner(runner_env(as_migrator, ini)).returncode == 0
    assert version_rows(as_migrator) == ["r0003"]


# -- signals in each phase (test_cli has SIGTERM while waiting and SIGKILL/SIGTERM in a revision) --
SLOW_ENV = '''
import os
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
connectable = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                 poolclass=pool.NullPool)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        connection.exec_driver_sql("SELECT pg_sleep(%s)" % os.environ.get("SLOW_ENV", "0"))
        context.run_migrations()
'''


@pytest.mark.core
@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_sigterm_inside_a_revision_cancels_it_whatever_the_driver(postgres, database, database_url, tmp_path, driver):
    # psycopg2 waits for a statement in C with Python's signal handler held back: the runner must
    # cancel the statement on the server itself, not wait for the driver to return.
    ini = slow_project(tmp_path / "p", seconds=60)
    use_driver(tmp_path / "p", driver)
    proc = start_runner(runner_env(database_url, ini))
    wait_for(lambda: sleeping_pid(postgres, database) or proc.poll() is not None)
    assert proc.poll() is None, finish(proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=60)
    assert result.returncode == 143, result
    assert time.monotonic() - sent < 15
    assert result.last["outcome"] == "interrupted"
    assert sleeping_pid(postgres, database) == 0
    assert_consistent(database_url, [])
    no_locks_left(postgres, database)


# SIGTERM while waiting for the database or the lock is in test_cli already.
@pytest.mark.core
@pytest.mark.parametrize("phase, signum", [
    ("waiting for the database", signal.SIGKILL), ("waiting for the lock", signal.SIGKILL),
    ("stamping", signal.SIGKILL), ("stamping", signal.SIGTERM),
])
def test_signal_in_each_phase(postgres, database, database_url, tmp_path, phase, signum):
    from .test_cli import _derived_key
    ini = make_project(tmp_path / "p", chain(2))
    holder = None
    if phase == "waiting for the database":
        env = runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", ini, MIGRATE_WAIT_TIMEOUT="60")
        proc = start_runner(env)
        time.sleep(2)
    elif phase == "waiting for the lock":
        holder = psycopg.connect(database_url, autocommit=True, application_name="holder")
        holder.execute("SELECT pg_advisory_lock(%s)", (_derived_key(database),))
        proc = start_runner(runner_env(database_url, ini))
        from .test_cli import running_runner
        wait_for(lambda: running_runner(postgres, database))
        time.sleep(1)  # polling the lock by now
    else:
        with psycopg.connect(database_url) as conn:
            conn.execute("CREATE TABLE legacy (id int)")
        (tmp_path / "p" / "migrations" / "env.py").write_text(SLOW_ENV)
        proc = start_runner(runner_env(database_url, ini, MIGRATE_BASELINE_REVISION="r0001", SLOW_ENV="30"))
        wait_for(lambda: sleeping_pid(postgres, database))
    proc.send_signal(signum)
    result = finish(proc, timeout=30)
    if holder is not None:
        holder.close()
    assert result.returncode == (-9 if signum == signal.SIGKILL else 143), result
    no_locks_left(postgres, database)
    wait_for(lambda: not running_query(postgres, database, "pg_sleep"), timeout=15)
    if phase == "waiting for the database":
        return
    assert version_rows(database_url) == []  # nothing stamped, nothing applied
    env = runner_env(database_url, ini, MIGRATE_BASELINE_REVISION="r0001")
    again = run_runner(env)
    assert again.returncode == 0, again
    assert version_rows(database_url) == ["r0002"]
    assert ("r_2" in tables(database_url)) and (phase != "stamping" or "r_1" not in tables(database_url))
    assert advisory_locks(postgres, database) == []
