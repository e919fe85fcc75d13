"""The shared-memory path for large arrays (issue 3, point 7): rings, readers, fallbacks."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from zmqruntime import protocol, shm

pytestmark = pytest.mark.skipif(
    not shm.enabled(),
    reason="shared-memory rings exist only on x86-64 Linux (and not with ZMQRUNTIME_SHM=0); "
    "elsewhere arrays travel in sockets, which the rest of the suite tests",
)

FRAME = 1 << 20  # 1 MiB: above shm.MIN_BYTES


def code(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


def ring_maps() -> list[str]:
    """Lines of this process's memory map that are a worker's ring."""
    return [
        line
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "zmqruntime-ring" in line
    ]


# --------------------------------------------------------------------------- the ring alone


def test_a_region_reads_back_until_the_ring_comes_round_over_it():
    ring = shm.Ring(capacity=4 * FRAME)
    reader = shm.RingReader()
    try:
        first = ring.alloc(FRAME, wait=False)
        first[:] = 7
        descriptor = ring.describe([first])
        ring.free(first)  # a preview: given back at once, still readable
        (copy,) = reader.read(descriptor)
        assert copy.nbytes == FRAME and (copy == 7).all()
        for value in range(1, 4):  # three more frames fill the ring but do not overwrite
            region = ring.alloc(FRAME, wait=False)
            region[:] = value
            ring.free(region)
        assert reader.read(descriptor) is not None
        ring.free(ring.alloc(FRAME, wait=False))  # the fifth lands where the first was
        assert reader.read(descriptor) is None
    finally:
        reader.close()
        ring.close()


def test_regions_in_use_are_never_overwritten_and_hold_back_allocation():
    ring = shm.Ring(capacity=4 * FRAME)
    try:
        held = [ring.alloc(FRAME, wait=False) for _ in range(4)]  # results not yet on disk
        assert all(r is not None for r in held)
        assert ring.alloc(FRAME, wait=False) is None  # a preview finds no room: socket path
        ring.free(held[0])
        again = ring.alloc(FRAME, wait=False)
        assert again is not None and again.ctypes.data == held[0].ctypes.data
        assert ring.alloc(3 * FRAME, wait=False) is None  # more than half the ring: never
    finally:
        ring.close()


def test_results_waiting_for_the_disk_hold_at_most_half_the_ring():
    """The other half keeps the newest written results readable for a lagging watcher."""
    ring = shm.Ring(capacity=4 * FRAME)
    reader = shm.RingReader()
    got: list = []
    try:
        written = ring.alloc(FRAME, wait=True)
        written[:] = 9
        descriptor = ring.describe([written])
        ring.free(written)  # on disk: still readable
        held = [ring.alloc(FRAME, wait=True) for _ in range(2)]  # half the ring waits
        late = threading.Thread(target=lambda: got.append(ring.alloc(FRAME, wait=True)))
        late.start()
        late.join(0.3)
        assert late.is_alive() and not got  # a third would pass the half: it waits...
        (copy,) = reader.read(descriptor)  # ...so the written one is still there
        assert (copy == 9).all()
        preview = ring.alloc(FRAME, wait=False)
        assert preview is not None  # previews are not held back
        ring.free(preview)  # given back at once, as the worker does once it is sent
        ring.free(held[0])  # one result reached the disk
        late.join(30)
        assert not late.is_alive() and got[0] is not None
    finally:
        reader.close()
        ring.close()


def test_a_descriptor_names_only_live_regions_of_its_ring():
    ring = shm.Ring(capacity=4 * FRAME)
    try:
        region = ring.alloc(FRAME, wait=False)
        assert ring.describe([region]) is not None
        assert ring.describe([np.zeros(FRAME, np.uint8)]) is None  # ordinary memory
        ring.free(region)
        assert ring.describe([region]) is None  # given back
    finally:
        ring.close()


def test_a_reader_refuses_a_ring_whose_id_does_not_match():
    ring = shm.Ring(capacity=4 * FRAME)
    reader = shm.RingReader()
    try:
        region = ring.alloc(FRAME, wait=False)
        _, pid, fd, spans = ring.describe([region])
        assert reader.read([b"x" * 16, pid, fd, spans]) is None  # pid and fd reused elsewhere
        assert reader.read([ring.id, 2**22 + 7, fd, spans]) is None  # no such process
        with pytest.raises(ValueError):
            reader.read([ring.id, pid])
    finally:
        reader.close()
        ring.close()


# --------------------------------------------------------------------------- through a server

BIG_ARRAYS = code("""
    import numpy as np
    def arrays():
        for dt in ["bool", "uint8", "int16", "uint16", "int32", "float32", "float64", "complex128"]:
            base = (np.arange(512 * 640) % 251).astype(dt).reshape(512, 640)
            yield base                                  # C order
            yield np.asfortranarray(base)               # Fortran order
            yield base[::2, 1:]                         # non-contiguous slice
    def run(ctx, config):
        for a in arrays():
            ctx.emit("a", a)
            ctx.preview("p", a)
