"""WAL checkpoints run in a thread of their own, not inside the server loop's commits."""

from __future__ import annotations

import os
import sqlite3
import time

from zmqruntime import walcheckpoint
from zmqruntime.store import Store


def write_logs(store: Store, n: int, per_commit: int = 100, start: int = 0) -> None:
    for i in range(start, start + n):
        store.add_log("run", i, time.time(), f"line {i} " + "x" * 200)
        if (i + 1 - start) % per_commit == 0:
            assert store.commit()
    assert store.commit()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_commits_leave_checkpoints_to_the_thread(tmp_path):
    store = Store(tmp_path, background_checkpoints=True)
    try:
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        checkpointer = store._checkpointer
        assert checkpointer is not None
        every = walcheckpoint.WRITES_PER_CHECKPOINT
        for k in range(1, 3):  # one checkpoint per WRITES_PER_CHECKPOINT writes
            write_logs(store, every, start=(k - 1) * every)
            assert wait_for(lambda k=k: checkpointer.checkpoints >= k), checkpointer.checkpoints
    finally:
        store.close()
    assert not (tmp_path / "executions.sqlite-wal").exists()  # the last close took the rest
    db = sqlite3.connect(tmp_path / "executions.sqlite")
    n = db.execute("SELECT count(*) FROM logs").fetchone()[0]
    db.close()
    assert n == 2 * walcheckpoint.WRITES_PER_CHECKPOINT


def test_a_store_with_few_writes_is_left_alone(tmp_path):
    """As with SQLite's own: no checkpoint (no write to the database file) until the log
    holds enough; a second server checking that the first's files are untouched relies on
    it (tests/test_faults.py)."""
    store = Store(tmp_path, background_checkpoints=True)
    try:
        write_logs(store, 10)
        db_file = tmp_path / "executions.sqlite"
        before = os.stat(db_file).st_mtime_ns
        time.sleep(0.5)
        assert store._checkpointer is not None and store._checkpointer.checkpoints == 0
        assert os.stat(db_file).st_mtime_ns == before
    finally:
        store.close()


def test_without_the_thread_sqlite_checkpoints_as_usual(tmp_path):
    store = Store(tmp_path)
    try:
        assert store._checkpointer is None
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        store.close()
