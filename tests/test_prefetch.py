"""The server's prefetch thread: stored results are read before their reply is sent."""

from __future__ import annotations

import numpy as np
import zmq

from zmqruntime.prefetch import Prefetcher


def test_payloads_come_back_in_order_once_their_files_are_read(tmp_path):
    ctx = zmq.Context()
    prefetch = Prefetcher(ctx)
    try:
        path = tmp_path / "frame.bin"
        np.arange(3 * 2**20, dtype=np.uint8).tofile(path)
        mapped = np.memmap(path, mode="r", dtype=np.uint8)
        prefetch.submit([memoryview(mapped)], "first")
        prefetch.submit([object(), memoryview(b"")], "second")  # untouchable: still answered
        got: list = []
        while len(got) < 2:
            assert prefetch.done.poll(5000), "the prefetch thread did not answer"
            got += prefetch.ready()
        assert got == ["first", "second"]
        assert prefetch.ready() == []  # nothing else pending
    finally:
        prefetch.close()
        ctx.term()  # every socket of the prefetcher is closed, or this would hang


def test_fetched_results_arrive_whole_through_the_prefetcher(client, tmp_path):
    exec_id = client.execute(
        "import numpy as np\n"
        "def run(ctx, config):\n"
        "    for i in range(6):\n"
        "        ctx.emit('frame', np.full((1024, 1024), i, np.uint32))\n"
    )
    client.wait(exec_id, timeout=60)
    results = client.get_results(exec_id, directory=tmp_path / "out")
    assert len(results["frame"]) == 6
    for i, path in enumerate(results["frame"]):
        frame = np.load(path)
        assert frame.shape == (1024, 1024) and (frame == i).all()
    fetched = list(client._fetch_results(exec_id, 0, 6))  # 4 MiB each: one per reply
    assert [int(e["value"][0, 0]) for e in fetched] == list(range(6))