""")


def expected_big_arrays() -> list[np.ndarray]:
    ns: dict = {}
    exec(BIG_ARRAYS, ns)
    return list(ns["arrays"]())


def _left(deadline: float) -> int:
    """Milliseconds until ``deadline`` (at least 1), for a poll that waits for an event."""
    return max(1, int((deadline - time.monotonic()) * 1000))


def test_large_arrays_reach_a_local_and_a_tcp_watcher_intact(client):
    """The local socket carries descriptors, the tcp one the bytes: both get the same."""
    info = client.ping()
    assert info["data_local"]["shm_probe"] is not None
    assert shm.probe_matches(info["data_local"]["shm_probe"])
    ctx = zmq.Context.instance()
    raw_local = ctx.socket(zmq.SUB)
    raw_local.setsockopt(zmq.RCVHWM, 0)
    raw_local.setsockopt(zmq.SUBSCRIBE, b"")
    raw_local.connect(info["data_local"]["url"])
    tcp = client.events("", hwm=0)  # as a watcher elsewhere: the TCP data port
    time.sleep(0.3)  # both subscriptions reach the server before the run starts
    try:
        exec_id = client.execute(BIG_ARRAYS)
        live = [e for e in client.stream(exec_id) if e["kind"] == "result"]
        want = expected_big_arrays()
        assert [e["index"] for e in live] == list(range(len(want)))
        for event, w in zip(live, want):
            assert event["value"].dtype == w.dtype and event["value"].shape == w.shape
            np.testing.assert_array_equal(event["value"], w)
        # wait for every result event on each socket (hwm 0: none is dropped), however
        # late a loaded machine delivers them; never conclude from a quiet moment
        described = seen_local = 0
        deadline = time.monotonic() + 60
        while seen_local < len(want) and raw_local.poll(_left(deadline)):
            frames = raw_local.recv_multipart()
            header = protocol.unpack(frames[2], None)
            if header.get("kind") == "result":
                seen_local += 1
                described += "shm" in header and len(frames) == 3
        assert seen_local == len(want), f"{seen_local} of {len(want)} results on the local socket"
        # the large ones came as descriptors, the small ones as bytes
        assert described == sum(w.nbytes >= shm.MIN_BYTES for w in want) > 0
        over_tcp = []
        while len(over_tcp) < len(want) and tcp.poll(_left(deadline)):
            event = protocol.parse_event(tcp.recv_multipart(copy=False))
            assert "shm" not in event
            if event["kind"] == "result":
                over_tcp.append(event["value"])
        assert len(over_tcp) == len(want)
        for got, w in zip(over_tcp, want):
            np.testing.assert_array_equal(got, w)
    finally:
        raw_local.close(0)
        tcp.close(0)


def test_a_local_watcher_that_lags_a_whole_ring_still_gets_every_result(client):
    """Descriptors whose bytes were overwritten count as dropped: the store fills in."""
    exec_id = client.execute(
        code("""
            import numpy as np
            def run(ctx, config):
                for i in range(40):
                    ctx.emit("frame", np.full((1024, 1024), i, np.uint64))  # 8 MiB each
        """)
    )
    stream = client.stream(exec_id)
    first = next(stream)  # subscribed; now fall behind while 320 MiB pass a 128 MiB ring
    time.sleep(3.0)
    events = [first, *stream]
    results = [e for e in events if e["kind"] == "result"]
    assert [e["index"] for e in results] == list(range(40))
    for e in results:
        assert e["value"].shape == (1024, 1024) and (e["value"] == e["index"]).all()
    assert any(e.get("fetched") for e in results)
    assert events[-1]["kind"] == "state" and events[-1]["status"]["state"] == "completed"


def test_a_killed_worker_leaves_no_shared_memory_behind(server):
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    client = server.client()
    exec_id = client.execute(
        code("""
            import os, time
            import numpy as np
            def run(ctx, config):
                ctx.emit("pid", os.getpid())
                frame = np.ones((1024, 1024), np.float64)
                while True:
                    ctx.emit("frame", frame)
                    ctx.preview("live", frame)
                    time.sleep(0.01)
        """)
    )
    worker_pid = None
    frames = 0
    for event in client.stream(exec_id):
        if event["kind"] == "result" and event["name"] == "pid":
            worker_pid = event["value"]
        elif event["kind"] == "result":
            frames += 1
            if frames == 5:
                assert ring_maps(), "the watcher maps the worker's ring while it streams"
                os.kill(worker_pid, signal.SIGKILL)
    assert event["kind"] == "state" and event["status"]["state"] == "failed"
    assert ring_maps() == []  # the stream is over: nothing of the dead worker stays mapped
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert shm_after <= shm_before  # rings are memfds: nothing named is ever created
    client.close()


def test_with_rings_off_everything_travels_in_the_sockets(make_server, monkeypatch):
    monkeypatch.setenv("ZMQRUNTIME_SHM", "0")
    assert not shm.enabled()
    srv = make_server("noshm")
    client = srv.client()
    assert client.ping()["data_local"]["shm_probe"] is None
    exec_id = client.execute(BIG_ARRAYS)
    live = [e["value"] for e in client.stream(exec_id) if e["kind"] == "result"]
    for got, w in zip(live, expected_big_arrays(), strict=True):
        np.testing.assert_array_equal(got, w)
    assert ring_maps() == []


PREVIEW_LARGE = code("""
    import numpy as np
    def run(ctx, config):
        frame = np.empty((1024, 1024), np.uint16)
        for i in range(config.n):
            frame[:] = i  # one buffer reused: each preview must be a copy
            ctx.preview("camera", frame)
            if ctx.wait(0.02):
                return
