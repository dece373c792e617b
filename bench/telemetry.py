"""What OpenTelemetry costs: the runner with the otel extra installed, without and with an OTLP endpoint.

    python bench/telemetry.py            # 5 repetitions
    python bench/telemetry.py --quick    # one

Interleaved, as bench/bench.py measures: bare `alembic upgrade heads`, the runner
with no endpoint (the extra installed, nothing of OpenTelemetry imported), and the
runner sending its trace and metrics to a local OTLP/HTTP receiver (which answers
200 without decoding); a no-op at 200 revisions and a full upgrade of 200. Prints
a table of medians and ratios to bare alembic; asserts no timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import Postgres, alembic_url, compile_both, fresh_database, med, project, run  # noqa: E402

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
REVISIONS = 200


class _Collector(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def measure(kind: str, ini: Path, url, collector: str, repeat: int) -> dict[str, list]:
    """`url()` gives the database of each run: the same one for a no-op, a fresh one for a full upgrade."""
    samples = {"alembic": [], "runner": [], "runner + endpoint": []}
    for _ in range(repeat):
        for tool in samples:
            os.environ.pop(ENDPOINT, None)
            if tool == "runner + endpoint":
                os.environ[ENDPOINT] = collector
            target = url()
            samples[tool].append(run("alembic" if tool == "alembic" else "runner", ini,
                                     alembic_url(target) if tool == "alembic" else target))
    os.environ.pop(ENDPOINT, None)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--repeat", type=int, help="repetitions (default 5, quick 1)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 5)
    os.environ.pop(ENDPOINT, None)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    collector = f"http://127.0.0.1:{receiver.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="mr-bench-otel-"))
    server = Postgres().start()
    try:
        def fresh() -> str:
            return fresh_database(server)

        ini = project(work, REVISIONS)
        compile_both(work)
        at_heads = fresh()
        run("runner", ini, at_heads)
        rows = [(f"no-op, {REVISIONS} revisions", measure("no-op", ini, lambda: at_heads, collector, 3 * repeat)),
                (f"full upgrade, {REVISIONS} revisions", measure("full", ini, fresh, collector, repeat))]
        lines = ["| case | alembic (s) | runner, no endpoint (s) | ratio | runner, endpoint (s) | ratio | "
                 "peak RSS no endpoint / endpoint (MiB) |", "|---|---|---|---|---|---|---|"]
        for label, samples in rows:
            bare, off, on = (med(samples[tool]) for tool in ("alembic", "runner", "runner + endpoint"))
            rss = "/".join(f"{med(samples[tool], 'maxrss_kib') / 1024:.0f}" for tool in ("runner", "runner + endpoint"))
            lines.append(f"| {label} | {bare:.2f} | {off:.2f} | {off / bare:.2f}x | {on:.2f} | {on / bare:.2f}x | "
                         f"{rss} |")
        print("\n".join(lines))
    finally:
        receiver.shutdown()
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
