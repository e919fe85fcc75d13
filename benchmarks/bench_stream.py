"""The data channel under load: throughput against raw pyzmq, ping latency, bounded memory.

    python benchmarks/bench_stream.py                 # 200 frames, 4 GB to disk
    python benchmarks/bench_stream.py --frames 100 --gb 1

In one run (issue 3, point 8), with 2048x2048 uint16 frames (8 MiB each):

1. raw pyzmq PUSH/PULL from a worker process over tcp loopback: frames/s;
2. the same frames emitted by a pipeline (``ctx.emit``) and consumed with
   ``ExecutionClient.stream()`` through a local server: frames/s and the ratio to 1;
   ``ctx.preview`` (never stored, newest wins) is measured too, for information;
3. ``ping()`` p50/p99 from a second client (another process) while frames stream at
   full speed, next to the same figures with nothing streaming;
4. the resident memory growth of the client while ``get_results(directory=...)``
   writes ``--gb`` GB of results to disk (in a fresh client process), and of the
   server and its workers while the run produces them and while they are fetched;
5. ``ping()`` p99/max while 4 client processes submit ``--submit-runs`` trivial runs
   each (half one by one, half with execute_many) and gather them;
6. arrays back: 50 runs each returning one frame, ``gather``ed by a client on the
   server's host (which reads the store's files itself) against the disk ceiling.

``--json FILE`` writes the figures with stable keys (raw_pyzmq_fps,
result_file_ceiling_fps, stored_stream_fps, stored_fetched_from_store, preview_fps,
ping_p99_ms_streaming, ping_p99_ms_submit_load, ping_max_ms_submit_load,
arrays_back_fps, ...).

Everything runs under a temporary state directory and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common  # noqa: E402
import numpy as np  # noqa: E402

FINAL = ("completed", "failed", "cancelled")

EMIT_N = (
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    frame = np.full((2048, 2048), 7, np.uint16)\n"
    "    for _ in range(config.n):\n"
    "        ctx.emit('frame', frame)\n"
)
EMIT_N_NOCOPY = EMIT_N.replace("ctx.emit('frame', frame)", "ctx.emit('frame', frame, copy=False)")
PREVIEW_FOR = (
    "import time\n"
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    frame = np.full((2048, 2048), 7, np.uint16)\n"
    "    start = time.monotonic()\n"
    "    n = 0\n"
    "    while time.monotonic() < start + config.seconds:\n"
    "        ctx.preview('frame', frame)\n"
    "        n += 1\n"
    "        pause = start + n / config.fps - time.monotonic()\n"
    "        if pause > 0:  # a camera's pace, not a spin that starves the other processes\n"
    "            time.sleep(pause)\n"
    "    return n\n"
)
EMIT_FOR = (
    "import time\n"
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    frame = np.full((2048, 2048), 7, np.uint16)\n"
    "    end = time.monotonic() + config.seconds\n"
    "    while time.monotonic() < end and not ctx.cancelled:\n"
    "        ctx.emit('frame', frame)\n"
)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- phases


def raw_pyzmq(frames: int) -> float:
    """Frames/s of one worker process PUSHing frames to this process's PULL over tcp."""
    pool = common.RawPool(1)
    try:
        pool.wait_ready()
        for n in (5, frames):  # warm-up, then the measurement
            t0 = time.perf_counter()
            pool.submit(common.OP_STREAM, n)
            count = 0
            while True:
                msg = pool.recv()
                if msg[0].bytes == b"end":
                    break
                assert len(msg[1]) == common.FRAME_BYTES
                count += 1
            elapsed = time.perf_counter() - t0
            assert count == n
        return frames / elapsed
    finally:
        pool.close()


def emit_has_copy() -> bool:
    """Whether this zmqruntime's ctx.emit takes copy= (zero-copy results)."""
    import inspect

    from zmqruntime.context import Context

    return "copy" in inspect.signature(Context.emit).parameters


