"""The server's disk guard: free space on the data dir, and runs failed for a full disk.

New runs are refused (ErrorCode.NO_SPACE) and queued ones wait while the data dir has
less free than ``--min-free-mb`` or the store cannot write; they go on by themselves once
space is back. A running run whose writes the store could not make fails (a run never
ends ``completed`` with a result missing). Socket-free: what it must do to a run goes
through the server (cancel on its worker, an event).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .formatting import fmt_bytes
from .protocol import EventKind
from .runstate import RunState
from .server_core import Run
from .server_requests import RunsRefused
from .store import free_bytes, storage_failure

if TYPE_CHECKING:
    from .server import ExecutionServer

log = logging.getLogger("zmqruntime.server")

#: new runs are refused (and queued ones wait) while the data dir has less free than this
DEFAULT_MIN_FREE_MB = 100.0


class DiskGuard:
    def __init__(self, server: ExecutionServer, data_dir: Path, min_free_mb: float) -> None:
        self.server = server
        self.data_dir = data_dir
        self.min_free = max(0, int(min_free_mb * 1e6))
        self.disk_free = free_bytes(data_dir)
        self.space_ok = True

    def refresh(self) -> bool:
        """Whether the data dir has --min-free-mb free (one statvfs, about a microsecond:
        read on every ping, execute and tick); when space is back, queued runs start."""
        self.disk_free = free_bytes(self.data_dir)
        ok = self.disk_free >= self.min_free
        if ok != self.space_ok:
            self.space_ok = ok
            if ok:
                log.info(
                    "%s free on %s again: accepting new runs",
                    fmt_bytes(self.disk_free),
                    self.data_dir,
                )
                self.server._dispatch()
            else:
                log.warning("not accepting new runs: %s", self.low_space())
        return self.space_ok

    def low_space(self) -> str:
        return (
            f"{fmt_bytes(self.disk_free)} free on {self.data_dir}, under this server's "
            f"minimum of {fmt_bytes(self.min_free)} (--min-free-mb)"
        )

    def accepting(self) -> bool:
        """New runs are taken, and queued ones started: enough space, a store that writes."""
        store = getattr(self.server, "store", None)
        return self.space_ok and (store is None or (store.writable and not store.backlog))

    def problem(self) -> str | None:
        store = getattr(self.server, "store", None)
        if store is not None and store.problem:
            return str(store.problem)
        return None if self.space_ok else self.low_space()

    def check_accepting(self) -> None:
        """Raise RunsRefused (answered with ErrorCode.NO_SPACE) while runs are refused."""
        self.refresh()
        if not self.accepting():
            raise RunsRefused(
                f"not accepting new runs: {self.problem()}. Free space there: new "
                "runs are accepted again as soon as it is back, without a restart"
            )

    def info(self) -> dict[str, Any]:
        """For ping: free space, the threshold, and what (if anything) is wrong."""
        self.refresh()
        return {
            "path": str(self.data_dir),
            "free_bytes": self.disk_free,
            "min_free_bytes": self.min_free,
            "accepting_runs": self.accepting(),
            "problem": self.problem(),
            "unsaved_writes": len(self.server.store.backlog),
        }

    def on_store_failure(self) -> None:
        """The store could not write: each running run with writes in its backlog fails
        (a run never ends completed with a result missing); queued runs wait for space."""
        store = self.server.store
        for exec_id, what in list(store.unsaved.items()):
            run = self.server.core.runs.get(exec_id)
            if run is None or run.state is not RunState.RUNNING or run.fail_reason is not None:
                continue
            error = store.last_error or OSError("the store could not write")
            reason = storage_failure(f"{what} of run {exec_id}", self.data_dir, error)
            self.fail_run(run, reason)

    def fail_run(self, run: Run, reason: str) -> None:
        """End a running run as failed for ``reason``: its worker is told to stop as on a
        cancel (killed after the grace period), and the run ends failed, not retried."""
        server = self.server
        run.fail_reason = reason
        run.record["message"] = reason
        log.error("run %s fails: %s", run.id, reason)
        if server.core.request_cancel(run, server.cancel_grace):
            server._cancel_on_worker(run)
        server._publish(
            run, EventKind.PROGRESS, {"progress": run.record["progress"], "message": reason}
        )
