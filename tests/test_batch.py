"""Many runs in few round trips: execute_many and gather."""

from __future__ import annotations

import numpy as np
import pytest

from zmqruntime import ExecutionFailed, UnknownExecution

SQUARE = "def run(ctx, config):\n    return config.x * config.x\n"


def test_execute_many_then_gather_in_order(client):
    ids = client.execute_many(
        SQUARE, [{"x": i} for i in range(500)], names=[f"sq{i}" for i in range(500)]
    )
    assert len(ids) == len(set(ids)) == 500
    results = client.gather(ids, timeout=120)
    assert [r["return"][0] for r in results] == [i * i for i in range(500)]
    assert client.get_status(ids[7])["name"] == "sq7"


def test_gather_reports_failures(client):
    ids = client.execute_many(SQUARE, [{"x": 2}, {"x": "a"}, {"x": 3}])
    with pytest.raises(ExecutionFailed, match="TypeError"):
        client.gather(ids, timeout=60)
    out = client.gather(ids, timeout=60, return_exceptions=True)
    assert out[0]["return"] == [4] and out[2]["return"] == [9]
    assert isinstance(out[1], ExecutionFailed) and "TypeError" in str(out[1])


def test_gather_fetches_what_does_not_fit_in_one_reply(client):
    big = (
        "import numpy as np\n"
        "def run(ctx, config):\n"
        "    ctx.emit('a', np.full((2048, 2048), config.i, dtype=np.uint16))\n"
    )
    ids = client.execute_many(big, [{"i": i} for i in range(6)])  # 6 x 8 MiB > 32 MiB
    results = client.gather(ids, timeout=120)
    assert [int(r["a"][0][5, 5]) for r in results] == list(range(6))
    assert all(r["a"][0].shape == (2048, 2048) for r in results)
    assert np.all(results[5]["a"][0] == 5)


def test_gather_of_an_unknown_id_raises(client):
    with pytest.raises(UnknownExecution):
        client.gather(["ffffffffffffffff"])


def test_execute_many_validates_its_input(client):
    from zmqruntime import RemoteError

    with pytest.raises(RemoteError, match="configs\\[1\\] must be a map"):
        client.execute_many(SQUARE, [{"x": 1}, 5])
    with pytest.raises(RemoteError, match="one entry per config"):
        client.connection.request(
            client_type("execute_many"),
            {"pipeline_code": SQUARE, "configs": [None], "names": ["a", "b"]},
        )


def client_type(name):
    from zmqruntime.protocol import ControlMessageType

    return ControlMessageType(name)