""")


def test_the_gui_follower_gets_large_frames_through_shared_memory(qtbot, server):
    from zmqruntime_gui.follower import RunFollower
    from zmqruntime_gui.model import FollowBox, RunKey

    client = server.client()
    with client.subscribe("nothing") as sub:
        assert sub.local  # on this host the follower's subscription reads the rings
    exec_id = client.execute(PREVIEW_LARGE, config={"n": 150})
    box = FollowBox(RunKey(f"127.0.0.1:{server.port}", exec_id))
    follower = RunFollower(client, box)
    follower.start()
    try:
        qtbot.waitUntil(lambda: box.finished, timeout=30_000)
    finally:
        follower.stop()
        assert follower.wait(5_000)
    assert box.error is None
    assert box.received["camera"] >= 20  # about 3 s of frames at 50/s; a slow CI drops some
    frame = box.take_frame("camera")
    assert frame.image.shape == (1024, 1024) and frame.image.dtype == np.uint16
    assert (frame.image == frame.image[0, 0]).all()  # one whole frame, never a torn one
    assert 0 < int(frame.image[0, 0]) < 150


def test_drain_copies_only_the_newest_preview_of_each_stream(client):
    burst = code("""
        import numpy as np
        def run(ctx, config):
            for i in range(6):
                ctx.preview("camera", np.full((512, 512), i, np.uint16))
                ctx.preview("other", np.full((512, 512), 10 + i, np.uint16))
                ctx.emit("n", i)
                ctx.wait(0.02)  # every frame leaves the worker
    """)
    with client.subscribe("", hwm=0) as sub:  # hwm 0: the socket itself drops nothing
        time.sleep(0.3)
        exec_id = client.execute(burst)
        client.wait(exec_id, timeout=30)
        time.sleep(0.3)
        events = sub.drain(1000)
    mine = [e for e in events if e["id"] == exec_id]
    previews = {e["name"]: e["value"] for e in mine if e["kind"] == "preview"}
    assert sorted(previews) == ["camera", "other"]  # one of each stream, not six
    assert len([e for e in mine if e["kind"] == "preview"]) == 2
    assert (previews["camera"] == 5).all() and (previews["other"] == 15).all()  # the newest
    assert [e["value"] for e in mine if e["kind"] == "result"] == list(range(6))  # all kept
    assert mine[-1]["kind"] == "state" and mine[-1]["status"]["state"] == "completed"


def test_an_array_too_large_for_the_ring_travels_in_the_sockets(client):
    exec_id = client.execute(
        code("""
            import numpy as np
            def run(ctx, config):
                ctx.emit("big", np.arange(5 * 2**20, dtype=np.float64))  # 40 MiB > half the ring
                ctx.preview("big", np.arange(5 * 2**20, dtype=np.float64))
        """)
    )
    events = list(client.stream(exec_id))
    (result,) = [e for e in events if e["kind"] == "result"]
    np.testing.assert_array_equal(result["value"], np.arange(5 * 2**20, dtype=np.float64))
    assert events[-1]["status"]["state"] == "completed"


def test_a_refused_memfd_means_sockets_not_a_crash(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refuse)
    assert shm.try_ring() is None
    assert shm.try_probe() is None
    assert "no shared memory" in capsys.readouterr().err


def test_the_ring_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ZMQRUNTIME_SHM_MB", "32")
    ring = shm.try_ring()
    try:
        assert ring is not None and ring.capacity == 32 * 2**20
    finally:
        ring.close()
    monkeypatch.setenv("ZMQRUNTIME_SHM_MB", "1")
    assert shm.ring_bytes() == 16 * 2**20  # a floor: a frame or two must fit
    monkeypatch.setenv("ZMQRUNTIME_SHM_MB", "lots")
    assert shm.ring_bytes() == shm.RING_BYTES


def test_a_ring_asks_for_huge_pages():
    """Results are written to disk straight from the ring; from 2 MiB pages that ran about a
    third faster here, so the ring's mapping asks for them (granted where the kernel's
    shmem_enabled allows it)."""
    ring = shm.Ring(4 * 1024 * 1024)
    try:
        rings = []  # the VmFlags of every ring mapped in this process
        lines = Path("/proc/self/smaps").read_text().splitlines()
        for i, line in enumerate(lines):
            if "zmqruntime-ring" in line:
                flags = next(f for f in lines[i + 1 :] if f.startswith("VmFlags:"))
                rings.append(flags.split()[1:])
        assert rings, "no ring mapping in /proc/self/smaps"
        assert all("hg" in flags for flags in rings), rings  # MADV_HUGEPAGE
    finally:
        ring.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("always within_size [advise] never deny force\n", True),
        ("always within_size advise [never] deny force\n", False),
        ("[always] within_size advise never deny force\n", True),
        ("garbled\n", None),
    ],
)
def test_the_shared_memory_huge_page_setting_is_read(tmp_path, text, expected):
    setting = tmp_path / "shmem_enabled"
    setting.write_text(text)
    assert shm.shared_huge_pages(setting) is expected
    assert shm.shared_huge_pages(tmp_path / "missing") is None


def test_the_server_says_when_rings_get_no_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "shmem_enabled"
    setting.write_text("always within_size advise [never] deny force\n")
    monkeypatch.setattr(shm, "THP_SHMEM", setting)
    hint = shm.huge_pages_hint()
    assert hint is not None and "docs/deployment.md" in hint and str(setting) in hint
    setting.write_text("always within_size [advise] never deny force\n")
    assert shm.huge_pages_hint() is None
