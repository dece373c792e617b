"""Build and run the container image with buildah, with no container engine.

No registry image can be pulled on the machines this suite runs on, so the base
image ``debian:trixie-slim`` is replaced by a stand-in made with
``debootstrap --variant=minbase trixie`` (trimmed the way the official slim
image is) and imported into a buildah storage of our own under that name. The
real ``Dockerfile`` is then built unchanged with ``--pull=never``.

Everything heavy is cached outside the repository (see ``cache_dir``): the
rootfs tarball and the buildah storage with its layer cache, so a second run
of the image tests only rebuilds what changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "debian:trixie-slim"
RUNNER_TAG = "localhost/migration-runner:test"
EXAMPLE_TAG = "localhost/migration-runner-example:test"
# debian:trixie-slim's own configuration (what `docker inspect` shows).
BASE_ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# What debuerreotype's --slim drops from debian:*-slim (dpkg keeps them out of
# every later install too).
SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
"""


class ImageError(RuntimeError):
    """A step of making, building or running an image failed."""


def cache_dir() -> Path:
    """Where the base rootfs and the buildah storage are kept between runs."""
    explicit = os.environ.get("MIGRATION_RUNNER_CACHE")
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_CACHE_HOME"):
        path = Path(os.environ["XDG_CACHE_HOME"]) / "migration-runner"
    elif os.geteuid() == 0:
        path = Path("/var/cache/migration-runner")
    else:
        path = Path.home() / ".cache" / "migration-runner"
    path.mkdir(parents=True, exist_ok=True)
    return path


def storage_root() -> Path:
    return cache_dir() / "containers" / "storage"


def run_root() -> Path:
    if os.geteuid() != 0:
        return cache_dir() / "run"
    if os.environ.get("MIGRATION_RUNNER_CACHE"):
        # A storage's mount and lock state lives in its runroot: a second storage
        # (another checkout's cache) sharing the default runroot would overwrite it.
        digest = hashlib.sha256(str(storage_root()).encode()).hexdigest()[:12]
        return Path(f"/run/migration-runner/containers-{digest}")
    return Path("/run/migration-runner/containers")