def disk_ceiling(frames: int, directory: Path) -> tuple[float, str]:
    """Frames/s of writing the same frames as result files on the store's filesystem,
    the way the worker does (its own writer if this zmqruntime has one, else np.save).

    The frames come from eight rotating page-aligned buffers, as from the worker's ring:
    rewriting one buffer over and over measures faster here than any real stream is.
    """
    directory.mkdir(parents=True, exist_ok=True)
    frame = common.new_frame()
    try:
        from zmqruntime.resultfile import aligned_copy, write_npy

        buffers = [aligned_copy(frame) for _ in range(8)]

        def write(i: int, path: Path) -> None:
            write_npy(path, buffers[i % len(buffers)])

        how = "zmqruntime.resultfile.write_npy from 8 rotating aligned buffers"
    except ImportError:

        def write(i: int, path: Path) -> None:
            np.save(path, frame, allow_pickle=False)

        how = "np.save"
    try:
        t0 = time.perf_counter()
        for i in range(frames):
            write(i, directory / f"{i}.npy")
        return frames / (time.perf_counter() - t0), how
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def zmqr_stream(client: Any, code: str, frames: int, kind: str) -> tuple[float, int, int]:
    """Frames/s from ``execute`` to the final state; ``kind`` events seen, and how many
    of them were fetched from the store because the live channel dropped them."""
    exec_id = client.execute(code, config={"n": frames})
    t0 = time.perf_counter()
    count = fetched = 0
    for event in client.stream(exec_id):
        if event["kind"] == kind:
            assert event["value"].nbytes == common.FRAME_BYTES
            count += 1
            fetched += bool(event.get("fetched"))
        elif event["kind"] == "state" and event["status"]["state"] in FINAL:
            assert event["status"]["state"] == "completed", event["status"]
    return frames / (time.perf_counter() - t0), count, fetched


def zmqr_previews(client: Any, seconds: float, fps: float) -> tuple[float, float]:
    """Previews received per second while a pipeline offers ``fps`` of them per second,
    and how many it offered per second."""
    exec_id = client.execute(PREVIEW_FOR, config={"seconds": seconds, "fps": fps})
    received = 0
    first = last = None
    offered = 0
    for event in client.stream(exec_id):
        if event["kind"] == "preview":
            assert event["value"].nbytes == common.FRAME_BYTES
            last = time.perf_counter()
            first = first or last
            received += 1
        elif event["kind"] == "result" and event["name"] == "return":
            offered = event["value"]
        elif event["kind"] == "state" and event["status"]["state"] in FINAL:
            assert event["status"]["state"] == "completed", event["status"]
    span = (last - first) if received > 1 else float("nan")
    return (received - 1) / span, offered / seconds


def ping_probe(
    port: int, seconds: float, interval: float, out: Path, until_gone: list[int] | None = None
) -> None:
    """Child process: ping the server every ``interval`` s for ``seconds`` (or until the
    processes ``until_gone`` have all exited); (wall, rtt) pairs."""
    import psutil

    from zmqruntime import ExecutionClient

    samples = []
    watched = [psutil.Process(pid) for pid in until_gone or [] if psutil.pid_exists(pid)]
    with ExecutionClient(port, auto_spawn=False, timeout=10.0) as client:
        client.ping()  # connect first: the handshake is not what we measure
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if watched and not any(p.is_running() and p.status() != "zombie" for p in watched):
                break
            t_wall = time.time()
            t0 = time.perf_counter()
            client.ping()
            samples.append((t_wall, (time.perf_counter() - t0) * 1e3))
            time.sleep(interval)
    out.write_text(json.dumps(samples))


def run_ping_probe(port: int, seconds: float, interval: float, root: Path) -> list[list[float]]:
    out = root / f"pings-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ping-probe",
        str(port),
        "--seconds",
        str(seconds),
        "--interval",
        str(interval),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=seconds + 60)
    return json.loads(out.read_text())


def ping_stats(rtts: list[float]) -> dict[str, float]:
    return {
        "n": len(rtts),
        "p50_ms": common.percentile(rtts, 50),
        "p99_ms": common.percentile(rtts, 99),
        "max_ms": max(rtts),
    }


def ping_while_streaming(
    client: Any, port: int, seconds: float, interval: float, root: Path
) -> dict[str, Any]:
    """Stream frames at full speed in a thread here; ping from another process meanwhile."""
    exec_id = client.execute(EMIT_FOR, config={"seconds": seconds + 4.0})
    window: dict[str, float] = {}
    counts = {"frames": 0}
    first = threading.Event()

    def consume() -> None:
        for event in client.stream(exec_id):
            if event["kind"] == "result":
                if not counts["frames"]:
                    window["start"] = time.time()
                    first.set()
                counts["frames"] += 1
                window["end"] = time.time()
        first.set()

    consumer = threading.Thread(target=consume, name="consumer", daemon=True)
    consumer.start()
    first.wait(60)
    samples = run_ping_probe(port, seconds, interval, root)
    client.cancel(exec_id)
    consumer.join(120)
    inside = [rtt for t, rtt in samples if window["start"] <= t <= window["end"]]
    fps = counts["frames"] / max(window["end"] - window["start"], 1e-9)
    return {**ping_stats(inside), "frames_streamed": counts["frames"], "stream_fps": fps}


