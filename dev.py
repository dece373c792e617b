#!/usr/bin/env python3
"""The two commands of the README, on a machine with only python3 and pip.

    python3 dev.py demo    run the runner end to end on examples/basic against an embedded PostgreSQL
    python3 dev.py test    run every test (extra arguments go to pytest)

Both first make .venv and install the project with its test extras into it
(again only when pyproject.toml has changed).
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


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(wanted)


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    if command not in ("demo", "test"):
        print(__doc__)
        return 0 if command == "help" else 2
    ensure_venv()
    if command == "demo":
        argv = [str(PYTHON), str(ROOT / "examples" / "quickstart.py"), *rest]
    else:
        argv = [str(PYTHON), "-m", "pytest", *rest]
    os.chdir(ROOT)
    return subprocess.run(argv).returncode


if __name__ == "__main__":
    sys.exit(main())
