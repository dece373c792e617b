#!/usr/bin/env python3
"""The commands of the README, on a machine with only python3 and pip.

    python3 dev.py demo        run the runner end to end on examples/basic against an embedded PostgreSQL
    python3 dev.py test        every test on the newest versions (.venv), then the core subset on
                               SQLAlchemy 1.4 (.venv-sa14); fails if either run fails
    python3 dev.py test-sa14   only the core subset (tests marked `core`) on SQLAlchemy 1.4.54,
                               alembic 1.16.0, Flask-SQLAlchemy 3.0 and psycopg2 as env.py's driver
    python3 dev.py bench       compare the runner with bare alembic (bench/bench.py; --quick for a short run)

Extra arguments go to pytest (to both runs for `test`; a `-m` expression is
combined with `core` for the subset). Each command first makes its virtualenv and
installs the project with its test (and bench) extras into it, again only when
pyproject.toml or the pins below have changed; .venv-sa14 with SA14_PINS in the
same resolution (pins outside what pyproject.toml declares fail the install).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_SA14 = ROOT / ".venv-sa14"
# The second environment: SQLAlchemy 1.4 (its last release) with the oldest alembic pyproject.toml declares;
# Flask-SQLAlchemy 3.0, as 3.1 needs SQLAlchemy 2; psycopg2, which `postgresql://` means to SQLAlchemy 1.4.
SA14_PINS = [
    "sqlalchemy[asyncio]==1.4.54",
    "alembic==1.16.0",
    "flask-sqlalchemy>=3.0,<3.1",
    "psycopg2-binary>=2.9",
]
CORE = "core"  # the marker of the subset run on .venv-sa14 (pyproject.toml's [tool.pytest.ini_options])
NO_TESTS_COLLECTED = 5  # pytest's exit code


def ensure_venv(extras: str, where: Path = VENV, pins: list[str] = ()) -> Path:
    """`where` with the project installed editable with `extras`, in one resolution with `pins` (which must
    lie within what pyproject.toml declares: pip refuses them otherwise)."""
    python = where / "bin" / "python"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()
                            + "\n".join(pins).encode()).hexdigest()
    stamp = where / ".installed"
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return python
    if not python.exists():
        venv.create(where, with_pip=True)
    if pins:
        print(f"dev.py: installing {where.name} with {', '.join(pins)}", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", f"{ROOT}[{extras}]", *pins], check=True)
    stamp.write_text(wanted)
    return python


def core_args(args: list[str]) -> list[str]:
    """pytest arguments selecting the `core` subset: `-m core`, or `-m "core and (EXPR)"` for a given `-m EXPR`."""
    out, expressions, rest = [], [], iter(args)
    for arg in rest:
        if arg == "-m":
            expressions.append(next(rest, ""))
        elif arg.startswith("-m") and not arg.startswith("--"):
            expressions.append(arg[2:].lstrip("="))
        else:
            out.append(arg)
    selection = " and ".join([CORE, *(f"({e})" for e in expressions if e)])
    return ["-m", selection, *out]


def run(python: Path, *args: str) -> int:
    return subprocess.run([str(python), *args], cwd=ROOT).returncode


def test_sa14(args: list[str], within_test: bool = False) -> int:
    python = ensure_venv("test", VENV_SA14, SA14_PINS)
    print(f"\n===== the core subset on SQLAlchemy 1.4 ({VENV_SA14.name}: {', '.join(SA14_PINS)}) =====",
          flush=True)
    code = run(python, "-m", "pytest", *core_args(args))
    if code == NO_TESTS_COLLECTED:
        if within_test and args:
            # `dev.py test tests/test_helm.py`: the arguments chose no test of the subset; not a failure.
            print("dev.py: none of the tests chosen is in the core subset; nothing to run on SQLAlchemy 1.4",
                  flush=True)
            return 0
        print(f"dev.py: no test {'chosen ' if args else ''}is marked `{CORE}`: nothing ran on SQLAlchemy 1.4",
              flush=True)
    return code


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    scripts = {"demo": ["examples/quickstart.py"], "test": ["-m", "pytest"], "bench": ["bench/bench.py"]}
    if command == "test-sa14":
        return test_sa14(rest)
    if command not in scripts:
        print(__doc__)
        return 0 if command == "help" else 2
    python = ensure_venv("test,bench" if command == "bench" else "test")
    code = run(python, *scripts[command], *rest)
    if command == "bench":  # the fleet's cases (issue 26) and what OpenTelemetry costs (issue 27), scripts of their own
        code = code or run(python, "bench/fleet.py", *rest)
        return code or run(python, "bench/telemetry.py", *[arg for arg in rest if arg == "--quick"])
    if command != "test":
        return code
    print(f"\ndev.py: the suite on the newest versions (.venv) exited {code}", flush=True)
    sa14 = test_sa14(rest, within_test=True)
    print(f"dev.py: newest versions exited {code}, the core subset on SQLAlchemy 1.4 exited {sa14}", flush=True)
    return code or sa14


if __name__ == "__main__":
    sys.exit(main())
