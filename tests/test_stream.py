"""The data channel: fidelity, order, many watchers, late joiners, gaps, bounded memory."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq
from reliability_util import wait_for

from zmqruntime.stream import Subscription, follow, load_directory
from zmqruntime.transport import tcp_url


def code(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


def until_watched(flag: Path) -> str:
    """Pipeline source defining ``wait_for_watcher(ctx)``: preview a small frame every 50 ms
    until ``flag`` exists, which a test creates once its watcher has seen a preview."""
    return code(f"""
        import os, time
        import numpy as np
        def wait_for_watcher(ctx):
            while not os.path.exists({str(flag)!r}):
                ctx.preview("hello", np.zeros((4, 4), dtype=np.uint8))
                time.sleep(0.05)
    """)


FIDELITY = code("""
    import numpy as np
    DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
              "uint64", "float16", "float32", "float64", "complex64", "complex128"]
    def arrays():
        for dt in DTYPES:
            base = (np.arange(60) % 11).astype(dt).reshape(3, 4, 5)
            yield base                                  # C order
            yield np.asfortranarray(base)               # Fortran order
            yield base[:, ::2, 1:]                      # non-contiguous slice
            yield np.array(base[0, 0, 0])              # 0-d
            yield base[:0]                              # empty
    def run(ctx, config):
        for a in arrays():
            ctx.emit("a", a)
""")


def expected_arrays():
    ns: dict = {}
    exec(FIDELITY, ns)
    return list(ns["arrays"]())


def assert_same(got, want):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_result_fidelity_every_dtype_and_layout_live_and_stored(client):
    exec_id = client.execute(FIDELITY)
    live = [e["value"] for e in client.stream(exec_id) if e["kind"] == "result"]
    stored = client.get_results(exec_id, timeout=30)["a"]
    want = expected_arrays()
    assert len(live) == len(stored) == len(want) == 70
    for got_live, got_stored, w in zip(live, stored, want):
        assert_same(got_live, w)
        assert_same(got_stored, w)


def test_ten_thousand_small_results_in_order(client):
    exec_id = client.execute(
        code("""
        def run(ctx, config):
            for i in range(10_000):
                ctx.emit("i", i)
    """)
    )
    indices, values = [], []
    for event in client.stream(exec_id, previews=False):
        if event["kind"] == "result":
            indices.append(event["index"])
            values.append(event["value"])
        last = event
    assert last["kind"] == "state" and last["status"]["state"] == "completed"
    assert indices == list(range(10_000)) and values == list(range(10_000))
    assert client.get_results(exec_id)["i"] == list(range(10_000))


FRAMES = code("""
    import numpy as np, time
    def run(ctx, config):
        for i in range(config.n):
            ctx.emit("frame", np.full((256, 256), i, dtype=np.uint16))
            ctx.preview("live", np.full((64, 64), i, dtype=np.uint16))
            ctx.progress(i + 1, config.n)
            time.sleep(config.delay)
""")


def test_two_watchers_both_receive_everything(server):
    c1, c2, submitter = server.client(), server.client(), server.client()
    exec_id = submitter.execute(FRAMES, config={"n": 100, "delay": 0.005})
    got: dict[str, list[int]] = {}

    def watch(name, c):
        got[name] = [int(e["value"][0, 0]) for e in c.stream(exec_id) if e["kind"] == "result"]

    threads = [threading.Thread(target=watch, args=(n, c)) for n, c in (("a", c1), ("b", c2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got["a"] == got["b"] == list(range(100))


def test_a_client_that_connects_after_the_end_gets_every_result(any_server):
    server = any_server
    exec_id = server.client().execute(FRAMES, config={"n": 20, "delay": 0})
    server.client().wait(exec_id, timeout=30)
    late = server.client()
    events = list(late.stream(exec_id))
    assert [int(e["value"][0, 0]) for e in events if e["kind"] == "result"] == list(range(20))
    assert events[-1]["kind"] == "state" and events[-1]["status"]["state"] == "completed"
    assert not any(e["kind"] == "preview" for e in events)  # previews are never stored


class LossySub:
    """A subscription that loses every third result on the way (as a full HWM would)."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.dropped = 0
        self.seen = 0

    def poll(self, timeout: int) -> bool:
        return self.sub.poll(timeout)

    def drain(self, limit: int = 256) -> list[dict]:
        kept = []
        for event in self.sub.drain(limit):
            if event["kind"] == "result":
                self.seen += 1
                if self.seen % 3 == 0:  # the final state's n_results covers a lost last one
                    self.dropped += 1
                    continue
            kept.append(event)
        return kept