def buildah_available() -> str | None:
    """None if buildah can be used here, else the reason it cannot."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (apt-get install buildah debootstrap)"
    if os.geteuid() != 0:
        return "the image tests run buildah with chroot isolation and vfs storage as root"
    return None


def buildah_cmd(*args: str | os.PathLike) -> list[str]:
    return [
        "buildah", "--root", str(storage_root()), "--runroot", str(run_root()),
        "--storage-driver", "vfs", *map(str, args),
    ]


def buildah(*args: str | os.PathLike, timeout: float = 600, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run a buildah command against this suite's own storage."""
    cmd = buildah_cmd(*args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                         f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def _file_lock(name: str):
    """Serialise rootfs/image creation between concurrent test processes."""
    with open(cache_dir() / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (debootstrap gets the same one)."""
    if os.environ.get("MIGRATION_RUNNER_DEBIAN_MIRROR"):
        return os.environ["MIGRATION_RUNNER_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        files += sorted(sources_d.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            urls = []
            if line.startswith("URIs:"):
                urls = line.split()[1:]
            elif line.startswith("deb "):
                urls = [w for w in line.split()[1:] if "://" in w][:1]
            for url in urls:
                if re.search(r"/debian/?$", url):
                    return url.rstrip("/")
    return DEFAULT_MIRROR


def _slim(root: Path) -> None:
    """Trim a debootstrap tree the way debian:*-slim is trimmed."""
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG_CFG)
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
    (root / "etc/apt/apt.conf.d/docker-no-languages").write_text('Acquire::Languages "none";\n')
    share = root / "usr/share"
    for sub in ("groff", "info", "linda", "man"):
        for child in (share / sub).glob("*"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for child in (share / "lintian/overrides").glob("*"):
        child.unlink()
    for child in (share / "locale").glob("*"):
        if child.name != "locale.alias":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for pkg in (share / "doc").glob("*"):
        if pkg.is_dir() and not pkg.is_symlink():
            for child in pkg.iterdir():
                if child.name != "copyright":
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                    "var/lib/apt/lists/*", "var/log/*.log", "var/log/apt/*"):
        for child in root.glob(pattern):
            if child.is_file() or child.is_symlink():
                child.unlink()
    # debootstrap copies the host's resolver and name; a container gets its own.
    for name in ("etc/resolv.conf", "etc/hostname"):
        (root / name).write_text("")
        (root / name).chmod(0o644)


def base_rootfs_tarball() -> Path:
    """A cached tarball of `debootstrap --variant=minbase trixie`, slimmed."""
    tarball = cache_dir() / "debian-trixie-minbase.tar"
    if tarball.exists():
        return tarball
    with _file_lock("rootfs"):
        if tarball.exists():
            return tarball
        if shutil.which("debootstrap") is None:
            raise ImageError("debootstrap is not installed (apt-get install debootstrap)")
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir()))
        try:
            root = work / "root"
            root.mkdir()
            # mkdtemp makes 0700 folders: a non-root user in the image could
            # then start nothing at all. The real image's / is 0755.
            root.chmod(0o755)
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", "trixie", str(root), debian_mirror()],
                capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                log = root / "debootstrap/debootstrap.log"
                detail = log.read_text()[-3000:] if log.exists() else proc.stderr[-3000:]
                raise ImageError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{detail}")
            _slim(root)
            partial = tarball.with_suffix(".tar.partial")
            # /dev is provided by the container runtime; keep only the folder.
            subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--xattrs",
                            "--exclude=./dev/*", "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def image_exists(name: str) -> bool:
    return buildah("inspect", "--type", "image", name, check=False, timeout=60).returncode == 0


def ensure_base_image() -> str:
    """Import the debootstrap stand-in as `debian:trixie-slim` (once)."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    tarball = base_rootfs_tarball()
    with _file_lock("base-image"):
        if image_exists(BASE_IMAGE):
            return BASE_IMAGE
        ctr = buildah("from", "--pull=never", "scratch").stdout.strip()
        try:
            buildah("add", ctr, tarball, "/")
            buildah("config", "--env", f"PATH={BASE_ENV_PATH}", "--cmd", "bash",
                    "--os", "linux", "--arch", "amd64", ctr)
            buildah("commit", "--quiet", ctr, BASE_IMAGE)
        finally:
            buildah("rm", ctr, check=False)
    return BASE_IMAGE


def host_ca_bundle() -> Path | None:
    """The CA bundle this host trusts (it may include a TLS-intercepting proxy's CA)."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build(tag: str, context: Path, dockerfile: Path | None = None,
          build_args: dict[str, str] | None = None, ca: str = "volume",
          timeout: float = 1800) -> subprocess.CompletedProcess:
    """`buildah bud` with chroot isolation, never pulling; one new layer per stage.

    ca: how the host's CA bundle reaches the build, for a TLS-intercepting
    egress: "volume" (`-v HOST:/run/host-ca.crt:ro --build-arg
    SSL_CERT_FILE=/run/host-ca.crt`), "secret" (`--secret id=ca-bundle,...
    --build-arg SSL_CERT_FILE=/run/secrets/ca-bundle`) or "none".
    """
    args: list[str | os.PathLike] = ["bud", "--isolation", "chroot", "--pull=never", "--layers=false",
                                     "--network", "host", "-t", tag]
    if dockerfile is not None:
        args += ["-f", dockerfile]
    bundle = host_ca_bundle()
    if bundle is not None and ca == "volume":
        args += ["-v", f"{bundle}:/run/host-ca.crt:ro", "--build-arg", "SSL_CERT_FILE=/run/host-ca.crt"]
    elif bundle is not None and ca == "secret":
        args += ["--secret", f"id=ca-bundle,src={bundle}", "--build-arg", "SSL_CERT_FILE=/run/secrets/ca-bundle"]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    args.append(context)
    result = buildah(*args, timeout=timeout)
    # Without a layer cache, an image replaced by this tag is of no further use.
    buildah("rmi", "--prune", check=False, timeout=300)
    return result


def build_runner_image(tag: str = RUNNER_TAG, ca: str = "volume") -> str:
    ensure_base_image()
    build(tag, REPO, REPO / "Dockerfile", ca=ca)
    return tag


def build_example_image(runner_tag: str = RUNNER_TAG, tag: str = EXAMPLE_TAG) -> str:
    """examples/derived-image: the runner image with examples/basic baked in."""
    build(tag, REPO / "examples" / "basic", REPO / "examples" / "derived-image" / "Dockerfile",
          build_args={"RUNNER_IMAGE": runner_tag})
    return tag


def inspect_image(name: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", name, timeout=60).stdout)


def image_config(name: str) -> dict:
    """The OCI image config (Entrypoint, Env, User, WorkingDir, Labels, ...)."""
    return inspect_image(name)["OCIv1"]["config"]


@dataclass
class Container:
    """A working container made from an image with `buildah from`."""

    image: str
    name: str = field(default_factory=lambda: f"mr-test-{uuid.uuid4().hex[:12]}")
    _mounted: Path | None = None

    def __post_init__(self) -> None:
        buildah("from", "--pull=never", "--name", self.name, self.image)

    @property
    def mountpoint(self) -> Path:
        if self._mounted is None:
            self._mounted = Path(buildah("mount", self.name).stdout.strip())
        return self._mounted

    def entrypoint(self) -> list[str]:
        return list(image_config(self.image).get("Entrypoint") or [])

    def run_cmd(self, command: list[str], env: dict[str, str] | None = None,
                extra: list[str] | None = None) -> list[str]:
        args = ["run", "--isolation", "chroot", "--network", "host"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        args += extra or []
        args += [self.name, "--", *command]
        return buildah_cmd(*args)

    def run(self, command: list[str], env: dict[str, str] | None = None,
            extra: list[str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.run_cmd(command, env, extra), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, command: list[str], env: dict[str, str] | None = None,
              extra: list[str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.run_cmd(command, env, extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def remove(self) -> None:
        if self._mounted is not None:
            buildah("umount", self.name, check=False)
        buildah("rm", self.name, check=False)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def read_only_rootfs(container: Container):
    """Make the container's root filesystem read-only for the runs inside.

    buildah run has no --read-only flag, but with vfs storage the container's
    rootfs is a plain folder: bind-mount it onto itself and remount that
    read-only, so the process inside sees a read-only / (as with
    `docker run --read-only`). Two places stay writable, both root-owned:
    /run, a tmpfs (mode 0755), because buildah itself creates and removes
    /run/.containerenv there and panics when it cannot; and /tmp, which the
    caller mounts as a tmpfs (`--mount type=tmpfs,destination=/tmp`).
    """
    root = container.mountpoint
    # buildah run bind-mounts its own files over these: they must exist.
    for name in ("etc/hosts", "etc/resolv.conf", "etc/hostname"):
        (root / name).touch(exist_ok=True)
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
        mounted.append(root)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev,size=1m", "tmpfs",
                        str(root / "run")], check=True)
        mounted.append(root / "run")
        yield root
    finally:
        for path in reversed(mounted):
            for _ in range(20):
                if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.25)


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return [p for p in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if p]
    except OSError:
        return []


def uids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M).group(1))
    return uid, gid


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
