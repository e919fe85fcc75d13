"""Processing during acquisition: from a file complete in a folder to its result and preview.

    python benchmarks/bench_acquisition.py                   # 10, 30, 100 frames/s
    python benchmarks/bench_acquisition.py --rates 30 --frames 90 --json figures.json

A writer process (``zmqruntime simulate-acquisition``) plays 2048x2048 uint16 TIFFs
(8 MiB each) into a folder on the local disk at each rate, each written under a hidden
name and renamed when complete, as acquisition software does. A run follows the folder
with ``ctx.follow_folder``; for each file it reads the image, previews it and emits a
small result. A client on the same host stamps the arrival of each result and preview
event; latency = arrival - the moment the writer finished the file (both wall clocks of
one host). Each rate runs twice: with file events (inotify), and with polling forced
(``poll=--poll``, as on a network share). Previews are newest-wins, so a preview that a
newer one replaced is not counted. Target (issue 20): p99 <= 100 ms at 30 frames/s on
local disk.
"""

from __future__ import annotations

import argparse
import json
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

PIPELINE = """
import time
import tifffile

def run(ctx, config):
    files = ctx.follow_folder(
        config.folder, "*.tif", done_marker="acquisition_done", poll=config.poll
    )
    for path in files:
        yielded = time.time()
        frame = tifffile.imread(path)
        read = time.time()
        ctx.preview("camera", frame)
        mean = float(frame[::64, ::64].mean())
        sent = time.time()
        ctx.emit("frame", {
            "name": path.name, "mean": mean, "yielded": yielded, "read": read, "sent": sent,
        })
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_source(folder: Path, n: int) -> None:
    """``n`` single-page TIFFs; pixel (0, 0) of frame i holds i, so previews say who they are."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    frame = rng.integers(100, 4000, common.FRAME_SHAPE, dtype=common.FRAME_DTYPE)
    for i in range(n):
        frame[0, 0] = i
        tifffile.imwrite(folder / f"frame_{i:05d}.tif", frame)


