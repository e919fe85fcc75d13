"""Native workers vs a Dask cluster (serve --dask local:N): per-run overhead and scaling.

    python benchmarks/bench_scale.py                       # N = 1, 2; 500 trivial runs
    python benchmarks/bench_scale.py --runs 100 --json out.json

For each executor (native ``--workers N``, Dask ``--dask local:N``) and each N, one server
is started under a temporary state directory, then:

* ``trivial``: ``--runs`` runs that return a number, one after the other; each run's round
  trip (execute -> results in the client) is timed: the median is the per-run overhead;
* ``nuclei``: the bundled nuclei example, one run per image of ``--images`` (default:
  the subset in tests/data), all submitted at once; wall time until all have results.

Parallel efficiency of N = 2 over N = 1 is ``wall(1) / wall(2) / 2`` (1.0: perfect). On a
machine with few cores the server, the client and the workers share them: read the
figures next to the core count and the load average printed at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "core"))

from zmqruntime import ExecutionClient, resources  # noqa: E402
from zmqruntime.transport import free_port, port_accepts_tcp  # noqa: E402

TRIVIAL = "def run(ctx, config):\n    return config['i']\n"
SUBSET = REPO / "tests" / "data" / "dsb2018_stage1_fluo_nuclei" / "images"


def start(executor: str, n: int, root: Path) -> tuple[int, subprocess.Popen]:
    port = free_port()
    data = root / f"{executor}-{n}"
    data.mkdir()
    cmd = [sys.executable, "-m", "zmqruntime", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data), "--workers", str(n)]
    if executor == "dask":
        cmd += ["--dask", f"local:{n}"]
    out = open(data / "stdout.txt", "wb")  # noqa: SIM115 - closed right after
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    out.close()
    deadline = time.monotonic() + 120
    while not port_accepts_tcp("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {(data / 'stdout.txt').read_text()}")
        time.sleep(0.05)
    with ExecutionClient(port=port, auto_spawn=False) as c:
        while c.ping()["workers_ready"] < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{executor}: {n} workers did not start")
            time.sleep(0.05)
    return port, proc


def stop(proc: subprocess.Popen) -> None:
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def trivial(c: ExecutionClient, runs: int) -> dict[str, float]:
    for i in range(min(10, runs)):  # warm-up: code caches, connections
        c.get_results(c.execute(TRIVIAL, config={"i": i}), timeout=60)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        c.get_results(c.execute(TRIVIAL, config={"i": i}), timeout=60)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
    }


def nuclei(c: ExecutionClient, folder: Path) -> dict[str, float]:
    examples = resources.examples_dir()
    pipeline = (examples / "nuclei_pipeline.py").read_text()
    config_code = (examples / "nuclei_config.py").read_text()
    images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif"))
    # one warm-up run: imports (scikit-image) in every worker are not what is measured
    c.get_results(
        c.execute(pipeline, config_code, config={"input_dir": str(folder), "pattern": images[0]}),
        timeout=300,
    )
    t0 = time.perf_counter()
    ids = [
        c.execute(pipeline, config_code, config={"input_dir": str(folder), "pattern": name})
        for name in images
    ]
    counts = [c.get_results(i, timeout=600)["counts"][0]["count"] for i in ids]
    return {"wall_s": time.perf_counter() - t0, "images": len(images), "nuclei": sum(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="trivial runs per server")
    parser.add_argument("--workers", default="1,2", help="N values (comma-separated)")
    parser.add_argument("--images", type=Path, default=SUBSET, help="folder of nuclei images")
    parser.add_argument("--executors", default="native,dask")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    ns = [int(n) for n in args.workers.split(",")]
    executors = args.executors.split(",")

    root = Path(tempfile.mkdtemp(prefix="zmqr-bench-scale-"))
    os.environ["ZMQRUNTIME_RUNTIME_DIR"] = str(root / "runtime")
    os.environ["ZMQRUNTIME_DATA_DIR"] = str(root / "data")
    os.environ["DASK_TEMPORARY_DIRECTORY"] = str(root / "dask-scratch")
    print(
        f"cores: {os.cpu_count()}, load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.runs} trivial runs; "
        f"nuclei: {args.images}"
    )
    figures: dict[str, dict[str, Any]] = {}
    try:
        for executor in executors:
            for n in ns:
                port, proc = start(executor, n, root)
                try:
                    with ExecutionClient(port=port, auto_spawn=False) as c:
                        row = {"trivial": trivial(c, args.runs), "nuclei": nuclei(c, args.images)}
                finally:
                    stop(proc)
                figures[f"{executor}:{n}"] = row
                print(
                    f"{executor:6s} N={n}: trivial median {row['trivial']['median_ms']:.2f} ms "
                    f"(p90 {row['trivial']['p90_ms']:.2f}), nuclei {row['nuclei']['images']} "
                    f"images in {row['nuclei']['wall_s']:.2f} s"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary: dict[str, Any] = {}
    for executor in executors:
        walls = {n: figures[f"{executor}:{n}"]["nuclei"]["wall_s"] for n in ns}
        if 1 in walls and 2 in walls:
            summary[f"{executor}_efficiency_2_over_1"] = walls[1] / walls[2] / 2
    if "native" in executors and "dask" in executors:
        for n in ns:
            summary[f"dask_overhead_ms_N{n}"] = (
                figures[f"dask:{n}"]["trivial"]["median_ms"]
                - figures[f"native:{n}"]["trivial"]["median_ms"]
            )
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
