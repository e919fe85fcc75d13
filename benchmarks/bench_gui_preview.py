"""GUI live preview under load: 2048x2048 uint16 frames as fast as a worker can send them.

Runs the real window offscreen against a real local server: a pipeline previews
frames in a tight loop for ``--seconds``; the window follows the run as a user would.
Prints frames received and displayed per second, the stall of the Qt event loop
(lateness of a 10 ms timer, p50/p99/max) and the GUI process's memory before, during
and after. Targets (DESIGN.md): >= 30 displayed fps, stall p99 <= 50 ms, memory flat.

    python benchmarks/bench_gui_preview.py              # 20 s, as in the README
    python benchmarks/bench_gui_preview.py --seconds 5  # a quick look
    python benchmarks/bench_gui_preview.py --fps 60     # a fast camera's pace

Everything runs on one machine: with the default (a pipeline that calls
ctx.preview in a tight loop) the worker, the server and the GUI share its cores, so
on a 2-core machine the figures say as much about CPU starvation as about the GUI;
--fps gives the GUI's own figures at a camera's pace.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

PIPELINE = """
import time
import numpy as np

def run(ctx, config):
    size = int(config.size)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = (1000 + 800 * np.sin(xx / 97.0) * np.cos(yy / 131.0)).astype(np.float32)
    frames = [
        np.clip(base + rng.normal(0, 60, base.shape), 0, 65535).astype(np.uint16)
        for _ in range(8)
    ]
    sent = 0
    interval = 1.0 / float(config.fps) if config.fps else 0.0
    t_next = time.monotonic()
    t_end = t_next + float(config.seconds)
    while time.monotonic() < t_end and not ctx.cancelled:
        ctx.preview("camera", frames[sent % len(frames)])
        sent += 1
        if interval:
            t_next += interval
            time.sleep(max(0.0, t_next - time.monotonic()))
        if sent % 20 == 0:
            ctx.progress(1 - (t_end - time.monotonic()) / float(config.seconds), None,
                         f"{sent} frames sent")
    return {"sent": sent}