def one_setting(
    client: Any, source: Path, dest: Path, rate: float, frames: int, poll: float | None
) -> dict[str, Any]:
    """Follow one played acquisition; latencies of results and previews, in seconds."""
    dest.mkdir(parents=True)
    exec_id = client.execute(PIPELINE, config={"folder": str(dest), "poll": poll})
    arrivals: list[tuple[float, dict[str, Any]]] = []
    following = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            for event in client.stream(exec_id):
                now = time.time()
                if event["kind"] == "preview":
                    event = {"kind": "preview", "index": int(event["value"][0, 0])}
                elif event["kind"] == "progress" and "acquisition" in event:
                    following.set()
                arrivals.append((now, event))
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    if not following.wait(30):
        raise RuntimeError("the run did not start following the folder")
    writer_log = dest.parent / f"{dest.name}.jsonl"
    cmd = [
        sys.executable, "-m", "zmqruntime", "simulate-acquisition", str(dest),
        "--from", str(source), "--fps", str(rate), "--frames", str(frames),
        "--quiet", "--log", str(writer_log),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
    thread.join(120)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise RuntimeError("the run did not end")
    written = [json.loads(line) for line in writer_log.read_text().splitlines()]
    finished = {r["name"]: r["finished"] for r in written}
    by_index = [r["finished"] for r in written]
    results = [(t, e["value"]["name"]) for t, e in arrivals if e["kind"] == "result"]
    yielded = [
        e["value"]["yielded"] - finished[e["value"]["name"]]
        for _, e in arrivals
        if e["kind"] == "result"
    ]
    stamps = [(t, e["value"]) for t, e in arrivals if e["kind"] == "result"]
    previews = [(t, e["index"]) for t, e in arrivals if e["kind"] == "preview"]
    state = arrivals[-1][1]["status"]["state"]
    names = [name for _, name in results]
    span = written[-1]["finished"] - written[0]["started"]
    return {
        "rate": rate,
        "mode": "inotify" if poll is None else f"polling {poll:g} s",
        "frames": frames,
        "state": state,
        "exactly_once_in_order": names == [r["name"] for r in written],
        "writer_fps": (len(written) - 1) / span if span > 0 and len(written) > 1 else None,
        "yield_latency": yielded,
        # where the rest goes: reading the TIFF, previewing it, the result event's way out
        "read_latency": [v["read"] - v["yielded"] for _, v in stamps],
        "preview_call_latency": [v["sent"] - v["read"] for _, v in stamps],
        "event_latency": [t - v["sent"] for t, v in stamps],
        "result_latency": [t - finished[name] for t, name in results],
        "preview_latency": [t - by_index[i] for t, i in previews],
    }


def summary(setting: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in setting.items() if not k.endswith("_latency")}
    for key in (
        "yield_latency", "read_latency", "preview_call_latency", "event_latency",
        "result_latency", "preview_latency",
    ):  # fmt: skip
        values = setting[key]
        out[key.replace("latency", "n")] = len(values)
        for q in (50, 99):
            out[f"{key}_p{q}_ms"] = (
                round(common.percentile(values, q) * 1000, 1) if values else None
            )
    return out


def render(rows: list[dict[str, Any]], argv: list[str]) -> str:
    lines = [
        "| frames/s (writer achieved) | watching | yielded in the run p50 / p99 | "
        "result event p50 / p99 | preview event p50 / p99 (previews shown) | "
        "every file once, in order |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fps = common.fmt(r["writer_fps"]) if r["writer_fps"] else "n/a"
        lines.append(
            f"| {r['rate']:g} ({fps}) | {r['mode']} | "
            f"{r['yield_latency_p50_ms']} / {r['yield_latency_p99_ms']} ms | "
            f"{r['result_latency_p50_ms']} / {r['result_latency_p99_ms']} ms | "
            f"{r['preview_latency_p50_ms']} / {r['preview_latency_p99_ms']} ms "
            f"({r['preview_n']} of {r['frames']}) | "
            f"{'yes' if r['exactly_once_in_order'] else 'NO'} ({r['state']}) |"
        )
    m = common.machine()
    v = common.versions(["tifffile", "watchfiles"])
    lines += [
        "",
        f"Machine: {m['cores']} logical cores, {m['cpu']}, {m['memory_gb']} GiB RAM, {m['os']}; "
        f"1-min load at the end: {m['load_1min']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Command: `{shlex.join(['python', 'benchmarks/bench_acquisition.py', *argv])}` "
        "(2048x2048 uint16 TIFFs, 8 MiB, renamed into a folder on the local disk).",
    ]
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from zmqruntime import ExecutionClient
    from zmqruntime.transport import free_port

    source = root / "source"
    log(f"writing {args.frames} source frames of 2048x2048 uint16 ...")
    make_source(source, args.frames)
    client = ExecutionClient(free_port(), auto_spawn=True, workers=1, timeout=60.0)
    rows = []
    try:
        while client.ping()["workers_ready"] < 1:
            time.sleep(0.02)
        for rate in args.rates:
            for poll in (None, args.poll):
                dest = root / f"acq-{rate:g}-{'poll' if poll else 'events'}"
                log(f"{rate:g} frames/s, {'polling' if poll else 'inotify'} ...")
                row = summary(one_setting(client, source, dest, rate, args.frames, poll))
                log(f"  {row}")
                rows.append(row)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        common.stop_spawned(client)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,30,100", help="frames/s, comma-separated")
    parser.add_argument("--frames", type=int, default=60, help="frames per setting")
    parser.add_argument("--poll", type=float, default=0.1, help="polling interval (s)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the temp state dir")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    t0 = time.monotonic()
    with common.isolation(keep=args.keep) as root:
        try:
            rows = benchmark(args, root)
        except KeyboardInterrupt:
            log("interrupted: stopping everything started")
            return 130
        finally:
            strays = common.kill_descendants()
            if strays:
                log(f"killed stray processes: {strays}")
    print(render(rows, argv))
    if args.json:
        facts = {"machine": common.machine(), "versions": common.versions(["tifffile"])}
        args.json.write_text(json.dumps({"settings": rows, **facts}, indent=2))
    log(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