def ping_while_fetching(
    client: Any, port: int, frames: int, seconds: float, interval: float, root: Path
) -> dict[str, Any]:
    """Fetch stored results (``get_results(directory=)``, over and over) in a thread here;
    ping from another process meanwhile. Result files are written with O_DIRECT, so the
    server reads them from the disk: bulk data that must not delay control requests."""
    exec_id = client.execute(EMIT_N, config={"n": frames})
    client.wait(exec_id)
    out = root / "fetch-out"
    window: dict[str, float] = {}
    counts = {"frames": 0}
    stop = threading.Event()
    started = threading.Event()

    def fetch() -> None:
        window["start"] = time.time()
        started.set()
        while not stop.is_set():
            results = client.get_results(exec_id, directory=out)
            counts["frames"] += len(results["frame"])
            shutil.rmtree(out, ignore_errors=True)
            window["end"] = time.time()

    fetcher = threading.Thread(target=fetch, name="fetcher", daemon=True)
    fetcher.start()
    started.wait(60)
    samples = run_ping_probe(port, seconds, interval, root)
    stop.set()
    fetcher.join(300)
    inside = [rtt for t, rtt in samples if window["start"] <= t <= window.get("end", t)]
    fps = counts["frames"] / max(window.get("end", 0) - window["start"], 1e-9)
    return {**ping_stats(inside), "frames_fetched": counts["frames"], "fetch_fps": fps}


TRIVIAL = "def run(ctx, config):\n    return config['i']\n"
ARRAY_BACK = (
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    return np.full((2048, 2048), config['i'], np.uint16)\n"
)


def submit_probe(port: int, runs: int) -> None:
    """Child process: submit ``runs`` trivial runs (half one by one, half in one
    execute_many) and gather them all."""
    from zmqruntime import ExecutionClient

    with ExecutionClient(port, auto_spawn=False, timeout=60.0) as client:
        half = runs // 2
        ids = [client.execute(TRIVIAL, config={"i": i}) for i in range(half)]
        ids += client.execute_many(TRIVIAL, [{"i": i} for i in range(half, runs)])
        got = client.gather(ids, timeout=600)
        assert [r["return"][0] for r in got] == list(range(runs))


