#!/usr/bin/env python3
"""The two commands of the README, on a machine with only python3 and pip.

    python3 dev.py demo    run the runner end to end on examples/basic against an embedded PostgreSQL
    python3 dev.py test    run every test (extra arguments go to pytest)
    python3 dev.py bench   compare the runner with bare alembic (bench/bench.py; --quick for a short run)

Each first makes .venv and installs the project with its test (and bench)
extras into it, again only when pyproject.toml has changed.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def ensure_venv(extras: str) -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", f"{ROOT}[{extras}]"], check=True)
    stamp.write_text(wanted)


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    scripts = {"demo": ["examples/quickstart.py"], "test": ["-m", "pytest"], "bench": ["bench/bench.py"]}
    if command not in scripts:
        print(__doc__)
        return 0 if command == "help" else 2
    ensure_venv("test,bench" if command == "bench" else "test")
    argv = [str(PYTHON), *scripts[command], *rest]
    os.chdir(ROOT)
    return subprocess.run(argv).returncode


if __name__ == "__main__":
    sys.exit(main())
