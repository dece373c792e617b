"""The benchmark's quick mode runs end to end, so that it cannot rot. It asserts no timing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_bench_quick_mode_runs_and_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("no-op, 1 revisions", "no-op, 1000 revisions", "full upgrade, 1 revisions",
                 "full upgrade, 1000 revisions", "10 runners at once at the heads, 1000 revisions",
                 "logins per process"):
        assert case in proc.stdout
    report = (tmp_path / "benchmarks.md").read_text()
    assert "| case |" in report and "## How it was measured" in report and "## Machine" in report


@pytest.mark.slow
def test_telemetry_bench_quick_mode_compares_without_and_with_an_endpoint():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "telemetry.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "revisions" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["no-op, 200 revisions", "full upgrade, 200 revisions"]
    for row in rows:  # alembic's time, then the runner's without and with an endpoint, each a ratio to alembic's
        cells = [cell.strip() for cell in row.split("|")[2:-1]]
        assert all(float(cells[i].rstrip("x")) > 0 for i in range(5)), row
