"""ExecutionPool throughput with 1, 2 and 3 local servers (tcp loopback), as ratios.

    python benchmarks/bench_pool.py                      # defaults below
    python benchmarks/bench_pool.py --workers 2 --runs 2000 --json out.json

Three servers are started (``--workers`` each) under a temporary state directory; for
k = 1, 2, 3 an ``ExecutionPool`` over the first k servers runs, with ``pool.map``:

* ``trivial``: ``--runs`` runs that return a number (dispatch and bookkeeping cost);
* ``sleep``: ``--sleep-runs`` runs that sleep ``--sleep`` seconds (work that waits on
  a camera or a disk: this is where more servers should mean more runs per second);
* ``frames``: ``--frame-runs`` runs that each emit ``--frames`` uint16 frames of
  ``--size``² pixels, fetched by the pool (frames/s and MB/s into the client).

For comparison, one ``ExecutionClient`` on server 1 does the trivial and frames
workloads (submit all, then fetch each). On a machine with few cores, servers share
them: read the ratios next to the core count printed at the top.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
CORE = HERE.parent / "core"  # this checkout's runtime, for the servers too
sys.path.insert(0, str(CORE))
sys.path.insert(0, str(HERE))  # common

from zmqruntime import ExecutionClient, ExecutionPool  # noqa: E402
from zmqruntime.transport import free_port, port_accepts_tcp  # noqa: E402

TRIVIAL = "def run(ctx, config):\n    return config['i']\n"
SLEEP = (
    "import time\n\ndef run(ctx, config):\n    time.sleep(config['t'])\n    return config['i']\n"
)
FRAMES = """
import numpy as np

def run(ctx, config):
    frame = np.full((config["size"], config["size"]), config["i"], dtype=np.uint16)
    for k in range(config["frames"]):
        frame[0, 0] = k
        ctx.emit("frame", frame)