def test_a_forced_gap_is_filled_from_the_store(server):
    client = server.client()
    exec_id = client.execute(FRAMES, config={"n": 60, "delay": 0.01})
    sub = client.subscribe(exec_id)
    lossy = LossySub(sub)
    try:
        events = list(follow(lossy, exec_id, client.get_status, client.fetch_results))
    finally:
        sub.close()
    results = [e for e in events if e["kind"] == "result"]
    assert lossy.dropped >= 5
    assert [int(e["value"][0, 0]) for e in results] == list(range(60))
    assert sum(1 for e in results if e.get("fetched")) >= lossy.dropped - 1


def test_previews_are_newest_wins_for_a_lagging_watcher(client):
    exec_id = client.execute(
        code("""
        import numpy as np, time
        def run(ctx, config):
            for i in range(400):
                ctx.preview("cam", np.full((512, 512), i, dtype=np.uint16))
            ctx.progress(1, 1)  # the burst is out
            time.sleep(0.5)
            ctx.preview("cam", np.full((512, 512), 999, dtype=np.uint16))
            time.sleep(0.3)
    """)
    )
    seen = []
    for event in client.stream(exec_id):
        if event["kind"] == "preview":
            seen.append(int(event["value"][0, 0]))
            if len(seen) == 1:  # a watcher that lags the whole burst, however fast it comes
                wait_for(lambda: client.get_status(exec_id)["progress"] == 1.0, what="the burst")
            time.sleep(0.02)  # a slow consumer
    assert seen and seen[-1] == 999  # the newest frame always arrives
    assert len(seen) < 200  # most of the backlog was dropped, not queued
    assert client.get_results(exec_id) == {}


def test_progress_and_last_frames_survive_a_full_pipe_to_the_server(any_server, tmp_path):
    """A server stalled while a pipeline floods previews (a busy disk, a loaded host):
    the worker's pipe fills, and the previews and the final progress that find it full
    wait as their streams' newest instead of being dropped; once the server reads again
    they arrive, while the run still runs. (A dropped ``progress(1, 1)`` once left a run
    short of 100% until it ended.)"""
    server = any_server  # a native worker's pipe is local; a Dask task's is TCP
    client, watching = server.client(), server.client()
    stopped, flooded, gate = tmp_path / "stopped", tmp_path / "flooded", tmp_path / "gate"
    exec_id = client.execute(
        until_watched(stopped)
        + code(f"""
        def run(ctx, config):
            wait_for_watcher(ctx)
            for i in range(200):  # 64 KiB frames fill the pipe to the stopped server
                ctx.preview(f"fill{{i}}", np.full((128, 256), i, dtype=np.uint16))
            for i in range(200):  # then 200 small streams, each with one frame
                ctx.preview(f"p{{i}}", np.full((4, 4), i, dtype=np.uint16))
            ctx.progress(1, 1, "flooded")
            open({str(flooded)!r}, "w").close()
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.01)
        """)
    )
    sub = watching.subscribe(exec_id, hwm=1000)  # room for the whole flood on this side
    events: list[dict] = []
    follow_run = follow(sub, exec_id, watching.get_status, watching.fetch_results)
    watcher = threading.Thread(target=lambda: events.extend(follow_run))
    watcher.start()
    try:
        wait_for(lambda: any(e["kind"] == "preview" for e in events), what="a first preview")
        process = psutil.Process(server.proc.pid)
        process.suspend()
        try:
            stopped.touch()
            wait_for(flooded.exists, what="the flood")
        finally:
            process.resume()
        status = wait_for(
            lambda: (s := client.get_status(exec_id))["progress"] == 1.0 and s,
            what="the final progress",
        )
        assert status["state"] == "running" and status["message"] == "flooded"
    finally:
        gate.touch()
        watcher.join(timeout=60)
        sub.close()
    assert not watcher.is_alive()
    names = {e["name"] for e in events if e["kind"] == "preview"}
    assert {f"p{i}" for i in range(200)} <= names  # every stream's newest frame arrived
    assert events[-1]["status"]["state"] == "completed"


