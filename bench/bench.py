"""migration-runner against bare `alembic upgrade heads`, on the embedded PostgreSQL.

    python bench/bench.py            # full run: writes docs/benchmarks.md and docs/benchmarks.png
    python bench/bench.py --quick    # CI: one repetition, ten concurrent runners, writes nothing under docs/

Both tools run the same projects (the `alembic init` template plus generated
revisions, each creating one table) against the same server, as processes, in
alternation: runner, alembic, runner, alembic, ... so drift in the machine hits
both alike. Each measurement is the wall time of one process from spawn to exit
and its peak resident memory (ru_maxrss from wait4). Medians are reported.
No timing is asserted: this measures, it does not judge.
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import statistics
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

BIN = Path(sys.executable).parent
RUNNER = shutil.which("migration-runner", path=str(BIN)) or "migration-runner"
ALEMBIC = shutil.which("alembic", path=str(BIN)) or "alembic"


class Run:
    def __init__(self, seconds: float, maxrss_kib: int, returncode: int, cpu: float = 0.0, fast: int = 0) -> None:
        self.seconds, self.maxrss_kib, self.returncode, self.cpu = seconds, maxrss_kib, returncode, cpu
        self.fast = fast  # runner processes that answered by the fast path (runner/fastpath.py)


def spawn(tool: str, ini: Path, url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG"))}
    if tool == "runner":
        env.update(DATABASE_URL=url, ALEMBIC_CONFIG=str(ini), MIGRATE_LOG_FORMAT="json",
                   MIGRATE_LOCK_TIMEOUT="600", MIGRATE_TERMINATION_LOG=os.devnull)
        argv = [RUNNER, "upgrade"]
    else:
        argv = [ALEMBIC, "-c", str(ini), "-x", f"url={url}", "upgrade", "heads"]
    # Output to a file: a full pipe would stall the process (and, for the runner, every waiter).
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=ini.parent)
    proc.log = log
    return proc


def reap(proc: subprocess.Popen, started: float) -> Run:
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.log.seek(0)
    err = proc.log.read().decode(errors="replace")
    proc.log.close()
    if proc.returncode:
        raise SystemExit(f"{proc.args[0]} exited {proc.returncode}:\n{err[-3000:]}")
    return Run(seconds, usage.ru_maxrss, proc.returncode, usage.ru_utime + usage.ru_stime,
               fast=int('"fast_path": true' in err))


def run(tool: str, ini: Path, url: str) -> Run:
    started = time.perf_counter()
    return reap(spawn(tool, ini, url), started)


def run_many(tool: str, ini: Path, url: str, n: int) -> Run:
    """n processes at once: the wall time until the last exits, their CPU time summed, the largest peak RSS."""
    started = time.perf_counter()
    procs = [spawn(tool, ini, url) for _ in range(n)]
    runs = [reap(p, started) for p in procs]
    return Run(time.perf_counter() - started, max(r.maxrss_kib for r in runs), 0, sum(r.cpu for r in runs),
               fast=sum(r.fast for r in runs))


class Logins:
    """Logins to one database, from pg_stat_database.sessions (counted as each session ends)."""

    def __init__(self, server, database: str) -> None:
        self.server, self.database = server, database

    def count(self) -> int:
        # Read from another database, so that this session is not one of those counted.
        with self.server.connect("postgres") as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s",
                                (self.database,)).fetchone()[0]

    def during(self, action) -> int:
        before = self.count()
        action()
        # An ending backend reports its session as it exits, a moment after the client saw it close.
        counted, deadline = self.count(), time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.2)
            again = self.count()
            if again == counted:
                break
            counted = again
        return counted - before


# env.py reads the URL from `-x url=...` for bare alembic; the runner sets sqlalchemy.url itself.
NO_OP_RUNS = 4  # no-op runs per repetition
SIZES = (1, 200, 1000)
CONCURRENT_REPEAT = 2  # repetitions of the many-at-once measurement (each starts 2 × 50 processes per size)

ENV_PATCH = '''
_x_url = context.get_x_argument(as_dictionary=True).get("url")
if _x_url:
    config.set_main_option("sqlalchemy.url", _x_url.replace("%", "%%"))
'''


def project(root: Path, n: int) -> Path:
    ini = make_project(root / f"p{n}", chain(n))
    env_py = root / f"p{n}" / "migrations" / "env.py"
    source = env_py.read_text()
    marker = "config = context.config\n"
    env_py.write_text(source.replace(marker, marker + ENV_PATCH, 1))
    return ini


def alembic_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def fresh_database(server) -> str:
    """The URL of a new, empty database on `server`."""
    name = f"b_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    return server.url(name)


def compile_both(work: Path) -> None:
    """Both tools from bytecode, as installed in an image: an editable checkout would otherwise compile the
    runner's modules in every process when PYTHONDONTWRITEBYTECODE is set."""
    for tree in (ROOT / "runner", work):
        compileall.compile_dir(str(tree), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, ten concurrent runners; no docs")
    parser.add_argument("--repeat", type=int, help="repetitions of each measurement (default 5, quick 1)")
    parser.add_argument("--output", type=Path, help="where to write benchmarks.md and benchmarks.png "
                        "(default docs/, or nowhere with --quick)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 5)
    full_pairs = 1 if args.quick else 2 * repeat + 1
    concurrent = 10 if args.quick else 50
    output = args.output or (None if args.quick else ROOT / "docs")

    work = Path(tempfile.mkdtemp(prefix="mr-bench-"))
    load = [os.getloadavg()[1]]  # the machine is shared: its load says how far to trust the figures
    server = Postgres().start()
    try:
        def fresh() -> str:
            return fresh_database(server)

        projects = {n: project(work, n) for n in (1, 200, 1000)}
        compile_both(work)
        rows = []  # (label, revisions, kind, runner runs, alembic runs)
        at_heads = {}

        # No-op: the database is already at the heads, migrated by the runner (which records the lineage
        # and the digest its fast path compares).
        for n in SIZES:
            url = at_heads[n] = fresh()
            run("runner", projects[n], url)
            samples = {"runner": [], "alembic": []}
            # A no-op costs a fraction of a second: more runs for a steadier median.
            for i in range(NO_OP_RUNS * repeat):
                for tool in order(i):
                    samples[tool].append(run(tool, projects[n], url if tool == "runner" else alembic_url(url)))
            rows.append((f"no-op, {n} revisions", n, "no-op", samples["runner"], samples["alembic"]))
            print(f"  measured {rows[-1][0]}", file=sys.stderr)

        # Full upgrade from an empty database: more pairs, as a run's time drifts with the machine's.
        for n in SIZES:
            samples = {"runner": [], "alembic": []}
            for i in range(full_pairs):
                for tool in order(i):
                    url = fresh()
                    samples[tool].append(run(tool, projects[n], url if tool == "runner" else alembic_url(url)))
            rows.append((f"full upgrade, {n} revisions", n, "full", samples["runner"], samples["alembic"]))
            print(f"  measured {rows[-1][0]}", file=sys.stderr)

        # Many at once on a database at the heads (every replica's init container at a rollout), against as
        # many bare alembic processes at once on the same database: alembic needs no lock to do nothing.
        for n in SIZES:
            samples = {"runner": [], "alembic": []}
            for i in range(max(1, min(repeat, CONCURRENT_REPEAT))):
                for tool in order(i):
                    url = at_heads[n] if tool == "runner" else alembic_url(at_heads[n])
                    samples[tool].append(run_many(tool, projects[n], url, concurrent))
            rows.append((f"{concurrent} runners at once at the heads, {n} revisions", n, "many", samples["runner"],
                         samples["alembic"]))
            print(f"  measured {rows[-1][0]}", file=sys.stderr)

        # Logins (sessions that authenticated) per process: one no-op, one full upgrade, and the many at once.
        logins = {}
        n = SIZES[1]
        name = at_heads[n].rsplit("/", 1)[1]
        for tool in ("runner", "alembic"):
            url = at_heads[n] if tool == "runner" else alembic_url(at_heads[n])
            counter = Logins(server, name)
            one = counter.during(lambda: run(tool, projects[n], url))
            many = counter.during(lambda: run_many(tool, projects[n], url, concurrent)) / concurrent
            full_url = fresh()
            full = Logins(server, full_url.rsplit("/", 1)[1]).during(
                lambda: run(tool, projects[n], full_url if tool == "runner" else alembic_url(full_url)))
            logins[tool] = (one, many, full)
        print("  counted logins", file=sys.stderr)

        load.append(os.getloadavg()[1])
        table = render(rows, logins, concurrent, repeat)
        print(table)
        if output:
            output.mkdir(parents=True, exist_ok=True)
            plot = output / "benchmarks.png"
            plotted = draw(rows, plot)
            (output / "benchmarks.md").write_text(report(table, repeat, concurrent, plotted, load))
            print(f"wrote {output / 'benchmarks.md'}" + (f" and {plot}" if plotted else ""))
    finally:
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)


def order(i: int) -> tuple[str, str]:
    """Which tool runs first in the i-th pair: each in turn, so that neither always follows the other."""
    return ("runner", "alembic") if i % 2 == 0 else ("alembic", "runner")


def med(runs: list[Run], attr: str = "seconds") -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def ratios(runner: list[Run], alembic: list[Run], attr: str = "seconds") -> list[float]:
    """runner / alembic for each pair measured side by side."""
    return [getattr(r, attr) / getattr(a, attr) for r, a in zip(runner, alembic)]


def paired(runner: list[Run], alembic: list[Run], attr: str = "seconds") -> float:
    """The median of runner / alembic over the pairs measured side by side: the machine's speed drifts by a
    third over minutes here, and a pair shares the moment it ran in where two medians do not."""
    return statistics.median(ratios(runner, alembic, attr))


def spread(runner: list[Run], alembic: list[Run], attr: str = "seconds") -> str:
    """The middle half of the pairs' ratios (first to third quartile): how far one pair can be trusted."""
    values = ratios(runner, alembic, attr)
    if len(values) < 4:
        return "–"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.2f}–{high:.2f}"


