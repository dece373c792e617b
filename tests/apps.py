"""One virtualenv per real application, with the application's own pins and the runner installed beside it.

The runner runs a project's env.py (or its Flask application) in the runner's own interpreter, so it
has to be installed where the application is: an application that pins SQLAlchemy<2 or its own
Alembic gets them here, not the versions of the project's .venv. Each application gets
`.venv-apps/<name>` at the repository root (gitignored), made by a single `pip install` of the
application's requirements and `-e <this checkout>`, so pip resolves the two together: if the
application's pins and the runner's requirements cannot both be met, the build fails with pip's
account of the conflict (that is a finding, not a harness error).

The virtualenv is reused across runs and rebuilt when the application's requirements, the runner's
requirements in pyproject.toml or the interpreter change (a hash of the three is kept in `.installed`). The runner
is installed editable, so a change to runner/*.py needs no rebuild. A missing virtualenv is built
by the first test that needs it (CI starts from a clean clone); `.build-seconds` records how long
the last build took. Two pytest processes building the same one wait for each other (a file lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import venv
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import Result

ROOT = Path(__file__).resolve().parent.parent
APPS_DIR = ROOT / ".venv-apps"

# Variables of the harness's own environment that must not reach an application's processes:
# the runner's settings (each test sets its own), libpq's, and the project's virtualenv.
_DROPPED = ("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG", "FLASK_", "AIRFLOW", "VIRTUAL_ENV", "PYTHONPATH",
            "PYTHONHOME")


@dataclass(frozen=True)
class App:
    """A released application: its name (the virtualenv's directory) and what pip installs for it."""

    name: str
    requirements: tuple[str, ...]


@dataclass
class AppVenv:
    app: App
    path: Path
    build_seconds: float | None = None  # set when this process built it
    _site: Path | None = field(default=None, repr=False)

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def script(self, name: str) -> str:
        path = self.bin / name
        assert path.exists(), f"{path} is not installed in {self.app.name}'s virtualenv"
        return str(path)

    @property
    def site_packages(self) -> Path:
        """purelib of the virtualenv: where the application's package (and its shipped migrations) lie."""
        if self._site is None:
            out = subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.strip()
            self._site = Path(out)
        return self._site

    def env(self, **extra: str) -> dict:
        """A clean environment for the application's processes: its virtualenv first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED)}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, argv: list[str], env: dict, cwd: Path | None = None, timeout: float = 300) -> Result:
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def start(self, argv: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def runner(self, env: dict, *args: str, cwd: Path | None = None, timeout: float = 300) -> Result:
        """The runner installed in this virtualenv (so env.py runs with the application's packages)."""
        return self.run([self.script("migration-runner"), *args], env, cwd=cwd, timeout=timeout)


class AppInstallError(AssertionError):
    """pip could not install the application with the runner beside it (e.g. their pins conflict)."""


def _key(app: App) -> str:
    """What the virtualenv depends on: the application's requirements, the runner's own requirements (not
    the rest of pyproject.toml: a new pytest marker needs no rebuild) and the interpreter."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runner = {"build": project["build-system"], "dependencies": project["project"]["dependencies"],
              "requires-python": project["project"].get("requires-python")}
    h = hashlib.sha256()
    h.update(json.dumps([app.requirements, runner, sys.version], sort_keys=True).encode())
    return h.hexdigest()


def _pip_output(text: str) -> str:
    # pip warns once per package about index locations it cannot use; they say nothing about the build.
    return "\n".join(line for line in text.splitlines() if not line.startswith("WARNING: Location "))


def app_venv(app: App) -> AppVenv:
    """The application's virtualenv, built (or rebuilt) first when its requirements or the runner's changed."""
    APPS_DIR.mkdir(exist_ok=True)
    path = APPS_DIR / app.name
    stamp = path / ".installed"
    wanted = _key(app)
    with open(APPS_DIR / f"{app.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest building the same one: wait, then reuse it
        if stamp.exists() and stamp.read_text() == wanted and (path / "bin" / "python").exists():
            return AppVenv(app, path)
        started = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)  # a stale or half-built one: never install over it
        venv.create(path, with_pip=True)
        proc = subprocess.run(
            # Not --quiet: on a conflict pip's "The conflict is caused by" lines are the finding.
            [str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-color",
             "--progress-bar", "off", *app.requirements, "-e", str(ROOT)],
            capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            output = _pip_output(proc.stdout + proc.stderr)
            cause = output[output.find("The conflict is caused by"):] if "The conflict is caused by" in output else output
            raise AppInstallError(
                f"{app.name}: `pip install {' '.join(app.requirements)} -e <runner>` failed "
                f"({proc.returncode}):\n{cause[-4000:]}")
        seconds = time.monotonic() - started
        (path / ".build-seconds").write_text(json.dumps({"seconds": round(seconds, 1)}))
        stamp.write_text(wanted)
        return AppVenv(app, path, build_seconds=seconds)