def test_a_frame_previewed_before_its_results_is_not_dropped_by_a_slow_server(any_server, tmp_path):
    """A camera-like pipeline (preview a frame, then emit its results) on a server that
    reads slowly (a loaded host: suspended 30 ms of every 40): a preview that finds the
    pipe full waits, and goes before the frame's results rather than being replaced by
    the next frame, so every frame reaches a watcher that reads each event, in order,
    each before its own result."""
    server = any_server
    client, watching = server.client(), server.client()
    started, n = tmp_path / "started", 60
    exec_id = client.execute(
        until_watched(started)
        + code(f"""
        def run(ctx, config):
            wait_for_watcher(ctx)
            for i in range({n}):
                ctx.preview("cam", np.full((130, 130), i, dtype=np.uint16))
                ctx.emit("movie", np.full((130, 130), i, dtype=np.uint16))
                ctx.emit("labels", np.full((130, 130), i, dtype=np.int32))
                ctx.emit("frames", {{"frame": i}})
        """)
    )
    sub = watching.subscribe(exec_id, hwm=1000)
    events: list[dict] = []

    def read_every_event() -> None:  # one by one: no newest-wins on this side
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sub.poll(100):
                events.append(sub.recv())
                if events[-1]["kind"] == "state" and events[-1]["status"]["state"] != "running":
                    return

    watcher = threading.Thread(target=read_every_event)
    watcher.start()
    process = psutil.Process(server.proc.pid)
    try:
        wait_for(lambda: any(e["kind"] == "preview" for e in events), what="a first preview")
        started.touch()
        while watcher.is_alive() and client.get_status(exec_id)["state"] == "running":
            process.suspend()
            time.sleep(0.03)
            process.resume()
            time.sleep(0.01)
    finally:
        process.resume()
        watcher.join(timeout=70)
        sub.close()
    assert not watcher.is_alive()
    assert events[-1]["status"]["state"] == "completed"
    order = [
        (e["kind"], int(e["value"].flat[0]))
        for e in events
        if (e["kind"] == "preview" and e["name"] == "cam")
        or (e["kind"] == "result" and e["name"] == "movie")
    ]
    frames = [i for kind, i in order if kind == "preview"]
    assert frames == list(range(n)), f"previews of frames {frames}"
    assert order == [(kind, i) for i in range(n) for kind in ("preview", "result")]


def test_a_tcp_watcher_that_lags_still_gets_each_streams_last_frame(client, tmp_path):
    """A remote watcher (TCP) that reads nothing while a run sends 2 MiB frames: the
    server sends a stream's next frame only once the last is through, and keeps the
    newest one waiting meanwhile, so the frame sent while the watcher lagged (999)
    arrives when it reads again, before the run's end."""
    gate = tmp_path / "gate"
    exec_id = client.execute(
        code(f"""
        import numpy as np, os, time
        def run(ctx, config):
            while not os.path.exists({str(gate)!r}):  # until the watcher sees it
                ctx.preview("cam", np.full((1024, 1024), 1000, dtype=np.uint16))
                time.sleep(0.05)
            for i in range(60):
                ctx.preview("cam", np.full((1024, 1024), i, dtype=np.uint16))
            ctx.preview("cam", np.full((1024, 1024), 999, dtype=np.uint16))
            ctx.progress(1, 1, "last frame out")
            time.sleep(1.0)
        """)
    )
    sub = client.subscribe(exec_id, local=False)
    try:
        assert not sub.local
        wait_for(lambda: sub.poll(100) and sub.drain(), what="a first frame")
        gate.touch()
        wait_for(
            lambda: client.get_status(exec_id)["message"] == "last frame out",
            what="the last frame sent",
        )
        time.sleep(0.2)  # the server has had the last frame a while: it must not drop it
        seen = [
            int(e["value"][0, 0])
            for e in follow(sub, exec_id, client.get_status, client.fetch_results)
            if e["kind"] == "preview"
        ]
    finally:
        sub.close()
    assert seen and seen[-1] == 999
    assert len([v for v in seen if v < 60]) < 60  # it lagged: frames in between were skipped