"""


def start_servers(n: int, workers: int, root: Path) -> list[tuple[int, subprocess.Popen]]:
    servers = []
    for i in range(n):
        port = free_port()
        data = root / f"server{i}"
        data.mkdir(parents=True)
        cmd = [sys.executable, "-m", "zmqruntime", "serve", "--port", str(port),
               "--workers", str(workers), "--data-dir", str(data)]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(CORE), os.environ.get("PYTHONPATH", "")]),
        }
        with open(data / "stdout.txt", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        servers.append((port, proc))
    for port, proc in servers:
        deadline = time.monotonic() + 60
        while not port_accepts_tcp("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not start")
            time.sleep(0.05)
        with ExecutionClient(port, auto_spawn=False) as c:
            while c.ping()["workers_ready"] < workers:
                time.sleep(0.05)
    return servers


def stop_servers(servers: list[tuple[int, subprocess.Popen]]) -> None:
    for _, proc in servers:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()


REPEAT = 3


def timed_map(pool: ExecutionPool, code: str, configs: list[dict[str, Any]]) -> float:
    """Median seconds of REPEAT maps (shared machines drift; the median drifts less)."""
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        n = 0
        for item in pool.map(code, configs):
            item.result()  # raises if a run failed: a benchmark of failures is worthless
            n += 1
        assert n == len(configs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_pool(ports: list[int], args: argparse.Namespace) -> dict[str, float]:
    eps = [f"tcp://127.0.0.1:{p}" for p in ports]
    with ExecutionPool(eps, timeout=30.0) as pool:
        timed_map(pool, TRIVIAL, [{"i": i} for i in range(50)])  # warm up code caches
        dt = timed_map(pool, TRIVIAL, [{"i": i} for i in range(args.runs)])
        trivial = args.runs / dt
        configs = [{"i": i, "t": args.sleep} for i in range(args.sleep_runs)]
        sleep = args.sleep_runs / timed_map(pool, SLEEP, configs)
        configs = [
            {"i": i, "frames": args.frames, "size": args.size} for i in range(args.frame_runs)
        ]
        dt = timed_map(pool, FRAMES, configs)
        n_frames = args.frame_runs * args.frames
        spread = {s["server"]: s["workers"] for s in pool.servers()}
    return {
        "servers": len(ports),
        "workers": sum(spread.values()),
        "trivial_runs_per_s": trivial,
        "sleep_runs_per_s": sleep,
        "frames_per_s": n_frames / dt,
        "MB_per_s": n_frames * args.size * args.size * 2 / dt / 1e6,
    }


def timed_client(c: ExecutionClient, code: str, configs: list[dict[str, Any]]) -> float:
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        ids = [c.execute(code, config=config) for config in configs]
        for exec_id in ids:
            c.get_results(exec_id)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_client(port: int, args: argparse.Namespace) -> dict[str, float]:
    with ExecutionClient(port, auto_spawn=False, timeout=30.0) as c:
        trivial = args.runs / timed_client(c, TRIVIAL, [{"i": i} for i in range(args.runs)])
        configs = [
            {"i": i, "frames": args.frames, "size": args.size} for i in range(args.frame_runs)
        ]
        dt = timed_client(c, FRAMES, configs)
    n_frames = args.frame_runs * args.frames
    return {
        "trivial_runs_per_s": trivial,
        "frames_per_s": n_frames / dt,
        "MB_per_s": n_frames * args.size * args.size * 2 / dt / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="workers per server")
    parser.add_argument("--runs", type=int, default=1000, help="trivial runs")
    parser.add_argument("--sleep-runs", type=int, default=120)
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds per sleep run")
    parser.add_argument("--frame-runs", type=int, default=12)
    parser.add_argument("--frames", type=int, default=5, help="frames per frame run")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many maps")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    global REPEAT
    REPEAT = args.repeat

    root = Path(tempfile.mkdtemp(prefix="zmqr-bench-pool-"))
    os.environ["ZMQRUNTIME_RUNTIME_DIR"] = str(root / "runtime")
    os.environ["ZMQRUNTIME_DATA_DIR"] = str(root / "data")
    servers: list[tuple[int, subprocess.Popen]] = []
    try:
        servers = start_servers(3, args.workers, root)
        ports = [p for p, _ in servers]
        print(
            f"cores: {os.cpu_count()}, servers: 3 x {args.workers} worker(s), loopback; "
            f"{args.runs} trivial runs, {args.sleep_runs} x {args.sleep:g} s sleep runs, "
            f"{args.frame_runs} x {args.frames} frames of {args.size}x{args.size} uint16"
        )
        rows = [bench_pool(ports[:k], args) for k in (1, 2, 3)]
        direct = bench_client(ports[0], args)
    finally:
        stop_servers(servers)
        shutil.rmtree(root, ignore_errors=True)

    base = rows[0]
    header = f"{'':24s}" + "".join(
        f"{k} server{'s' if k > 1 else '':1s}".rjust(14) for k in (1, 2, 3)
    )
    print(header)
    for key, label in (
        ("trivial_runs_per_s", "trivial runs/s"),
        ("sleep_runs_per_s", f"{args.sleep:g} s runs/s"),
        ("frames_per_s", "frames/s"),
        ("MB_per_s", "MB/s"),
    ):
        print(f"{label:24s}" + "".join(f"{r[key]:14.1f}" for r in rows))
        print(f"{'  ratio to 1 server':24s}" + "".join(f"{r[key] / base[key]:14.2f}" for r in rows))
    print(
        f"one ExecutionClient on server 1: {direct['trivial_runs_per_s']:.1f} trivial runs/s "
        f"(pool/client {base['trivial_runs_per_s'] / direct['trivial_runs_per_s']:.2f}), "
        f"{direct['frames_per_s']:.1f} frames/s "
        f"(pool/client {base['frames_per_s'] / direct['frames_per_s']:.2f})"
    )
    if args.json:
        # stable keys: pool_<k>_servers_<figure> (k = 1, 2, 3) and client_<figure>, with
        # figure one of trivial_runs_per_s, sleep_runs_per_s, frames_per_s, MB_per_s
        import common

        flat: dict[str, Any] = {
            f"pool_{k}_servers_{key}": value
            for k, row in zip((1, 2, 3), rows)
            for key, value in row.items()
        }
        flat.update({f"client_{key}": value for key, value in direct.items()})
        flat.update(pool=rows, client=direct)
        common.write_json(args.json, "bench_pool", flat, sys.argv)


if __name__ == "__main__":
    main()
