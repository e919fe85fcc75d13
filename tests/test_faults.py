"""Faults of disk, operator and port: a server outlives them, and says what happened.

* A full disk fails the run that could not store its results ("disk full while storing
  result N of run ..."), never the server: ping and status keep answering, the store stays
  intact, earlier runs keep their results, and runs are taken again once space is back.
  The disk is a small tmpfs mounted for the test (root only; skipped otherwise).
* One server per data dir: a second ``serve`` there exits 3 at once and changes nothing.
* A taken control or data port: exit 3 with the port and who holds it, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerProcess, kill_tree, start_server
from reliability_util import sigkill_server, wait_for

from zmqruntime import ExecutionFailed, RemoteError, local
from zmqruntime.transport import free_port, port_accepts_tcp

DISK_MB = 20
MIN_FREE_MB = 1.0  # what the servers on the small disk refuse new runs under

#: 512 KiB frames with a log line each, more than the disk holds
FILL = """
import numpy as np
def run(ctx, config):
    for i in range(200):
        ctx.log(f"frame {i}")
        ctx.emit("frame", np.full((512, 512), i, dtype=np.uint16))
"""

#: small values and log lines only: nothing for the worker to write, all for the store
CHATTY = """
import time
def run(ctx, config):
    for i in range(1_000_000):
        ctx.log(f"line {i} " + "x" * 200)
        ctx.emit("value", i)
        time.sleep(0.001)
"""

EARLIER = """
import numpy as np
def run(ctx, config):
    ctx.emit("image", np.arange(64, dtype=np.uint16).reshape(8, 8))
    ctx.emit("value", {"a": 1})
    return 42
"""

QUICK = """
def run(ctx, config):
    return 7
"""

#: notes each execution in ``config.log``, emits and logs, then waits for ``config.go``
ONCE = """
import os, time
def run(ctx, config):
    with open(config.log, "a") as f:
        f.write(ctx.execution_id + "\\n")
    ctx.emit("before", 1)
    ctx.log("waiting")
    while not os.path.exists(config.go):
        time.sleep(0.05)
    return "done"
"""


# --------------------------------------------------------------------------- helpers


class SmallDisk:
    """A tmpfs of DISK_MB mounted for one test, with servers on it and a filler file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"
        self.servers: list[ServerProcess] = []

    def serve(self, name: str = "data", **kwargs) -> ServerProcess:
        extra = ["--min-free-mb", str(MIN_FREE_MB), *kwargs.pop("extra", [])]
        s = start_server(self.root / name, workers=1, extra=extra, **kwargs)
        self.servers.append(s)
        return s

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Grow the filler until at most ``leave`` bytes are free."""
        chunk = b"\0" * (1 << 20)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while self.free() > leave:
                with contextlib.suppress(OSError):  # ENOSPC: full to the last page
                    os.write(fd, chunk[: max(4096, min(len(chunk), self.free() - leave))])
                if self.free() <= 4096:
                    break
        finally:
            os.close(fd)

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    root = tmp_path / "disk"
    root.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(root)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(
            "the disk-full tests mount a small tmpfs, which needs root: "
            f"mount said {mount.stderr.strip() or mount.returncode}"
        )
    disk = SmallDisk(root)
    try:
        yield disk
    finally:
        for s in disk.servers:
            s.stop()
        subprocess.run(["umount", str(root)], check=False)


class Watcher:
    """Pings the server and asks a status all the time, from its own client: the longest
    round trip and every error are kept (the control channel must never go quiet)."""

    def __init__(self, server: ServerProcess, exec_id: str) -> None:
        self.client = server.client(timeout=5.0)
        self.ids = [exec_id]
        self.worst = 0.0
        self.count = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.client.ping()
                for exec_id in list(self.ids):
                    self.client.get_status(exec_id)
            except Exception as exc:  # recorded, and the test fails on it
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.worst = max(self.worst, time.monotonic() - t0)
            self.count += 1
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self.errors, self.errors
        assert self.count > 0 and self.worst < 5.0, (self.count, self.worst)


def integrity(data_dir: Path) -> str:
    db = sqlite3.connect(f"file:{data_dir / 'executions.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def stored_rows(data_dir: Path, exec_id: str) -> tuple[str, int]:
    """The run's state and number of indexed results as the store has them."""
    db = sqlite3.connect(f"file:{data_dir / 'executions.sqlite'}?mode=ro", uri=True)
    try:
        (state,) = db.execute("SELECT state FROM executions WHERE id=?", (exec_id,)).fetchone()
        (n,) = db.execute("SELECT COUNT(*) FROM results WHERE exec_id=?", (exec_id,)).fetchone()
        return state, n
    finally:
        db.close()


