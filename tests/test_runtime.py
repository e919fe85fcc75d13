"""End to end through the public API, against real servers and worker processes."""

from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

from zmqruntime import (
    ExecutionCancelled,
    ExecutionClient,
    ExecutionFailed,
    ServerUnavailable,
    UnknownExecution,
    local,
)
from zmqruntime.transport import free_port


def code(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


SLEEP = code("""
    import time
    def run(ctx, config):
        ctx.emit("started", time.time())
        time.sleep(config.seconds)
        ctx.emit("ended", time.time())
        return config.seconds
""")

COOPERATIVE = code("""
    import time
    def run(ctx, config):
        ctx.emit("started", True)
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)
""")

BUSY = code("""
    def run(ctx, config):
        ctx.emit("started", True)
        while True:
            pass
""")


def wait_for_state(client, exec_id, state, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_status(exec_id)
        if status["state"] == state:
            return status
        time.sleep(0.02)
    raise AssertionError(f"{exec_id} never reached {state}: {client.get_status(exec_id)}")


def test_execute_returns_before_the_run_finishes(client):
    t0 = time.monotonic()
    exec_id = client.execute(SLEEP, config={"seconds": 2.0})
    elapsed = time.monotonic() - t0
    assert isinstance(exec_id, str) and exec_id
    assert elapsed < 1.0
    assert client.get_status(exec_id)["state"] in ("queued", "running")
    assert client.get_results(exec_id, timeout=30)["return"] == [2.0]


def test_status_has_the_contract_fields(any_client):
    client = any_client
    exec_id = client.execute(SLEEP, config={"seconds": 0.0}, name="quick")
    status = client.wait(exec_id, timeout=30)
    for key in (
        "id",
        "state",
        "progress",
        "message",
        "error",
        "traceback",
        "created",
        "started",
        "finished",
        "n_results",
    ):
        assert key in status
    assert status["id"] == exec_id and status["state"] == "completed"
    assert status["created"] <= status["started"] <= status["finished"]
    assert status["n_results"] == 3 and status["name"] == "quick"


ARRAYS = code("""
    import numpy as np
    def run(ctx, config):
        ctx.emit("a", np.arange(12, dtype=np.uint16).reshape(3, 4))
        ctx.emit("a", np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)))
        ctx.emit("a", np.array(7.25))
        ctx.emit("a", np.arange(30, dtype=np.int64).reshape(5, 6)[::2, ::3])
        ctx.emit("a", np.zeros((0, 3), dtype=np.complex128))
        ctx.emit("a", np.array([True, False]))
        ctx.emit("b", b"raw bytes")
        ctx.emit("c", {"k": [1, 2.5, "x"]})
""")


def test_arrays_come_back_equal(any_client):
    client = any_client
    results = client.get_results(client.execute(ARRAYS), timeout=30)
    expected = [
        np.arange(12, dtype=np.uint16).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        np.array(7.25),
        np.arange(30, dtype=np.int64).reshape(5, 6)[::2, ::3],
        np.zeros((0, 3), dtype=np.complex128),
        np.array([True, False]),
    ]
    assert len(results["a"]) == len(expected)
    for got, want in zip(results["a"], expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert results["a"][1].flags.f_contiguous
    assert results["b"] == [b"raw bytes"]
    assert results["c"] == [{"k": [1, 2.5, "x"]}]


CONFIG_ECHO = code("""
    def run(ctx, config):
        return {"sigma": config.sigma, "name": config["name"], "keys": sorted(config.keys())}
""")


def test_config_from_code_and_from_dict(client):
    config_code = "import math\nsigma = 1.5\nname = 'nuclei'\n_private = 3\n"
    res = client.get_results(client.execute(CONFIG_ECHO, config_code), timeout=30)
    assert res["return"] == [{"sigma": 1.5, "name": "nuclei", "keys": ["name", "sigma"]}]
    res = client.get_results(
        client.execute(CONFIG_ECHO, config={"sigma": 2, "name": "x"}), timeout=30
    )
    assert res["return"] == [{"sigma": 2, "name": "x", "keys": ["name", "sigma"]}]
    # a dict overrides names from config_code
    res = client.get_results(
        client.execute(CONFIG_ECHO, config_code, config={"sigma": 9}), timeout=30
    )
    assert res["return"][0]["sigma"] == 9


def test_a_raising_pipeline_fails_with_its_traceback(client):
    pipeline = code("""
        def helper(x):
            raise ValueError(f"bad value {x}")
        def run(ctx, config):
            print("about to fail")
            helper(42)
    """)
    exec_id = client.execute(pipeline)
    status = client.wait(exec_id, timeout=30)
    assert status["state"] == "failed"
    assert status["error"] == "ValueError: bad value 42"
    assert "helper(42)" in status["traceback"] and "in helper" in status["traceback"]
    with pytest.raises(ExecutionFailed, match="bad value 42") as info:
        client.get_results(exec_id)
    assert "raise ValueError" in info.value.traceback
    assert any("about to fail" in line["text"] for line in client.get_logs(exec_id))


def test_a_pipeline_without_run_fails_clearly(client):
    status = client.wait(client.execute("x = 1\n"), timeout=30)
    assert status["state"] == "failed"
    assert "must define a function run(ctx, config)" in status["error"]
    status = client.wait(client.execute("def run(ctx, config):\n  return (\n"), timeout=30)
    assert status["state"] == "failed" and status["error"].startswith("SyntaxError")


def test_unknown_id_raises(client):
    with pytest.raises(UnknownExecution, match="never issued") as info:
        client.get_status("0123456789abcdef")
    assert isinstance(info.value, KeyError)
    for call in (client.cancel, client.wait, client.get_results, client.get_logs):
        with pytest.raises(UnknownExecution):
            call("nope")


def test_print_and_log_and_progress_are_captured(client):
    pipeline = code("""
        def run(ctx, config):
            for i in range(3):
                print("line", i)
                ctx.progress(i + 1, 3, f"step {i + 1}")
            ctx.log("done")
    """)
    exec_id = client.execute(pipeline)
    status = client.wait(exec_id, timeout=30)
    assert status["progress"] == 1.0
    text = "\n".join(entry["text"] for entry in client.get_logs(exec_id))
    assert text.splitlines() == ["line 0", "line 1", "line 2", "done"]


def test_cancel_a_queued_run(make_any_server):
    server = make_any_server(workers=1)
    client = server.client()
    blocker = client.execute(SLEEP, config={"seconds": 3.0})
    queued = client.execute(SLEEP, config={"seconds": 0.0})
    assert client.get_status(queued)["state"] == "queued"
    reply = client.cancel(queued)
    assert reply["cancelled"] is True
    assert client.get_status(queued)["state"] == "cancelled"
    with pytest.raises(ExecutionCancelled):
        client.get_results(queued)
    client.cancel(blocker)


def test_cancel_a_cooperative_run(any_client):
    client = any_client
    exec_id = client.execute(COOPERATIVE)
    wait_for_state(client, exec_id, "running")
    time.sleep(0.2)
    t0 = time.monotonic()
    assert client.cancel(exec_id)["cancelled"] is True
    status = client.wait(exec_id, timeout=30)
    assert status["state"] == "cancelled"
    assert time.monotonic() - t0 < 1.5, "a cooperative run stops before the grace period"
    assert "killed" not in (status["message"] or "")


def _pool_is_whole(client, n=2):
    deadline = time.monotonic() + 20
    while client.ping()["workers_ready"] < n:
        assert time.monotonic() < deadline, "the worker was not replaced"
        time.sleep(0.05)


def test_cancel_interrupts_a_busy_loop_and_replaces_the_worker(any_client):
    client = any_client
    exec_id = client.execute(BUSY)
    wait_for_state(client, exec_id, "running")
    time.sleep(0.2)
    t0 = time.monotonic()
    client.cancel(exec_id)
    status = client.wait(exec_id, timeout=30)
    assert status["state"] == "cancelled"
    assert "interrupted" in status["message"]
    assert time.monotonic() - t0 < 1.5, "a pure-Python loop stops well before the grace period"
    _pool_is_whole(client)
    assert client.get_results(client.execute(SLEEP, config={"seconds": 0}), timeout=30)[
        "return"
    ] == [0]


def test_cancel_kills_a_worker_stuck_in_c_after_the_grace_period(any_client):
    client = any_client
    stuck = code("""
        import time
        def run(ctx, config):
            ctx.emit("started", True)
            time.sleep(600)        # one C call: neither cooperative nor interruptible
    """)
    exec_id = client.execute(stuck)
    wait_for_state(client, exec_id, "running")
    time.sleep(0.2)
    t0 = time.monotonic()
    client.cancel(exec_id)
    status = client.wait(exec_id, timeout=30)
    elapsed = time.monotonic() - t0
    assert status["state"] == "cancelled"
    assert "worker was killed" in status["message"]
    assert 1.5 < elapsed < 10, elapsed  # the grace period (2 s by default), then the kill
    _pool_is_whole(client)
    assert client.get_results(client.execute(SLEEP, config={"seconds": 0}), timeout=30)[
        "return"
    ] == [0]


def test_cancel_of_one_run_leaves_another_running(client):
    victim = client.execute(BUSY)
    survivor = client.execute(SLEEP, config={"seconds": 3.0})
    wait_for_state(client, victim, "running")
    wait_for_state(client, survivor, "running")
    client.cancel(victim)
    assert client.wait(victim, timeout=30)["state"] == "cancelled"
    assert client.get_status(survivor)["state"] == "running"
    assert client.get_results(survivor, timeout=30)["return"] == [3.0]


def test_cancel_of_a_finished_run_is_a_noop_that_says_so(client):
    exec_id = client.execute(SLEEP, config={"seconds": 0})
    client.wait(exec_id, timeout=30)
    reply = client.cancel(exec_id)
    assert reply["cancelled"] is False and reply["state"] == "completed"
    assert "already completed" in reply["message"]
    assert client.get_status(exec_id)["state"] == "completed"


def test_two_runs_overlap_on_two_workers(client):
    a = client.execute(SLEEP, config={"seconds": 1.0})
    b = client.execute(SLEEP, config={"seconds": 1.0})
    ra, rb = client.get_results(a, timeout=30), client.get_results(b, timeout=30)
    # each ran while the other was running: start of one before the end of the other
    assert ra["started"][0] < rb["ended"][0] and rb["started"][0] < ra["ended"][0]
    sa, sb = client.get_status(a), client.get_status(b)
    assert sa["started"] < sb["finished"] and sb["started"] < sa["finished"]


def test_runs_are_served_in_fifo_order(make_server):
    client = make_server(workers=1).client()
    ids = [client.execute(SLEEP, config={"seconds": 0.05}) for _ in range(5)]
    starts = [client.get_results(i, timeout=30)["started"][0] for i in ids]
    assert starts == sorted(starts)


def test_list_executions_and_ping(client):
    exec_id = client.execute(SLEEP, config={"seconds": 0})
    client.wait(exec_id, timeout=30)
    assert exec_id in [s["id"] for s in client.list_executions()]
    info = client.ping()
    assert info["server"] == "zmqruntime" and info["workers"] == 2
    assert info["data_port"] == client.port + 1 and info["rtt_ms"] > 0


def test_client_is_safe_from_several_threads(client):
    exec_id = client.execute(SLEEP, config={"seconds": 1.0})
    errors: list[BaseException] = []

    def poll():
        try:
            for _ in range(50):
                assert client.get_status(exec_id)["id"] == exec_id
                client.ping()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    events = [e["kind"] for e in client.stream(exec_id)]
    for t in threads:
        t.join()
    assert not errors
    assert events[-1] == "state"


def test_bounded_error_against_a_dead_port():
    port = free_port()
    t0 = time.monotonic()
    with ExecutionClient(port=port, auto_spawn=False, timeout=1.0) as c:
        with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}"):
            c.execute("def run(ctx, config): pass")
    assert time.monotonic() - t0 < 3.0
    # a remote host is never spawned: the error names the endpoint, within the timeout
    t0 = time.monotonic()
    with ExecutionClient(port=port, host="192.0.2.1", timeout=1.0) as c:
        with pytest.raises(ServerUnavailable, match=f"192.0.2.1:{port}"):
            c.ping()
    assert time.monotonic() - t0 < 3.0


def _stop_spawned(port: int) -> None:
    entry = local.find_server(port)
    if entry is not None:
        with ExecutionClient(port=port, auto_spawn=False) as c:
            c.shutdown()
        local.wait_until(lambda: not entry.is_alive(), 15)


def test_auto_spawn_starts_a_server_and_registers_it(tmp_path):
    port = free_port()
    try:
        with ExecutionClient(port=port, workers=1, data_dir=tmp_path / "d") as c:
            res = c.get_results(c.execute(SLEEP, config={"seconds": 0}), timeout=60)
            assert res["return"] == [0]
            assert c.spawned is not None
        entry = local.find_server(port)
        assert entry is not None and entry.pid == c.spawned.pid
        assert port in [e.port for e in local.list_servers()]
    finally:
        _stop_spawned(port)
    assert local.find_server(port) is None


def test_two_racing_clients_spawn_one_server(tmp_path):
    port = free_port()
    barrier = threading.Barrier(2)
    infos: list[dict] = []

    def go():
        with ExecutionClient(port=port, workers=1, data_dir=tmp_path / "d") as c:
            barrier.wait()
            infos.append(c.ping())

    try:
        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(infos) == 2 and infos[0]["pid"] == infos[1]["pid"]
        servers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "serve" in p.info["cmdline"] and str(port) in p.info["cmdline"]
        ]
        assert len(servers) == 1
    finally:
        _stop_spawned(port)


def test_close_with_an_abandoned_stream_does_not_hang(server):
    c = ExecutionClient(port=server.port, auto_spawn=False)
    exec_id = c.execute(SLEEP, config={"seconds": 0.5})
    events = c.stream(exec_id)
    next(events)  # the stream's SUB socket is open
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 2.0


def test_a_pipeline_that_saw_the_cancel_may_wind_down_uninterrupted(client):
    winding = code("""
        import time
        def run(ctx, config):
            ctx.emit("started", True)
            while not ctx.wait(10):            # a cancel-aware sleep
                pass
            t = time.time()
            while time.time() - t < 0.8:       # saving partial results: pure Python, busy
                pass
            ctx.emit("partial", "saved")
    """)
    exec_id = client.execute(winding)
    wait_for_state(client, exec_id, "running")
    time.sleep(0.2)
    client.cancel(exec_id)
    status = client.wait(exec_id, timeout=30)
    assert status["state"] == "cancelled"
    assert status["message"] == "cancelled by request"
    assert status["n_results"] == 2  # "partial" was stored: the wind-down was not cut short
