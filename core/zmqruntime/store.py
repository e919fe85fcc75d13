"""Execution records in SQLite and result files on disk: what survives a restart.

Layout of a server's data dir::

    executions.sqlite      records, result index and log lines (WAL mode)
    results/<id>/<n>.npy   array results, one file each, written by the worker
    results/<id>/<n>.bin   large bytes results
    server.log

Only the server process writes SQLite; workers write result files and tell the
server, which indexes them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

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
    config BLOB
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

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.results_dir = self.data_dir / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_path = self.data_dir / "executions.sqlite"
        if not db_path.exists():  # pipelines' code and results: readable by this user only
            os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite's -wal follows
        self.db = sqlite3.connect(db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._in_tx = False

    # -- transactions: the server batches every write of one loop turn into one commit
    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def close(self) -> None:
        self.commit()
        self.db.close()

    # -- records
    def insert(
        self, record: dict[str, Any], pipeline_code: str, config_code: str | None, config: Any
    ) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO executions (id, name, state, progress, message, created, retries,"
            " pipeline_code, config_code, config) VALUES (?,?,?,?,?,?,?,?,?,?)",
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
                msgpack.packb(config, use_bin_type=True) if config is not None else None,
            ),
        )

    def update(self, exec_id: str, **fields: Any) -> None:
        if not fields:
            return
        self._begin()
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE executions SET {cols} WHERE id=?", (*fields.values(), exec_id))

    def get(self, exec_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            f"SELECT {', '.join(STATUS_FIELDS)} FROM executions WHERE id=?", (exec_id,)
        ).fetchone()
        return dict(zip(STATUS_FIELDS, row)) if row else None

    def code_of(self, exec_id: str) -> tuple[str, str | None, Any]:
        pipeline, config_code, config = self.db.execute(
            "SELECT pipeline_code, config_code, config FROM executions WHERE id=?", (exec_id,)
        ).fetchone()
        return pipeline, config_code, (msgpack.unpackb(config, raw=False) if config else None)

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

    def ids_in_state(self, state: str) -> list[str]:
        rows = self.db.execute("SELECT id FROM executions WHERE state=? ORDER BY created", (state,))
        return [r[0] for r in rows]

    # -- results
    def run_dir(self, exec_id: str) -> Path:
        return self.results_dir / exec_id

    def add_result(self, exec_id: str, idx: int, name: str, meta: dict, nbytes: int) -> None:
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO results (exec_id, idx, name, meta, nbytes) VALUES (?,?,?,?,?)",
            (exec_id, idx, name, msgpack.packb(meta, use_bin_type=True), nbytes),
        )

    def results(self, exec_id: str, start: int = 0, limit: int = 1 << 30) -> Iterator[dict]:
        rows = self.db.execute(
            "SELECT idx, name, meta FROM results WHERE exec_id=? AND idx>=? ORDER BY idx LIMIT ?",
            (exec_id, start, limit),
        )
        for idx, name, meta in rows:
            yield {"index": idx, "name": name, **msgpack.unpackb(meta, raw=False)}

    def clear_results(self, exec_id: str) -> None:
        """Forget a run's results (index and files): a retried run starts from nothing."""
        self._begin()
        self.db.execute("DELETE FROM results WHERE exec_id=?", (exec_id,))
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
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO logs (exec_id, idx, t, text) VALUES (?,?,?,?)",
            (exec_id, idx, t, text),
        )

    def logs(self, exec_id: str, start: int = 0, limit: int = 10_000) -> list[dict]:
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
        self._begin()
        for table, col in (("results", "exec_id"), ("logs", "exec_id"), ("executions", "id")):
            self.db.execute(f"DELETE FROM {table} WHERE {col}=?", (exec_id,))
        shutil.rmtree(self.run_dir(exec_id), ignore_errors=True)
