"""The console script's process: its modules imported out of the cyclic collector's way, and left without a teardown.

A run imports pydantic, alembic, SQLAlchemy and psycopg: some 140,000 objects
that live as long as the process. Left to the collector, they are traversed
again and again as they are created, and once more by every full collection
after them (bare alembic spends about 60 ms of a 200-revision upgrade in the
collector, the runner importing this way about 7 ms). So the process imports them with the
collector paused and then freezes them (`gc.freeze`): later collections skip
them and see only what is created afterwards. The project's code (env.py, its
revisions, its application) runs with the collector on, at Python's
thresholds, as under alembic's CLI. Only the console script's own process
does this, never an interpreter the runner is imported into (a test's).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

_own_process = False  # set by run(): the interpreter is the console script's, started for this run


@contextmanager
def importing() -> Iterator[None]:
    """Import the runner's stack with the collector paused, then freeze what was made (in run()'s process only)."""
    if not _own_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        # Also on a failed import: the collector must be on for whatever runs next.
        gc.freeze()
        gc.enable()


def run() -> None:
    """`migration-runner`: run the command line in this process, then leave with its exit code."""
    global _own_process
    _own_process = True
    with importing():
        from . import cli
    code = cli.main()
    # Tearing the interpreter down (finalising the modules of SQLAlchemy, alembic,
    # pydantic) takes ~0.15 s and does nothing a finished run needs: every
    # connection is closed and the lock released by now. Run the exit handlers,
    # flush, and leave.
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
