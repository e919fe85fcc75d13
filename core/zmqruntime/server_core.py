"""The server's socket-free core: runs, the queue, parked waiters, cancel deadlines.

:class:`RunCore` keeps every run the server knows in memory and in the store, and changes
a run's state only through :meth:`RunCore.transition` (checked against
:data:`zmqruntime.runstate.TRANSITIONS`). It owns no socket and no loop: what it has to
tell the world goes through two callables it is given, ``publish(run, kind, body)`` (an
event on the data channel) and ``answer(waiter)`` (the reply to a parked wait), so a test
drives it in memory with lists for both (tests/test_run_states.py).
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import UnknownExecution
from .protocol import EventKind
from .runstate import INITIAL, RunState, check_transition
from .store import Store

log = logging.getLogger("zmqruntime.server")


@dataclass
class Waiter:
    """A parked wait / wait_many request: answered when ``pending`` empties or at ``deadline``."""

    route: list[bytes]
    req: Any
    pending: set[str]
    deadline: float
    ids: list[str]
    with_results: bool
    max_bytes: int
    single: bool  # a wait (status + results of one run), not a wait_many
    answered: bool = False


@dataclass
class Run:
    record: dict[str, Any]
    seq: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    cancel_deadline: float | None = None
    task: dict[str, Any] | None = None
    log_bytes: int = 0
    waiters: list[Waiter] = field(default_factory=list)
    #: per preview stream, the frame last sent to tcp watchers (newest wins)
    remote_previews: dict[tuple, Any] = field(default_factory=dict)
    #: per preview stream, the newest frame waiting for the last one to be through
    pending_previews: dict[tuple, Any] = field(default_factory=dict)
    #: why the server ends this run as failed once its worker stops (its results could
    #: not be stored); never retried
    fail_reason: str | None = None
    #: Dask worker resources the run needs (``execute(..., resources=)``); Dask executor only
    resources: dict[str, float] | None = None

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def state(self) -> RunState:
        return RunState(self.record["state"])


Publish = Callable[[Run, EventKind, dict[str, Any]], None]


class RunCore:
    """Runs, queue and waiters of one server; every state change goes through ``transition``.

    A run that reaches a final state leaves ``runs`` at once and waits in ``finished``
    until :meth:`announce`, which the server calls after the store committed: a final
    state is durable before anyone hears of it.
    """

    def __init__(
        self, store: Store | None, publish: Publish, answer: Callable[[Waiter], None]
    ) -> None:
        self.store: Store | None = store
        self.publish = publish
        self.answer = answer
        self.runs: dict[str, Run] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.finished: list[Run] = []
        #: finished runs whose final writes wait in the store's backlog (a full disk):
        #: their status is answered from here until the disk takes them
        self.unsaved: dict[str, Run] = {}

    @property
    def _store(self) -> Store:
        assert self.store is not None, "the core has no store yet"
        return self.store

    # ------------------------------------------------------------------ the state machine
    def transition(self, run: Run, new: RunState | str, **fields: Any) -> None:
        """The one place a run's state changes: checked against the table, written to the
        record and the store, then published (a final state once committed: see
        :meth:`announce`). Raises IllegalTransition for a move the table does not allow."""
        state = check_transition(run.id, run.record["state"], new)
        run.record.update(state=state.value, **fields)
        self._store.update(run.id, state=state.value, **fields)
        if state.final:
            self.runs.pop(run.id, None)
            self.finished.append(run)  # announced once this loop turn's writes are committed
        else:
            self.publish_state(run)

    def publish_state(self, run: Run) -> None:
        self.publish(run, EventKind.STATE, {"status": dict(run.record)})

    def submit(
        self,
        pipeline_code: str,
        config_code: str | None,
        config: dict | None,
        name: str | None,
        retries: int,
        resources: dict[str, float] | None = None,
    ) -> Run:
        """A new run, queued (the table's initial state) and published."""
        exec_id = secrets.token_hex(8)
        record = {
            "id": exec_id,
            "name": name or exec_id,
            "state": INITIAL.value,
            "progress": None,
            "message": None,
            "error": None,
            "traceback": None,
            "created": time.time(),
            "started": None,
            "finished": None,
            "n_results": 0,
            "n_logs": 0,
            "retries": max(0, retries),
            "attempts": 0,
        }
        self._store.insert(record, pipeline_code, config_code, config, resources)
        run = Run(record=record, resources=resources)
        run.task = {"pipeline_code": pipeline_code, "config_code": config_code, "config": config}
        self.runs[exec_id] = run
        self.queue.append(exec_id)
        self.publish_state(run)
        return run

    def start(self, run: Run) -> None:
        """A run's attempt starts on a worker: state, start time and attempt count."""
        self.transition(
            run,
            RunState.RUNNING,
            started=time.time(),
            attempts=run.record["attempts"] + 1,
            message=None,
        )

    def finish(
        self,
        run: Run,
        state: RunState | str,
        *,
        error: str | None = None,
        traceback: str | None = None,
        message: str | None = None,
    ) -> None:
        record = run.record
        final = RunState(state)
        self.transition(
            run,
            final,
            finished=time.time(),
            error=error,
            traceback=traceback,
            message=message,
            progress=1.0 if final is RunState.COMPLETED else record["progress"],
            n_results=record["n_results"],
            n_logs=record["n_logs"],
            attempts=record["attempts"],
        )

    def on_done(self, run: Run, msg: dict[str, Any]) -> None:
        """A worker's ``done`` message for a running run: its final state. A cancelled run
        that did not fail ends cancelled; one the server failed ends failed."""
        try:
            state = RunState(msg.get("state", "failed"))
        except ValueError:
            state = RunState.FAILED
        if not state.final:
            state = RunState.FAILED
        if run.cancel_requested and state is not RunState.FAILED:
            state = RunState.CANCELLED
        if run.fail_reason is not None:  # stopped by the server: its results were not stored
            self.finish(run, RunState.FAILED, error=run.fail_reason, message=run.fail_reason)
            return
        message = {RunState.COMPLETED: "completed", RunState.CANCELLED: "cancelled by request"}
        self.finish(
            run,
            state,
            error=msg.get("error"),
            traceback=msg.get("traceback"),
            message=msg.get("message") or message.get(state) or msg.get("error"),
        )

    def interrupt_running(self) -> None:
        """The server shuts down: running runs end failed (queued ones stay queued)."""
        for run in list(self.runs.values()):
            if run.state is RunState.RUNNING:
                self.finish(
                    run,
                    RunState.FAILED,
                    error="interrupted: the server shut down while this run was running",
                    message="interrupted by server shutdown",
                )

    def drop_waiters(self) -> list[Waiter]:
        """Every parked request not answered yet, marked answered (the server stops)."""
        dropped = []
        for run in self.runs.values():
            dropped += [w for w in run.waiters if not w.answered]
            for w in run.waiters:
                w.answered = True
        return dropped

    def requeue(self, run: Run, message: str) -> None:
        """A running run starts again from nothing (its worker died, retries are left):
        the dead attempt's results are dropped; it goes to the head of the queue."""
        record = run.record
        self._store.clear_results(run.id)
        self.transition(
            run,
            RunState.QUEUED,
            message=message,
            n_results=0,
            progress=None,
            n_logs=record["n_logs"],
            attempts=record["attempts"],
        )
        run.task = self.task_from_store(run.id)
        self.queue.appendleft(run.id)

    def run_lost(self, run: Run, reason: str, state: RunState | str = RunState.FAILED) -> None:
        """A running run's worker (or Dask task) died or was killed: retried from nothing
        while its retries allow (never for a server-made failure), else it ends."""
        record = run.record
        retry = run.fail_reason is None and record["attempts"] <= record["retries"]
        if RunState(state) is RunState.FAILED and retry:
            log.info(
                "run %s: %s; retrying (attempt %d of %d)",
                record["id"],
                reason,
                record["attempts"] + 1,
                record["retries"] + 1,
            )
            self.requeue(run, f"retrying: {reason}")
        else:
            failed = RunState(state) is RunState.FAILED
            self.finish(run, state, error=reason if failed else None, message=reason)

    def cancel_queued(self, run: Run, message: str = "cancelled while queued") -> None:
        if run.id in self.queue:
            self.queue.remove(run.id)
        self.finish(run, RunState.CANCELLED, message=message)

    def request_cancel(self, run: Run, grace: float) -> bool:
        """Mark a running run for cancel with a kill deadline; False if already marked."""
        if run.cancel_requested:
            return False
        run.cancel_requested = True
        run.cancel_deadline = time.monotonic() + grace
        return True

    def task_from_store(self, exec_id: str) -> dict[str, Any]:
        pipeline, config_code, config = self._store.code_of(exec_id)
        return {"pipeline_code": pipeline, "config_code": config_code, "config": config}

    def next_task(self, run: Run) -> dict[str, Any]:
        """What a worker needs to start ``run`` (read from the store after a restart)."""
        task = run.task or self.task_from_store(run.id)
        run.task = None
        return task

    # ------------------------------------------------------------------ lookups
    def record(self, exec_id: str) -> dict[str, Any]:
        run = self.runs.get(exec_id) or self.unsaved.get(exec_id)
        if run is not None:
            return run.record
        record = self._store.get(exec_id)
        if record is None:
            raise UnknownExecution(f"unknown execution id {exec_id!r}: this server never issued it")
        return record

    def count(self, state: RunState) -> int:
        return sum(1 for r in self.runs.values() if r.record["state"] == state.value)

    # ------------------------------------------------------------------ restart
    def recover(self) -> int:
        """Bring back what a previous server on this data dir left: queued runs are queued
        again, running ones requeued (retries left) or failed as interrupted. Returns how
        many runs are queued.

        Works from memory, not from what the store shows after its writes: on a full disk
        those writes wait in memory, and the runs must be queued (or failed) all the same.
        """
        store = self._store
        queued: dict[str, Run] = {}
        for exec_id in store.ids_in_state(RunState.RUNNING.value):
            record = store.get(exec_id)
            assert record is not None
            run = Run(record=record, resources=store.resources_of(exec_id))
            # the counters are written at the end of a run: count what it left behind
            n_results, n_logs = store.counts(exec_id)
            record["n_results"], record["n_logs"] = n_results, n_logs
            if record["attempts"] <= record["retries"]:
                store.clear_results(exec_id)
                self.transition(
                    run,
                    RunState.QUEUED,
                    started=None,
                    progress=None,
                    n_results=0,
                    n_logs=n_logs,
                    message="requeued after a server restart",
                )
                queued[exec_id] = run
            else:  # final: announced (and kept in ``unsaved`` if the disk is full) by announce
                self.finish(
                    run,
                    RunState.FAILED,
                    error="interrupted: the server stopped while this run was running",
                    message="interrupted by a server restart",
                )
        for exec_id in store.ids_in_state(RunState.QUEUED.value):
            record = store.get(exec_id)
            assert record is not None
            queued[exec_id] = Run(record=record, resources=store.resources_of(exec_id))
        for run in sorted(queued.values(), key=lambda r: r.record["created"]):
            self.runs[run.id] = run
            self.queue.append(run.id)
        return len(self.queue)

    # ------------------------------------------------------------------ waiters
    def park(self, waiter: Waiter) -> bool:
        """Park ``waiter`` on its runs that have not ended; False if it is due at once."""
        final = {s.value for s in RunState if s.final}
        waiter.pending = {i for i in waiter.ids if self.record(i)["state"] not in final}
        if not waiter.pending or waiter.deadline <= time.monotonic():
            return False
        for exec_id in waiter.pending:
            self.runs[exec_id].waiters.append(waiter)
        return True

    def _answer(self, waiter: Waiter) -> None:
        if not waiter.answered:
            waiter.answered = True
            self.answer(waiter)

    def announce(self) -> None:
        """Tell watchers and waiters of the runs that ended since the last call; called
        after the store committed them."""
        if not self.finished:
            return
        finished, self.finished = self.finished, []
        for run in finished:
            if self.store is not None and run.id in self.store.unsaved:
                self.unsaved[run.id] = run
            self.publish_state(run)
            for waiter in run.waiters:
                waiter.pending.discard(run.id)
                if not waiter.pending:
                    self._answer(waiter)
            run.waiters.clear()

    def expire_waiters(self, now: float) -> None:
        """Answer the parked requests whose timeout passed (with the runs as they are)."""
        for run in list(self.runs.values()):
            if run.waiters:
                for waiter in run.waiters:
                    if now >= waiter.deadline:
                        self._answer(waiter)
                run.waiters = [w for w in run.waiters if not w.answered]

    def cancels_due(self, now: float) -> list[Run]:
        """Runs whose cancel grace period is over."""
        return [
            r
            for r in self.runs.values()
            if r.cancel_deadline is not None and now > r.cancel_deadline
        ]

    def overdue(self, now: float, grace: float) -> list[tuple[Run, str, str]]:
        """Running runs whose cancel grace period is over, each with why it ends and in
        which state, once its worker (or Dask task) is stopped by force."""
        out = []
        for run in self.cancels_due(now):
            if run.state is not RunState.RUNNING:
                continue
            if run.fail_reason is not None:
                out.append((run, run.fail_reason, RunState.FAILED.value))
            else:
                reason = (
                    f"cancelled: the pipeline did not stop within {grace:g} s, "
                    "so its worker was killed"
                )
                out.append((run, reason, RunState.CANCELLED.value))
        return out
