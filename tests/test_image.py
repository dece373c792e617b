"""The container image: the real Dockerfile built with buildah, run against the suite's PostgreSQL.

No container engine runs here, so the base image is a debootstrap stand-in for
debian:trixie-slim and the containers run with `buildah run --isolation chroot
--network host` (see tests/image.py). Without buildah these tests are skipped,
except under CI=true, where they fail: CI must always run them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from alembic.config import Config
from alembic.script import ScriptDirectory

from . import image
from .conftest import tables, version_rows
from .projects import chain, make_project

pytestmark = pytest.mark.slow

ROOT = image.REPO
EXAMPLE = ROOT / "examples" / "basic"
COMPOSE = ROOT / "examples" / "compose" / "compose.yaml"
UID, GID = 10001, 10001
MB = 1000 * 1000
# The budget for what the project adds on top of debian:trixie-slim (issue 24).
ADDED_BUDGET = 60 * MB
# A stand-in for the python:3.13-slim an application image would start from
# (Debian's python3 with venv and pip), for building examples/app-image.
PYTHON_STANDIN = """\
FROM debian:trixie-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv passwd \\
 && rm -rf /var/lib/apt/lists/* && ln -s /usr/bin/python3 /usr/local/bin/python
"""


def require_buildah() -> None:
    reason = image.buildah_available()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the image tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def example_heads() -> list[str]:
    return sorted(ScriptDirectory.from_config(Config(str(EXAMPLE / "alembic.ini"))).get_heads())


def records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def runner_env(url: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": url, "MIGRATE_LOG_FORMAT": "json", "MIGRATE_WAIT_TIMEOUT": "30", **extra}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """Collect a process's stdout and stderr lines from threads, as they come."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.threads = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                        for stream in (proc.stdout, proc.stderr)]
        for t in self.threads:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        for t in self.threads:
            t.join(timeout=10)
        return "".join(self.lines)


def runner_process(buildah_pid: int, timeout: float = 60) -> int:
    """The host PID of the runner started by `buildah run` (the non-root Python process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in image.descendants(buildah_pid):
            argv = image.cmdline(pid)
            if argv and argv[0].endswith("python") and "/opt/venv/bin/migration-runner" in argv:
                return pid
        time.sleep(0.05)
    raise AssertionError("the runner process did not appear")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root (but the runtime's mounts) with its size and mtime."""
    skip = {"proc", "sys", "dev", "tmp", "run"}
    files: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            files[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return files


# -- fixtures: the images are built once per module ------------------------------------------
@pytest.fixture(scope="module")
def runner_image() -> str:
    require_buildah()
    started = time.monotonic()
    tag = image.build_runner_image()
    print(f"\nrunner image built in {time.monotonic() - started:.1f}s")
    return tag


@pytest.fixture(scope="module")
def example_image(runner_image) -> str:
    return image.build_example_image(runner_image)


@pytest.fixture
def container(example_image):
    with image.Container(example_image) as c:
        yield c


# -- what the image is ------------------------------------------------------------------------
def test_image_config_exec_entrypoint_non_root_workdir_env_labels(runner_image):
    config = image.image_config(runner_image)
    assert config["Entrypoint"] == ["migration-runner"]  # exec form: no shell between runtime and runner
    assert not config.get("Cmd")
    assert config["User"] == f"{UID}:{GID}"
    assert config["WorkingDir"] == "/app"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["ALEMBIC_CONFIG"] == "/app/alembic.ini"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert config.get("StopSignal") == "SIGTERM"
    labels = config["Labels"]
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.title"] == "migration-runner"


def test_final_image_has_only_python_and_the_venv_no_build_tools_caches_or_ca(runner_image):
    inspected = json.dumps(image.inspect_image(runner_image))
    # The builder's CA bundle arguments leave no trace in the final image's config or history.
    for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "UV_NATIVE_TLS", "host-ca.crt"):
        assert name not in inspected, name
    with image.Container(runner_image) as c:
        root = c.mountpoint
        for path in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/strip", "usr/bin/pip3", "usr/bin/uv",
                     "opt/venv/bin/pip", "opt/venv/bin/uv", "opt/uv", "src", "root/.cache",
                     "run/secrets/ca-bundle", "etc/ssl/certs/ca-certificates.crt",
                     "usr/lib/python3/dist-packages/pip"):
            assert not (root / path).exists(), path
        # `buildah bud -v` leaves its mount point behind in every stage: empty, no certificate.
        leftover = root / "run/host-ca.crt"
        assert not leftover.exists() or leftover.stat().st_size == 0
        assert list((root / "var/lib/apt/lists").glob("*_Packages*")) == []
        assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
        # The venv runs Debian's own interpreter, the one the builder used.
        assert os.readlink(root / "opt/venv/bin/python").endswith("python3")
        assert (root / "usr/bin/python3").exists()
        cfg = (root / "opt/venv/pyvenv.cfg").read_text()
        assert re.search(r"^home = /usr/bin$", cfg, re.M), cfg
        # The project is installed as a package (not editable), with compiled bytecode.
        site = next((root / "opt/venv/lib").glob("python3*/site-packages"))
        assert (site / "runner" / "cli.py").exists()
        for pth in site.glob("*.pth"):
            assert "/src" not in pth.read_text(), pth.name
        assert list((site / "runner" / "__pycache__").glob("cli.*.pyc"))
        assert (root / "opt/venv/bin/migration-runner").exists()
        # The dependencies are bytecode alone; the runner keeps its sources (for tracebacks).
        sources = [p.relative_to(site) for p in site.rglob("*.py")]
        assert [p for p in sources if p.parts[0] != "runner" and p.parts[:2] != ("alembic", "templates")] == []
        assert (site / "sqlalchemy/engine/base.pyc").exists() and not (site / "sqlalchemy/__pycache__").exists()
        # psycopg on Debian's libpq, not psycopg-binary's bundled libraries.
        assert not (site / "psycopg_binary").exists() and not list(site.glob("psycopg_binary*"))
        assert list(root.glob("usr/lib/*/libpq.so.5"))
        # Dialects the runner never loads are out; SQLite's stays (models' test variants).
        dialects = site / "sqlalchemy/dialects"
        assert not any((dialects / name).exists() for name in ("mssql", "mysql", "oracle"))
        assert (dialects / "postgresql").is_dir() and (dialects / "sqlite").is_dir()
        for path in ("sqlalchemy/testing", "alembic/testing", "pydantic/v1", "sqlalchemy/ext/mypy"):
            assert not (site / path).exists(), path


