"""Execution records in SQLite and result files on disk: what survives a restart.

Layout of a server's data dir::

    executions.sqlite      records, result index and log lines (WAL mode)
    results/<id>/<n>.npy   array results, one file each, written by the worker
    results/<id>/<n>.bin   large bytes results
    server.log

Only the server process writes SQLite; workers write result files and tell the
server, which indexes them.

A full disk (or another I/O error) never makes a write raise here: the writes of the
transaction that failed wait in memory, in order (:attr:`Store.backlog`), and are replayed
once the disk takes them; :attr:`Store.unsaved` says which runs they belong to, so the
server can fail those runs with a clear reason. A store that cannot even be opened for
writing (a restart on a full disk) is read without writing and reopened later.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from . import protocol
from .formatting import fmt_bytes
from .resultfile import ResultFiles
from .walcheckpoint import WalCheckpointer

log = logging.getLogger("zmqruntime.store")

#: seconds between two attempts to write what a full disk refused
RETRY_INTERVAL = 1.0
#: an I/O error with less than this free is reported as a full disk (SQLite says "disk
#: I/O error" when it cannot grow its shared-memory file)
NEARLY_FULL_BYTES = 1 << 20


class StorageFailed(OSError):
    """Storing part of a run failed (disk full, I/O error); the message says what and where."""


def free_bytes(path: Path | str) -> int:
    """Bytes free for this user on the filesystem of ``path`` (0 if it cannot be told)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT from a file write, or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "")  # Python 3.11+
        return name == "SQLITE_FULL" or "database or disk is full" in str(exc)
    return isinstance(exc, StorageFailed) and str(exc).startswith("disk full")


def storage_failure(what: str, path: Path | str, exc: BaseException) -> str:
    """The reason a run fails when ``what`` could not be stored under ``path``.

    ``disk full while storing result 12 of run 3f2a...: 0 bytes free on /data``
    """
    free = free_bytes(path)
    if is_disk_full(exc) or free < NEARLY_FULL_BYTES:
        return f"disk full while storing {what}: {fmt_bytes(free)} free on {path}"
    return f"I/O error while storing {what}: {exc} ({fmt_bytes(free)} free on {path})"


class Write(NamedTuple):
    """One SQL write, kept until it is durable: replayed if its transaction failed."""

    sql: str
    args: tuple
    exec_id: str | None
    what: str  # for messages: "result 12", "the log", "the state"


SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    id TEXT PRIMARY KEY,
    name TEXT,
    state TEXT NOT NULL,
    progress REAL,
    message TEXT,
    error TEXT,
    traceback TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    n_results INTEGER NOT NULL DEFAULT 0,
    n_logs INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    pipeline_code TEXT NOT NULL,
    config_code TEXT,
    config BLOB,
    resources BLOB  -- Dask worker resources the run needs (execute(..., resources=))
);
CREATE INDEX IF NOT EXISTS executions_state ON executions(state);
CREATE TABLE IF NOT EXISTS results (
    exec_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    meta BLOB NOT NULL,
    nbytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (exec_id, idx)
);
CREATE TABLE IF NOT EXISTS logs (
    exec_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    t REAL NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (exec_id, idx)
);
"""

STATUS_FIELDS = (
    "id",
    "name",
    "state",
    "progress",
    "message",
    "error",
    "traceback",
    "created",
    "started",
    "finished",
    "n_results",
    "n_logs",
    "retries",
    "attempts",
)


class Store:
    """The server's durable state. Not thread-safe: one server loop owns it."""

    def __init__(self, data_dir: Path, *, background_checkpoints: bool = False) -> None:
        """``background_checkpoints``: WAL checkpoints in a thread of their own, never in a
        commit (the server's; see walcheckpoint)."""
        self.data_dir = Path(data_dir)
        self._background_checkpoints = background_checkpoints
        self._checkpointer: WalCheckpointer | None = None
        #: the result files: the store locates them, a worker writes and the server reads
        #: them through it (resultfile.ResultFiles)
        self.files = ResultFiles(self.data_dir)
        self.results_dir = self.files.root
        self.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db_path = self.data_dir / "executions.sqlite"
        self._in_tx = False
        self._journal: list[Write] = []  # this transaction's writes
        #: writes the disk refused, in order; replayed by :meth:`commit` once it takes them
        self.backlog: list[Write] = []
        #: run id -> the first of its writes in the backlog ("result 12")
        self.unsaved: dict[str, str] = {}
        #: why writes wait in memory (None: everything written is durable)
        self.problem: str | None = None
        self.last_error: BaseException | None = None  # what the disk said last
        self.writable = True  # False: opened read-only (the disk was full at start)
        self._retry_at = 0.0
        self._doomed: list[Path] = []  # removed once the commit that forgets them is durable
        try:
            self.db = self._open()
        except sqlite3.Error as exc:
            self.db = self._open_readonly()
            self.writable = False
            self.last_error = exc
            self.problem = storage_failure("run records", self.data_dir, exc)
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            log.error("%s: serving what is stored, new writes wait in memory", self.problem)
        else:
            self._start_checkpoints()

    def _start_checkpoints(self) -> None:
        """Checkpoints off the commit path, if asked for (SQLite's own if that fails)."""
        if not self._background_checkpoints or self._checkpointer is not None:
            return
        try:
            self._checkpointer = WalCheckpointer(self.db_path)
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error as exc:
            log.warning("WAL checkpoints stay in commits: %s", exc)
            self._stop_checkpoints()

    def _stop_checkpoints(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None

    def _open(self) -> sqlite3.Connection:
        if not self.db_path.exists():  # pipelines' code and results: this user only
            os.close(os.open(self.db_path, os.O_CREAT | os.O_WRONLY, 0o600))  # -wal follows
        db = sqlite3.connect(self.db_path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(executions)")}
            if "resources" not in columns:  # a store written before the column existed
                db.execute("ALTER TABLE executions ADD COLUMN resources BLOB")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        """What is stored, read without writing a byte (no -shm, no -wal): the disk is full.

        Commits still in a -wal file left by a crash are not seen until the store reopens.
        """
        try:
            uri = f"{self.db_path.absolute().as_uri()}?immutable=1"  # --data-dir may be relative
            db = sqlite3.connect(uri, uri=True)
            db.execute("SELECT 1 FROM executions LIMIT 1").fetchall()
            return db
        except sqlite3.Error:  # no store yet (or unreadable): an empty one in memory
            db = sqlite3.connect(":memory:", isolation_level=None)
            db.executescript(SCHEMA)
            return db

    # -- transactions: the server batches every write of one loop turn into one commit
    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def _write(self, sql: str, args: tuple, exec_id: str | None, what: str) -> None:
        """Run one write in the current transaction; if the disk refuses it (or refused
        an earlier one still waiting), it waits in the backlog instead, in order."""
        write = Write(sql, args, exec_id, what)
        if self.backlog or not self.writable:
            self._to_backlog([write])
            return
        try:
            self._begin()
            self.db.execute(sql, args)
        except sqlite3.Error as exc:
            self._failed(exc, [*self._journal, write])
            return
        self._journal.append(write)

    def _failed(self, exc: sqlite3.Error, writes: list[Write]) -> None:
        """A transaction failed: roll it back and keep its writes for a later attempt."""
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
        self._in_tx = False
        self._journal = []
        first = not self.backlog
        self._to_backlog(writes)
        self.last_error = exc
        self.problem = storage_failure("run records", self.data_dir, exc)
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        if first:
            log.error("%s: %d write(s) wait in memory", self.problem, len(self.backlog))

    def _to_backlog(self, writes: list[Write]) -> None:
        self.backlog.extend(writes)
        for w in writes:
            if w.exec_id is not None:
                self.unsaved.setdefault(w.exec_id, w.what)

    def commit(self, force: bool = False) -> bool:
        """Make the writes so far durable; False: they wait in memory (see ``problem``).

        With a backlog, a new attempt is made at most every RETRY_INTERVAL (or now, with
        ``force``); never raises for a full disk or an I/O error.
        """
        if self.backlog or not self.writable:
            if force or time.monotonic() >= self._retry_at:
                self._replay()
            return not self.backlog and self.writable
        if self._in_tx:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._failed(exc, self._journal)
                return False
            if self._checkpointer is not None:
                self._checkpointer.wrote(len(self._journal))
            self._in_tx = False
            self._journal = []
            self._remove_doomed()
        return True

    def _replay(self) -> None:
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        try:
            if not self.writable:
                db = self._open()  # the disk takes writes again: leave the read-only view
                self.db.close()
                self.db, self.writable = db, True
                self._start_checkpoints()
            self.db.execute("BEGIN")
            for w in self.backlog:
                self.db.execute(w.sql, w.args)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.writable and self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            self.last_error = exc
            self.problem = storage_failure("run records", self.data_dir, exc)
            return
        log.info("the store took %d delayed write(s): %s is over", len(self.backlog), self.problem)
        self.backlog, self.unsaved, self.problem = [], {}, None
        self._remove_doomed()

    def _remove_doomed(self) -> None:
        doomed, self._doomed = self._doomed, []
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Commit what can be; writes a full disk still refuses are lost (and logged)."""
        self.commit(force=True)
        if self.backlog:
            log.error(
                "%d write(s) could not be stored before the server stopped (%s); the runs "
                "they belong to are recovered from what is stored at the next start",
                len(self.backlog),
                self.problem,
            )
        self._stop_checkpoints()  # the last connection to close checkpoints the rest
        try:
            self.db.close()
        except sqlite3.Error as exc:  # pragma: no cover - closing never writes much
            log.warning("closing the store: %s", exc)

    # -- records
    def insert(
        self,
        record: dict[str, Any],
        pipeline_code: str,
        config_code: str | None,
        config: Any,
        resources: dict[str, float] | None = None,
    ) -> None:
        self._write(
            "INSERT INTO executions (id, name, state, progress, message, created, retries,"
            " pipeline_code, config_code, config, resources) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                record["id"],
                record["name"],
                record["state"],
                record["progress"],
                record["message"],
                record["created"],
                record["retries"],
                pipeline_code,
                config_code,
                protocol.dumps(config) if config is not None else None,
                protocol.dumps(resources) if resources else None,
            ),
            record["id"],
            "the record",
        )

    def update(self, exec_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        sql = f"UPDATE executions SET {cols} WHERE id=?"
        self._write(sql, (*fields.values(), exec_id), exec_id, "the state")

    def get(self, exec_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            f"SELECT {', '.join(STATUS_FIELDS)} FROM executions WHERE id=?", (exec_id,)
        ).fetchone()
        return dict(zip(STATUS_FIELDS, row)) if row else None

    def code_of(self, exec_id: str) -> tuple[str, str | None, Any]:
        pipeline, config_code, config = self.db.execute(
            "SELECT pipeline_code, config_code, config FROM executions WHERE id=?", (exec_id,)
        ).fetchone()
        return pipeline, config_code, (protocol.loads(config) if config else None)

    def resources_of(self, exec_id: str) -> dict[str, float] | None:
        """The Dask worker resources a stored run asked for (None: none, or a store opened
        read-only that predates the column)."""
        try:
            row = self.db.execute(
                "SELECT resources FROM executions WHERE id=?", (exec_id,)
            ).fetchone()
        except sqlite3.OperationalError:  # read-only store without the column
            return None
        return protocol.loads(row[0]) if row and row[0] else None

    def list(self, limit: int = 200, states: Iterable[str] | None = None) -> list[dict]:
        sql = f"SELECT {', '.join(STATUS_FIELDS)} FROM executions"
        args: list[Any] = []
        if states:
            states = list(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        return [dict(zip(STATUS_FIELDS, row)) for row in self.db.execute(sql, args)]

    def ids_in_state(self, state: str) -> builtins.list[str]:
        rows = self.db.execute("SELECT id FROM executions WHERE state=? ORDER BY created", (state,))
        return [r[0] for r in rows]

    # -- results
    def run_dir(self, exec_id: str) -> Path:
        return self.files.run_dir(exec_id)

    def add_result(self, exec_id: str, idx: int, name: str, meta: dict, nbytes: int) -> None:
        self._write(
            "INSERT OR REPLACE INTO results (exec_id, idx, name, meta, nbytes) VALUES (?,?,?,?,?)",
            (exec_id, idx, name, _pack_meta(meta), nbytes),
            exec_id,
            f"result {idx}",
        )

    def results(self, exec_id: str, start: int = 0, limit: int = 1 << 30) -> Iterator[dict]:
        rows = self.db.execute(
            "SELECT idx, name, meta FROM results WHERE exec_id=? AND idx>=? ORDER BY idx LIMIT ?",
            (exec_id, start, limit),
        )
        for idx, name, meta in rows:
            yield {"index": idx, "name": name, **_unpack_meta(meta)}

    def clear_results(self, exec_id: str) -> None:
        """Forget a run's results (index and files): a retried run starts from nothing."""
        self._write("DELETE FROM results WHERE exec_id=?", (exec_id,), exec_id, "the state")
        shutil.rmtree(self.run_dir(exec_id), ignore_errors=True)

    def counts(self, exec_id: str) -> tuple[int, int]:
        """``(n_results, n_logs)`` as stored: the record's counters are written only at the end."""
        (n_results,) = self.db.execute(
            "SELECT COALESCE(MAX(idx)+1, 0) FROM results WHERE exec_id=?", (exec_id,)
        ).fetchone()
        (n_logs,) = self.db.execute(
            "SELECT COALESCE(MAX(idx)+1, 0) FROM logs WHERE exec_id=?", (exec_id,)
        ).fetchone()
        return n_results, n_logs

    # -- logs
    def add_log(self, exec_id: str, idx: int, t: float, text: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO logs (exec_id, idx, t, text) VALUES (?,?,?,?)",
            (exec_id, idx, t, text),
            exec_id,
            "the log",
        )

    def logs(self, exec_id: str, start: int = 0, limit: int = 10_000) -> builtins.list[dict]:
        rows = self.db.execute(
            "SELECT idx, t, text FROM logs WHERE exec_id=? AND idx>=? ORDER BY idx LIMIT ?",
            (exec_id, start, limit),
        )
        return [{"index": i, "t": t, "text": text} for i, t, text in rows]

    # -- retention
    def purge(self, older_than_days: float | None = None, max_bytes: int | None = None) -> int:
        """Remove finished runs by age, then oldest first until under ``max_bytes``."""
        removed: list[str] = []
        finished = "state IN ('completed','failed','cancelled')"
        if older_than_days is not None:
            cutoff = time.time() - older_than_days * 86400
            removed += [
                r[0]
                for r in self.db.execute(
                    f"SELECT id FROM executions WHERE {finished} AND finished < ?", (cutoff,)
                )
            ]
        if max_bytes is not None:
            rows = self.db.execute(
                f"SELECT e.id, COALESCE(SUM(r.nbytes),0) FROM executions e LEFT JOIN results r"
                f" ON r.exec_id=e.id WHERE {finished} GROUP BY e.id ORDER BY e.finished DESC"
            ).fetchall()
            total = 0
            for exec_id, nbytes in rows:
                total += nbytes
                if total > max_bytes and exec_id not in removed:
                    removed.append(exec_id)
        for exec_id in removed:
            self.delete(exec_id)
        self.commit()
        return len(removed)

    def delete(self, exec_id: str) -> None:
        """Forget a finished run; its files go once that is durable (never the reverse)."""
        for table, col in (("results", "exec_id"), ("logs", "exec_id"), ("executions", "id")):
            self._write(f"DELETE FROM {table} WHERE {col}=?", (exec_id,), None, "a removal")
        self._doomed.append(self.run_dir(exec_id))


def _pack_meta(meta: dict[str, Any]) -> bytes:
    """A result's index entry. Its inline ``value`` arrived undecoded (tuples and complex
    numbers as msgpack ExtType values) and is kept byte for byte, never interpreted here."""
    return msgpack.packb(meta, use_bin_type=True)


def _unpack_meta(blob: bytes) -> dict[str, Any]:
    # no ext_hook: ExtType values stay opaque; keys of a stored value may be any type
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)