def test_a_stalled_watcher_does_not_slow_the_run_or_grow_the_server(server):
    client = server.client()
    pipeline = code("""
        import numpy as np
        def run(ctx, config):
            frame = np.ones((1024, 1024), dtype=np.uint16)
            for i in range(config.n):
                ctx.preview("cam", frame)
                ctx.emit("f", frame)
    """)
    t0 = time.monotonic()
    client.wait(client.execute(pipeline, config={"n": 150}), timeout=120)
    baseline = time.monotonic() - t0
    server_proc = psutil.Process(server.proc.pid)
    rss_before = server_proc.memory_info().rss
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.connect(tcp_url("127.0.0.1", server.port + 1))
    time.sleep(0.3)
    try:
        t0 = time.monotonic()
        client.wait(client.execute(pipeline, config={"n": 150}), timeout=120)
        with_stalled = time.monotonic() - t0
        growth = server_proc.memory_info().rss - rss_before
    finally:
        stalled.close(linger=0)
    # 150 x 2 MiB results + previews went out; a queue for the stalled watcher would hold
    # hundreds of MiB. Bounds are generous: the tight figures belong to the benchmark.
    assert growth < 150 * 2**20, f"server grew {growth / 2**20:.0f} MiB"
    assert with_stalled < 4 * baseline + 2.0, (baseline, with_stalled)


@pytest.mark.timeout(300)
def test_one_gigabyte_to_a_directory_keeps_the_client_bounded(server, tmp_path):
    client = server.client()
    exec_id = client.execute(
        code("""
        import numpy as np
        def run(ctx, config):
            frame = np.arange(2048 * 2048, dtype=np.uint16).reshape(2048, 2048)
            for i in range(128):                       # 128 x 8 MiB = 1 GiB
                ctx.emit("frame", frame)
    """)
    )
    client.wait(exec_id, timeout=240)
    me = psutil.Process()
    peak = before = me.memory_info().rss
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = client.get_results(exec_id, directory=tmp_path / "out")
    finally:
        stop.set()
        sampler.join()
    assert len(results["frame"]) == 128
    growth = (peak - before) / 2**20
    print(f"\nclient RSS growth while writing 1 GiB to disk: {growth:.0f} MiB")
    assert growth < 300, f"client grew {growth:.0f} MiB for 1 GiB written"
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["results"]) == 128
    back = load_directory(tmp_path / "out")["frame"]
    assert back[127].shape == (2048, 2048) and int(back[127][1, 0]) == 2048


def test_control_answers_while_frames_stream(server):
    """Invariant 1: a ping from another client is answered in ms while gigabytes flow."""
    client = server.client()
    exec_id = client.execute(
        code("""
        import numpy as np
        def run(ctx, config):
            frame = np.ones((2048, 2048), dtype=np.uint16)
            for i in range(120):                       # ~1 GB of results
                ctx.emit("frame", frame)
    """)
    )
    received = []

    def consume():
        received.extend(1 for e in server.client().stream(exec_id) if e["kind"] == "result")

    watcher = threading.Thread(target=consume)
    watcher.start()
    pinger = server.client()
    rtts = []
    while watcher.is_alive():
        rtts.append(pinger.ping()["rtt_ms"])
        time.sleep(0.005)
    watcher.join()
    assert sum(received) == 120 and len(rtts) > 10
    rtts.sort()
    p50, worst = rtts[len(rtts) // 2], rtts[-1]
    print(f"\nping while streaming: n={len(rtts)} p50={p50:.2f} ms max={worst:.1f} ms")
    # generous bounds for a loaded 2-core CI box; the benchmark reports the tight p99
    assert p50 < 50 and worst < 1000


def test_emit_copies_so_a_reused_buffer_is_safe(client):
    exec_id = client.execute(
        code("""
        import numpy as np
        def run(ctx, config):
            buf = np.zeros((512, 512), dtype=np.uint16)
            for i in range(50):
                buf[:] = i                             # a camera reusing its buffer
                ctx.emit("frame", buf)
    """)
    )
    frames = client.get_results(exec_id, timeout=60)["frame"]
    assert [int(f[0, 0]) for f in frames] == list(range(50))
    assert all(int(f.max()) == int(f.min()) for f in frames)
