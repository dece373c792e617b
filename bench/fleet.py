"""A fleet (DATABASE_URLS_FILE) of many databases at several MIGRATE_FLEET_CONCURRENCY settings, on the embedded PostgreSQL.

    python bench/fleet.py            # 200 databases x 20 revisions at concurrency 1, 4 and 8; writes docs/benchmarks-fleet.md
    python bench/fleet.py --quick    # CI: 6 databases x 3 revisions, writes nothing under docs/

Each setting migrates its own fresh databases (created empty before its run, so
every run does the same work): the wall time of the fleet process from spawn to
exit, the CPU time of it and its children, and the largest peak resident memory
of one process (ru_maxrss of the children: a target's runner, which sizes a
pod's memory limit per target in flight). Concurrency 1 is the serial time; the
ideal at N is that divided by N, bounded on a small machine by its cores, since
each target starts a Python process. No timing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.postgres import Postgres  # noqa: E402
from tests.projects import chain, make_project  # noqa: E402

RUNNER = Path(sys.executable).parent / "migration-runner"


def fleet_run(ini: Path, urls: list[str], concurrency: int, workdir: Path) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS KiB of the largest process, exit code) of one fleet run."""
    listing = workdir / f"targets-{concurrency}-{uuid.uuid4().hex[:6]}"
    listing.write_text("\n".join(urls) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG"))}
    env.update(DATABASE_URLS_FILE=str(listing), ALEMBIC_CONFIG=str(ini), MIGRATE_LOG_FORMAT="json",
               MIGRATE_FLEET_CONCURRENCY=str(concurrency), MIGRATE_TERMINATION_LOG=os.devnull)
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen([str(RUNNER), "upgrade"], env=env, stdout=subprocess.DEVNULL, stderr=log,
                                cwd=ini.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-3000:])
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss of RUSAGE_CHILDREN is the largest of any descendant waited for so far: the runners'.
    return wall, usage.ru_utime + usage.ru_stime, max(usage.ru_maxrss, children.ru_maxrss), proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "docs")
    args, _ = parser.parse_known_args()  # dev.py bench passes bench.py's options too
    databases, revisions = (6, 3) if args.quick else (200, 20)
    settings = (1, 4) if args.quick else (1, 4, 8)
    server = Postgres().start()
    rows = []
    try:
        server.create_role("bench", "bench-pw", "CREATEDB")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            ini = make_project(work / "project", chain(revisions))
            for concurrency in settings:
                names = [f"fleet_{concurrency}_{i}" for i in range(databases)]
                for name in names:
                    server.create_database(name, "bench")
                urls = [server.url(name, "bench", "bench-pw") for name in names]
                wall, cpu, rss, code = fleet_run(ini, urls, concurrency, work)
                # Other work on the machine stretches wall time, not CPU time: say how busy it was.
                rows.append((concurrency, wall, cpu, rss, code, os.getloadavg()[1]))
                print(f"fleet of {databases} databases x {revisions} revisions, concurrency {concurrency}: "
                      f"{wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss / 1024:.0f} MiB, exit {code}", flush=True)
                for name in names:
                    server.execute(f'DROP DATABASE "{name}"')
    finally:
        server.destroy()
    serial = rows[0][1]
    lines = [f"# Fleet benchmark\n",
             f"`python bench/fleet.py`: {databases} databases x {revisions} revisions migrated by one "
             f"`migration-runner upgrade` with DATABASE_URLS_FILE, each concurrency on fresh databases. "
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.\n",
             "| concurrency | wall (s) | speed-up over 1 | CPU (s) | largest process RSS (MiB) | exit | "
             "load average (5 min) after |",
             "|---|---|---|---|---|---|---|"]
    for concurrency, wall, cpu, rss, code, load in rows:
        lines.append(f"| {concurrency} | {wall:.1f} | {serial / wall:.2f}x | {cpu:.1f} | {rss / 1024:.0f} | {code} | "
                     f"{load:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "benchmarks-fleet.md").write_text(report)
    return 0 if all(row[4] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
