"""Passwords that rotate: DATABASE_PASSWORD_FILE read, or MIGRATE_PASSWORD_COMMAND run, at every login.

A short-lived credential (an IAM token from `aws rds generate-db-auth-token`,
`gcloud sql generate-login-token` or `az account get-access-token`, a file a
Vault agent or a CSI driver rewrites) must be fetched when a connection logs
in, not once at start: a run can outlast a token. So the URL holds no password
and every login gets a fresh one: the engines env.py builds itself from
sqlalchemy.url (psycopg 3 or 2, asyncpg, pg8000, sync or async) through
SQLAlchemy's `do_connect` event, listened on every dialect; the runner's own
sessions, which do not go through SQLAlchemy, by calling `fill` as they connect
(`sessions.connect`). Only a login without a password of its own, as the URL's
user, gets it: a token is never handed to another role's login.

The command runs without a shell (`shlex.split`; write `sh -c '...'` for a
pipeline), in a process group of its own that is killed whole after
MIGRATE_PASSWORD_COMMAND_TIMEOUT. Its stdout is the password and is never
shown; a failure is one line naming the program (not its arguments, which may
hold secrets) and the first line of its stderr. Every password is registered
with `log.add_secret` before it is used, so no output ever shows it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from . import database, log
from .errors import ConfigError, DatabaseUnreachable

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

FILE = "DATABASE_PASSWORD_FILE"
COMMAND = "MIGRATE_PASSWORD_COMMAND"


class Unavailable(DatabaseUnreachable):
    """No password this time (the command failed or hung, the file is missing or empty).

    Exit 3, like a database not up yet: a token service can be briefly down, and a
    Vault agent may write the file after the runner starts. The wait for the database
    retries it within MIGRATE_WAIT_TIMEOUT.
    """


@dataclass(frozen=True)
class Source:
    """Where each login's password comes from, and whose logins get it."""

    user: str | None
    hosts: frozenset[str] = frozenset()  # the URL's servers: no other server is sent the password
    file: Path | None = None
    command: tuple[str, ...] = ()
    timeout: float = 30.0

    def fetch(self) -> str:
        """A fresh password, registered for masking before anyone uses it."""
        password = _read(self.file) if self.file is not None else _run(self.command, self.timeout)
        log.add_secret(password)
        return password


_source: Source | None = None
_listening = False


def configure(settings, url: URL, *, engines: bool = True) -> None:
    """Take the password source from the settings, for the URL DATABASE_URL gives; exit 2 on a conflict.
    `engines=False`: for the runner's own sessions only, leaving SQLAlchemy unimported (fastpath)."""
    global _source, _listening
    file, command = settings.database_password_file, settings.password_command
    if file is None and command is None:
        _source = None
        return
    if file is not None and command is not None:
        raise ConfigError(f"{FILE} and {COMMAND} are both set; set at most one")
    name = FILE if file is not None else COMMAND
    user = url.username or url.query.get("user")  # whose logins get the password
    hosts = frozenset(host for host, _ in database.hosts(url) if host)
    if url.password or url.query.get("password"):
        raise ConfigError(f"{name} is set, but DATABASE_URL holds a password too; leave the password out of the URL "
                          f"(each login takes it from {name})")
    if command is not None:
        try:
            argv = tuple(shlex.split(command))
        except ValueError as e:  # an unclosed quote; the text is never echoed, it may hold a secret
            raise ConfigError(f"{COMMAND}: not a command line ({e})") from None
        if not argv:
            raise ConfigError(f"{COMMAND}: the command is empty")
        if shutil.which(argv[0]) is None:
            raise ConfigError(f"{COMMAND}: {os.path.basename(argv[0])} is not found on PATH or not executable; "
                              f"install it in the image (a derived image)")
        _source = Source(user, hosts, command=argv, timeout=settings.password_command_timeout)
    else:
        _source = Source(user, hosts, file=file)
    if engines and not _listening:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        # On the Engine class: every dialect, whichever engine env.py builds and whenever.
        event.listen(Engine, "do_connect", _on_connect)
        _listening = True


