"""Passwords that rotate: DATABASE_PASSWORD_FILE and MIGRATE_PASSWORD_COMMAND, fetched at every login.

Against the real server with password logins (scram-sha-256): the role's password
is changed under the runner, so a login with a stale password fails.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from . import envs
from .conftest import finish, run_runner, runner_env, start_runner, version_rows
from .postgres import SUPERUSER, SUPERUSER_PASSWORD
from .projects import chain, make_project, write_env


@pytest.fixture
def role(postgres) -> str:
    """A login role of this test's own, whose password the test rotates."""
    name = f"rot_{uuid.uuid4().hex[:10]}"
    postgres.create_role(name, "first-" + uuid.uuid4().hex)
    return name


@pytest.fixture
def owned(postgres, role) -> str:
    """A fresh database owned by `role`."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name, role)
    return name


def bare_url(postgres, database: str, role: str) -> str:
    """The URL without a password: the file or the command supplies it."""
    return f"postgresql://{role}@{postgres.host}:{postgres.port}/{database}"


def set_password(postgres, role: str, password: str) -> None:
    postgres.execute(f"ALTER ROLE \"{role}\" PASSWORD '{password}'")


def superuser_url(postgres, database: str) -> str:
    return postgres.url(database, SUPERUSER, SUPERUSER_PASSWORD)


# A password command as IAM token commands behave: a new token at every call. Each call also
# makes it the role's only valid password, so a login with an earlier one fails. It keeps
# every token it printed in a file, for the test to look for them in the output.
ROTATING = '''
import sys, uuid
import psycopg
n = len(open({issued!r}).read().splitlines()) if __import__("os").path.exists({issued!r}) else 0
token = f"tok/{{n + 1}}+" + uuid.uuid4().hex + "=&X-Amz-Signature"
with psycopg.connect({admin!r}, autocommit=True) as conn:
    conn.execute(psycopg.sql.SQL("ALTER ROLE {{}} PASSWORD {{}}").format(
        psycopg.sql.Identifier({role!r}), psycopg.sql.Literal(token)))
with open({issued!r}, "a") as f:
    f.write(token + "\\n")
print(token)
'''


def rotating_command(tmp_path: Path, postgres, role: str) -> tuple[str, Path]:
    """MIGRATE_PASSWORD_COMMAND for ROTATING (with arguments, as a CLI gets them), and its file of tokens."""
    issued = tmp_path / "issued"
    script = tmp_path / "issue_token.py"
    script.write_text(ROTATING.format(issued=str(issued), admin=superuser_url(postgres, "postgres"), role=role))
    return shlex.join([sys.executable, str(script), "--region", "eu-west-1"]), issued


def tokens(issued: Path) -> list[str]:
    return issued.read_text().splitlines() if issued.exists() else []


def assert_never_shown(secrets: list[str], result, termination: Path | None = None) -> None:
    shown = result.output + (termination.read_text() if termination is not None and termination.exists() else "")
    for secret in secrets:
        assert secret not in shown


def test_the_password_file_is_read_again_at_every_login(postgres, role, owned, tmp_path):
    ini = make_project(tmp_path / "p", chain(2))
    first, second = "file-one-" + uuid.uuid4().hex, "file-two-" + uuid.uuid4().hex
    set_password(postgres, role, first)
    secret = tmp_path / "password"
    secret.write_text(first + "\n")  # as Secrets are often written: the newline is not part of it
    termination = tmp_path / "termination"
    # `wait` logs in at every poll: through env.py's own engine, and the runner's first session.
    waiting = start_runner(runner_env(bare_url(postgres, owned, role), ini, DATABASE_PASSWORD_FILE=secret,
                                      MIGRATE_WAIT_TIMEOUT="60", MIGRATE_TERMINATION_LOG=termination), "wait")
    seen = []
    for line in waiting.stdout:
        seen.append(line)
        if "database is fresh" in line:
            break
    assert waiting.poll() is None, "".join(seen)
    # Rotated as Vault's agent or a CSI driver does: the old password stops working at once.
    set_password(postgres, role, second)
    replacement = tmp_path / "password.new"
    replacement.write_text(second + "\n")
    replacement.replace(secret)
    time.sleep(1.5)  # several polls log in with the new password meanwhile
    upgraded = run_runner(runner_env(bare_url(postgres, owned, role), ini, DATABASE_PASSWORD_FILE=secret))
    assert upgraded.returncode == 0, upgraded
    result = finish(waiting, timeout=60)
    result.stdout = "".join(seen) + result.stdout
    assert result.returncode == 0, result
    assert result.last["outcome"] == "current"
    assert version_rows(superuser_url(postgres, owned)) == ["r0002"]
    assert_never_shown([first, second], result, termination)
    assert_never_shown([first, second], upgraded)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "asyncpg", "pg8000", "psycopg_async"])
def test_every_login_runs_the_command_and_uses_its_fresh_password(postgres, role, owned, tmp_path, driver):
    root = tmp_path / "p"
    ini = make_project(root, chain(3))
    write_env(root, envs.own_engine(driver))  # env.py builds its own engine with this driver
    command, issued = rotating_command(tmp_path, postgres, role)
    termination = tmp_path / "termination"
    result = run_runner(runner_env(bare_url(postgres, owned, role), ini, MIGRATE_PASSWORD_COMMAND=command,
                                   MIGRATE_TERMINATION_LOG=termination, MIGRATE_LOG_LEVEL="DEBUG"))
    assert result.returncode == 0, result
    assert result.last["applied"] == ["r0001", "r0002", "r0003"]
    # Each token replaced the last on the server: a login reusing one would have been refused.
    # The runner's first session, its lock session and env.py's engine logged in at least.
    issued_tokens = tokens(issued)
    assert len(issued_tokens) >= 3, issued_tokens
    assert len(set(issued_tokens)) == len(issued_tokens)
    assert_never_shown(issued_tokens, result, termination)
    assert "eu-west-1" not in result.output
    # The summary's read-back and a second run (at heads) need fresh tokens too.
    again = run_runner(runner_env(bare_url(postgres, owned, role), ini, MIGRATE_PASSWORD_COMMAND=command), "check")
    assert again.returncode == 0, again
    assert len(tokens(issued)) > len(issued_tokens)
    assert_never_shown(tokens(issued), again)


def test_the_url_env_py_receives_holds_no_password(postgres, role, owned, tmp_path):
    """env.py that passes sqlalchemy.url on as it is gets no stale password to reuse; it logs in all the same."""
    root = tmp_path / "p"
    ini = make_project(root, chain(1))
    env_py = root / "migrations" / "env.py"
    seen = tmp_path / "seen-url"
    env_py.write_text(env_py.read_text().replace(
        "config = context.config\n",
        f"config = context.config\nopen({str(seen)!r}, 'w').write(config.get_main_option('sqlalchemy.url'))\n", 1))
    command, issued = rotating_command(tmp_path, postgres, role)
    result = run_runner(runner_env(bare_url(postgres, owned, role), ini, MIGRATE_PASSWORD_COMMAND=command))
    assert result.returncode == 0, result
    assert seen.read_text() == f"postgresql+psycopg://{role}@{postgres.host}:{postgres.port}/{owned}"


def failing_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "cli.py"
    script.write_text(body)
    return script


def test_a_failing_command_is_exit_3_with_its_first_stderr_line_and_no_secret(postgres, role, owned, tmp_path):
    ini = make_project(tmp_path / "p", chain(1))
    leaked = "stdout-secret-" + uuid.uuid4().hex
    script = failing_script(tmp_path, f'''
import sys
print({leaked!r})
sys.stderr.write("\\nAn error occurred (ExpiredToken) when calling the generate-db-auth-token operation\\nsecond line\\n")
sys.exit(254)
''')
    termination = tmp_path / "termination"
    command = shlex.join([sys.executable, str(script), "--profile", "arg-secret-" + leaked])
    started = time.monotonic()
    result = run_runner(runner_env(bare_url(postgres, owned, role), ini, MIGRATE_PASSWORD_COMMAND=command,
                                   MIGRATE_WAIT_TIMEOUT="2", MIGRATE_TERMINATION_LOG=termination))
    assert result.returncode == 3, result
    assert time.monotonic() - started < 60
    event = result.last["event"]
    program = os.path.basename(sys.executable)
    assert (f"MIGRATE_PASSWORD_COMMAND: {program} failed (exit 254): An error occurred (ExpiredToken) when calling "
            f"the generate-db-auth-token operation") in event, event
    assert "second line" not in event
    # Retried within MIGRATE_WAIT_TIMEOUT, like a database not up yet: a token service can be briefly down.
    assert any("not ready" in e and "ExpiredToken" in e for e in result.events()), result
    assert_never_shown([leaked], result, termination)
    assert json.loads(termination.read_text())["exit_code"] == 3
    assert version_rows(superuser_url(postgres, owned)) == []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


HANGING = '''
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
open({pids!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
sys.stdout.write("partial-" + "token")
sys.stdout.flush()
time.sleep(600)
'''


def hanging_command(tmp_path: Path) -> tuple[str, Path]:
    pids = tmp_path / "pids"
    script = tmp_path / "hang.py"
    script.write_text(HANGING.format(pids=str(pids)))
    return shlex.join([sys.executable, str(script)]), pids


def test_a_hanging_command_is_killed_with_what_it_started_and_is_exit_3(postgres, role, owned, tmp_path):
    ini = make_project(tmp_path / "p", chain(1))
    command, pids = hanging_command(tmp_path)
    started = time.monotonic()
    result = run_runner(runner_env(bare_url(postgres, owned, role), ini, MIGRATE_PASSWORD_COMMAND=command,
                                   MIGRATE_PASSWORD_COMMAND_TIMEOUT="1", MIGRATE_WAIT_TIMEOUT="1"), timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 3, result
    assert took < 30, took
    assert "did not finish within 1s (MIGRATE_PASSWORD_COMMAND_TIMEOUT); killed" in result.last["event"]
    assert "partial-token" not in result.output
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), pid


def test_sigterm_while_the_command_runs_kills_it_too(postgres, role, owned, tmp_path):
    ini = make_project(tmp_path / "p", chain(1))
    command, pids = hanging_command(tmp_path)
    runner = start_runner(runner_env(bare_url(postgres, owned, role), ini, MIGRATE_PASSWORD_COMMAND=command,
                                     MIGRATE_PASSWORD_COMMAND_TIMEOUT="120"))
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        assert runner.poll() is None, finish(runner)
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)
    result = finish(runner, timeout=30)
    assert result.returncode == 143, result
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), pid


@pytest.mark.parametrize("case", ["both", "url-password", "query-password", "not-found", "unbalanced-quote"])
def test_conflicting_or_unusable_settings_are_exit_2_before_any_login(postgres, role, owned, tmp_path, case):
    ini = make_project(tmp_path / "p", chain(1))
    secret = tmp_path / "password"
    secret.write_text("in-the-file-pw\n")
    url = bare_url(postgres, owned, role)
    extra = {"DATABASE_PASSWORD_FILE": secret}
    if case == "both":
        extra["MIGRATE_PASSWORD_COMMAND"] = "echo x"
    elif case == "url-password":
        url = url.replace(f"{role}@", f"{role}:url-secret-pw@")
    elif case == "query-password":
        url += "?password=url-secret-pw"
    elif case == "not-found":
        extra = {"MIGRATE_PASSWORD_COMMAND": "no-such-token-cli-here generate --token tok-secret-pw"}
    else:
        extra = {"MIGRATE_PASSWORD_COMMAND": "aws rds generate-db-auth-token --secret 'tok-secret-pw"}
    result = run_runner(runner_env(url, ini, **extra))
    assert result.returncode == 2, result
    event = result.last["event"]
    expected = {"both": "DATABASE_PASSWORD_FILE and MIGRATE_PASSWORD_COMMAND are both set",
                "url-password": "DATABASE_URL holds a password too",
                "query-password": "DATABASE_URL holds a password too",
                "not-found": "MIGRATE_PASSWORD_COMMAND: no-such-token-cli-here is not found",
                "unbalanced-quote": "MIGRATE_PASSWORD_COMMAND: not a command line"}[case]
    assert expected in event, event
    for secret_text in ("url-secret-pw", "tok-secret-pw", "in-the-file-pw"):
        assert secret_text not in result.output
    assert not any("is up" in e for e in result.events())


def test_a_file_that_lags_the_rotation_is_waited_for(postgres, role, owned, tmp_path):
    """A Kubernetes Secret volume shows a new password up to a minute after the server has it: the refused
    logins meanwhile are retried within MIGRATE_WAIT_TIMEOUT, reading the file again each time."""
    ini = make_project(tmp_path / "p", chain(1))
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    secret = tmp_path / "password"
    secret.write_text(old + "\n")
    set_password(postgres, role, new)  # rotated on the server; the file not yet
    runner = start_runner(runner_env(bare_url(postgres, owned, role), ini, DATABASE_PASSWORD_FILE=secret,
                                     MIGRATE_WAIT_TIMEOUT="60"))
    time.sleep(4)  # past the fast path's login (refused too) to the full path's retries, on a busy machine
    assert runner.poll() is None, finish(runner)
    secret.write_text(new + "\n")
    result = finish(runner, timeout=60)
    assert result.returncode == 0, result
    assert any("not ready" in e and "authentication failed" in e for e in result.events()), result
    assert result.last["applied"] == ["r0001"]
    assert_never_shown([old, new], result)


def test_without_a_rotating_source_a_refused_password_is_not_retried(postgres, role, owned, tmp_path):
    ini = make_project(tmp_path / "p", chain(1))
    url = bare_url(postgres, owned, role).replace(f"{role}@", f"{role}:wrong-pw@")
    started = time.monotonic()
    result = run_runner(runner_env(url, ini, MIGRATE_WAIT_TIMEOUT="60"))
    assert result.returncode == 3, result
    assert time.monotonic() - started < 30
    assert "authentication failed" in result.last["event"]
    assert not any("not ready" in e for e in result.events())


def test_a_missing_password_file_is_waited_for_then_exit_3(postgres, role, owned, tmp_path):
    """A Vault agent beside the runner may write the file after the runner starts: it is waited for."""
    ini = make_project(tmp_path / "p", chain(1))
    secret = tmp_path / "vault" / "password"
    password = "late-" + uuid.uuid4().hex
    set_password(postgres, role, password)
    env = runner_env(bare_url(postgres, owned, role), ini, DATABASE_PASSWORD_FILE=secret, MIGRATE_WAIT_TIMEOUT="1")
    missing = run_runner(env)
    assert missing.returncode == 3, missing
    assert f"DATABASE_PASSWORD_FILE: cannot read {secret}: No such file or directory" in missing.last["event"]
    env["MIGRATE_WAIT_TIMEOUT"] = "60"
    runner = start_runner(env)
    time.sleep(2)
    assert runner.poll() is None, finish(runner)
    secret.parent.mkdir()
    secret.write_text(password)  # no newline: used as it is
    result = finish(runner, timeout=60)
    assert result.returncode == 0, result
    assert result.last["applied"] == ["r0001"]
    assert_never_shown([password], result)


@pytest.mark.parametrize("params, gets_it", [
    ({"user": "app", "host": "db-0"}, True),
    ({"user": "app", "host": "db-0,db-1"}, True),  # psycopg's multi-host list
    ({"user": "app", "host": ["db-1"]}, True),  # asyncpg's
    ({"user": "app", "host": "scratch.elsewhere"}, False),  # the same user name on another server
    ({"user": "app", "host": ["db-0", "elsewhere"]}, False),
    ({"user": "other", "host": "db-0"}, False),
    ({"user": "app", "host": "db-0", "password": "its-own"}, False),
])
def test_only_logins_to_the_urls_servers_as_its_user_get_the_password(tmp_path, monkeypatch, params, gets_it):
    from sqlalchemy.engine import make_url

    from runner import credentials
    from runner.settings import Settings

    secret = tmp_path / "password"
    secret.write_text("rotated-secret\n")
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(secret))
    monkeypatch.setattr(credentials, "_source", None)
    credentials.configure(Settings(), make_url("postgresql://app@/shop?host=db-0:5432&host=db-1:5432"))
    filled = credentials.fill(dict(params))
    assert (filled.get("password") == "rotated-secret") is gets_it, filled
