"""Liveness: a client notices a dead server within seconds and reconnects by itself;
the server notices a hung worker by its missing heartbeats."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from reliability_util import BLOCKING, QUICK, read_pid, sigkill_server, wait_for

from zmqruntime import ExecutionClient, ServerUnavailable

#: the issue's bound for noticing a dead server with a client's default settings
DEAD_SERVER_BOUND = 5.0

#: logs and reports progress every 0.2 s for a minute: a stream stays busy until the end
CHATTY = """
import os, time
def run(ctx, config):
    with open(config.pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(config.pid_file + ".tmp", config.pid_file)
    for i in range(300):
        ctx.progress(i, 300, message=f"step {i}")
        ctx.log(f"step {i}")
        time.sleep(0.2)
"""


def _kill_after(server, delay: float) -> list[float]:
    """SIGKILL ``server`` after ``delay`` s in a thread; the list gets the kill's time."""
    when: list[float] = []

    def kill() -> None:
        time.sleep(delay)
        when.append(time.monotonic())
        sigkill_server(server.proc)

    threading.Thread(target=kill, daemon=True).start()
    return when


def _time_to_unavailable(call, server) -> float:
    """Seconds between the server's SIGKILL and ``call`` raising ServerUnavailable."""
    when = _kill_after(server, 0.5)
    with pytest.raises(ServerUnavailable) as info:
        call()
    elapsed = time.monotonic() - when[0]
    print(f"\n  {call.__name__}: ServerUnavailable {elapsed:.2f} s after SIGKILL: {info.value}")
    return elapsed


@pytest.mark.parametrize("method", ["wait", "get_results", "stream"])
def test_a_client_notices_a_dead_server_and_reconnects_by_itself(make_server, tmp_path, method):
    s = make_server(method, workers=1)
    c = s.client()  # default timeout: what a user gets
    exec_id = c.execute(CHATTY, config={"pid_file": str(tmp_path / "pid")})
    read_pid(tmp_path / "pid")
    seen: list[str] = []

    def wait() -> None:
        c.wait(exec_id)

    def get_results() -> None:
        c.get_results(exec_id)

    def stream() -> None:
        for event in c.stream(exec_id):
            seen.append(event["kind"])

    call = {"wait": wait, "get_results": get_results, "stream": stream}[method]
    elapsed = _time_to_unavailable(call, s)
    assert elapsed <= DEAD_SERVER_BOUND
    if method == "stream":
        assert "progress" in seen and "log" in seen  # it was live until the kill

    # a server comes back on that port (same data dir): the same client just works again
    s2 = make_server(method, workers=1, port=s.port)
    status = c.get_status(exec_id)
    assert status["state"] == "failed" and "interrupted" in status["error"]
    assert c.get_results(c.execute(QUICK, config={"value": "again"}), timeout=30) == {
        "return": ["again"]
    }
    s2.stop()


def test_a_client_survives_a_restart_between_requests(make_server):
    s = make_server("between", workers=1)
    with ExecutionClient(port=s.port, auto_spawn=False) as c:
        first = c.ping()["pid"]
        s.stop()
        with pytest.raises(ServerUnavailable):
            c.ping(timeout=1.0)
        s2 = make_server("between", workers=1, port=s.port)
        assert c.ping()["pid"] == s2.proc.pid != first
        s2.stop()  # and a graceful restart with no failed request in between
        s3 = make_server("between", workers=1, port=s.port)
        assert c.ping()["pid"] == s3.proc.pid


HOLDS_THE_GIL = """
import ctypes, os
def run(ctx, config):
    with open(config.pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(config.pid_file + ".tmp", config.pid_file)
    # a C call through PyDLL keeps the GIL: the worker's heartbeat thread cannot run
    ctypes.PyDLL(None).sleep(120)
"""


@pytest.mark.parametrize("how", ["sigstop", "gil"])
def test_a_hung_worker_is_detected_by_its_missing_heartbeats(make_server, tmp_path, how):
    timeout = 1.5
    s = make_server(how, workers=1, extra=["--heartbeat-timeout", str(timeout)])
    c = s.client()
    pid_file = tmp_path / "pid"
    code = BLOCKING if how == "sigstop" else HOLDS_THE_GIL
    exec_id = c.execute(code, config={"pid_file": str(pid_file)})
    pid = read_pid(pid_file)
    if how == "sigstop":
        os.kill(pid, signal.SIGSTOP)
    hung_at = time.time()
    try:
        status = c.wait(exec_id, timeout=30)
    finally:
        if psutil.pid_exists(pid):  # never leave a stopped process behind
            os.kill(pid, signal.SIGKILL)
    detected = status["finished"] - hung_at
    print(f"\n  {how}: hung worker detected after {detected:.2f} s (timeout {timeout} s)")
    assert status["state"] == "failed"
    assert status["error"] == f"worker hung: no heartbeat for {timeout:g} s"
    # last heartbeat at most 0.5 s before the hang; generous slack for a loaded machine
    assert timeout - 0.6 <= detected <= timeout + 3.0
    wait_for(lambda: not psutil.pid_exists(pid), timeout=10, what="the hung worker to be killed")
    wait_for(lambda: c.ping()["workers_ready"] == 1, what="a replacement worker")
    assert c.get_results(c.execute(QUICK, config={"value": 5}), timeout=30) == {"return": [5]}


def test_wait_with_a_zero_timeout_answers_at_once(make_server, tmp_path):
    s = make_server("zero", workers=1)
    c = s.client()
    exec_id = c.execute(BLOCKING, config={"pid_file": str(tmp_path / "pid"), "seconds": 30})
    read_pid(tmp_path / "pid")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        c.wait(exec_id, timeout=0)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(TimeoutError):
        c.get_results(exec_id, timeout=0)
    c.cancel(exec_id)
