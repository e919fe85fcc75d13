"""What an ExecutionPool knows: one record per server and per run, and the items of map.

The records are plain data; :mod:`zmqruntime.pool_dispatch` changes them under the pool's
lock. ``decorate`` and friends turn a server's status or event into the pool's (its id).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .client import ExecutionClient
from .errors import ZmqRuntimeError
from .protocol import FINAL_STATES, EventKind


@dataclass(eq=False)
class ServerSlot:
    """One server of the pool: its two clients, what its last ping said, our runs there."""

    index: int
    host: str
    port: int
    key: str
    ctl: ExecutionClient  # the caller's requests
    mon: ExecutionClient  # the tracker's requests (never waits behind the caller's)
    up: bool | None = None  # None until the first ping answers or fails
    info: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None
    last_ping: float = 0.0
    last_sweep: float = 0.0
    down_since: float | None = None
    others: int = 0  # runs of other clients running or queued there, at the last look
    last_chosen: int = 0
    inflight: dict[str, PoolRun] = field(default_factory=dict)  # server id -> run
    orphans: set[str] = field(default_factory=set)  # superseded ids to cancel on revival
    wake: threading.Event = field(default_factory=threading.Event)
    checked: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def workers(self) -> int:
        return int(self.info.get("workers") or 0)

    def free(self) -> int:
        """Free workers: the other clients' load at the last look, plus ours as of now."""
        # a ping can count our newest run as another client's until the sweep: never < 0
        return max(0, self.workers - self.others - len(self.inflight))


@dataclass(eq=False)
class PoolRun:
    """One run submitted through the pool, kept (code and config too) until it ends."""

    pipeline_code: str
    config_code: str | None
    config: dict[str, Any] | None
    name: str | None
    retries: int
    prefetch: bool
    created: float = field(default_factory=time.time)
    order: int = 0
    id: str = ""
    server: ServerSlot | None = None
    sid: str | None = None
    state: str = "queued"  # as last seen
    status: dict[str, Any] | None = None  # last status seen on its current server
    final: dict[str, Any] | None = None
    results: dict[str, list[Any]] | None = None
    reruns: int = 0  # resubmissions of a run that had started (these use up retries)
    history: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    pending_since: float | None = None
    callbacks: list[Callable[[str], None]] = field(default_factory=list)


@dataclass
class MapItem:
    """One finished run of :meth:`ExecutionPool.map`.

    ``results`` holds ``{name: [values]}`` of a completed run (None with ``fetch=False``
    or when the run did not complete); ``error`` the ExecutionFailed/ExecutionCancelled
    of a run that did not. ``result()`` returns the one or raises the other.
    """

    index: int
    config: dict[str, Any]
    id: str
    status: dict[str, Any]
    results: dict[str, list[Any]] | None
    error: ZmqRuntimeError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def result(self) -> dict[str, list[Any]] | None:
        if self.error is not None:
            raise self.error
        return self.results


# --------------------------------------------------------------------------- statuses and events


def decorate(
    status: dict[str, Any], exec_id: str, s: ServerSlot | None, sid: str | None
) -> dict[str, Any]:
    out = dict(status)
    out["id"] = exec_id
    out["server"] = s.key if s is not None else None
    out["server_id"] = sid
    return out


def rewrite_event(
    event: dict[str, Any], exec_id: str, s: ServerSlot, sid: str, run: PoolRun | None = None
) -> dict[str, Any]:
    out = dict(event)
    out["id"] = exec_id
    out["server"] = s.key
    if "status" in out:
        out["status"] = decorate(out["status"], exec_id, s, sid)
        if run is not None:
            out["status"]["resubmitted"] = len(run.history)
    return out


def state_event(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": EventKind.STATE.value,
        "id": status["id"],
        "seq": None,
        "server": status.get("server"),
        "status": status,
    }


def note_move(run: PoolRun, old_key: str, old_server: ServerSlot | None, reason: str) -> None:
    """Record in a run's history the attempt it is leaving, and why."""
    run.history.append(
        {
            "id": old_key,
            "server": old_server.key if old_server else None,
            "reason": reason,
            "time": time.time(),
        }
    )


def run_status(run: PoolRun, status: dict[str, Any]) -> dict[str, Any]:
    """A server's status of the run as the pool reports it: pool id, where, history."""
    s, sid = run.server, run.sid
    out = decorate(status, run.id, s, sid)
    out["resubmitted"] = len(run.history)
    out["history"] = [dict(h) for h in run.history]
    out["retries"] = run.retries
    return out


def synth_status(
    run: PoolRun, state: str, message: str, *, error: str | None = None
) -> dict[str, Any]:
    """A status the pool writes itself (waiting for a server, or lost for good)."""
    base = dict(run.status or {})
    final = state in FINAL_STATES
    base.update(
        id=run.sid or run.id,
        name=run.name or run.id,
        state=state,
        message=message,
        error=error,
        traceback=None,
        created=base.get("created") or run.created,
        started=base.get("started"),
        finished=time.time() if final else None,
        progress=base.get("progress"),
        n_results=0 if final else base.get("n_results", 0),
        n_logs=base.get("n_logs", 0),
    )
    out = run_status(run, base)
    out["by_pool"] = True
    return out