def test_psycopg_runs_its_python_implementation_on_debians_libpq(runner_image):
    probe = ("import psycopg, psycopg.pq._pq_ctypes as c; "
             "print(psycopg.pq.__impl__, psycopg.pq.version(), c.libname)")
    with image.Container(runner_image) as c:
        run = c.run(["python3", "-c", probe])
    assert run.returncode == 0, run.stdout + run.stderr
    impl, version, libname = run.stdout.split()
    assert impl == "python" and int(version) >= 170000 and libname == "libpq.so.5", run.stdout


def test_ca_bundle_as_build_secret_leaves_no_trace(runner_image):
    """The way documented for `docker build`: --secret id=ca-bundle plus SSL_CERT_FILE."""
    if image.host_ca_bundle() is None:
        pytest.skip("this host has no CA bundle to hand to the build")
    tag = image.build_runner_image("localhost/migration-runner:secret-test", ca="secret")
    try:
        assert "ca-bundle" not in json.dumps(image.inspect_image(tag)["OCIv1"]["config"])
        with image.Container(tag) as c:
            assert not (c.mountpoint / "run/secrets").exists()
            assert not (c.mountpoint / "run/host-ca.crt").exists()
            assert (c.mountpoint / "opt/venv/bin/migration-runner").exists()
    finally:
        image.buildah("rmi", tag, check=False)