def render(rows, logins, concurrent, repeat) -> str:
    lines = ["| case | runner (s) | alembic (s) | runner / alembic | CPU time, runner / alembic "
             "| middle half of the pairs (wall; CPU) | runner peak RSS (MiB) | alembic peak RSS (MiB) "
             "| runners on the fast path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _, kind, runner, alembic in rows:
        r, a = med(runner), med(alembic)
        processes = len(runner) * (concurrent if kind == "many" else 1)
        lines.append(f"| {label} | {r:.3f} | {a:.3f} | {paired(runner, alembic):.2f} | "
                     f"{paired(runner, alembic, 'cpu'):.2f} | "
                     f"{spread(runner, alembic)}; {spread(runner, alembic, 'cpu')} | "
                     f"{med(runner, 'maxrss_kib') / 1024:.0f} | {med(alembic, 'maxrss_kib') / 1024:.0f} | "
                     f"{sum(run.fast for run in runner)} of {processes} |")
    lines.append("")
    lines.append("| logins per process (200 revisions) | runner | alembic |")
    lines.append("|---|---:|---:|")
    for index, case in enumerate(("one no-op", f"{concurrent} no-ops at once (mean)", "one full upgrade")):
        lines.append(f"| {case} | {logins['runner'][index]:g} | {logins['alembic'][index]:g} |")
    lines.append("")
    runs = max(1, min(repeat, CONCURRENT_REPEAT))
    full = next((len(row[3]) for row in rows if row[2] == "full"), 0)
    lines.append(f"Times are medians of {NO_OP_RUNS * repeat} runs of each tool for the no-op cases, {full} for the "
                 f"full upgrades, {runs} for the {concurrent}-at-once ones (wall time until the last of them exits; "
                 f"CPU time summed over them). Ratios are the medians of the ratios of the pairs, each pair one "
                 f"run of each tool side by side, in turn first.")
    return "\n".join(lines)


def draw(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for kind, style in (("no-op", "o-"), ("full", "s--")):
        picked = [row for row in rows if row[2] == kind]
        xs = [row[1] for row in picked]
        for tool, index, colour in (("runner", 3, "tab:blue"), ("alembic", 4, "tab:orange")):
            ax.plot(xs, [med(row[index]) for row in picked], style, color=colour,
                    label=f"{tool}, {'no-op (at heads)' if kind == 'no-op' else 'full upgrade from empty'}")
    ax.set_xlabel("revisions in the project")
    ax.set_ylabel("wall time of one process (s, median)")
    ax.set_title("migration-runner vs bare `alembic upgrade heads`")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def report(table: str, repeat: int, concurrent: int, plotted: bool, load: list[float]) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    memory = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), "?")
    from importlib.metadata import version

    versions = ", ".join(f"{name} {version(name)}" for name in ("alembic", "SQLAlchemy", "psycopg"))
    return f"""# Benchmarks: migration-runner against bare alembic

Generated by `python bench/bench.py` ({time.strftime('%Y-%m-%d')}). Re-run it to refresh this page.

{table}

{'![runner and alembic time against the number of revisions](benchmarks.png)' if plotted else ''}

## How it was measured

- Server: the embedded PostgreSQL 16 of the test suite (`tests/postgres.py`, the pgserver wheel) on
  127.0.0.1, `fsync=off`; the same server and the same projects for both tools.
- Projects: the `alembic init` generic template; revision *i* creates table `r_i`. For bare alembic the
  URL is passed with `alembic -x url=...` (a three-line addition to env.py); the runner sets it itself.
- Each measurement is one process, from spawn to exit (wall time, `time.perf_counter`), with its CPU
  time (user + system) and peak resident memory from `wait4`. Runner and alembic run in pairs, side
  by side, each first in turn: {NO_OP_RUNS * repeat} pairs for a no-op, {2 * repeat + 1} for a full
  upgrade. A ratio is the median of the pairs' ratios: this machine's speed drifts (the same full
  upgrade of 1000 revisions took 2.8 s and 7 s within minutes, CPU time 1.3 s and 2.5 s), and a pair
  shares the moment it ran in where two medians do not. CPU time leaves out waiting for the server.
- Both tools run from compiled bytecode, as in the image (`compileall` of the runner's package and the
  projects first): with `PYTHONDONTWRITEBYTECODE` set, an editable checkout would otherwise compile the
  runner's modules in every process (about 13 ms).
- No-op: the database is already at the heads, migrated by the runner first (so that its lineage, and
  the digest the fast path compares, are recorded). Full upgrade: a new, empty database for every run.
- At once: {concurrent} processes of one tool started together on the no-op's database (at the heads),
  timed until the last exits, then {concurrent} of the other; CPU time is their sum. Bare alembic needs
  no lock to do nothing, so this is the one concurrent case both tools can run.
- Logins: the database's `pg_stat_database.sessions` counter before and after (read from another
  database, so the reading session is not counted).

## Where the time goes

- A no-op takes the fast path (`runner/fastpath.py`): the runner imports pydantic-settings and psycopg,
  hashes the script directory and the ini (the digest), logs in once and runs one query for the
  table carrying that digest, its version rows and `pg_is_in_recovery()`. It imports neither alembic
  nor SQLAlchemy (`python -X importtime -m runner --help` shows it) and runs no `env.py`, where bare
  alembic imports both, loads every revision file and builds an engine: so the ratio falls as the
  revisions grow. The floor is the interpreter, pydantic-settings (the one settings class) and psycopg.
- A full upgrade runs `env.py` as alembic does, and the migration's statements cost both the same. The
  runner adds a fixed cost: pydantic-settings' import (the largest part), two more logins (the wait's
  session, kept as the lock's second one, and the lock's: a login to this server takes about 7 ms,
  4 ms of it the client's CPU for libpq's SCRAM), the digest of the script files (a few ms for 1000), a walk of the revisions for the lineage,
  and a second log line a revision. It saves two (`runner/startup.py`): it imports its stack (pydantic,
  alembic, SQLAlchemy, psycopg: some 140,000 objects that live as long as the process) with Python's
  cyclic garbage collector paused, then freezes those objects out of its reach, so that neither the
  imports nor later collections traverse them again (bare alembic spends about 60 ms of a 200-revision
  upgrade and 140 ms of a 1000-revision one in the collector; the runner 7 and 30 to 50 ms); env.py
  and the revisions run with the collector on, at Python's thresholds. And it leaves by `os._exit` once
  everything is closed, where alembic's interpreter tears its modules down (0.15 to 0.2 s at 1000
  revisions). The column of the pairs' middle half shows how far a single pair scatters here.
- Many at once: each process starts Python and imports its stack, and two cores run them, so the
  ratio of the many is about that of one no-op's CPU time.

## Machine

{platform.platform()}; {os.cpu_count()} cores ({cpu}); {memory} memory; Python {platform.python_version()};
load average (5 min) {load[0]:.1f} at the start and {load[-1]:.1f} at the end (a lagging figure: the
many-at-once cases raise it, as may other work on the machine);
{versions}.
"""


if __name__ == "__main__":
    main()