def fill(params: dict) -> dict:
    """Give connection parameters a fresh password when they have none and log in as the URL's user
    to the URL's servers (a scratch database elsewhere, with the same user name, gets none)."""
    source = _source
    if (source is not None and not params.get("password") and params.get("user") == source.user
            and _servers(params) <= source.hosts):
        params["password"] = source.fetch()
    return params


def _servers(params: dict) -> frozenset[str]:
    """The hosts connection parameters name: libpq's comma list, asyncpg's list, or one."""
    host = params.get("host")
    if host is None:
        return frozenset()
    items = host if isinstance(host, (list, tuple)) else str(host).split(",")
    return frozenset(str(item).strip() for item in items if str(item).strip())


def cured_by_waiting(error: BaseException) -> bool:
    """Whether the password, not the database, failed this login in a way the next fetch may cure."""
    return isinstance(error, Unavailable) or may_be_stale(error)


def may_be_stale(error: BaseException) -> bool:
    """Whether a refused login may only have raced a rotation, so that the next fetch can cure it.

    The file is rewritten a while after the server's password changes (a Kubernetes Secret
    volume lags by up to a minute), and a token can expire between its making and its use:
    while waiting for the database, such a refusal is waited out like a database not up yet.
    """
    return _source is not None and "authentication failed" in str(getattr(error, "orig", None) or error)


def _on_connect(dialect, connection_record, cargs, cparams) -> None:
    fill(cparams)


def _read(path: Path) -> str:
    """The file's content without one trailing newline (a Secret is often written with one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Unavailable(f"{FILE}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise Unavailable(f"{FILE}: {path} is not UTF-8 text") from None
    password = _one_line(text)
    if not password:
        raise Unavailable(f"{FILE}: {path} is empty")
    return password


def _one_line(text: str) -> str:
    """`text` without one trailing newline (\\n or \\r\\n); anything else is kept as it is."""
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def _run(argv: tuple[str, ...], timeout: float) -> str:
    """Run the command once; its stdout, less one trailing newline, is the password."""
    program = os.path.basename(argv[0])
    where = f"{COMMAND}: {program}"
    try:
        # A session of its own: a timeout kills the command and whatever it started (a pipeline's
        # shell, a CLI's helper processes), not just its first process.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except FileNotFoundError:
        raise ConfigError(f"{where} is not found; install it in the image (a derived image)") from None
    except PermissionError:
        raise ConfigError(f"{where} is not executable") from None
    except OSError as e:
        raise Unavailable(f"{where} could not be started: {e.strerror}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise Unavailable(f"{where} did not finish within {timeout:g}s (MIGRATE_PASSWORD_COMMAND_TIMEOUT); "
                          f"killed") from None
    except BaseException:  # SIGTERM or SIGINT meanwhile: the command must not outlive the runner
        _kill(proc)
        raise
    if proc.returncode != 0:
        how = f"killed by {_signal_name(-proc.returncode)}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise Unavailable(f"{where} failed ({how}): {_first_line(err) or 'nothing on stderr'}")
    try:
        password = _one_line(out.decode("utf-8"))
    except UnicodeDecodeError:
        raise Unavailable(f"{where} printed something that is not UTF-8 text on stdout") from None
    if not password:
        raise Unavailable(f"{where} printed nothing on stdout (exit 0): {_first_line(err) or 'nothing on stderr'}")
    if "\n" in password:
        # A CLI printing a notice on stdout: sending it as a password would only fail the login.
        log.add_secret(password)
        raise Unavailable(f"{where} printed several lines on stdout; it must print the password alone")
    return password


def _kill(proc: subprocess.Popen) -> None:
    """Kill the command's whole process group and reap it, without waiting on a descendant that escaped."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a descendant in another session still holds the pipes
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait()


def _first_line(data: bytes) -> str:
    """The first non-blank line of the command's stderr, shortened; of a Python traceback (the
    CLIs of AWS, Google Cloud and Azure are Python programs) its last line, which says what failed."""
    lines = [" ".join(line.split()) for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]
    return line if len(line) <= 300 else line[:300] + "..."


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