def test_project_adds_at_most_60_mb_to_the_base(runner_image):
    """What the image adds: the sizes of its layers above the base's (uncompressed tars).

    These are the sizes the registry manifest records (`buildah inspect`'s
    Manifest), which is what a node stores and unpacks on top of a cached base.
    """
    base = json.loads(image.inspect_image(image.BASE_IMAGE)["Manifest"])["layers"]
    layers = json.loads(image.inspect_image(runner_image)["Manifest"])["layers"]
    assert [l["digest"] for l in layers[:len(base)]] == [l["digest"] for l in base]
    base_size = sum(l["size"] for l in base)
    added = sum(l["size"] for l in layers[len(base):])
    print(f"\nbase {base_size / MB:.1f} MB, added {added / MB:.1f} MB (uncompressed layer tars)")
    assert added <= ADDED_BUDGET, f"the project adds {added / MB:.1f} MB"


# -- running the entrypoint --------------------------------------------------------------------
def test_entrypoint_upgrades_to_heads_then_second_run_is_a_no_op(container, database_url):
    heads = example_heads()
    first = container.run(container.entrypoint(), env=runner_env(database_url))
    assert first.returncode == 0, first.stdout + first.stderr
    assert version_rows(database_url) == heads
    assert {"accounts", "orders"} <= set(tables(database_url))
    summary = records(first.stdout + first.stderr)[-1]
    assert summary["outcome"] == "upgraded" and summary["to_revision"] == heads

    second = container.run(container.entrypoint(), env=runner_env(database_url))
    assert second.returncode == 0, second.stdout + second.stderr
    assert records(second.stdout + second.stderr)[-1]["outcome"] == "current"
    assert version_rows(database_url) == heads


def test_runner_process_runs_as_the_non_root_uid_and_sigterm_exits_143(container):
    env = runner_env(f"postgresql://runner:pw@127.0.0.1:{closed_port()}/db", MIGRATE_WAIT_TIMEOUT="60")
    proc = container.popen(container.entrypoint(), env=env)
    out = Output(proc)
    try:
        pid = runner_process(proc.pid)
        assert image.uids(pid) == (UID, GID)
        # Exec form: the runtime starts the runner directly, no shell in between.
        chain = [image.cmdline(p) for p in image.descendants(proc.pid)]
        assert not any(argv and argv[0] in ("/bin/sh", "sh", "/usr/bin/sh") for argv in chain), chain
        time.sleep(2)  # waiting for the closed port
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        image.kill_group(proc)
    text = out.text()
    assert proc.returncode == 143, text
    last = records(text)[-1]
    assert last["exit_code"] == 143 and last["outcome"] == "interrupted", last
    assert "SIGTERM" in last["event"]
    assert any("not ready" in r["event"] for r in records(text))  # it was waiting, not yet started


def test_sigterm_reaches_the_runner_as_pid_1(container):
    """As PID 1 (a container's own PID namespace) a signal without a handler is ignored."""
    root = container.mountpoint
    if not ((root / "usr/bin/unshare").exists() and (root / "usr/bin/setpriv").exists()):
        pytest.skip("the base image has no unshare/setpriv (util-linux)")
    env = runner_env(f"postgresql://runner:pw@127.0.0.1:{closed_port()}/db", MIGRATE_WAIT_TIMEOUT="60")
    # unshare --fork makes a new PID namespace whose PID 1 execs setpriv, which drops
    # to the image's user and execs the entrypoint: the runner itself is PID 1.
    command = ["unshare", "--pid", "--fork", "--kill-child", "setpriv", f"--reuid={UID}", f"--regid={GID}",
               "--clear-groups", *container.entrypoint()]
    proc = container.popen(command, env=env, extra=["--user", "0:0", "--cap-add", "CAP_SYS_ADMIN"])
    out = Output(proc)
    try:
        pid = runner_process(proc.pid)
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.M), status
        assert image.uids(pid) == (UID, GID)
        time.sleep(2)
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        image.kill_group(proc)
    text = out.text()
    assert proc.returncode == 143, text
    assert records(text)[-1]["outcome"] == "interrupted", text


