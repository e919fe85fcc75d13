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
    assert client._store_reader() is None
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
