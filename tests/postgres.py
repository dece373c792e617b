"""A real PostgreSQL 16 server from the pgserver wheel, on 127.0.0.1, with password logins.

pgserver itself only offers a socket-only server; the tests need TCP (for the
fault proxy and TLS), password authentication (for wrong-password cases) and
restarts, so this drives the wheel's initdb/pg_ctl directly. As root the server
runs as the `pgserver` system user, which pgserver's own helpers create.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import psycopg.sql
from pgserver._commands import POSTGRES_BIN_PATH

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "super-secret-pw"
SYSTEM_USER = "pgserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_root() -> bool:
    return os.geteuid() == 0


def _prepare_root() -> None:
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
    import stat

    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", read | execute)


class Postgres:
    """One server: start, stop (fast or immediate), restart, and URLs to reach it."""

    def __init__(self, port: int | None = None, settings: dict | None = None) -> None:
        # Not under pytest's tmp_path: that is private to root, and the server runs as another user.
        self.base = Path(tempfile.mkdtemp(prefix="mr-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "socket"
        self.log = self.base / "server.log"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.settings = {"max_connections": "300", "fsync": "off", "synchronous_commit": "off",
                         "full_page_writes": "off", **(settings or {})}

    # -- lifecycle ---------------------------------------------------------
    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        kwargs = {"user": SYSTEM_USER} if _as_root() else {}
        proc = subprocess.run([str(POSTGRES_BIN_PATH / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")
        return proc

    def init(self) -> "Postgres":
        if _as_root():
            _prepare_root()
        self.base.chmod(0o755)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if _as_root():
            owner = pwd.getpwnam(SYSTEM_USER)
            for path in (self.base, self.socket_dir, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync")
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            for name, value in self.settings.items():
                conf.write(f"{name} = '{value}'\n")
        return self

    def start(self) -> "Postgres":
        if not (self.data / "PG_VERSION").exists():
            self.init()
        options = f"-h {self.host} -p {self.port} -k {self.socket_dir}"
        if _as_root():
            self.log.touch(exist_ok=True)
            os.chown(self.log, *_ids())
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start")
        # A script that dies before its own cleanup must not leave a server running.
        atexit.register(self.destroy)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        if self.base.exists():
            self.stop("immediate")
            _remove_in_background(self.base)

    # -- access ------------------------------------------------------------
    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD,
            host: str | None = None, port: int | None = None) -> str:
        from urllib.parse import quote

        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host or self.host}:{port or self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs) -> psycopg.Connection:
        return psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, password=SUPERUSER_PASSWORD,
                               dbname=database, autocommit=True, **kwargs)

    def execute(self, sql: str, database: str = "postgres", params=None) -> list[tuple]:
        with self.connect(database) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str, owner: str = SUPERUSER) -> None:
        self.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')

    def create_role(self, name: str, password: str, extra: str = "") -> None:
        with self.connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(f'{verb} ROLE "{name}" LOGIN PASSWORD {psycopg.sql.quote(password)} {extra}')


def _remove_in_background(path: Path) -> None:
    """Remove a stopped server's directory without waiting: the data directory of a session's few hundred
    databases is tens of thousands of files, which took up to two minutes to delete on a busy disk here.
    It is renamed at once (so nothing finds it), then deleted by an `rm` that outlives this process."""
    trash = path.with_name(path.name + "-removing")
    try:
        path.rename(trash)
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" >/dev/null 2>&1 &', "sh", str(trash)], check=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        shutil.rmtree(trash if trash.exists() else path, ignore_errors=True)


# -- replication --------------------------------------------------------------
def standby_of(primary: Postgres) -> Postgres:
    """A hot standby streaming from `primary`, started: `pg_basebackup -R` with the wheel's binaries.

    initdb's pg_hba.conf lets the superuser replicate over the local socket (trust), and the
    defaults (wal_level=replica, max_wal_senders=10) let the primary send; -R writes
    standby.signal and a primary_conninfo naming the primary's socket.
    """
    standby = Postgres(settings=primary.settings)
    standby.base.chmod(0o755)
    standby.socket_dir.mkdir(exist_ok=True)
    if _as_root():
        for path in (standby.base, standby.socket_dir):
            os.chown(path, *_ids())
    standby._run("pg_basebackup", "-h", str(primary.socket_dir), "-p", str(primary.port), "-U", SUPERUSER,
                 "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync", timeout=120)
    return standby.start()


def in_recovery(server: Postgres) -> bool:
    return server.execute("SELECT pg_is_in_recovery()")[0][0]


def promote(standby: Postgres) -> None:
    """Make the standby a primary (what a failover manager does), returning once it accepts writes."""
    standby._run("pg_ctl", "-D", str(standby.data), "-w", "-t", "60", "promote")


def wait_for_replay(standby: Postgres, primary: Postgres, timeout: float = 60) -> None:
    """Until the standby has replayed all the primary has written so far (synchronous_commit is off here)."""
    import time

    # The insert position: with synchronous_commit off a commit may not be written out yet.
    target = primary.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0]
    deadline = time.monotonic() + timeout
    while not standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", params=(target,))[0][0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the standby did not replay up to {target} within {timeout:g}s")
        time.sleep(0.05)


def _ids() -> tuple[int, int]:
    owner = pwd.getpwnam(SYSTEM_USER)
    return owner.pw_uid, owner.pw_gid