def ping_while_submitting(
    port: int, clients: int, runs: int, interval: float, root: Path
) -> dict[str, Any]:
    """``clients`` processes submit ``runs`` each; ping from another process meanwhile."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--submit-probe", str(port)]
    cmd += ["--submit-runs", str(runs)]
    t0 = time.time()
    procs = [subprocess.Popen(cmd) for _ in range(clients)]
    out = root / f"pings-submit-{time.monotonic_ns()}.json"
    pinger = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--ping-probe", str(port)]
        + ["--seconds", "3600", "--interval", str(interval), "--out", str(out)]
        + ["--until-gone", ",".join(str(p.pid) for p in procs)]
    )
    try:
        for proc in procs:
            if proc.wait(timeout=900) != 0:
                raise RuntimeError("a submitting client failed")
        t1 = time.time()
        pinger.wait(timeout=120)
    finally:
        for proc in (*procs, pinger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    samples = json.loads(out.read_text())
    inside = [rtt for t, rtt in samples if t0 <= t <= t1]
    return {**ping_stats(inside), "runs": clients * runs, "runs_per_s": clients * runs / (t1 - t0)}


def arrays_back(client: Any, n: int) -> float:
    """Frames/s of ``gather`` over ``n`` finished runs that each returned one frame."""
    ids = client.execute_many(ARRAY_BACK, [{"i": i} for i in range(n)])
    client.gather(ids, timeout=600)  # all finished and stored: what follows is reading
    t0 = time.perf_counter()
    got = client.gather(ids)
    fps = n / (time.perf_counter() - t0)
    assert all(int(r["return"][0][1, 1]) == i % 65536 for i, r in enumerate(got))
    return fps


def rss_probe(port: int, gb: float, out_dir: Path, out: Path) -> None:
    """Child process: a run emitting ``gb`` GB, then get_results(directory=) it; RSS peaks."""
    import psutil

    from zmqruntime import ExecutionClient

    frames = math.ceil(gb * 1e9 / common.FRAME_BYTES)
    with ExecutionClient(port, auto_spawn=False, timeout=60.0) as client:
        server_pid = client.ping()["pid"]
        pids = {"client": os.getpid(), "server": server_pid}
        for i, child in enumerate(psutil.Process(server_pid).children()):
            pids[f"worker{i + 1}"] = child.pid
        report: dict[str, Any] = {"frames": frames, "bytes": frames * common.FRAME_BYTES}
        sampler = common.RssSampler(pids)
        baseline = sampler.baseline
        sampler.start()
        t0 = time.perf_counter()
        exec_id = client.execute(EMIT_N, config={"n": frames})
        client.wait(exec_id)
        report["produce_s"] = time.perf_counter() - t0
        report["produce"] = sampler.stop()
        sampler = common.RssSampler(pids)
        sampler.baseline = baseline  # growth over the state before the run, not between phases
        sampler.start()
        t0 = time.perf_counter()
        results = client.get_results(exec_id, directory=out_dir)
        report["fetch_s"] = time.perf_counter() - t0
        report["fetch"] = sampler.stop()
        files = results["frame"]
        assert len(files) == frames, (len(files), frames)
        assert Path(files[-1]).stat().st_size >= common.FRAME_BYTES
        report["written_bytes"] = sum(Path(f).stat().st_size for f in files)
    out.write_text(json.dumps(report))


def run_rss_probe(port: int, gb: float, root: Path) -> dict[str, Any]:
    out = root / "rss.json"
    out_dir = root / "get_results-out"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-probe",
        str(port),
        "--gb",
        str(gb),
        "--out",
        str(out),
        "--out-dir",
        str(out_dir),
    ]
    try:
        subprocess.run(cmd, check=True, timeout=3600)
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # gigabytes: do not wait for the end


# --------------------------------------------------------------------------- main


def benchmark(
    args: argparse.Namespace, root: Path, figures: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """The table's rows; ``figures`` gets the same numbers under stable keys (--json)."""
    from zmqruntime import ExecutionClient
    from zmqruntime.transport import free_port

    rows: list[tuple[str, str, str]] = []
    steps = set(args.steps)
    raw_fps = None
    if "throughput" in steps:
        log(f"raw pyzmq: {args.frames} frames ...")
        raw_fps = raw_pyzmq(args.frames)
        figures["raw_pyzmq_fps"] = raw_fps
        rows.append(
            (
                f"raw pyzmq PUSH/PULL, tcp loopback, {args.frames} frames",
                f"{common.fmt(raw_fps)} frames/s ({raw_fps * common.FRAME_BYTES / 1e9:.2f} GB/s)",
                "ceiling",
            )
        )
    port = free_port()
    client = ExecutionClient(port, auto_spawn=True, workers=args.workers, timeout=60.0)
    try:
        client.ping()
        while client.ping()["workers_ready"] < args.workers:
            time.sleep(0.02)
        if "throughput" in steps:
            log(f"zmqruntime emit -> stream(): {args.frames} frames ...")
            zmqr_stream(client, EMIT_N, 5, "result")  # warm-up
            fps, count, fetched = zmqr_stream(client, EMIT_N, args.frames, "result")
            assert count == args.frames, (count, args.frames)
            figures.update(stored_stream_fps=fps, stored_fetched_from_store=fetched)
            figures["stored_fetched_share"] = fetched / args.frames
            share = fps / raw_fps if raw_fps else float("nan")
            rows.append(
                (
                    f"zmqruntime ctx.emit -> client.stream(), {args.frames} frames "
                    f"({fetched} of them fetched from the store after a live drop)",
                    f"{common.fmt(fps)} frames/s = {share:.0%} of raw pyzmq",
                    f"≥ 70%: {'met' if share >= 0.7 else 'missed'}",
                )
            )
            if emit_has_copy():
                log(f"zmqruntime emit(copy=False) -> stream(): {args.frames} frames ...")
                fps, count, fetched = zmqr_stream(client, EMIT_N_NOCOPY, args.frames, "result")
                assert count == args.frames, (count, args.frames)
                rows.append(
                    (
                        f"the same with ctx.emit(..., copy=False) ({fetched} fetched)",
                        f"{common.fmt(fps)} frames/s = {fps / raw_fps:.0%} of raw pyzmq",
                        "information",
                    )
                )
            log(f"result-file ceiling: {args.frames} frames ...")
            disk_fps, how = disk_ceiling(args.frames, root / "disk-ceiling")
            figures["result_file_ceiling_fps"] = disk_fps
            figures["stored_stream_vs_ceiling"] = figures["stored_stream_fps"] / disk_fps
            rows.append(
                (
                    f"writing the same {args.frames} frames as result files on the store's "
                    f"filesystem, one process ({how}; every emitted result is written once)",
                    f"{common.fmt(disk_fps)} frames/s "
                    f"({disk_fps * common.FRAME_BYTES / 1e9:.2f} GB/s)",
                    "ceiling",
                )
            )
            ratio = figures["stored_stream_vs_ceiling"]
            fetched_share = figures["stored_fetched_share"]
            rows.append(
                (
                    "stored results streamed (ctx.emit -> stream()) against that ceiling, and "
                    "the share a local watcher fetched from the store instead of live",
                    f"{ratio:.0%} of the ceiling; {fetched_share:.1%} fetched",
                    f"≥ 90%: {'met' if ratio >= 0.9 else 'missed'}; "
                    f"≤ 5%: {'met' if fetched_share <= 0.05 else 'missed'}",
                )
            )
            log("zmqruntime preview -> stream(): 3 s ...")
            received, sent = zmqr_previews(client, 3.0, fps=2 * raw_fps)
            figures["preview_fps"] = received
            rows.append(
                (
                    "zmqruntime ctx.preview -> client.stream() for 3 s, offered at twice the "
                    "raw pyzmq rate (never stored; a lagging watcher gets the newest)",
                    f"{common.fmt(received)} frames/s received = {received / raw_fps:.0%} of "
                    f"raw pyzmq; the pipeline offered {common.fmt(sent)} frames/s",
                    "information",
                )
            )
        if "ping" in steps:
            log(f"ping idle for {args.ping_seconds / 2:g} s ...")
            idle = ping_stats(
                [r for _, r in run_ping_probe(port, args.ping_seconds / 2, args.interval, root)]
            )
            rows.append(
                (
                    f"ping() from a second client, idle ({idle['n']} pings)",
                    f"p50 {idle['p50_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} ms, "
                    f"max {idle['max_ms']:.2f} ms",
                    "reference",
                )
            )
            log(f"ping while frames stream, {args.ping_seconds:g} s ...")
            busy = ping_while_streaming(client, port, args.ping_seconds, args.interval, root)
            figures["ping_p99_ms_streaming"] = busy["p99_ms"]
            rows.append(
                (
                    f"ping() from a second client while frames stream ({busy['n']} pings; "
                    f"{busy['frames_streamed']} frames at {busy['stream_fps']:.0f}/s)",
                    f"p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms, "
                    f"max {busy['max_ms']:.2f} ms",
                    f"p99 ≤ 5 ms: {'met' if busy['p99_ms'] <= 5 else 'missed'}",
                )
            )
            log(f"ping while stored results are fetched, {args.ping_seconds:g} s ...")
            fetching = ping_while_fetching(
                client, port, args.frames, args.ping_seconds, args.interval, root
            )
            rows.append(
                (
                    f"ping() from a second client while another fetches stored results "
                    f"({fetching['n']} pings; {fetching['frames_fetched']} frames fetched "
                    f"at {fetching['fetch_fps']:.0f}/s)",
                    f"p50 {fetching['p50_ms']:.2f} ms, p99 {fetching['p99_ms']:.2f} ms, "
                    f"max {fetching['max_ms']:.2f} ms",
                    f"p99 ≤ 5 ms: {'met' if fetching['p99_ms'] <= 5 else 'missed'}",
                )
            )
        if "submit" in steps:
            log(f"ping while 4 clients submit {args.submit_runs} runs each ...")
            load = ping_while_submitting(port, 4, args.submit_runs, args.interval, root)
            figures["ping_p99_ms_submit_load"] = load["p99_ms"]
            figures["ping_max_ms_submit_load"] = load["max_ms"]
            figures["submit_runs_per_s"] = load["runs_per_s"]
            rows.append(
                (
                    f"ping() from a fifth client while 4 clients submit {args.submit_runs} "
                    f"trivial runs each, half one by one, half with execute_many "
                    f"({load['n']} pings; {load['runs_per_s']:.0f} runs/s)",
                    f"p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms, "
                    f"max {load['max_ms']:.2f} ms",
                    "p99 ≤ 5 ms, max ≤ 20 ms: "
                    + ("met" if load["p99_ms"] <= 5 and load["max_ms"] <= 20 else "missed"),
                )
            )
        if "arrays" in steps:
            log("arrays back: 50 runs returning a frame each ...")
            arrays_back(client, 5)  # warm-up
            back = arrays_back(client, 50)
            figures["arrays_back_fps"] = back
            ceiling = figures.get("result_file_ceiling_fps")
            ratio = back / ceiling if ceiling else float("nan")
            rows.append(
                (
                    "arrays back: gather() of 50 finished runs returning one frame each, "
                    "a client on the server's host",
                    f"{common.fmt(back)} frames/s"
                    + (f" = {ratio:.0%} of the result-file ceiling" if ceiling else ""),
                    f"≥ 70% of the ceiling: {'met' if ratio >= 0.7 else 'missed'}"
                    if ceiling
                    else "information",
                )
            )
        if "rss" in steps:
            log(f"get_results(directory=...) of {args.gb:g} GB ...")
            rss = run_rss_probe(port, args.gb, root)
            gbytes = rss["bytes"] / 1e9
            produce, fetch = rss["produce"], rss["fetch"]
            client_growth = fetch["client"]["growth_mb"]
            server_growth = max(produce["server"]["growth_mb"], fetch["server"]["growth_mb"])
            workers = [k for k in produce if k.startswith("worker")]
            worker_growth = max(
                [max(produce[w]["growth_mb"], fetch[w]["growth_mb"]) for w in workers] or [0]
            )
            rows.append(
                (
                    f"client RSS growth, get_results(directory=) of {gbytes:.2f} GB "
                    f"({rss['frames']} frames; fetch {rss['fetch_s']:.1f} s = "
                    f"{gbytes / rss['fetch_s']:.2f} GB/s)",
                    f"+{client_growth:.1f} MB (baseline {fetch['client']['baseline_mb']:.0f} MB)",
                    f"≤ 100 MB: {'met' if client_growth <= 100 else 'missed'}",
                )
            )
            rows.append(
                (
                    f"server RSS growth, producing ({rss['produce_s']:.1f} s) and fetching",
                    f"+{server_growth:.1f} MB (baseline {produce['server']['baseline_mb']:.0f} MB)"
                    f"; workers +{worker_growth:.1f} MB at most",
                    f"≤ 100 MB: {'met' if server_growth <= 100 else 'missed'}",
                )
            )
    finally:
        common.stop_spawned(client)
    return rows


