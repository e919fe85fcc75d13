"""Worker crashes: os._exit, SIGKILL and a real segfault each cost one run, never the server."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from reliability_util import BLOCKING, QUICK, read_pid, wait_for

EXIT_7 = """
import os, time
def run(ctx, config):
    ctx.log("exiting hard")
    time.sleep(0.5)  # what was logged well before the crash is kept (not the last ms)
    os._exit(7)
"""

SEGFAULT = """
import ctypes, resource
def run(ctx, config):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test's cwd
    ctypes.string_at(0)  # reads address 0: SIGSEGV in C, no Python exception
"""

#: crashes (exit code 7) on its first ``config.crashes`` attempts, then completes
CRASH_N_TIMES = """
import os
def run(ctx, config):
    with open(config.counter, "a") as f:
        f.write("x")
    with open(config.counter) as f:
        attempt = len(f.read())
    if attempt <= config.crashes:
        os._exit(7)
    return attempt
"""


def _dead(pid: int) -> bool:
    """Gone, or a zombie whose every thread has exited: its parent can reap it now,
    though it may not have noticed yet. (The main thread of a dying multi-threaded
    process shows as a zombie before its other threads are gone.)"""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (psutil.NoSuchProcess, FileNotFoundError):
        return True


def _worker_pids(server) -> set[int]:
    return {p.pid for p in psutil.Process(server.proc.pid).children()}


def _crash(kind: str, client, tmp_path) -> str:
    """Start a run that kills its worker in the way named by ``kind``; return its id."""
    if kind == "exit":
        return client.execute(EXIT_7)
    if kind == "segfault":
        return client.execute(SEGFAULT)
    pid_file = tmp_path / f"{kind}.pid"
    exec_id = client.execute(BLOCKING, config={"pid_file": str(pid_file)})
    os.kill(read_pid(pid_file), signal.SIGKILL)
    return exec_id


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("exit", "exit code 7"),
        ("sigkill", "killed by signal SIGKILL"),
        ("segfault", "killed by signal SIGSEGV"),
    ],
)
def test_a_dying_worker_fails_its_run_and_is_replaced(
    make_any_server, executor, tmp_path, kind, expected
):
    if executor == "dask" and kind != "exit":
        pytest.skip("on Dask every death of a worker process takes the path of case 'exit'")
    s = make_any_server(kind, workers=2)
    c = s.client()
    before = _worker_pids(s)
    # a run on the other worker must not notice anything
    bystander = c.execute(BLOCKING, config={"pid_file": str(tmp_path / "by.pid"), "seconds": 2})
    read_pid(tmp_path / "by.pid")

    victim = _crash(kind, c, tmp_path)
    status = c.wait(victim, timeout=30)
    assert status["state"] == "failed"
    if executor == "dask":  # Dask tells that its worker was lost, not how it ended
        assert status["error"].startswith("the worker process died (Dask worker tcp://")
        assert "lost: KilledWorker" in status["error"]
    else:
        assert status["error"] == f"the worker process died ({expected})"
    assert status["attempts"] == 1
    if kind == "exit":
        assert [line["text"] for line in c.get_logs(victim)] == ["exiting hard"]

    assert c.wait(bystander, timeout=30)["state"] == "completed"
    assert s.proc.poll() is None, "the server died with its worker"
    wait_for(lambda: c.ping()["workers_ready"] == 2, what="a replacement worker")
    if executor == "native":  # Dask's worker processes are its nannies' children
        after = _worker_pids(s)
        assert len(after) == 2 and len(after - before) == 1, (before, after)
    # the pool works as before: two runs at once, both complete
    ids = [c.execute(QUICK, config={"value": i}) for i in range(2)]
    assert [c.get_results(i, timeout=30) for i in ids] == [{"return": [0]}, {"return": [1]}]


def test_retries_resubmit_a_run_whose_worker_died(make_any_server, tmp_path):
    s = make_any_server("retries", workers=1)
    c = s.client()
    lucky = c.execute(
        CRASH_N_TIMES, config={"counter": str(tmp_path / "a"), "crashes": 2}, retries=2
    )
    status = c.wait(lucky, timeout=60)
    assert status["state"] == "completed", status
    assert status["attempts"] == 3
    assert c.get_results(lucky) == {"return": [3]}

    unlucky = c.execute(
        CRASH_N_TIMES, config={"counter": str(tmp_path / "b"), "crashes": 99}, retries=1
    )
    status = c.wait(unlucky, timeout=60)
    assert status["state"] == "failed"
    assert status["attempts"] == 2
    assert status["error"].startswith("the worker process died (")
    assert "exit code 7" in status["error"] or "KilledWorker" in status["error"]
    assert (tmp_path / "b").read_text() == "xx"  # exactly two attempts ran

    # a pipeline that merely raises is not retried: retries are for dead workers
    raising = c.execute("def run(ctx, config):\n    raise ValueError('no')\n", retries=3)
    status = c.wait(raising, timeout=30)
    assert status["state"] == "failed" and status["attempts"] == 1


#: makes every new worker exit at once while a flag file exists (a broken environment)
BREAK_WORKERS = """
import os, sys
if "zmqruntime.worker" in sys.orig_argv and os.path.exists(os.environ["ZMQR_TEST_BREAK"]):
    raise SystemExit(1)
"""


def test_workers_that_cannot_start_are_retried_with_backoff(make_server, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BREAK_WORKERS)
    flag = tmp_path / "workers-broken.flag"
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("ZMQR_TEST_BREAK", str(flag))
    s = make_server("broken", workers=2)
    c = s.client()
    flag.touch()  # from now on no worker can start, as after a botched upgrade
    pids = _worker_pids(s)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(_dead(p) for p in pids), what="the workers to die")
    queued = c.execute(QUICK, config={"value": "after the repair"})

    def attempts() -> int:
        return (s.data_dir / "server.log").read_text().count("died before it was ready")

    wait_for(lambda: attempts() >= 2, timeout=30, what="two failed worker starts")
    first_two = attempts()
    time.sleep(4)
    later = attempts() - first_two
    print(f"\n  {later} more failed worker starts in 4 s (backoff 0.5, 1, 2, 4 s ...)")
    assert later <= 8  # without backoff: hundreds, one per loop tick
    assert c.ping()["workers_ready"] == 0
    assert c.get_status(queued)["state"] == "queued"  # waits, is not lost

    flag.unlink()  # repaired: the next attempt succeeds, the queue moves again
    wait_for(lambda: c.ping()["workers_ready"] == 2, timeout=40, what="workers to start again")
    assert c.get_results(queued, timeout=30) == {"return": ["after the repair"]}


def test_a_run_submitted_just_after_idle_workers_died_is_not_lost(make_server):
    s = make_server("idle-deaths", workers=2)
    c = s.client()
    for _ in range(3):
        pids = _worker_pids(s)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda pids=pids: all(_dead(p) for p in pids), what="the workers to die")
        # the server has not polled its workers yet: it must not hand this run to a corpse
        exec_id = c.execute(QUICK, config={"value": 1})
        status = c.wait(exec_id, timeout=30)
        assert status["state"] == "completed", (status["error"], status["message"])
        assert status["attempts"] == 1