def assert_refused(client) -> None:
    with pytest.raises(RemoteError) as info:
        client.execute(QUICK)
    assert info.value.code == "no_space"
    assert "not accepting new runs" in str(info.value)


def serve_once(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``zmqruntime serve ARGS`` that is expected to exit; killed (tree) if it does not."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqruntime", "serve", "--workers", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"serve {args} did not exit: {out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- full disk


def test_a_full_disk_fails_the_run_not_the_server(small_disk):
    s = small_disk.serve()
    c = s.client(timeout=10.0)
    earlier = c.execute(EARLIER)
    expected = c.get_results(earlier, timeout=30)
    watcher = Watcher(s, earlier)

    small_disk.fill(leave=3_000_000)  # room for about five frames
    run = c.execute(FILL)
    watcher.ids.append(run)
    status = c.wait(run, timeout=60)
    assert status["state"] == "failed"
    error = status["error"]
    assert error.startswith("disk full while storing "), error
    assert f"of run {run}: " in error and f"free on {s.data_dir}" in error, error
    assert 0 < status["n_results"] < 200
    with pytest.raises(ExecutionFailed, match="disk full while storing"):
        c.get_results(run, timeout=10)

    # under --min-free-mb: new runs are refused with a clear error, reads still work
    small_disk.fill(leave=100_000)
    storage = c.ping()["storage"]
    assert not storage["accepting_runs"] and storage["problem"], storage
    assert storage["min_free_bytes"] == int(MIN_FREE_MB * 1e6)
    assert_refused(c)
    np.testing.assert_equal(c.get_results(earlier), expected)

    # space is back: runs are taken again, no restart
    small_disk.unfill()
    wait_for(lambda: c.ping()["storage"]["accepting_runs"], timeout=10, what="space back")
    later = c.execute(QUICK)
    assert c.get_results(later, timeout=30) == {"return": [7]}
    wait_for(lambda: c.ping()["storage"]["unsaved_writes"] == 0, timeout=10, what="store")
    watcher.stop()

    assert integrity(s.data_dir) == "ok"
    again = c.get_status(run)
    assert again["state"] == "failed" and again["error"] == error
    # every result file left is indexed: the partial one was removed
    state, indexed = stored_rows(s.data_dir, run)
    assert state == "failed" and indexed == again["n_results"]
    assert len(list((s.data_dir / "results" / run).iterdir())) == indexed
    # what was stored before the failure stays fetchable, one by one
    assert len(c.list_results(run)) == indexed
    np.testing.assert_equal(c.get_result(run, 0), np.zeros((512, 512), np.uint16))
    np.testing.assert_equal(c.get_results(earlier), expected)
    assert s.proc.poll() is None


def test_a_store_that_cannot_write_fails_the_running_run_and_catches_up(small_disk):
    """The disk fills while a run writes only records (no files): the server cannot
    commit, fails that run, answers from memory, and writes it all once space is back."""
    s = small_disk.serve()
    c = s.client(timeout=10.0)
    earlier = c.execute(EARLIER)
    expected = c.get_results(earlier, timeout=30)
    run = c.execute(CHATTY)
    watcher = Watcher(s, run)
    wait_for(lambda: c.get_status(run)["n_results"] > 10, timeout=30, what="results")

    small_disk.fill(leave=0)
    status = c.wait(run, timeout=60)
    assert status["state"] == "failed"
    assert status["error"].startswith("disk full while storing "), status["error"]
    assert f"of run {run}: " in status["error"]
    storage = c.ping()["storage"]
    assert not storage["accepting_runs"] and "disk full" in storage["problem"], storage
    assert_refused(c)
    np.testing.assert_equal(c.get_results(earlier), expected)
    assert c.get_status(run)["state"] == "failed"  # from memory: the store has not got it

    small_disk.unfill()
    wait_for(lambda: c.ping()["storage"]["accepting_runs"], timeout=10, what="store")
    later = c.execute(QUICK)
    assert c.get_results(later, timeout=30) == {"return": [7]}
    watcher.stop()

    assert integrity(s.data_dir) == "ok"
    final = c.get_status(run)
    state, indexed = stored_rows(s.data_dir, run)
    assert (state, indexed) == ("failed", final["n_results"])
    assert s.proc.poll() is None


def test_a_server_starts_on_a_full_disk_serves_reads_and_says_why(small_disk):
    s = small_disk.serve()
    c = s.client()
    earlier = c.execute(EARLIER)
    expected = c.get_results(earlier, timeout=30)
    s.stop()

    small_disk.fill(leave=0)
    s = small_disk.serve()  # the same data dir, on a disk without a free page
    c = s.client()
    storage = c.ping()["storage"]
    assert not storage["accepting_runs"], storage
    assert str(s.data_dir) in storage["problem"], storage
    np.testing.assert_equal(c.get_results(earlier), expected)
    assert c.get_status(earlier)["state"] == "completed"
    assert [r["id"] for r in c.list_executions()] == [earlier]
    assert_refused(c)

    small_disk.unfill()
    wait_for(lambda: c.ping()["storage"]["accepting_runs"], timeout=10, what="space back")
    later = c.execute(QUICK)
    assert c.get_results(later, timeout=30) == {"return": [7]}
    np.testing.assert_equal(c.get_results(earlier), expected)
    assert integrity(s.data_dir) == "ok"


# --------------------------------------------------------------------------- data dir lock


def snapshot(data_dir: Path) -> tuple[dict, dict]:
    """Every file (size, mtime) and every row of the store, read without writing."""
    files = {
        str(p.relative_to(data_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and not p.name.endswith("-shm")  # readers may touch the wal-index
    }
    db = sqlite3.connect(f"file:{data_dir / 'executions.sqlite'}?mode=ro", uri=True)
    try:
        rows = {
            t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
            for t in ("executions", "results", "logs")
        }
    finally:
        db.close()
    return files, rows


def test_a_second_server_on_a_data_dir_exits_3_and_changes_nothing(make_server, tmp_path):
    a = make_server("a", workers=1)
    c = a.client()
    done = c.execute(EARLIER)
    expected = c.get_results(done, timeout=30)
    config = {"log": str(tmp_path / "executions.log"), "go": str(tmp_path / "go")}
    running = c.execute(ONCE, config=config)
    wait_for(lambda: c.get_status(running)["n_results"] == 1, what="the first result")
    wait_for(lambda: c.get_logs(running), what="the log line")
    queued = c.execute(ONCE, config=config)  # waits behind it: one worker
    assert c.get_status(queued)["state"] == "queued"
    before = snapshot(a.data_dir)

    holder = f"in use by zmqruntime server pid {a.proc.pid} on port {a.port}"
    for port in (a.port, free_port()):
        t0 = time.monotonic()
        proc = serve_once(["--port", str(port), "--data-dir", str(a.data_dir)])
        assert proc.returncode == 3, (proc.stdout, proc.stderr)
        assert time.monotonic() - t0 < 20
        message = one_line(proc.stderr)
        assert f"data dir {a.data_dir} is {holder}" in message, message
        assert "Traceback" not in proc.stderr + proc.stdout
        if port != a.port:
            assert not port_accepts_tcp("127.0.0.1", port)
            assert not local.registry_path(port).exists()

    # another data dir on the first server's port: the port is taken, and by whom
    proc = serve_once(["--port", str(a.port), "--data-dir", str(tmp_path / "other")])
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    message = one_line(proc.stderr)
    assert f"port {a.port} is in use by pid {a.proc.pid} (zmqruntime server on" in message
    assert "Traceback" not in proc.stderr

    assert snapshot(a.data_dir) == before
    assert local.find_server(a.port).pid == a.proc.pid

    Path(config["go"]).touch()
    assert c.get_results(running, timeout=30) == {"before": [1], "return": ["done"]}
    assert c.get_results(queued, timeout=30) == {"before": [1], "return": ["done"]}
    np.testing.assert_equal(c.get_results(done), expected)
    executions = Path(config["log"]).read_text().split()
    assert sorted(executions) == sorted([running, queued])  # each ran once


# --------------------------------------------------------------------------- ports, registry


@pytest.mark.parametrize("which", ["control", "data"])
def test_a_taken_port_exits_3_naming_the_port_and_its_holder(tmp_path, which):
    port = free_port()
    taken = port if which == "control" else port + 1
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        proc = serve_once(["--port", str(port), "--data-dir", str(tmp_path / "d")])
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    message = one_line(proc.stderr)
    assert f"port {taken}" in message and f"is in use by pid {os.getpid()} (" in message, message
    if which == "data":
        assert "data port" in message
    assert "Traceback" not in proc.stderr + proc.stdout
    assert local.find_server(port) is None
    assert not local.registry_path(port).exists()  # a failed start leaves no entry


def test_a_crashed_servers_entry_is_cleaned_at_the_next_listing(make_server):
    s = make_server("crash", workers=1)
    path = local.registry_path(s.port)
    assert path.exists()
    for worker in sigkill_server(s.proc):
        with contextlib.suppress(Exception):
            worker.kill()
    assert path.exists()  # nobody was left to remove it
    out = subprocess.run(
        [sys.executable, "-m", "zmqruntime", "servers"], capture_output=True, text=True
    )
    assert out.returncode == 0 and str(s.port) not in out.stdout
    assert not path.exists()


def test_ping_and_servers_show_the_free_space_threshold(make_server):
    s = make_server("ping", workers=1, extra=["--min-free-mb", "0.5"])
    storage = s.client().ping()["storage"]
    assert storage["min_free_bytes"] == 500_000 and storage["accepting_runs"]
    assert storage["free_bytes"] > 0 and storage["problem"] is None
    assert storage["path"] == str(s.data_dir)
    out = subprocess.run(
        [sys.executable, "-m", "zmqruntime", "servers"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert "disk free / min" in out.stdout and "/ 500.0 kB" in out.stdout, out.stdout


def test_a_client_whose_spawned_server_exits_says_why(server):
    from zmqruntime import ExecutionClient, ServerUnavailable
    from zmqruntime.transport import free_port

    # auto-spawn a second server on the data dir the fixture's server holds: it exits 3
    client = ExecutionClient(port=free_port(), data_dir=server.data_dir, spawn_timeout=30)
    try:
        with pytest.raises(ServerUnavailable) as info:
            client.ping()
    finally:
        client.close()
    message = str(info.value)
    assert "exited at once" in message and str(server.proc.pid) in message, message


def test_result_files_are_private_also_without_o_direct(tmp_path):
    from zmqruntime.resultfile import write_bytes, write_npy

    odd = np.arange(10, dtype=np.uint8)[1:]  # not block-aligned: the buffered path
    write_npy(tmp_path / "a.npy", odd)
    write_bytes(tmp_path / "b.zmqv", b"x")
    for name in ("a.npy", "b.zmqv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), odd)
