"""Native workers vs a Dask cluster (serve --dask local:N): per-run overhead and scaling.

    python benchmarks/bench_scale.py                       # N = 1, 2; 500 trivial runs
    python benchmarks/bench_scale.py --runs 100 --json out.json

For each executor (native ``--workers N``, Dask ``--dask local:N``) and each N, one server
is started under a temporary state directory; all run side by side, and every measure is
taken in rounds over all of them in turn (``--rounds``), so that a load that changes while
the benchmark runs (a shared machine) weighs on each alike:

* ``trivial``: ``--runs`` runs that return a number, one after the other; each run's round
  trip (execute -> results in the client) is timed: the median is the per-run overhead;
* ``nuclei``: the bundled nuclei example, one run per image of ``--images`` (default:
  the subset in tests/data), all submitted at once, ``--repeat`` passes (default 4: the
  subset has 6 images, too few runs to time two workers against one); the wall times
  until all have results, summed. One untimed pass over the images first, so that
  every worker has imported scikit-image (a first import costs seconds, and a warm-up of
  one run warmed one worker only).
* ``raw Dask`` (Dask executors): the same trivial function through a bare
  ``LocalCluster`` of N workers, ``client.submit(f).result()`` one after the other: the
  floor that one Dask task per run puts under the Dask executor's round trip.

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


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
    }


def trivial(c: ExecutionClient, runs: int, times: list[float]) -> None:
    """``runs`` trivial runs one after the other; their round trips go to ``times``."""
    for i in range(runs):
        t0 = time.perf_counter()
        c.get_results(c.execute(TRIVIAL, config={"i": i}), timeout=60)
        times.append(time.perf_counter() - t0)


class Nuclei:
    """The nuclei example over ``folder``: one run per image."""

    def __init__(self, folder: Path) -> None:
        examples = resources.examples_dir()
        self.pipeline = (examples / "nuclei_pipeline.py").read_text()
        self.config_code = (examples / "nuclei_config.py").read_text()
        self.folder = folder
        self.images = sorted(
            p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif")
        )

    def one_pass(self, c: ExecutionClient) -> tuple[float, int]:
        """Every image at once; (wall time until all have results, nuclei counted)."""
        t0 = time.perf_counter()
        ids = [
            c.execute(
                self.pipeline,
                self.config_code,
                config={"input_dir": str(self.folder), "pattern": name},
            )
            for name in self.images
        ]
        counts = [c.get_results(i, timeout=600)["counts"][0]["count"] for i in ids]
        return time.perf_counter() - t0, sum(counts)


def _trivial(i: int) -> int:
    return i


class RawDask:
    """A bare LocalCluster of n single-threaded worker processes: submit -> result."""

    def __init__(self, n: int) -> None:
        import logging

        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )
        self.client = Client(self.cluster)

    def trivial(self, runs: int, times: list[float]) -> None:
        for i in range(runs):
            t0 = time.perf_counter()
            self.client.submit(_trivial, i, pure=False).result()
            times.append(time.perf_counter() - t0)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="trivial runs per server")
    parser.add_argument("--workers", default="1,2", help="N values (comma-separated)")
    parser.add_argument("--images", type=Path, default=SUBSET, help="folder of nuclei images")
    parser.add_argument("--repeat", type=int, default=4, help="timed passes over the images")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the trivial runs")
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
        f"nuclei: {args.images}",
        flush=True,
    )
    nuclei = Nuclei(args.images)
    procs: list[subprocess.Popen] = []
    clients: dict[str, ExecutionClient] = {}
    raws: dict[str, RawDask] = {}
    times: dict[str, list[float]] = {}
    walls: dict[str, float] = {}
    counted: dict[str, int] = {}
    try:
        for executor in executors:
            for n in ns:
                port, proc = start(executor, n, root)
                procs.append(proc)
                name = f"{executor}:{n}"
                clients[name] = c = ExecutionClient(port=port, auto_spawn=False)
                trivial(c, 10, [])  # warm-up: code caches, connections
                nuclei.one_pass(c)  # untimed: every worker imports scikit-image here
                times[name], walls[name], counted[name] = [], 0.0, 0
                if executor == "dask":
                    raws[f"raw-dask:{n}"] = raw = RawDask(n)
                    raw.trivial(10, [])
                    times[f"raw-dask:{n}"] = []
        # every measure in rounds over all targets, in turn: a load that changes while the
        # benchmark runs (a shared machine) weighs on each target alike
        names = list(times)
        per_round = max(1, args.runs // args.rounds)
        for r in range(args.rounds):
            for name in _rotated(names, r):
                if name in clients:
                    trivial(clients[name], per_round, times[name])
                else:
                    raws[name].trivial(per_round, times[name])
        servers = list(clients)
        for r in range(args.repeat):
            for name in _rotated(servers, r):
                wall, count = nuclei.one_pass(clients[name])
                walls[name] += wall
                counted[name] += count
    finally:
        for c in clients.values():
            c.close()
        for proc in procs:
            stop(proc)
        for raw in raws.values():
            raw.close()
        shutil.rmtree(root, ignore_errors=True)

    figures: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {"trivial": _stats(times[name])}
        if name in clients:
            runs = len(nuclei.images) * args.repeat
            row["nuclei"] = {"wall_s": walls[name], "images": runs, "nuclei": counted[name]}
        figures[name] = row
        line = f"{name:11s}: trivial median {row['trivial']['median_ms']:.2f} ms "
        line += f"(p90 {row['trivial']['p90_ms']:.2f})"
        if "nuclei" in row:
            line += f", nuclei {row['nuclei']['images']} runs in {row['nuclei']['wall_s']:.2f} s"
        print(line)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    summary: dict[str, Any] = {}
    for executor in executors:
        wall_of = {n: figures[f"{executor}:{n}"]["nuclei"]["wall_s"] for n in ns}
        if 1 in wall_of and 2 in wall_of:
            summary[f"{executor}_efficiency_2_over_1"] = wall_of[1] / wall_of[2] / 2
    if "native" in executors and "dask" in executors:
        for n in ns:
            summary[f"dask_overhead_ms_N{n}"] = (
                figures[f"dask:{n}"]["trivial"]["median_ms"]
                - figures[f"native:{n}"]["trivial"]["median_ms"]
            )
    for n in ns:
        if f"raw-dask:{n}" in figures:
            summary[f"dask_over_raw_dask_ms_N{n}"] = (
                figures[f"dask:{n}"]["trivial"]["median_ms"]
                - figures[f"raw-dask:{n}"]["trivial"]["median_ms"]
            )
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
