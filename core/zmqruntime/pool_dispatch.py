"""The machinery behind ExecutionPool: dispatch by free capacity, tracking, failover.

A :class:`Dispatcher` holds the pool's records (:mod:`zmqruntime.pool_state`) under one
lock and runs one tracker thread per server: it pings the server (capacity, liveness),
follows this pool's runs there, and when the server stops answering moves its runs to
another one or reports them failed (the rules are in :mod:`zmqruntime.pool`'s docstring).
:class:`~zmqruntime.pool.ExecutionPool` is the public face on top of it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import (
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    UnknownExecution,
    ZmqRuntimeError,
)
from .pool_state import PoolRun, ServerSlot, note_move, run_status, synth_status
from .protocol import FINAL_STATES, ControlMessageType, ErrorCode
from .stream import MemorySink

log = logging.getLogger("zmqruntime.pool")

#: how long a tracker's long-poll waits on one run before looking at the others
TRACK_CHUNK = 0.1
#: a tracker lists the server's queued and running runs at least this often, and at once
#: after one of this pool's runs there ended
SWEEP_INTERVAL = 0.2
#: a fresh pool waits this long for slow servers' first answer before dispatching
FIRST_CONTACT = 0.5


class Dispatcher:
    """The runs of one pool and the threads that follow its servers."""

    def __init__(
        self,
        servers: list[ServerSlot],
        *,
        timeout: float,
        heartbeat: float,
        pending_timeout: float,
    ) -> None:
        self.servers = servers
        self.by_key = {s.key: s for s in servers}
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.pending_timeout = pending_timeout
        self.cond = threading.Condition(threading.RLock())
        self.closing = threading.Event()
        self.runs: dict[str, PoolRun] = {}
        self.pending: list[PoolRun] = []  # runs whose server was lost, waiting for another
        self.stats = dict.fromkeys(
            ("submitted", "resubmitted", "finished", "failed_by_pool", "superseded_ignored"), 0
        )
        self._order = itertools.count()
        self._chosen = itertools.count(1)
        self._started = time.monotonic()

    def start(self) -> None:
        """One tracker thread per server."""
        for s in self.servers:
            s.thread = threading.Thread(
                target=self._track, args=(s,), name=f"zmqruntime-pool-{s.key}", daemon=True
            )
            s.thread.start()

    def close(self) -> None:
        """Stop the trackers (the servers' runs go on) and close every connection."""
        if self.closing.is_set():
            return
        self.closing.set()
        for s in self.servers:
            s.wake.set()
        for s in self.servers:
            if s.thread is not None:
                s.thread.join(timeout=self.timeout + 5)
        for s in self.servers:
            s.ctl.close()
            s.mon.close()
        with self.cond:
            self.cond.notify_all()

    # ------------------------------------------------------------------ submission
    def execute(
        self,
        pipeline_code: str,
        config_code: str | None,
        config: dict[str, Any] | None,
        name: str | None,
        retries: int,
        *,
        prefetch: bool,
        callback: Callable[[str], None] | None = None,
    ) -> str:
        if not isinstance(pipeline_code, str):
            raise TypeError("pipeline_code must be Python source code (a str)")
        if self.closing.is_set():
            raise ServerUnavailable("this pool is closed")
        self._first_contact()
        run = PoolRun(pipeline_code, config_code, config, name, max(0, int(retries)), prefetch)
        run.order = next(self._order)
        if callback is not None:
            run.callbacks.append(callback)
        tried: set[ServerSlot] = set()
        while True:
            target = self._choose(tried)
            if target is None:
                raise ServerUnavailable(
                    "no server of this pool is answering: " + self._down_summary()
                )
            tried.add(target)
            try:
                sid, status = self._submit(target, run)
            except ServerUnavailable as exc:
                self._confirm_down(target, exc)
                continue
            except RemoteError as exc:
                if exc.code in (ErrorCode.SHUTTING_DOWN.value, ErrorCode.NO_SPACE.value):
                    continue  # that server takes no runs now: another one may
                raise
            with self.cond:
                run.id = f"{target.key}/{sid}"
                self.runs[run.id] = run
                self.stats["submitted"] += 1
                placed = self._place(run, target, sid, status)
            if not placed:  # the server went down while we submitted: move the run on
                self._resubmit(run, {target}, f"server {target.key} went down at submission")
            return run.id

    def _submit(self, target: ServerSlot, run: PoolRun) -> tuple[str, dict[str, Any]]:
        body = {
            "pipeline_code": run.pipeline_code,
            "config_code": run.config_code,
            "config": run.config,
            "name": run.name,
            "retries": max(0, run.retries - run.reruns),
        }
        # the reply's status says whether the run started already (it matters on failover)
        reply = target.ctl.connection.request(ControlMessageType.EXECUTE, body)
        return reply["id"], reply.get("status") or {}

    def _place(self, run: PoolRun, target: ServerSlot, sid: str, status: dict[str, Any]) -> bool:
        """Record that ``target`` holds the run as ``sid`` (pool lock held)."""
        run.server, run.sid = target, sid
        run.status = status or None
        run.state = status.get("state", "queued") if status else "queued"
        run.pending_since = None
        if target.up is False:
            target.orphans.add(sid)
            return False
        target.inflight[sid] = run
        target.last_chosen = next(self._chosen)
        target.wake.set()
        return True

    def _choose(self, exclude: set[ServerSlot]) -> ServerSlot | None:
        with self.cond:
            live = [s for s in self.servers if s.up and s not in exclude and s.workers > 0]
            if not live:
                return None
            return max(live, key=lambda s: (s.free(), s.workers, -s.last_chosen, -s.index))

    def _first_contact(self) -> None:
        """Before the first dispatch, give every server a moment to answer its first ping."""
        deadline = self._started + self.timeout + 1.0
        while time.monotonic() < deadline and not self.closing.is_set():
            checked = [s.checked.is_set() for s in self.servers]
            if all(checked):
                return
            any_up = any(s.up for s in self.servers)
            if any_up and time.monotonic() - self._started >= FIRST_CONTACT:
                return
            time.sleep(0.01)

    def default_window(self) -> int:
        with self.cond:
            return max(1, sum(2 * s.workers for s in self.servers if s.up))

    def _down_summary(self) -> str:
        with self.cond:
            return "; ".join(f"{s.key}: {s.last_error or 'not answering'}" for s in self.servers)

    # ------------------------------------------------------------------ tracking
    def _track(self, s: ServerSlot) -> None:
        """One thread per server: ping it, follow this pool's runs there, notice its death."""
        ended = True
        while not self.closing.is_set():
            try:
                s.wake.clear()  # a submission from now on wakes the waits below
                now = time.monotonic()
                if s.up is not True or now - s.last_ping >= self.heartbeat:
                    self._ping(s)
                if s.up:
                    with self.cond:
                        runs = list(s.inflight.items())
                    if runs:
                        if ended or now - s.last_sweep >= SWEEP_INTERVAL:
                            self._sweep(s, runs)
                            s.last_sweep = now
                        ended = self._long_poll(s)
                    else:
                        s.wake.wait(self.heartbeat)
                else:
                    s.wake.wait(self.heartbeat)
            except (ServerUnavailable, ProtocolError) as exc:
                if self.closing.is_set():
                    break
                self._confirm_down(s, exc)
            except Exception:  # a bug here must not stop the tracking of this server
                if self.closing.is_set():
                    break
                log.exception("pool tracker of %s failed; going on", s.key)
                self.closing.wait(self.heartbeat)
            self._expire_pending()

    def _ping(self, s: ServerSlot) -> None:
        try:
            info = s.mon.ping(timeout=self.timeout)
        except (ServerUnavailable, ProtocolError) as exc:
            s.last_ping = time.monotonic()
            self._mark_down(s, exc)
            return
        if info.get("server") != "zmqruntime":
            self._mark_down(s, ProtocolError(f"{s.key} answered, but not as a zmqruntime server"))
            return
        with self.cond:
            was = s.up
            s.info = info
            s.up = True
            s.down_since = None
            s.last_error = None
            s.last_ping = time.monotonic()
            # ours are in ``inflight`` (a run that ended unseen makes this conservative)
            s.others = max(0, info["workers_busy"] + info["queued"] - len(s.inflight))
            orphans, s.orphans = s.orphans, set()
            s.checked.set()
            self.cond.notify_all()
        if was is not True:
            if was is False:
                log.info("server %s answers again", s.key)
            for sid in orphans:  # superseded attempts must not run again after a restart
                with contextlib.suppress(ZmqRuntimeError):
                    s.mon.cancel(sid)
            self._drain_pending()

    def ping_quietly(self, s: ServerSlot) -> None:
        with contextlib.suppress(Exception):
            self._ping(s)

    def _sweep(self, s: ServerSlot, runs: list[tuple[str, PoolRun]]) -> None:
        """One LIST of the server's queued and running runs; ask about the rest one by one."""
        limit = 2 * len(runs) + 1000
        listed = s.mon.list_executions(limit=limit, states=["queued", "running"])
        live = {st["id"]: st for st in listed}
        with self.cond:
            if len(listed) < limit:  # a complete picture of the server's load
                s.others = sum(1 for st in listed if st["id"] not in s.inflight)
            for sid, run in runs:
                st = live.get(sid)
                if st is not None and run.sid == sid and run.final is None:
                    run.status, run.state = st, st["state"]
        for sid, run in runs:
            if sid in live or run.final is not None or run.sid != sid:
                continue
            try:
                status = s.mon.get_status(sid)
            except UnknownExecution:
                self._lost(s, run, sid, f"server {s.key} no longer knows run {sid}")
                continue
            self._observe(s, run, sid, status)

    def _long_poll(self, s: ServerSlot) -> bool:
        """Wait (briefly) on the oldest run there; True if it ended (others may have too)."""
        with self.cond:
            candidates = [r for r in s.inflight.values() if r.final is None]
            if not candidates:
                return True
            run = min(candidates, key=lambda r: r.order)
            sid = run.sid
        assert sid is not None
        try:
            status = s.mon.wait(sid, timeout=TRACK_CHUNK)
        except TimeoutError:
            return False
        except UnknownExecution:
            self._lost(s, run, sid, f"server {s.key} no longer knows run {sid}")
            return True
        self._observe(s, run, sid, status)
        return True

    def _observe(self, s: ServerSlot, run: PoolRun, sid: str, status: dict[str, Any]) -> None:
        with self.cond:
            if run.sid != sid or run.final is not None:
                return
            run.status, run.state = status, status["state"]
        if status["state"] not in FINAL_STATES:
            return
        results = None
        if run.prefetch and status["state"] == "completed":
            # a server lost during this fetch is handled like one lost while running
            sink = MemorySink()
            for event in s.mon.fetch_results(sid, 0, status["n_results"]):
                sink.add(event["index"], event["name"], event["value"])
            results = sink.close()
        self.finalize(run, status, sid=sid, results=results)

    def finalize(
        self,
        run: PoolRun,
        status: dict[str, Any],
        *,
        sid: str | None = None,
        results: dict[str, list[Any]] | None = None,
        by_pool: bool = False,
    ) -> bool:
        """Record the run's end, once: a superseded attempt's end is ignored."""
        with self.cond:
            if sid is not None and run.sid != sid:
                self.stats["superseded_ignored"] += 1
                return False
            if run.final is not None:  # seen by another thread first
                return False
            if run.server is not None and run.sid is not None:
                run.server.inflight.pop(run.sid, None)
            run.final = run_status(run, status)
            run.state = status["state"]
            run.results = results
            self.stats["finished"] += 1
            if by_pool:
                self.stats["failed_by_pool"] += 1
            callbacks = list(run.callbacks)
            run.callbacks.clear()
            self.cond.notify_all()
        for callback in callbacks:
            callback(run.id)
        return True

    # ------------------------------------------------------------------ failover
    def _confirm_down(self, s: ServerSlot, exc: Exception) -> None:
        """A request failed: one ping with the full timeout decides whether it is down."""
        if s.up is False:
            return
        try:
            info = s.mon.ping(timeout=self.timeout)
            if info.get("server") == "zmqruntime":
                log.info("server %s was slow (%s) but answers", s.key, exc)
                return
        except (ServerUnavailable, ProtocolError):
            pass
        self._mark_down(s, exc)

    def _mark_down(self, s: ServerSlot, exc: Exception) -> None:
        with self.cond:
            s.last_error = str(exc)
            s.checked.set()
            if s.up is False:
                return
            first = s.up is None
            s.up = False
            s.down_since = time.time()
            victims = [(sid, run) for sid, run in s.inflight.items()]
            s.inflight.clear()
            for sid, _ in victims:
                s.orphans.add(sid)
            self.cond.notify_all()
        if not first:
            log.warning(
                "server %s stopped answering (%s): %d run(s) to fail over", s.key, exc, len(victims)
            )
        reason = f"server {s.key} stopped answering ({exc})"
        for sid, run in victims:
            self._recover(s, run, sid, reason)

    def _lost(self, s: ServerSlot, run: PoolRun, sid: str, reason: str) -> None:
        with self.cond:  # whoever takes the run out of ``inflight`` decides its fate
            if s.inflight.get(sid) is not run or run.final is not None:
                return
            del s.inflight[sid]
        self._recover(s, run, sid, reason)

    def _recover(self, s: ServerSlot, run: PoolRun, sid: str, reason: str) -> None:
        """Decide the fate of a run its server lost: resubmit it, or report it failed."""
        with self.cond:
            if run.final is not None or run.sid != sid:
                return
            state = run.state
        if run.cancel_requested:
            self.finalize(
                run,
                synth_status(run, "cancelled", f"cancel requested, then {reason}"),
                by_pool=True,
            )
        elif state == "queued":
            self._resubmit(run, {s}, f"{reason} while the run was queued")
        elif run.reruns < run.retries:
            run.reruns += 1
            self._resubmit(
                run, {s}, f"{reason} while the run was {state}; retry {run.reruns} of {run.retries}"
            )
        elif state == "completed":
            error = (
                f"the run completed on {s.key}, but {reason} before its results were "
                "fetched; they stay in that server's store (retries=0, so it was not re-run)"
            )
            self.finalize(run, synth_status(run, "failed", error, error=error), by_pool=True)
        else:
            error = (
                f"{reason} while the run was running; it was not resubmitted elsewhere "
                f"because retries={run.retries} (submit with retries>0 to allow that)"
            )
            self.finalize(run, synth_status(run, "failed", error, error=error), by_pool=True)

    def _resubmit(self, run: PoolRun, exclude: set[ServerSlot], reason: str) -> None:
        tried = set(exclude)
        old_server = run.server
        old_key = f"{old_server.key}/{run.sid}" if old_server is not None else None
        while not self.closing.is_set():
            target = self._choose(tried)
            if target is None:
                with self.cond:
                    if run.final is not None:
                        return
                    if old_key is not None:
                        note_move(run, old_key, old_server, reason)
                    run.server, run.sid, run.state = None, None, "queued"
                    run.status = None
                    run.pending_since = time.monotonic()
                    self.pending.append(run)
                log.warning("run %s waits for a server: %s", run.id, reason)
                return
            tried.add(target)
            try:
                sid, status = self._submit(target, run)
            except ServerUnavailable as exc:
                self._confirm_down(target, exc)
                continue
            except RemoteError:
                continue
            with self.cond:
                if run.final is not None:  # cancelled meanwhile: the new attempt is unwanted
                    cancel_new = True
                else:
                    cancel_new = False
                    if old_key is not None:
                        note_move(run, old_key, old_server, reason)
                    self.stats["resubmitted"] += 1
                    placed = self._place(run, target, sid, status)
            if cancel_new:
                with contextlib.suppress(ZmqRuntimeError):
                    target.ctl.cancel(sid)
                return
            log.info("run %s resubmitted to %s as %s: %s", run.id, target.key, sid, reason)
            if placed:
                return
            old_server, old_key = target, f"{target.key}/{sid}"
            reason = f"server {target.key} went down at resubmission"
        # closing: leave the run as it is

    def _drain_pending(self) -> None:
        with self.cond:
            waiting, self.pending = self.pending, []
        for run in waiting:
            if run.final is not None:
                continue
            self._resubmit(run, set(), "a server answers again")

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self.cond:
            expired = [
                r
                for r in self.pending
                if r.pending_since is not None and now - r.pending_since > self.pending_timeout
            ]
            if not expired:
                return
            self.pending = [r for r in self.pending if r not in expired]
        for run in expired:
            reason = run.history[-1]["reason"] if run.history else "its server was lost"
            error = (
                f"{reason}; no server of this pool answered within {self.pending_timeout:g} s "
                "to take the run over"
            )
            self.finalize(run, synth_status(run, "failed", error, error=error), by_pool=True)

    # ------------------------------------------------------------------ ids and statuses
    def resolve(self, exec_id: str) -> tuple[ServerSlot, str]:
        """A pool id not issued by this pool: ``host:port/sid``, or a bare server id."""
        key, sep, sid = exec_id.rpartition("/")
        if sep:
            s = self.by_key.get(key)
            if s is None:
                raise UnknownExecution(
                    f"execution id {exec_id!r} names server {key}, which is not in this pool "
                    f"({', '.join(self.by_key)})"
                )
            return s, sid
        for s in self.servers:
            if s.up is False:
                continue
            try:
                s.ctl.get_status(exec_id)
                return s, exec_id
            except (UnknownExecution, ServerUnavailable):
                continue
        raise UnknownExecution(f"no server of this pool knows execution id {exec_id!r}")

    def where(self, exec_id: str, run: PoolRun | None) -> tuple[ServerSlot, str]:
        if run is None:
            return self.resolve(exec_id)
        with self.cond:
            s, sid = run.server, run.sid
        if s is None or sid is None:
            raise ServerUnavailable(f"run {exec_id} has no server at the moment")
        return s, sid
