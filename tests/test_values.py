"""Every value a pipeline emits comes back exactly, or the emit call fails loudly.

Real servers on loopback. What comes back (README, "What comes back"): arrays with dtype,
shape, bytes and memory order; tuples as tuples (named tuples as plain tuples); dicts with
keys of any hashable kind; bytes, complex numbers, None and bool as themselves; numpy
scalars as the Python scalar; sets as lists.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import kill_tree, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zmqruntime import (
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionPool,
    ProtocolError,
    load_directory,
    protocol,
)
from zmqruntime.context import LogWriter

# --------------------------------------------------------------------------- comparison


def same(a, b, path="value") -> None:
    """Assert ``b`` is ``a`` as the codec promises to give it back (exact types)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{path}: {type(b).__name__} instead of an array"
        assert b.dtype == a.dtype and b.shape == a.shape, f"{path}: {b.dtype}{b.shape}"
        assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes(), path
        if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous:
            assert b.flags.f_contiguous, f"{path}: Fortran order lost"
        return
    if isinstance(a, np.generic):
        a = a.item() if a.dtype.kind != "c" else complex(a)
    if isinstance(a, (set, frozenset)):
        assert type(b) is list and sorted(map(repr, a)) == sorted(map(repr, b)), path
        return
    assert type(b) is type(a), f"{path}: {type(b).__name__} instead of {type(a).__name__}"
    if isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and str(a) == str(b)), path
    elif isinstance(a, complex):
        same(a.real, b.real, path + ".real")
        same(a.imag, b.imag, path + ".imag")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: {len(b)} items instead of {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(b)!r} instead of {set(a)!r}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert a == b, f"{path}: {b!r} instead of {a!r}"


# --------------------------------------------------------------------------- strategies

DTYPES = [
    "|b1", "|u1", "<i2", ">i4", "<u8", "<i8", "<f2", "<f4", ">f8", "<c8", "<c16",
    "<M8[ms]", "|S3", "<U2", [("x", "<f4"), ("n", "|u1")],
]  # fmt: skip


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    arr = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim >= 1 and arr.shape[0] > 1:
        arr = arr[::2]  # a view: comes back as a C-ordered copy of its elements
    return arr


