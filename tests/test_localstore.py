"""A client on the server's host reads finished results from the store's files itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zmqruntime import localstore
from zmqruntime.localstore import StoreReader

PIPE = """
import numpy as np
def run(ctx, config):
    ctx.emit("frame", np.arange(512 * 512, dtype=np.uint16).reshape(512, 512))
    ctx.emit("fortran", np.asfortranarray(np.arange(12.0).reshape(3, 4)))
    ctx.emit("empty", np.zeros((0, 3), np.int8))
    ctx.emit("table", {(0, 1): np.ones(3), "n": 2})
    ctx.emit("blob", b"x" * (2 << 20))
    return "done"
"""


def expected() -> dict:
    return {
        "frame": [np.arange(512 * 512, dtype=np.uint16).reshape(512, 512)],
        "fortran": [np.asfortranarray(np.arange(12.0).reshape(3, 4))],
        "empty": [np.zeros((0, 3), np.int8)],
        "table": [{(0, 1): np.ones(3), "n": 2}],
        "blob": [b"x" * (2 << 20)],
        "return": ["done"],
    }


def check(got: dict) -> None:
    want = expected()
    assert list(got) == list(want)
    for name in ("frame", "fortran", "empty"):
        a, b = want[name][0], got[name][0]
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert got["fortran"][0].flags.f_contiguous
    assert set(got["table"][0]) == {(0, 1), "n"}
    np.testing.assert_array_equal(got["table"][0][(0, 1)], np.ones(3))
    assert got["blob"] == want["blob"] and got["return"] == ["done"]


def test_a_local_client_reads_finished_results_from_the_files(server, monkeypatch):
    reads = []
    original = StoreReader.read

    def spy(self, exec_id, entry):
        reads.append(entry["name"])
        return original(self, exec_id, entry)

    monkeypatch.setattr(StoreReader, "read", spy)
    client = server.client()
    exec_id = client.execute(PIPE)
    check(client.get_results(exec_id, timeout=60))
    assert "frame" in reads and "blob" in reads  # the large ones came from the files
    streamed = [e for e in client.stream(exec_id) if e["kind"] == "result"]
    check({e["name"]: [e["value"]] for e in streamed})


def test_results_come_over_the_socket_when_a_file_cannot_be_read(server, monkeypatch):
    def refuse(self, exec_id, entry):
        raise PermissionError("not readable here")

    monkeypatch.setattr(StoreReader, "read", refuse)
    client = server.client()
    check(client.get_results(client.execute(PIPE), timeout=60))


def test_direct_reads_can_be_turned_off(server, monkeypatch):
    monkeypatch.setenv(localstore.ENV_SWITCH, "0")
    client = server.client()
    assert client.stored.reader() is None
    check(client.get_results(client.execute(PIPE), timeout=60))


def test_a_data_dir_of_another_server_is_never_read(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "server.lock").write_text("\n" + json.dumps({"pid": 1, "token": "aaa"}))
    ping = {"store_token": "bbb", "data_dir": str(tmp_path)}
    assert StoreReader.for_server(ping) is None
    assert StoreReader.for_server({**ping, "store_token": "aaa"}) is not None
    assert StoreReader.for_server({"data_dir": str(tmp_path)}) is None  # an older server


@pytest.mark.parametrize("missing", ["shape", "offset"])
def test_an_incomplete_listing_entry_is_refused_so_the_socket_is_used(tmp_path, missing):
    reader = StoreReader(tmp_path)
    entry = {"index": 0, "name": "a", "kind": "array", "file": "0.npy", "dtype": "<u2"}
    entry.update(shape=[2], offset=4096)
    del entry[missing]
    with pytest.raises(OSError):
        reader.read("x", entry)


FRAMES = """
import numpy as np
def run(ctx, config):
    if config["i"] == 3:
        raise ValueError("no frame 3")
    for k in range(config["i"] % 3):  # 0, 1 or 2 frames per run
        ctx.emit("frame", np.full((256, 256), 100 * config["i"] + k, np.uint16))
    return config["i"]
"""


def _in_flight_spy(monkeypatch) -> list[int]:
    """Wrap StoreReader.read to record how many file reads were under way at each start
    (a value that came in the listing is not a read)."""
    import threading
    import time

    original = StoreReader.read
    lock = threading.Lock()
    active = [0]
    seen: list[int] = []

    def spy(self, exec_id, entry):
        if "file" not in entry:
            return original(self, exec_id, entry)
        with lock:
            active[0] += 1
            seen.append(active[0])
        try:
            time.sleep(0.02)  # long enough for the next reads to start meanwhile
            return original(self, exec_id, entry)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(StoreReader, "read", spy)
    return seen


def gather_frames(client) -> None:
    ids = client.execute_many(FRAMES, [{"i": i} for i in range(12)])
    got = client.gather(ids, timeout=120, return_exceptions=True)
    for i, result in enumerate(got):
        if i == 3:
            assert "no frame 3" in str(result)
            continue
        assert result["return"] == [i]
        frames = result.get("frame", [])
        assert [int(f[0, 0]) for f in frames] == [100 * i + k for k in range(i % 3)]
        assert all(f.shape == (256, 256) and np.all(f == f[0, 0]) for f in frames)


def test_gather_reads_several_files_at_once_in_order(server, monkeypatch):
    seen = _in_flight_spy(monkeypatch)
    gather_frames(server.client())
    assert len(seen) >= 8  # every frame came from its file
    assert 2 <= max(seen) <= localstore.READ_AHEAD_FILES


def test_read_ahead_stays_within_its_byte_budget(server, monkeypatch):
    monkeypatch.setattr(localstore, "READ_AHEAD_BYTES", 1)  # under one frame: one at a time
    seen = _in_flight_spy(monkeypatch)
    gather_frames(server.client())
    assert len(seen) >= 8 and max(seen) == 1


def test_get_result_reads_the_file_on_the_servers_host(server, monkeypatch):
    """One result by index (exports, the window and napari ask this way) comes from its
    file too, and from the socket when the file cannot be read."""
    reads = []
    original = StoreReader.read

    def spy(self, exec_id, entry):
        reads.append(entry["name"])
        return original(self, exec_id, entry)

    monkeypatch.setattr(StoreReader, "read", spy)
    client = server.client()
    exec_id = client.execute(PIPE)
    client.wait(exec_id, timeout=60)
    frame = client.get_result(exec_id, 0)
    assert reads == ["frame"]
    np.testing.assert_array_equal(frame, expected()["frame"][0])
    table = client.get_result(exec_id, 3)
    assert set(table) == {(0, 1), "n"} and table["n"] == 2
    with pytest.raises(IndexError):
        client.get_result(exec_id, 99)

    def refuse(self, exec_id, entry):
        raise PermissionError("not readable here")

    monkeypatch.setattr(StoreReader, "read", refuse)
    np.testing.assert_array_equal(client.get_result(exec_id, 0), expected()["frame"][0])