def render(rows: list[tuple[str, str, str]], args: argparse.Namespace) -> str:
    m = common.machine()
    v = common.versions()
    lines = ["| measure | figure | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "",
        f"Machine: {m['cores']} logical cores ({m['physical_cores']} physical), {m['cpu']}, "
        f"{m['memory_gb']} GiB RAM, {m['os']}; 1-min load at the end: {m['load_1min']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Command: `{shlex.join(['python', 'benchmarks/bench_stream.py', *args.argv])}` "
        f"({args.workers} workers; frames are 2048x2048 uint16, 8 MiB).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per throughput run")
    parser.add_argument("--gb", type=float, default=4.0, help="GB of results to write to disk")
    parser.add_argument("--ping-seconds", type=float, default=6.0, help="ping under load this long")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between pings")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--steps",
        default="throughput,ping,submit,arrays,rss",
        help="comma-separated subset of throughput,ping,submit,arrays,rss",
    )
    parser.add_argument(
        "--submit-runs", type=int, default=2000, help="runs each of 4 clients submits"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--submit-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--until-gone", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the temp state dir")
    parser.add_argument("--ping-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.ping_probe:
        gone = [int(p) for p in args.until_gone.split(",")] if args.until_gone else None
        ping_probe(args.ping_probe, args.seconds, args.interval, args.out, gone)
        return 0
    if args.submit_probe:
        submit_probe(args.submit_probe, args.submit_runs)
        return 0
    if args.rss_probe:
        rss_probe(args.rss_probe, args.gb, args.out_dir, args.out)
        return 0
    t0 = time.monotonic()
    figures: dict[str, Any] = {}
    with common.isolation(keep=args.keep) as root:
        try:
            rows = benchmark(args, root, figures)
        except KeyboardInterrupt:
            log("interrupted: stopping everything started")
            return 130
        finally:
            strays = common.kill_descendants()
            if strays:
                log(f"killed stray processes: {strays}")
        if args.keep:
            log(f"state kept in {root}")
    print(render(rows, args))
    if args.json:
        common.write_json(args.json, "bench_stream", figures, args.argv)
    log(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