def test_works_on_a_read_only_root_with_only_tmp_writable(container, database_url):
    tmpfs = ["--mount", "type=tmpfs,destination=/tmp"]
    with image.read_only_rootfs(container):
        probe = container.run(
            ["sh", "-c", "for d in / /app /app/migrations /opt/venv /opt/venv/lib /etc /var /var/tmp /run "
                         "/nonexistent /tmp; do touch $d/.probe 2>/dev/null && echo writable $d; done; true"],
            extra=tmpfs)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split("\n")[:-1] == ["writable /tmp"], probe.stdout
        result = container.run(container.entrypoint(), env=runner_env(database_url), extra=tmpfs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert version_rows(database_url) == example_heads()


def test_bytecode_is_precompiled_so_a_run_writes_nothing(container, database_url):
    """Even as root with PYTHONDONTWRITEBYTECODE unset, a run adds or changes no file.

    Python writes a .pyc for every module it imports without an up-to-date
    one; none appears, so everything the runner and the migrations import was
    compiled at build time (and a read-only root costs nothing at start).
    """
    root = container.mountpoint
    before = snapshot(root)
    result = container.run(container.entrypoint(), env=runner_env(database_url, PYTHONDONTWRITEBYTECODE=""),
                           extra=["--user", "0:0"])
    assert result.returncode == 0, result.stdout + result.stderr
    after = snapshot(root)
    runtime_files = {"etc/hosts", "etc/resolv.conf", "etc/hostname"}
    changed = sorted(p for p in set(before) | set(after)
                     if before.get(p) != after.get(p) and p not in runtime_files)
    assert changed == [], changed[:20]


def test_time_from_container_start_to_first_connection_attempt(container):
    """A listener on 127.0.0.1 notes when the runner's first connection arrives."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(60)
        port = listener.getsockname()[1]
        env = runner_env(f"postgresql://runner:pw@127.0.0.1:{port}/db", MIGRATE_WAIT_TIMEOUT="60")
        started = time.monotonic()
        proc = container.popen(container.entrypoint(), env=env)
        try:
            conn, _ = listener.accept()
            first_attempt = time.monotonic() - started
            conn.close()
        finally:
            for pid in image.descendants(proc.pid):
                argv = image.cmdline(pid)
                if argv and argv[0].endswith("python"):
                    os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            finally:
                image.kill_group(proc)
    started = time.monotonic()
    noop = container.run(["true"])
    overhead = time.monotonic() - started
    assert noop.returncode == 0
    print(f"\ncontainer start -> first connection attempt: {first_attempt:.2f}s "
          f"(buildah run of /bin/true alone: {overhead:.2f}s)")
    assert first_attempt < 20


def copy_project(ini: Path, root: Path) -> None:
    """The project into the container at `root`, its script_location relative to its alembic.ini."""
    shutil.copytree(ini.parent, root)
    text = re.sub(r"(?m)^script_location = .*$", "script_location = %(here)s/migrations", ini.read_text())
    (root / "alembic.ini").write_text(text)


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg_async"])
def test_async_template_runs_in_the_image(runner_image, database_url, tmp_path, scheme):
    """`alembic init -t async`: SQLAlchemy's asyncio needs greenlet, which the image carries."""
    project = make_project(tmp_path / "async", chain(2), template="async")
    url = database_url.replace("postgresql://", f"{scheme}://", 1)
    with image.Container(runner_image) as c:
        copy_project(project, c.mountpoint / "async-app")
        env = {**runner_env(url), "ALEMBIC_CONFIG": "/async-app/alembic.ini"}
        run = c.run(["migration-runner"], env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert records(run.stdout + run.stderr)[-1]["applied"] == ["r0001", "r0002"]
    assert version_rows(database_url) == ["r0002"]


def test_a_driver_the_image_lacks_is_named(runner_image, database_url, tmp_path):
    project = make_project(tmp_path / "async", chain(1), template="async")
    with image.Container(runner_image) as c:
        copy_project(project, c.mountpoint / "async-app")
        env = {**runner_env(database_url.replace("postgresql://", "postgresql+asyncpg://", 1)),
               "ALEMBIC_CONFIG": "/async-app/alembic.ini"}
        run = c.run(["migration-runner"], env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    event = records(run.stdout + run.stderr)[-1]["event"]
    assert "'asyncpg'" in event and "EXTRAS=drivers" in event
    assert version_rows(database_url) == []


# -- the two ways of use --------------------------------------------------------------------------
def test_derived_image_carries_the_example_project(example_image):
    with image.Container(example_image) as c:
        root = c.mountpoint
        assert (root / "app/alembic.ini").read_text() == (EXAMPLE / "alembic.ini").read_text()
        versions = sorted(p.name for p in (EXAMPLE / "migrations/versions").glob("*.py"))
        assert sorted(p.name for p in (root / "app/migrations/versions").glob("*.py")) == versions
        assert list((root / "app/migrations/versions/__pycache__").glob("*.pyc"))
        assert image.image_config(example_image)["User"] == f"{UID}:{GID}"
        assert image.image_config(example_image)["Entrypoint"] == ["migration-runner"]


def test_app_image_example_init_command_then_application(runner_image, database_url, tmp_path):
    """examples/app-image: the runner pip-installed into an application's own image."""
    (tmp_path / "Containerfile").write_text(PYTHON_STANDIN)
    standin = f"localhost/python-standin:{hashlib.sha256(PYTHON_STANDIN.encode()).hexdigest()[:12]}"
    if not image.image_exists(standin):
        image.build(standin, tmp_path, tmp_path / "Containerfile")
    tag = "localhost/migration-runner-app-example:test"
    ca = image.host_ca_bundle()
    image.build(tag, ROOT, ROOT / "examples/app-image/Dockerfile",
                build_args={"PYTHON_IMAGE": standin, **({"PIP_CERT": "/run/host-ca.crt"} if ca else {})})
    config = image.image_config(tag)
    assert config["User"] == f"{UID}:{GID}" and config["Cmd"] == ["python", "/app/app.py"]
    with image.Container(tag) as c:
        before = c.run(config["Cmd"], env={"DATABASE_URL": database_url})
        assert before.returncode == 1, before.stdout + before.stderr  # the app refuses an unmigrated database
        init = c.run(["migration-runner"], env=runner_env(database_url))
        assert init.returncode == 0, init.stdout + init.stderr
        assert version_rows(database_url) == example_heads()
        app = c.run(config["Cmd"], env={"DATABASE_URL": database_url})
        assert app.returncode == 0, app.stdout + app.stderr
        assert "application starting" in app.stdout


# -- the compose example (parsed: no engine here) --------------------------------------------------
def test_compose_example_orders_postgres_then_migrate_then_app():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) >= {"postgres", "migrate", "app"}

    postgres = services["postgres"]
    check = postgres["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and "pg_isready" in " ".join(check["test"][1:])
    assert check.get("interval") and check.get("retries", 0) >= 3

    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    build = migrate["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == EXAMPLE.resolve()
    assert (context / build["dockerfile"]).resolve() == (ROOT / "examples/derived-image/Dockerfile").resolve()
    assert "RUNNER_IMAGE" in build["args"]
    url = urlsplit(migrate["environment"]["DATABASE_URL"])
    env = postgres["environment"]
    assert url.hostname == "postgres" and url.port == 5432
    assert (url.username, url.password, url.path.lstrip("/")) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert migrate.get("read_only") is True and "/tmp" in migrate.get("tmpfs", [])
    assert migrate.get("restart", "no") == "no"  # a one-shot job: never restarted

    app = services["app"]
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "postgres" not in app["depends_on"] or app["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_dockerfile_builder_only_ca_and_trixie_slim_final_stage():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    assert len(stages) == 2
    builder, final = stages
    assert builder.startswith("${BASE_IMAGE} AS builder") and final.startswith("${BASE_IMAGE}\n")
    assert re.search(r"^ARG BASE_IMAGE=debian:trixie-slim$", text, re.M)
    for arg in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "UV_NATIVE_TLS"):
        assert re.search(rf"^ARG {arg}\b", builder, re.M) and arg not in final, arg
    assert "uv sync --locked --no-dev" in builder and "--no-editable" in builder
    assert "UV_COMPILE_BYTECODE=1" in builder and "UV_PYTHON_DOWNLOADS=never" in builder
    assert re.findall(r"^COPY .*", final, re.M) == ["COPY --from=builder /opt/venv /opt/venv"]
    assert "--no-install-recommends python3 " in final and "rm -rf /var/lib/apt/lists/*" in final
    assert re.search(r'^ENTRYPOINT \["migration-runner"\]$', final, re.M)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!runner/" in ignored  # everything stays out of the context unless listed
