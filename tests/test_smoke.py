import numpy as np


def test_roundtrip(client):
    exec_id = client.execute(
        "def run(ctx, config):\n    ctx.emit('x', np.arange(5))\n"
        "    return config.a\nimport numpy as np\n",
        config={"a": 3},
    )
    res = client.get_results(exec_id, timeout=30)
    assert res["return"] == [3]
    np.testing.assert_array_equal(res["x"][0], np.arange(5))
