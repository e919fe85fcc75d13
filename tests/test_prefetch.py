"""The server's prefetch thread: stored results are read before their reply is sent."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from zmqruntime.prefetch import Prefetcher
from zmqruntime.resultfile import NPY_DATA_OFFSET, aligned_copy, aligned_empty, write_npy


@pytest.mark.parametrize("order", ["C", "F"])
def test_arrays_are_read_off_the_loop_and_errors_come_back_named(tmp_path, order):
    ctx = zmq.Context()
    prefetch = Prefetcher(ctx)
    try:
        want = np.asarray(np.arange(1000 * 777, dtype=np.int32).reshape(1000, 777), order=order)
        path = tmp_path / "0.npy"
        write_npy(path, aligned_copy(want))
        np.testing.assert_array_equal(np.load(path), want)  # an ordinary .npy file
        out = aligned_empty(want.shape, want.dtype, order)
        prefetch.submit([(path, NPY_DATA_OFFSET, out)], "first")
        gone = aligned_empty((10,), np.float64)
        prefetch.submit([(tmp_path / "retained-away.npy", NPY_DATA_OFFSET, gone)], "second")
        got: list = []
        while len(got) < 2:
            assert prefetch.done.poll(5000), "the prefetch thread did not answer"
            got += prefetch.ready()
        assert got[0] == ("first", None)
        np.testing.assert_array_equal(out, want)
        assert got[1][0] == "second" and "retained-away.npy" in got[1][1]
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
    fetched = list(client.fetch_results(exec_id, 0, 6))  # 4 MiB each: one per reply
    assert [int(e["value"][0, 0]) for e in fetched] == list(range(6))
