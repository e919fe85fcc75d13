"""WAL checkpoints in a thread of their own, so that no commit of the server loop waits
for one.

SQLite copies its write-ahead log back into the database ("checkpoints") inside the
commit that takes the log past 1,000 pages; with runs submitted by the thousand that
commit held the server loop, and every request waiting on it, for 8-18 ms, against under
8.5 ms for any other commit (benchmarks/bench_stream.py, submission load). Here a second
connection runs a passive checkpoint, which never blocks the loop's writes, once the loop
has committed WRITES_PER_CHECKPOINT writes since the last one; the loop's connection has
automatic checkpoints turned off. A store that is not written to is not touched. A
checkpoint that fails (a full disk) is tried again after as many writes: the log keeps
every commit, so nothing is lost; it only grows until the disk takes writes again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("zmqruntime.store")

#: committed writes (SQL statements) between two checkpoints: a few hundred pages of log
WRITES_PER_CHECKPOINT = 1000


class WalCheckpointer:
    """Checkpoints the WAL of the SQLite file at ``db_path`` when :meth:`wrote` says so."""

    def __init__(self, db_path: Path, every: int = WRITES_PER_CHECKPOINT) -> None:
        """Raises sqlite3.Error if the file cannot be opened (then keep SQLite's own)."""
        self.every = every
        self.checkpoints = 0  # passive checkpoints that ran
        # opened here, so that a failure is the caller's to see; used only by the thread
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._since = 0  # writes committed since the last checkpoint was asked for
        self._due = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        """The loop committed ``n`` more writes (called by the store after each commit)."""
        self._since += n
        if self._since >= self.every:
            self._since = 0
            self._due.set()

    def _run(self) -> None:
        db = self._db
        failing = False
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._stopping:
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    if not failing:  # once per spell of failures
                        log.warning("WAL checkpoint failed (%s); tried again later", exc)
                    failing = True
                    continue
                failing = False
                self.checkpoints += 1
        finally:
            db.close()

    def stop(self) -> None:
        """Stop (before the loop's connection closes: the last connection to close
        checkpoints what is left and removes the log)."""
        self._stopping = True
        self._due.set()
        self._thread.join(timeout=10)
