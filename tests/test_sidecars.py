"""MIGRATE_QUIT_URLS: real HTTP servers standing in for the sidecars, told to quit once whatever the exit code."""

from __future__ import annotations

import base64
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from runner import sidecars

from .conftest import advisory_locks, finish, run_runner, runner_env, start_runner, version_rows
from .postgres import free_port
from .test_cli import _derived_key, running_runner, wait_for


class Sidecar:
    """An HTTP server recording each request (method, path, Authorization, monotonic time);
    on_request() is called as each arrives, before the answer."""

    def __init__(self, status: int = 200, on_request=None) -> None:
        self.requests: list[tuple[str, str, str | None, float]] = []
        sidecar = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                sidecar.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                         time.monotonic()))
                if on_request:
                    on_request()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/quitquitquit"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Hanging:
    """A server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/quitquitquit"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def sidecar():
    server = Sidecar()
    yield server
    server.close()


def closed_url() -> str:
    """A database URL on a closed port: connecting would be exit 3."""
    return f"postgresql://u:pw@127.0.0.1:{free_port()}/db"


def assert_summary_last(result, code: int) -> None:
    assert result.returncode == code, result
    assert result.last["exit_code"] == code and "outcome" in result.last, result


# -- told once, whatever the exit code ---------------------------------------------------
def test_told_once_on_success_after_the_lock_is_released(database_url, project, postgres, database):
    locks_at_post = []
    server = Sidecar(on_request=lambda: locks_at_post.append(advisory_locks(postgres, database)))
    try:
        result = run_runner(runner_env(database_url, project, MIGRATE_QUIT_URLS=server.url))
    finally:
        server.close()
    assert_summary_last(result, 0)
    assert result.last["outcome"] == "upgraded" and version_rows(database_url) == ["r0003"]
    assert server.calls() == [("POST", "/quitquitquit")]
    assert server.requests[0][2] is None  # no credentials in the URL, none sent
    assert locks_at_post == [[]]  # the lock was released before the sidecar was told
    told = [r for r in result.records if "told to quit" in r["event"]]
    assert len(told) == 1 and told[0]["quit_url"] == server.url and "HTTP 200" in told[0]["event"]


def test_told_once_when_the_database_is_unreachable(project, sidecar):
    result = run_runner(runner_env(closed_url(), project, MIGRATE_WAIT_TIMEOUT="1",
                                   MIGRATE_QUIT_URLS=sidecar.url))
    assert_summary_last(result, 3)
    assert sidecar.calls() == [("POST", "/quitquitquit")]


@pytest.mark.parametrize("args, extra", [
    ((), {"MIGRATE_WAIT_TIMEOUT": "soon"}),  # the settings never built
    (("frobnicate",), {}),                   # a usage error, before the settings are read
    (("downgrade",), {}),                    # no revision given
])
def test_told_once_on_a_configuration_error(project, sidecar, args, extra):
    result = run_runner(runner_env(closed_url(), project, MIGRATE_QUIT_URLS=sidecar.url, **extra), *args)
    assert_summary_last(result, 2)
    assert sidecar.calls() == [("POST", "/quitquitquit")]


def test_told_once_on_sigterm_while_waiting_for_the_database(project, sidecar):
    proc = start_runner(runner_env(closed_url(), project, MIGRATE_WAIT_TIMEOUT="60",
                                   MIGRATE_QUIT_URLS=sidecar.url))
    time.sleep(2)
    assert sidecar.requests == []  # not before the run ends
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=15)
    assert_summary_last(result, 143)
    assert sidecar.calls() == [("POST", "/quitquitquit")] and sidecar.requests[0][3] > sent


def test_told_once_on_sigterm_while_waiting_for_the_lock(database_url, project, postgres, database, sidecar):
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_derived_key(database),))
        proc = start_runner(runner_env(database_url, project, MIGRATE_QUIT_URLS=sidecar.url))
        wait_for(lambda: len(advisory_locks(postgres, database)) == 1 and running_runner(postgres, database))
        time.sleep(0.5)
        assert sidecar.requests == []
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=30)
    assert_summary_last(result, 143)
    assert sidecar.calls() == [("POST", "/quitquitquit")]
    assert version_rows(database_url) == []


def test_every_url_is_told_once(project):
    istio, proxy = Sidecar(), Sidecar()
    try:
        # Whitespace and commas both separate.
        urls = f" {istio.url},{proxy.url.replace('/quitquitquit', '/other')}\n"
        result = run_runner(runner_env(None, project, MIGRATE_QUIT_URLS=urls), "heads")
    finally:
        istio.close()
        proxy.close()
    assert_summary_last(result, 0)
    assert istio.calls() == [("POST", "/quitquitquit")] and proxy.calls() == [("POST", "/other")]


# -- a sidecar that does not answer changes nothing ----------------------------------------
@pytest.mark.parametrize("failure", ["closed port", "never answers", "HTTP 503", "redirect"])
def test_a_failing_sidecar_is_one_warning_and_the_exit_code_is_unchanged(database_url, project, sidecar, failure):
    if failure == "closed port":
        dead, close = f"http://127.0.0.1:{free_port()}/quitquitquit", lambda: None
    elif failure == "never answers":
        hanging = Hanging()
        dead, close = hanging.url, hanging.close
    else:
        server = Sidecar(status=503 if failure == "HTTP 503" else 302)
        dead, close = server.url, server.close
    started = time.monotonic()
    try:
        result = run_runner(runner_env(database_url, project, MIGRATE_QUIT_URLS=f"{dead} {sidecar.url}"), timeout=60)
    finally:
        close()
    elapsed = time.monotonic() - started
    assert_summary_last(result, 0)
    assert elapsed < 20, elapsed
    if failure == "never answers":
        assert hanging.accepted, "the runner never connected"
    if failure in ("HTTP 503", "redirect"):
        assert server.calls() == [("POST", "/quitquitquit")]
    assert sidecar.calls() == [("POST", "/quitquitquit")]  # the others are told all the same
    warnings = [r for r in result.records if r["level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["quit_url"] == dead and dead in warnings[0]["event"], warnings
    words = {"closed port": "refused", "never answers": "within", "HTTP 503": "HTTP 503", "redirect": "HTTP 302"}
    assert words[failure] in warnings[0]["event"] or "timed out" in warnings[0]["event"], warnings


def test_a_second_sigterm_stops_the_wait_for_the_sidecars_not_the_summary(project):
    hanging = Hanging()
    try:
        proc = start_runner(runner_env(closed_url(), project, MIGRATE_WAIT_TIMEOUT="60",
                                       MIGRATE_QUIT_URLS=hanging.url))
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: hanging.accepted, timeout=10, interval=0.02)
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=15)
    finally:
        hanging.close()
    assert_summary_last(result, 143)
    assert "not told to quit" in result.records[-2]["event"] and "SIGTERM" in result.records[-2]["event"], result


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_password_in_the_url_is_sent_but_never_shown(project, sidecar, fmt):
    port = sidecar.url.split(":")[2].split("/")[0]
    good = f"http://admin:s3cr%40t-pw@127.0.0.1:{port}/quitquitquit?token=t0ken-value"
    dead = f"http://admin:s3cr%40t-pw@127.0.0.1:{free_port()}/quitquitquit"
    result = run_runner(runner_env(None, project, MIGRATE_QUIT_URLS=f"{good},{dead}", MIGRATE_LOG_FORMAT=fmt),
                        "heads")
    assert result.returncode == 0, result
    assert sidecar.calls() == [("POST", "/quitquitquit?token=t0ken-value")]
    assert sidecar.requests[0][2] == "Basic " + base64.b64encode(b"admin:s3cr@t-pw").decode()
    warning = next(line for line in result.output.splitlines() if "not told to quit" in line)
    assert f"http://***@127.0.0.1:{dead.split(':')[3]}" in warning
    for secret in ("s3cr", "admin", "t0ken"):
        assert secret not in result.output, result


# -- the variable itself ---------------------------------------------------------------------
def test_an_invalid_url_exits_2_naming_the_variable_not_the_url_and_the_valid_ones_are_told(project, sidecar):
    result = run_runner(runner_env(closed_url(), project,
                                   MIGRATE_QUIT_URLS=f"{sidecar.url} ftp://admin:topsecret@h/quit"))
    assert_summary_last(result, 2)
    assert "MIGRATE_QUIT_URLS" in result.last["event"] and "URL 2" in result.last["event"]
    assert "topsecret" not in result.output and "admin" not in result.output, result
    assert sidecar.calls() == [("POST", "/quitquitquit")]


def test_without_the_variable_nothing_is_posted_and_nothing_logged(project):
    result = run_runner(runner_env(None, project, MIGRATE_LOG_LEVEL="DEBUG"), "heads")
    assert result.returncode == 0, result
    assert not any("sidecar" in e for e in result.events()), result


def test_shown_masks_user_info_and_query():
    assert sidecars.shown("http://u:p@h:1/q?token=x#f") == "http://***@h:1/q?***"
    assert sidecars.shown("https://h/quitquitquit") == "https://h/quitquitquit"