"""


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="measured duration (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--size", type=int, default=2048, help="frame edge in pixels (default 2048)")
    p.add_argument(
        "--fps",
        type=float,
        default=0.0,
        help="frames per second the pipeline offers (default 0: as fast as it can)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--screenshot", type=Path, help="save the window as PNG at the end")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="zmqr-bench-gui-"))
    os.environ["ZMQRUNTIME_RUNTIME_DIR"] = str(tmp / "runtime")
    os.environ["ZMQRUNTIME_DATA_DIR"] = str(tmp / "data")
    os.environ["ZMQRUNTIME_GUI_SETTINGS"] = str(tmp / "gui.ini")

    from PySide6 import QtCore

    from zmqruntime import ExecutionClient, local
    from zmqruntime.transport import free_port, port_accepts_tcp
    from zmqruntime_gui.app import make_app
    from zmqruntime_gui.main_window import MainWindow
    from zmqruntime_gui.model import Endpoint, ServerState

    port = free_port()
    proc = local.spawn_server(port, "127.0.0.1", args.workers)
    try:
        deadline = time.monotonic() + 60
        while not port_accepts_tcp("127.0.0.1", port):
            if time.monotonic() > deadline or not proc.is_running():
                print("the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        with ExecutionClient(port=port, auto_spawn=False) as c:
            while c.ping()["workers_ready"] < args.workers:
                time.sleep(0.05)

        app = make_app([])
        window = MainWindow()
        window.resize(1500, 940)
        window.show()
        ep = Endpoint("127.0.0.1", port)
        window.controller.watch(ep)

        def pump_until(predicate, timeout: float) -> bool:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 20)
                if predicate():
                    return True
                time.sleep(0.005)
            return predicate()

        ok = pump_until(lambda: window.controller.servers[ep].state == ServerState.ALIVE, 30)
        assert ok, "server not alive in the window"
        rss_idle = rss_mb()
        duration = args.warmup + args.seconds + 1.0
        window.controller.submit_run(
            ep,
            PIPELINE,
            None,
            config={"size": args.size, "seconds": duration, "fps": args.fps},
            name="bench-preview",
        )
        assert pump_until(lambda: window.preview.frame is not None, 60), "no frame displayed"

        # -- measure: a 10 ms timer's lateness, counts sampled at start and end
        lateness: list[float] = []
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            lateness.append(max(0.0, (now - last[0]) * 1000 - 10))
            last[0] = now

        rss_samples: list[float] = []
        sampler = QtCore.QTimer()
        sampler.timeout.connect(lambda: rss_samples.append(rss_mb()))
        timer = QtCore.QTimer()
        timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        timer.timeout.connect(tick)

        loop = QtCore.QEventLoop()
        QtCore.QTimer.singleShot(int(args.warmup * 1000), loop.quit)
        loop.exec()  # warm-up: steady state first
        box = window.preview.box
        image = window.preview.image
        rss_before = rss_mb()
        recv0, disp0, t0 = box.received_count("camera"), image.painted, time.perf_counter()
        last[0] = t0
        timer.start(10)
        sampler.start(1000)
        QtCore.QTimer.singleShot(int(args.seconds * 1000), loop.quit)
        loop.exec()
        timer.stop()
        sampler.stop()
        elapsed = time.perf_counter() - t0
        recv1, disp1 = box.received_count("camera"), image.painted
        if window.preview.box is not box:
            print("warning: the preview switched runs during the measurement", file=sys.stderr)
        rss_after = rss_mb()
        shape = window.preview.frame.image.shape
        if args.screenshot:
            window.grab().save(str(args.screenshot), "PNG")

        key = box.key
        window.controller.cancel_runs([key])
        with ExecutionClient(port=port, auto_spawn=False) as c:
            final = c.wait(key.exec_id, timeout=30)
            sent = (
                (c.get_results(key.exec_id).get("return") or [{}])[0].get("sent")
                if (final["state"] == "completed")
                else None
            )
            c.shutdown()
        window.close()
        proc.wait(timeout=30)

        received, displayed = (recv1 - recv0) / elapsed, (disp1 - disp0) / elapsed
        offered = f"offered at {args.fps:g} fps" if args.fps else "offered as fast as possible"
        print(
            f"GUI preview benchmark: {shape[0]}x{shape[1]} uint16 frames {offered}, offscreen, "
            f"{args.seconds:g} s measured after {args.warmup:g} s warm-up, {os.cpu_count()} CPUs"
        )
        print(f"  frames received   {received:7.1f} /s   ({recv1 - recv0} frames)")
        print(f"  frames displayed  {displayed:7.1f} /s   ({disp1 - disp0} frames painted)")
        if sent is not None:
            print(f"  frames sent by the pipeline (whole run): {sent}")
        print(
            f"  event-loop stall (10 ms timer lateness): p50 {pct(lateness, 50):.1f} ms, "
            f"p99 {pct(lateness, 99):.1f} ms, max {max(lateness):.1f} ms ({len(lateness)} ticks)"
        )
        print(
            f"  GUI memory (RSS): idle {rss_idle:.0f} MB, before {rss_before:.0f} MB, "
            f"after {rss_after:.0f} MB, min/max during {min(rss_samples):.0f}/"
            f"{max(rss_samples):.0f} MB"
        )
        targets = displayed >= 30 and pct(lateness, 99) <= 50
        print(
            "  targets (>= 30 fps displayed, p99 stall <= 50 ms): "
            + ("met" if targets else "NOT met")
        )
        return 0
    finally:  # never leave the server behind, whatever went wrong
        entry = local.find_server(port)
        if entry is not None:
            local.kill_server(entry)


if __name__ == "__main__":
    sys.exit(main())