finite_floats = st.floats(allow_nan=False)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.complex_numbers(allow_nan=False)
)
hashable = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | finite_floats
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
keys = hashable | st.tuples(hashable, hashable)
values = st.recursive(
    scalars | arrays(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=8,
)

SETTINGS = settings(
    max_examples=int(os.environ.get("ZMQRUNTIME_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

ECHO = """
def run(ctx, config):
    ctx.emit("v", config.v)
    ctx.emit("wrapped", {"inner": [config.v, (config.v,)]})
    return config.v
"""


@pytest.fixture(scope="module")
def value_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("values") / "server", workers=2)
    yield s
    s.stop()


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(value=values)
def test_any_value_comes_back_identical_through_every_path(value_server, tmp_path_factory, value):
    c = value_server.client()
    exec_id = c.execute(ECHO, config={"v": value})  # the config path, too
    expected = {"v": [value], "wrapped": [{"inner": [value, (value,)]}], "return": [value]}
    if value is None:
        del expected["return"]  # None is no return value
    order = [(n, v) for n, vs in expected.items() for v in vs]

    same(expected, c.get_results(exec_id, timeout=60), "get_results")
    for index, (_name, v) in enumerate(order):
        same(v, c.get_result(exec_id, index), f"get_result({index})")
    streamed = [e for e in c.stream(exec_id) if e["kind"] == "result"]
    same([v for _, v in order], [e["value"] for e in streamed], "stream()")

    out = tmp_path_factory.mktemp("export")
    c.get_results(exec_id, directory=out)
    same(expected, load_directory(out), "get_results(directory=)")
    json.loads((out / "index.json").read_text())  # the index is valid JSON
    same(value if value is not None else None, c.get_source(exec_id)["config"]["v"], "source")


def test_values_streamed_live_and_through_a_pool_come_back_identical(value_server):
    tricky = [
        {"m": np.arange(12, dtype=">u2").reshape(3, 4, order="F"), (1, "a"): (None, 2j)},
        ({b"k": np.zeros((0, 3))}, [np.float32(1.5), True]),
        {"big": np.arange(300_000, dtype=np.uint8)},  # inside a dict: above the ring's size
        {None: {3.5: [b"", ""]}},
    ]
    pipe = """
import time
def run(ctx, config):
    time.sleep(config.pause)
    for v in config.values:
        ctx.emit("v", v)
"""
    c = value_server.client()
    exec_id = c.execute(pipe, config={"values": tricky, "pause": 0.5})
    live = [e for e in c.stream(exec_id) if e["kind"] == "result"]
    assert not any(e.get("fetched") for e in live), "these results were meant to come live"
    same(tricky, [e["value"] for e in live], "live stream")

    with ExecutionPool([f"tcp://127.0.0.1:{value_server.port}"]) as pool:
        pid = pool.execute(pipe, config={"values": tricky, "pause": 0})
        same({"v": tricky}, pool.get_results(pid, timeout=60), "ExecutionPool")


def test_values_survive_a_sigkill_and_restart_of_the_server(tmp_path):
    value = {"m": np.arange(6.0).reshape(2, 3), (0, 1): 5, "t": (1, b"x", 2j), None: []}
    s = start_server(tmp_path / "srv")
    try:
        c = s.client()
        exec_id = c.execute(ECHO, config={"v": value})
        c.wait(exec_id, timeout=60)
        os.kill(s.proc.pid, signal.SIGKILL)
        s.stop()
    finally:
        kill_tree(s.proc)
    s2 = start_server(tmp_path / "srv")
    try:
        c2 = s2.client()
        same(
            {"v": [value], "wrapped": [{"inner": [value, (value,)]}], "return": [value]},
            c2.get_results(exec_id, timeout=60),
            "after restart",
        )
    finally:
        s2.stop()


# --------------------------------------------------------------------------- what users saw


def test_a_dict_holding_an_array_comes_back_with_its_own_bytes_not_another_results(client):
    pipe = """
import numpy as np
def run(ctx, config):
    ctx.emit("a", np.array([0, 1, 2]))
    ctx.emit("d", {"m": np.array([7, 7, 7])})
    ctx.emit("mask", {"mask": np.array([True, False])})
    return (np.arange(4.0), "label")
"""
    exec_id = client.execute(pipe)
    results = client.get_results(exec_id, timeout=60)
    same(np.array([7, 7, 7]), results["d"][0]["m"])
    same(np.array([True, False]), results["mask"][0]["mask"])
    same((np.arange(4.0), "label"), results["return"][0])
    same({"mask": np.array([True, False])}, client.get_result(exec_id, 2))


def test_dicts_keyed_by_tuples_are_kept_in_a_completed_run(client):
    pipe = """
def run(ctx, config):
    ctx.emit("counts", {(0, 1): 5})
    ctx.emit("after", 42)
    return {(1, 1): 3}
"""
    exec_id = client.execute(pipe)
    assert client.wait(exec_id, timeout=60)["state"] == "completed"
    same(
        {"counts": [{(0, 1): 5}], "after": [42], "return": [{(1, 1): 3}]},
        client.get_results(exec_id),
    )


def test_a_value_the_codec_cannot_carry_fails_the_emit_call_naming_the_result(client):
    pipe = """
def run(ctx, config):
    ctx.emit("fine", 1)
    try:
        ctx.emit("per_well", {"A1": object()})
    except TypeError as exc:
        ctx.emit("error", str(exc))
    ctx.emit("huge", 2 ** 70)
"""
    exec_id = client.execute(pipe)
    status = client.wait(exec_id, timeout=60)
    assert status["state"] == "failed"
    assert "result 'huge'" in status["error"] and "TypeError" in status["error"]
    with pytest.raises(ExecutionFailed):
        client.get_results(exec_id)
    stored = [r["value"] for r in client.list_results(exec_id)]
    assert stored[0] == 1 and "result 'per_well'" in stored[1] and "object" in stored[1]
    assert len(stored) == 2  # the refused values were never stored


def test_a_thread_left_running_by_one_run_cannot_write_into_the_next(make_server):
    server = make_server(workers=1)
    c = server.client()
    leaky = """
import threading, time
def run(ctx, config):
    def late():
        time.sleep(1.0)
        try:
            ctx.emit("late", "from run A")
        except Exception as exc:
            print("late emit refused:", type(exc).__name__, exc)
    threading.Thread(target=late, name="leftover").start()
    return "A"
"""
    a = c.execute(leaky)
    assert c.get_results(a, timeout=60) == {"return": ["A"]}
    logs = "\n".join(line["text"] for line in c.get_logs(a))
    assert "leftover" in logs and "worker is replaced" in logs
    b = c.execute(
        "import time\ndef run(ctx, config):\n"
        "    ctx.emit('own', 1)\n    time.sleep(1.5)\n    ctx.emit('own', 2)\n    return 'B'\n"
    )
    assert c.get_results(b, timeout=60) == {"own": [1, 2], "return": ["B"]}
    assert c.get_results(a) == {"return": ["A"]}


def test_arrays_and_complex_numbers_in_config_reach_the_pipeline(client):
    flat = np.linspace(0.5, 1.5, 12, dtype=np.float32).reshape(3, 4)
    config = {"flat_field": flat, "calib": {"matrix": np.eye(2), "z": 1 - 2j}, "t": (1, 2)}
    pipe = """
def run(ctx, config):
    return [config.flat_field, config.calib, config.t]
"""
    exec_id = client.execute(pipe, config=config)
    same([[flat, config["calib"], (1, 2)]], client.get_results(exec_id, timeout=60)["return"])
    same(flat, client.get_source(exec_id)["config"]["flat_field"])


def test_a_progress_bar_written_with_carriage_returns_is_shown_live_and_stored_once(client):
    pipe = """
import sys, time
def run(ctx, config):
    for i in range(40_000):
        sys.stderr.write("\\r%6d it" % i)
    time.sleep(0.3)
    for i in range(40_000, 40_003):
        sys.stderr.write("\\r%6d it" % i)
        time.sleep(0.3)
    sys.stderr.write("\\n")
    print("done")
"""
    exec_id = client.execute(pipe)
    partial = []
    for event in client.stream(exec_id):
        if event["kind"] == "log" and event.get("partial"):
            partial.append(event["text"])
    assert client.wait(exec_id)["state"] == "completed"
    assert partial and partial[-1] == " 40002 it", partial[-5:]
    stored = "\n".join(line["text"] for line in client.get_logs(exec_id)).split("\n")
    assert stored == [" 40002 it", "done"]  # lines are stored coalesced, a few per record


def test_log_writer_costs_linear_time_and_bounded_memory():
    lines: list[str] = []

    class FakeCtx:
        live_line = None

        def _append_log(self, text: str) -> None:
            lines.append(text)

    writer = LogWriter(FakeCtx())  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for _ in range(200_000):
        writer.write("x")  # one ever-growing line without a newline
    elapsed = time.perf_counter() - t0
    writer.close_run()
    assert "".join(lines) == "x" * 200_000
    assert all(len(line) <= 16 * 1024 for line in lines)
    assert elapsed < 10, f"{elapsed:.1f} s for 200,000 one-character writes: not linear"
    lines.clear()
    writer.write("a\r\nb\rc\n\rd")
    writer.close_run()
    assert lines == ["a", "c", "d"]


def test_a_request_over_the_size_limit_is_refused_at_once_with_a_clear_error(server):
    c = server.client()
    big = np.zeros(protocol.MAX_CONTROL_MESSAGE // 8 + 1)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="too large") as info:
        c.execute("def run(ctx, config): pass", config={"big": big})
    assert info.value.code == "too_large" and time.monotonic() - t0 < 2
    assert c.ping()["server"] == "zmqruntime"  # the client's socket is fine

    # a peer that does not check: frames each under the transport's cap, too large in all
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{server.port}")
    try:
        half = np.zeros(protocol.MAX_CONTROL_MESSAGE // 2, np.uint8)
        body = {"pipeline_code": "x", "config": {"a": half, "b": half, "c": half}}
        sock.send_multipart(protocol.request(protocol.ControlMessageType.EXECUTE, 7, body))
        assert sock.poll(10_000), "the server did not answer an oversize request"
        reply = protocol.decode(sock.recv_multipart())
        assert reply["type"] == "error" and reply["body"]["code"] == "too_large"
        assert reply["req"] == 7
    finally:
        sock.close()
        zctx.term()


def test_cancel_by_interrupt_ends_cancelled_without_a_type_error(client):
    pipe = """
import time
def run(ctx, config):
    ctx.emit("started", 1)
    while True:
        time.sleep(0.01)
"""
    exec_id = client.execute(pipe)
    deadline = time.monotonic() + 30
    while client.get_status(exec_id)["n_results"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    client.cancel(exec_id)
    status = client.wait(exec_id, timeout=30)
    assert status["state"] == "cancelled"
    assert not status["error"] and "TypeError" not in (status["message"] or "")
    with pytest.raises(ExecutionCancelled):
        client.get_results(exec_id)


def test_export_takes_long_names_and_bytes_keys_and_the_cli_keeps_its_exit_codes(
    client, server, tmp_path
):
    long_name = "per-well intensity " * 16  # 304 characters
    pipe = f"""
import numpy as np
def run(ctx, config):
    ctx.emit({long_name!r}, np.arange(3))
    ctx.emit("a/b", 1)
    ctx.emit("a_b", 2)
    ctx.emit("keys", {{b"raw": 1, 2: "two"}})
"""
    exec_id = client.execute(pipe)
    out = tmp_path / "out"
    results = client.get_results(exec_id, directory=out, timeout=60)
    assert set(results) == {long_name, "a/b", "a_b", "keys"}
    index = json.loads((out / "index.json").read_text())
    files = [e["file"] for e in index["results"] if "file" in e]
    assert all((out / f).is_file() and len(f) < 120 for f in files)
    same(
        {long_name: [np.arange(3)], "a/b": [1], "a_b": [2], "keys": [{b"raw": 1, 2: "two"}]},
        load_directory(out),
    )

    cli = [sys.executable, "-m", "zmqruntime", "results", exec_id, "--port", str(server.port)]
    ok = subprocess.run([*cli, "--out", str(tmp_path / "cli")], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    bad = subprocess.run([*cli, "--out", str(blocked)], capture_output=True, text=True)
    assert bad.returncode == 6, (bad.returncode, bad.stderr)
    assert "could not write the results" in bad.stderr and "Traceback" not in bad.stderr


def test_a_ctx_used_after_its_run_refuses_every_call():
    from zmqruntime import RunEnded
    from zmqruntime.context import Context

    sent = []
    ctx = Context("abc", lambda *a: sent.append(a), Path("/nonexistent"), None, None)  # type: ignore[arg-type]
    ctx.close()
    for call in (
        lambda: ctx.emit("x", 1),
        lambda: ctx.preview("p", np.zeros((2, 2))),
        lambda: ctx.progress(1),
        lambda: ctx.log("x"),
    ):
        with pytest.raises(RunEnded, match="run abc has ended"):
            call()
    assert not sent
