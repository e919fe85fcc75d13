"""The small runtime additions the GUI relies on: run source, result listing, one result."""

import numpy as np
import pytest

from zmqruntime import UnknownExecution

PIPELINE = """
import numpy as np

def run(ctx, config):
    ctx.emit("image", np.arange(12, dtype=np.uint16).reshape(3, 4))
    ctx.emit("count", 7)
    ctx.emit("big", list(range(5000)))
    return config.gain
"""


def test_source_listing_and_single_result(client):
    exec_id = client.execute(PIPELINE, "gain = 2\n", config={"extra": 1}, name="probe")
    client.wait(exec_id, timeout=60)

    source = client.get_source(exec_id)
    assert source["pipeline_code"] == PIPELINE
    assert source["config_code"] == "gain = 2\n"
    assert source["config"] == {"extra": 1}

    listing = client.list_results(exec_id)
    assert [(r["index"], r["name"], r["kind"]) for r in listing] == [
        (0, "image", "array"),
        (1, "count", "value"),
        (2, "big", "value"),
        (3, "return", "value"),
    ]
    assert listing[0]["shape"] == [3, 4] and np.dtype(listing[0]["dtype"]) == np.uint16
    assert listing[1]["value"] == 7
    assert "value" not in listing[2] and listing[2]["nbytes"] > 4096  # too big to inline
    assert listing[3]["value"] == 2
    assert client.list_results(exec_id, start=2) == listing[2:]

    np.testing.assert_array_equal(
        client.get_result(exec_id, 0), np.arange(12, dtype=np.uint16).reshape(3, 4)
    )
    assert client.get_result(exec_id, 2) == list(range(5000))
    with pytest.raises(IndexError):
        client.get_result(exec_id, 9)


def test_source_of_unknown_id(client):
    with pytest.raises(UnknownExecution):
        client.get_source("0123456789abcdef")
