"""Persistence: a server SIGKILLed mid-work and restarted on its data dir loses nothing finished.

Also retention: ``serve --keep-days / --max-store-gb`` and ``zmqruntime purge``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from reliability_util import BLOCKING, QUICK, read_pid, sigkill_server, wait_for

from zmqruntime import ExecutionFailed, UnknownExecution

FINISHED = """
import numpy as np
def run(ctx, config):
    print("hello from the pipeline")
    ctx.log("second line")
    ctx.emit("image", np.arange(12, dtype=np.uint16).reshape(3, 4))
    ctx.emit("blob", b"\\x00\\x01binary")
    ctx.emit("value", {"a": [1, 2.5, "x"]})
    return 42
"""

FAILING = """
def run(ctx, config):
    ctx.log("about to fail")
    raise RuntimeError("boom")
"""

#: emits small arrays as fast as it can, so a SIGKILL of the server lands mid-write
BUSY_WRITER = """
import os, time
import numpy as np
def run(ctx, config):
    ctx.log("writer started")
    i = 0
    while True:
        ctx.emit("frame", np.full((16, 16), i, dtype=np.uint16))
        if i == 20:
            with open(config.pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(config.pid_file + ".tmp", config.pid_file)
        i += 1
        time.sleep(0.002)
"""

#: first attempt: emits a result, leaves a marker and blocks; second attempt: completes
SECOND_TIME_LUCKY = """
import os, time
def run(ctx, config):
    if os.path.exists(config.marker):
        return "second attempt"
    ctx.emit("partial", "from the first attempt")
    with open(config.marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(config.marker + ".tmp", config.marker)
    time.sleep(60)
"""


def test_restart_after_sigkill_keeps_finished_runs_and_resumes_the_queue(make_server, tmp_path):
    s = make_server("store", workers=2)
    c = s.client()

    done = c.execute(FINISHED, name="finished")
    expected = c.get_results(done, timeout=30)
    done_status = c.wait(done)
    done_logs = c.get_logs(done)
    assert [line["text"] for line in done_logs] == ["hello from the pipeline\nsecond line"] or [
        line["text"] for line in done_logs
    ] == ["hello from the pipeline", "second line"]

    failed = c.execute(FAILING)
    failed_status = c.wait(failed, timeout=30)
    assert failed_status["state"] == "failed"

    # two runs in flight on the two workers: one plain, one with retries=1
    interrupted = c.execute(BUSY_WRITER, config={"pid_file": str(tmp_path / "writer.pid")})
    retried = c.execute(
        SECOND_TIME_LUCKY, config={"marker": str(tmp_path / "lucky.marker")}, retries=1
    )
    read_pid(tmp_path / "writer.pid")
    read_pid(tmp_path / "lucky.marker")
    wait_for(lambda: c.get_logs(interrupted), what="the writer's log line to be stored")
    queued = [c.execute(QUICK, config={"value": i}) for i in range(3)]
    assert [c.get_status(q)["state"] for q in queued] == ["queued"] * 3

    orphans = sigkill_server(s.proc)
    # the orphaned workers notice their server is gone and exit by themselves
    gone, alive = psutil.wait_procs(orphans, timeout=10)
    assert not alive, f"workers outlived their SIGKILLed server: {alive}"

    s2 = make_server("store", workers=2, port=s.port)
    c2 = s2.client()

    # finished runs: status, logs and results exactly as before
    assert c2.get_status(done) == done_status
    assert c2.get_logs(done) == done_logs
    got = c2.get_results(done)
    assert got.keys() == expected.keys()
    np.testing.assert_array_equal(got["image"][0], expected["image"][0])
    assert got["image"][0].dtype == np.uint16
    assert got["blob"] == [b"\x00\x01binary"]
    assert got["value"] == [{"a": [1, 2.5, "x"]}]
    assert got["return"] == [42]
    assert c2.get_status(failed) == failed_status
    with pytest.raises(ExecutionFailed, match="boom"):
        c2.get_results(failed)

    # the run that was running fails, saying why, and keeps what it logged
    status = c2.wait(interrupted, timeout=30)
    assert status["state"] == "failed"
    assert "interrupted" in status["error"]
    assert status["finished"] is not None
    assert [line["text"] for line in c2.get_logs(interrupted)][0] == "writer started"
    assert status["n_logs"] >= 1
    assert status["n_results"] >= 20  # what it emitted before the crash is counted

    # the one with retries=1 ran again, and only the second attempt's results count
    status = c2.wait(retried, timeout=30)
    assert status["state"] == "completed", status
    assert status["attempts"] == 2
    assert c2.get_results(retried) == {"return": ["second attempt"]}

    # the queued runs ran after the restart, in order
    for i, q in enumerate(queued):
        assert c2.get_results(q, timeout=30) == {"return": [i]}

    s2.stop()
    db = sqlite3.connect(s.data_dir / "executions.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        n = db.execute("SELECT COUNT(*) FROM executions").fetchone()[0]
        assert n == 4 + len(queued)
    finally:
        db.close()


def test_restart_after_sigterm_also_fails_the_running_run_as_interrupted(make_any_server, tmp_path):
    s = make_any_server("graceful", workers=1)
    c = s.client()
    running = c.execute(BLOCKING, config={"pid_file": str(tmp_path / "pid")})
    read_pid(tmp_path / "pid")
    queued = c.execute(QUICK, config={"value": "after"})
    s.stop()  # SIGTERM: a graceful shutdown
    s2 = make_any_server("graceful", workers=1, port=s.port)
    c2 = s2.client()
    status = c2.get_status(running)
    assert status["state"] == "failed" and "interrupted" in status["error"]
    assert c2.get_results(queued, timeout=30) == {"return": ["after"]}


# --------------------------------------------------------------------------- retention

ARRAY_100K = """
import numpy as np
def run(ctx, config):
    ctx.emit("data", np.zeros(100_000, dtype=np.uint8))
"""


def _age(data_dir, ids, days):
    db = sqlite3.connect(data_dir / "executions.sqlite")
    try:
        for exec_id in ids:
            db.execute(
                "UPDATE executions SET created=created-?, finished=finished-? WHERE id=?",
                (days * 86400, days * 86400, exec_id),
            )
        db.commit()
    finally:
        db.close()


def _exists(client, exec_id):
    try:
        client.get_status(exec_id)
    except UnknownExecution:
        return False
    return True


def test_keep_days_and_max_store_gb_at_startup(make_server):
    s = make_server("retention", workers=1)
    c = s.client()
    ids = []
    for _ in range(4):
        ids.append(c.execute(ARRAY_100K))
        c.wait(ids[-1], timeout=30)
        time.sleep(0.01)  # distinct finish times: "oldest first" is well defined
    s.stop()
    old, c_id, d_id = ids[:2], ids[2], ids[3]
    _age(s.data_dir, old, days=10)

    s2 = make_server("retention", workers=1, port=s.port, extra=["--keep-days", "5"])
    c2 = s2.client()
    assert [_exists(c2, i) for i in ids] == [False, False, True, True]
    for i in old:
        assert not (s.data_dir / "results" / i).exists()
    assert c2.get_results(c_id)["data"][0].nbytes == 100_000
    s2.stop()

    # 150 kB of results allowed: the newest run (100 kB) stays, the older one goes
    s3 = make_server("retention", workers=1, port=s.port, extra=["--max-store-gb", "0.00015"])
    c3 = s3.client()
    assert not _exists(c3, c_id)
    assert not (s.data_dir / "results" / c_id).exists()
    assert c3.get_results(d_id)["data"][0].nbytes == 100_000


def test_retention_is_applied_while_the_server_runs(make_server):
    s = make_server(
        "periodic", workers=1, extra=["--keep-days", "0.00002", "--retention-interval", "0.5"]
    )  # 0.00002 days = 1.7 s
    c = s.client()
    exec_id = c.execute(ARRAY_100K)
    c.wait(exec_id, timeout=30)
    assert (s.data_dir / "results" / exec_id).exists()
    wait_for(lambda: not _exists(c, exec_id), timeout=15, what="retention to remove the run")
    assert not (s.data_dir / "results" / exec_id).exists()


def test_purge_command_on_a_live_server_removes_only_finished_runs(make_server, tmp_path):
    s = make_server("purge", workers=1)
    c = s.client()
    finished = c.execute(ARRAY_100K)
    c.wait(finished, timeout=30)
    running = c.execute(BLOCKING, config={"pid_file": str(tmp_path / "pid"), "seconds": 3})
    read_pid(tmp_path / "pid")
    queued = c.execute(QUICK, config={"value": 1})

    out = subprocess.run(
        [sys.executable, "-m", "zmqruntime", "purge", "--data-dir", str(s.data_dir)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--keep-days" in out.stderr  # nothing to go by: refused

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "zmqruntime",
            "purge",
            "--data-dir",
            str(s.data_dir),
            "--keep-days",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "removed 1 finished run" in out.stdout
    assert not _exists(c, finished)
    assert not (s.data_dir / "results" / finished).exists()
    assert c.wait(running, timeout=30)["state"] == "completed"
    assert c.get_results(queued, timeout=30) == {"return": [1]}
