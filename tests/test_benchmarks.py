"""The benchmark scripts still run against the current API (figures are not checked here:
timings belong to the benchmarks themselves)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

pytestmark = pytest.mark.slow


def run_script(*args: str, timeout: float = 240) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "core"), str(REPO), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, f"the benchmark left processes running: {after - before}"
    return out.stdout


def row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(f"| {label}"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_compare_prints_one_table_with_zmqruntime_and_raw_pyzmq(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    table = run_script(
        str(BENCH / "compare.py"),
        "--quick",
        "--only",
        "pyzmq,disk,zmqruntime",
        "--workloads",
        "roundtrip,streaming,startup",
        "--json",
        str(out),
    )
    header = row(table, "workload")
    assert header[2:5] == ["raw pyzmq", "result-file ceiling", "zmqruntime"]
    median = row(table, "1. round trip, median")
    assert re.fullmatch(r"[\d.,]+", median[4]), median
    assert re.match(r"[\d.,]+ \([\d.e+-]+×\)", median[2]), median
    live = row(table, "4a. streaming, live only")
    assert "of raw pyzmq" in live[5] and live[3] == "n/a"
    stored = row(table, "4b. streaming, stored to disk")
    assert "of the ceiling" in stored[5] and "fetched from the store" in stored[5]
    assert stored[2] == "n/a" and re.match(r"[\d.,]+ \(", stored[3]), stored
    assert row(table, "6. start-up")[4] != "n/a"
    assert "Versions:" in table and "logical cores" in table
    assert table.count("| workload |") == 1
    figures = json.loads(out.read_text())
    for key in (
        "pyzmq_streaming_live_frames_s",
        "disk_streaming_stored_frames_s",
        "zmqruntime_streaming_live_frames_s",
        "zmqruntime_streaming_stored_frames_s",
        "zmqruntime_streaming_stored_frames_fetched",
        "zmqruntime_roundtrip_median_ms",
    ):
        assert figures[key] >= 0, key
    assert figures["benchmark"] == "compare"


def test_bench_stream_measures_throughput_ping_and_memory(tmp_path: Path) -> None:
    table = run_script(
        str(BENCH / "bench_stream.py"),
        "--frames",
        "10",
        "--gb",
        "0.1",
        "--ping-seconds",
        "1",
        "--submit-runs",
        "40",
        "--json",
        str(tmp_path / "figures.json"),
    )
    figures = json.loads((tmp_path / "figures.json").read_text())
    for key in (
        "raw_pyzmq_fps",
        "result_file_ceiling_fps",
        "stored_stream_fps",
        "stored_fetched_from_store",
        "preview_fps",
        "ping_p99_ms_streaming",
        "ping_p99_ms_submit_load",
        "ping_max_ms_submit_load",
        "arrays_back_fps",
    ):
        assert isinstance(figures[key], (int, float)) and figures[key] >= 0, key
    assert re.search(r"p99 [\d.]+ ms", row(table, "ping() from a fifth client")[1])
    assert "frames/s = " in row(table, "zmqruntime ctx.emit")[1]
    assert re.search(r"p99 [\d.]+ ms", row(table, "ping() from a second client while")[1])
    assert re.match(r"\+[\d.]+ MB", row(table, "client RSS growth")[1])
    assert re.match(r"\+[\d.]+ MB", row(table, "server RSS growth")[1])
