"""benchmarks/bench_acquisition.py still runs and says what it measured (its figures are not
checked here: timings belong to the benchmark, on a machine it has to itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

STAGES = ("yield", "read", "preview_call", "event", "result", "preview")


def test_bench_acquisition_runs_both_modes_and_splits_each_frames_way(tmp_path: Path) -> None:
    figures = tmp_path / "acq.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "core"), str(REPO)])
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "bench_acquisition.py"),
        "--rates", "10", "--frames", "8", "--json", str(figures),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, f"the benchmark left processes running: {after - before}"

    rows = [line for line in out.stdout.splitlines() if line.startswith("| 10 (")]
    assert [r.split("|")[2].strip() for r in rows] == ["inotify", "polling 0.1 s"], out.stdout
    settings = json.loads(figures.read_text())["settings"]
    assert len(settings) == 2
    for setting in settings:
        assert setting["state"] == "completed" and setting["exactly_once_in_order"], setting
        for stage in STAGES:
            # previews are newest-wins: one a newer one replaced is not counted
            assert 1 <= setting[f"{stage}_n"] <= 8, (stage, setting)
            assert setting[f"{stage}_n"] == 8 or stage == "preview", (stage, setting)
            p50, p99 = setting[f"{stage}_latency_p50_ms"], setting[f"{stage}_latency_p99_ms"]
            assert 0 <= p50 <= p99, (stage, setting)
