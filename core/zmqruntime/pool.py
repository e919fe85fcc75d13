"""ExecutionPool: one client for many servers, with dispatch by free capacity and failover.

A lab points one pool at the servers on several machines and submits a plate as one run
per well; the pool spreads the runs, follows them, and finishes them even if a machine
drops out::

    with ExecutionPool(["tcp://node1:5555", "tcp://node2:5555"], keys="~/.zmqr-keys") as pool:
        for item in pool.map(pipeline_code, [{"well": w} for w in wells]):
            print(item.index, item.result())

Ids. ``execute`` returns ``"<host>:<port>/<server id>"``: the server the run was first
sent to (as written in the endpoint) and the id that server issued, e.g.
``"10.0.0.5:5555/3f2a9c1d0b7e4a55"``. The id stays the run's handle for the pool's
lifetime even if the run is moved; ``get_status`` then says where it runs now
(``server``, ``server_id``) and where it was before (``history``). A bare server id
(without ``host:port/``) is looked up on every server.

Dispatch. Each server's tracker thread pings it (``workers``, ``workers_busy``,
``queued``) and lists its queued and running runs; a run goes to the server with the
most free capacity ``workers - busy - queued``, corrected by what this pool submitted or
saw finish since that snapshot. Ties go to the server chosen least recently.

Failover. A server that stops answering (no reply to a ping within ``timeout``) is
marked down. Its runs that were queued, and its running runs with ``retries`` left, are
resubmitted to the best other server (the pool keeps every run's code and config until
it ends). A running run without retries left ends as ``failed`` with the reason; so
does a run for which no server answers within ``pending_timeout``. Each run ends exactly
once from the pool's point of view: an attempt that was superseded is ignored (and
cancelled on its server when that server answers again). "Queued" is the state last
seen: a run that started just before its server vanished may have run there too, so
resubmitted code should be safe to run again.

Results live on the server that ran the run; ``map`` fetches them as part of finishing
the run, so a server lost between "completed" and the fetch is handled like a server
lost while running.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import ExecutionClient, raise_for_status
from .errors import (
    ExecutionCancelled,
    ExecutionFailed,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    UnknownExecution,
    ZmqRuntimeError,
)
from .protocol import FINAL_STATES, ControlMessageType, ErrorCode, EventKind
from .stream import DirectorySink, MemorySink
from .transport import endpoint_key, keys_for, parse_endpoint, tcp_url

if TYPE_CHECKING:
    from .api import ExecutionAPI

log = logging.getLogger("zmqruntime.pool")

#: how long a tracker's long-poll waits on one run before looking at the others
TRACK_CHUNK = 0.1
#: a tracker lists the server's queued and running runs at least this often, and at once
#: after one of this pool's runs there ended
SWEEP_INTERVAL = 0.2
#: a fresh pool waits this long for slow servers' first answer before dispatching
FIRST_CONTACT = 0.5


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class _Server:
    index: int
    host: str
    port: int
    key: str
    ctl: ExecutionClient  # the caller's requests
    mon: ExecutionClient  # the tracker's requests (never waits behind the caller's)
    up: bool | None = None  # None until the first ping answers or fails
    info: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None
    last_contact: float = 0.0
    last_ping: float = 0.0
    last_sweep: float = 0.0
    down_since: float | None = None
    others: int = 0  # runs of other clients running or queued there, at the last look
    last_chosen: int = 0
    inflight: dict[str, _Run] = field(default_factory=dict)  # server id -> run
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
class _Run:
    pipeline_code: str
    config_code: str | None
    config: dict[str, Any] | None
    name: str | None
    retries: int
    prefetch: bool
    created: float = field(default_factory=time.time)
    order: int = 0
    id: str = ""
    server: _Server | None = None
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


# --------------------------------------------------------------------------- the pool


class ExecutionPool:
    """Many zmqruntime servers behind the contract of :class:`ExecutionClient`.

    ``servers``: endpoints ``tcp://host:port``. ``keys``: see :func:`keys_for`.
    ``timeout``: seconds a server has to answer a request before it counts as down.
    ``heartbeat``: seconds between pings of each server (capacity and liveness).
    ``pending_timeout``: how long a run whose server died waits for any server to answer
    before it is reported failed.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        keys: str | Path | Mapping[str, str | Path] | None = None,
        timeout: float = 5.0,
        heartbeat: float = 0.5,
        pending_timeout: float = 60.0,
    ) -> None:
        if isinstance(servers, str):
            servers = [servers]
        if not servers:
            raise ValueError("an ExecutionPool needs at least one server endpoint")
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat)
        self.pending_timeout = float(pending_timeout)
        self._cond = threading.Condition(threading.RLock())
        self._closing = threading.Event()
        self._runs: dict[str, _Run] = {}
        self._pending: list[_Run] = []
        self._order = itertools.count()
        self._chosen = itertools.count(1)
        self._started = time.monotonic()
        self._stats = dict.fromkeys(
            ("submitted", "resubmitted", "finished", "failed_by_pool", "superseded_ignored"), 0
        )
        self._servers: list[_Server] = []
        seen = set()
        try:
            for i, endpoint in enumerate(servers):
                host, port = parse_endpoint(endpoint)
                key = endpoint_key(host, port)
                if key in seen:
                    raise ValueError(f"server {key} is listed twice")
                seen.add(key)
                kdir = keys_for(keys, host, port)
                ctl, mon = (
                    ExecutionClient(port, host, auto_spawn=False, timeout=timeout, keys=kdir)
                    for _ in range(2)
                )
                self._servers.append(_Server(i, host, port, key, ctl, mon))
        except BaseException:
            for s in self._servers:
                s.ctl.close()
                s.mon.close()
            raise
        self._by_key = {s.key: s for s in self._servers}
        self.endpoint = ", ".join(tcp_url(s.host, s.port) for s in self._servers)
        for s in self._servers:
            s.thread = threading.Thread(
                target=self._track, args=(s,), name=f"zmqruntime-pool-{s.key}", daemon=True
            )
            s.thread.start()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop following the servers (their runs go on) and close every connection."""
        if self._closing.is_set():
            return
        self._closing.set()
        for s in self._servers:
            s.wake.set()
        for s in self._servers:
            if s.thread is not None:
                s.thread.join(timeout=self.timeout + 5)
        for s in self._servers:
            s.ctl.close()
            s.mon.close()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> ExecutionPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExecutionPool([{self.endpoint}])"

    # ------------------------------------------------------------------ public API
    def execute(
        self,
        pipeline_code: str,
        config_code: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        name: str | None = None,
        retries: int = 0,
    ) -> str:
        """Queue a run on the server with the most free capacity; return its pool id."""
        return self._execute(pipeline_code, config_code, config, name, retries, prefetch=False)

    def get_status(self, exec_id: str) -> dict[str, Any]:
        """The run's status dict plus ``server``, ``server_id``, ``resubmitted``, ``history``.

        While the run's server does not answer, the last status seen is returned with
        ``server_up: False``; the pool's failover decides what happens to the run.
        """
        run = self._runs.get(exec_id)
        if run is None:
            found, fsid = self._resolve(exec_id)
            return _decorate(found.ctl.get_status(fsid), exec_id, found, fsid)
        with self._cond:
            if run.final is not None:
                return dict(run.final)
            s, sid = run.server, run.sid
            if s is None or sid is None:
                return self._synth(run, "queued", run.history[-1]["reason"] if run.history else "")
        try:
            status = s.ctl.get_status(sid)
        except ServerUnavailable as exc:
            with self._cond:
                if run.final is not None:
                    return dict(run.final)
                out = self._decorate(run, run.status or self._synth(run, run.state, ""))
                out.update(server_up=False, message=f"server not answering: {exc}")
                return out
        except UnknownExecution:
            with self._cond:
                if run.final is not None:
                    return dict(run.final)
                return self._decorate(run, run.status or self._synth(run, run.state, ""))
        if status["state"] in FINAL_STATES:
            if not run.prefetch:
                self._finalize(run, status, sid=sid)
            with self._cond:
                if run.final is not None:
                    return dict(run.final)
                if run.sid == sid:  # completed there; results on their way to the pool
                    status = {**status, "state": "running", "message": "fetching results"}
        with self._cond:
            if run.sid == sid:
                run.status, run.state = status, status["state"]
            return self._decorate(run, status)

    def wait(self, exec_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends (wherever it ended up) and return its final status."""
        run = self._runs.get(exec_id)
        if run is None:
            s, sid = self._resolve(exec_id)
            return _decorate(s.ctl.wait(sid, timeout), exec_id, s, sid)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while run.final is None:
                if self._closing.is_set():
                    raise ServerUnavailable("this pool is closed")
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"execution {exec_id} still {run.state} after {timeout:g} s"
                        )
                    self._cond.wait(min(remaining, 1.0))
                else:
                    self._cond.wait(1.0)
            return dict(run.final)

    def get_results(
        self,
        exec_id: str,
        timeout: float | None = None,
        *,
        directory: str | Path | None = None,
        format: str = "npy",
    ) -> dict[str, list[Any]]:
        """Wait for the run, then return ``{name: [value, ...]}`` from the server that ran it.

        Raises ExecutionFailed (with the reason, also for runs the pool could not
        recover) or ExecutionCancelled like :meth:`ExecutionClient.get_results`.
        ``directory`` and ``format`` as there (an image export is made by that server's
        client, which has the results' metadata).
        """
        status = self.wait(exec_id, timeout)
        raise_for_status(status)
        run = self._runs.get(exec_id)
        if format != "npy":
            s, sid = self._where(exec_id, run)
            return s.ctl.get_results(sid, timeout, directory=directory, format=format)
        if run is not None and run.results is not None:
            if directory is None:
                return run.results
            sink = DirectorySink(Path(directory), exec_id)
            index = 0
            for name, values in run.results.items():
                for value in values:
                    sink.add(index, name, value)
                    index += 1
            return sink.close()
        s, sid = self._where(exec_id, run)
        return s.ctl.get_results(sid, timeout, directory=directory)

    def cancel(self, exec_id: str) -> dict[str, Any]:
        """Ask the run to stop, wherever it is; a cancelled run is never resubmitted."""
        run = self._runs.get(exec_id)
        if run is None:
            found, fsid = self._resolve(exec_id)
            return found.ctl.cancel(fsid)
        with self._cond:
            if run.final is not None:
                state = run.final["state"]
                return {
                    "cancelled": False,
                    "state": state,
                    "message": f"execution {exec_id} already {state}; nothing to cancel",
                }
            run.cancel_requested = True
            s, sid = run.server, run.sid
            if s is None or sid is None:  # waiting in the pool for a server
                self._pending = [r for r in self._pending if r is not run]
        if s is None or sid is None:
            self._finalize(
                run, self._synth(run, "cancelled", "cancelled while waiting for a server")
            )
            return {"cancelled": True, "state": "cancelled", "message": "cancelled in the pool"}
        try:
            reply = s.ctl.cancel(sid)
        except ServerUnavailable as exc:
            return {
                "cancelled": True,
                "state": run.state,
                "message": f"server {s.key} is not answering ({exc}); the run will not be "
                "resubmitted and ends as cancelled if the server stays down",
            }
        s.wake.set()
        return reply

    def stream(
        self, exec_id: str, *, previews: bool = True, poll_interval: float = 0.5
    ) -> Iterator[dict[str, Any]]:
        """Live events of one run, following it across a failover.

        Events carry the pool id. When the run is moved to another server, a ``state``
        event with ``status["resubmitted"]`` announces it and the run's events (its
        results too) start again from the new attempt. The last event is the final
        ``state``.
        """
        run = self._runs.get(exec_id)
        if run is None:
            found, fsid = self._resolve(exec_id)
            for event in found.ctl.stream(fsid, previews=previews, poll_interval=poll_interval):
                yield _rewrite_event(event, exec_id, found, fsid)
            return
        last_sid: str | None = None
        while True:
            with self._cond:
                while run.final is None and run.server is None:  # waiting for a server
                    if self._closing.is_set():
                        raise ServerUnavailable("this pool is closed")
                    self._cond.wait(0.5)
                final, s, sid = run.final, run.server, run.sid
            if final is not None and final.get("by_pool"):
                yield _state_event(final)
                return
            assert s is not None and sid is not None
            if last_sid is not None and sid != last_sid:  # announce the move
                yield _state_event(self.get_status(exec_id))
            last_sid = sid
            try:
                for event in s.ctl.stream(sid, previews=previews, poll_interval=poll_interval):
                    if event["kind"] == EventKind.STATE.value and (
                        event["status"]["state"] in FINAL_STATES
                    ):
                        if not run.prefetch:
                            self._finalize(run, event["status"], sid=sid)
                        break
                    if run.sid != sid:  # moved while we listened to the old attempt
                        break
                    yield _rewrite_event(event, exec_id, s, sid, run)
            except (ServerUnavailable, UnknownExecution):
                pass  # the tracker notices too and decides the run's fate
            with self._cond:  # the pool's verdict: ended on this attempt, or moved on
                while run.final is None and run.sid == sid:
                    if self._closing.is_set():
                        raise ServerUnavailable("this pool is closed")
                    self._cond.wait(0.5)
                if run.final is not None and run.sid == sid:
                    final = dict(run.final)
                else:
                    final = None
            if final is not None:
                yield _state_event(final)
                return

    def map(
        self,
        pipeline_code: str,
        configs: Iterable[dict[str, Any]],
        config_code: str | None = None,
        *,
        name: str | None = None,
        retries: int = 0,
        window: int | None = None,
        fetch: bool = True,
        timeout: float | None = None,
    ) -> Iterator[MapItem]:
        """Run ``pipeline_code`` once per config; yield a :class:`MapItem` as each run ends.

        Items come in the order runs finish (``item.index`` is the config's position).
        At most ``window`` runs are out at once (default: twice the workers of the
        servers that answer), so a faster server takes more of the work. With ``fetch``
        the results are fetched before the item is yielded. ``timeout``: seconds without
        any run finishing before TimeoutError. Closing the iterator early cancels the
        runs still out.
        """
        done: queue.Queue[str] = queue.Queue()
        configs_iter = iter(configs)
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        index = 0
        exhausted = False
        try:
            while True:
                limit = window or self._default_window()
                while not exhausted and len(out) < limit:
                    try:
                        config = next(configs_iter)
                    except StopIteration:
                        exhausted = True
                        break
                    exec_id = self._execute(
                        pipeline_code,
                        config_code,
                        config,
                        f"{name or 'map'}-{index}",
                        retries,
                        prefetch=fetch,
                        callback=done.put,
                    )
                    out[exec_id] = (index, config)
                    index += 1
                if not out:
                    return
                try:
                    exec_id = done.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(
                        f"no run of this map finished within {timeout:g} s ({len(out)} out)"
                    ) from None
                i, config = out.pop(exec_id)
                run = self._runs[exec_id]
                assert run.final is not None
                results, error = None, None
                try:
                    raise_for_status(run.final)
                    results = run.results
                except (ExecutionFailed, ExecutionCancelled) as exc:
                    error = exc
                run.results = None  # handed over: the pool keeps no copy
                yield MapItem(i, config, exec_id, dict(run.final), results, error)
        finally:
            for exec_id in out:
                with contextlib.suppress(ZmqRuntimeError):
                    self.cancel(exec_id)

    def as_completed(
        self, exec_ids: Iterable[str], timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Final statuses of the given runs (of this pool), each once, as they end."""
        done: queue.Queue[str] = queue.Queue()
        wanted = set()
        for exec_id in exec_ids:
            run = self._runs.get(exec_id)
            if run is None:
                raise UnknownExecution(f"{exec_id!r} was not submitted through this pool")
            wanted.add(exec_id)
            with self._cond:
                if run.final is not None:
                    done.put(exec_id)
                else:
                    run.callbacks.append(done.put)
        while wanted:
            try:
                exec_id = done.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"{len(wanted)} run(s) still out after {timeout:g} s without an end"
                ) from None
            if exec_id in wanted:
                wanted.discard(exec_id)
                yield dict(self._runs[exec_id].final or {})

    def list_executions(
        self, limit: int = 200, states: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Recent runs of every answering server, newest first, ids as ``host:port/id``."""
        out: list[dict[str, Any]] = []
        for s in self._servers:
            if s.up is False:
                continue
            try:
                for status in s.ctl.list_executions(limit=limit, states=states):
                    out.append(_decorate(status, f"{s.key}/{status['id']}", s, status["id"]))
            except ServerUnavailable:
                continue
        out.sort(key=lambda st: st.get("created") or 0, reverse=True)
        return out[:limit]

    def get_logs(self, exec_id: str, start: int = 0) -> list[dict[str, Any]]:
        """Stored log lines of the run's current attempt."""
        s, sid = self._where(exec_id, self._runs.get(exec_id))
        return s.ctl.get_logs(sid, start)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Totals over the answering servers plus ``servers``: one entry per server."""
        servers = self.servers()
        live = [s for s in servers if s["up"]]
        return {
            "servers": servers,
            "up": len(live),
            "down": len(servers) - len(live),
            "workers": sum(s["workers"] for s in live),
            "workers_busy": sum(s["workers_busy"] for s in live),
            "queued": sum(s["queued"] for s in live),
            "pending": len(self._pending),
        }

    def servers(self) -> list[dict[str, Any]]:
        """What the pool knows of each server: up/down, capacity, its last error."""
        with self._cond:
            return [
                {
                    "server": s.key,
                    "endpoint": tcp_url(s.host, s.port),
                    "up": bool(s.up),
                    "workers": s.workers,
                    "workers_busy": int(s.info.get("workers_busy") or 0),
                    "queued": int(s.info.get("queued") or 0),
                    "free": s.free() if s.up else 0,
                    "inflight": len(s.inflight),
                    "rtt_ms": s.info.get("rtt_ms"),
                    "last_error": s.last_error,
                    "down_since": s.down_since,
                }
                for s in self._servers
            ]

    def refresh(self) -> None:
        """Ping every server now (the trackers do it every ``heartbeat`` seconds anyway)."""
        threads = [threading.Thread(target=self._ping_quietly, args=(s,)) for s in self._servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stats(self) -> dict[str, int]:
        """Counters: submitted, resubmitted, finished, failed_by_pool, superseded_ignored."""
        with self._cond:
            return dict(self._stats)

    # ------------------------------------------------------------------ submission
    def _execute(
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
        if self._closing.is_set():
            raise ServerUnavailable("this pool is closed")
        self._first_contact()
        run = _Run(pipeline_code, config_code, config, name, max(0, int(retries)), prefetch)
        run.order = next(self._order)
        if callback is not None:
            run.callbacks.append(callback)
        tried: set[_Server] = set()
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
            with self._cond:
                run.id = f"{target.key}/{sid}"
                self._runs[run.id] = run
                self._stats["submitted"] += 1
                placed = self._place(run, target, sid, status)
            if not placed:  # the server went down while we submitted: move the run on
                self._resubmit(run, {target}, f"server {target.key} went down at submission")
            return run.id

    def _submit(self, target: _Server, run: _Run) -> tuple[str, dict[str, Any]]:
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

    def _place(self, run: _Run, target: _Server, sid: str, status: dict[str, Any]) -> bool:
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

    def _choose(self, exclude: set[_Server]) -> _Server | None:
        with self._cond:
            live = [s for s in self._servers if s.up and s not in exclude and s.workers > 0]
            if not live:
                return None
            return max(live, key=lambda s: (s.free(), s.workers, -s.last_chosen, -s.index))

    def _first_contact(self) -> None:
        """Before the first dispatch, give every server a moment to answer its first ping."""
        deadline = self._started + self.timeout + 1.0
        while time.monotonic() < deadline and not self._closing.is_set():
            checked = [s.checked.is_set() for s in self._servers]
            if all(checked):
                return
            any_up = any(s.up for s in self._servers)
            if any_up and time.monotonic() - self._started >= FIRST_CONTACT:
                return
            time.sleep(0.01)

    def _default_window(self) -> int:
        with self._cond:
            return max(1, sum(2 * s.workers for s in self._servers if s.up))

    def _down_summary(self) -> str:
        with self._cond:
            return "; ".join(f"{s.key}: {s.last_error or 'not answering'}" for s in self._servers)

    # ------------------------------------------------------------------ tracking
    def _track(self, s: _Server) -> None:
        """One thread per server: ping it, follow this pool's runs there, notice its death."""
        ended = True
        while not self._closing.is_set():
            try:
                s.wake.clear()  # a submission from now on wakes the waits below
                now = time.monotonic()
                if s.up is not True or now - s.last_ping >= self.heartbeat:
                    self._ping(s)
                if s.up:
                    with self._cond:
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
                if self._closing.is_set():
                    break
                self._confirm_down(s, exc)
            except Exception:  # a bug here must not stop the tracking of this server
                if self._closing.is_set():
                    break
                log.exception("pool tracker of %s failed; going on", s.key)
                self._closing.wait(self.heartbeat)
            self._expire_pending()

    def _ping(self, s: _Server) -> None:
        try:
            info = s.mon.ping(timeout=self.timeout)
        except (ServerUnavailable, ProtocolError) as exc:
            s.last_ping = time.monotonic()
            self._mark_down(s, exc)
            return
        if info.get("server") != "zmqruntime":
            self._mark_down(s, ProtocolError(f"{s.key} answered, but not as a zmqruntime server"))
            return
        with self._cond:
            was = s.up
            s.info = info
            s.up = True
            s.down_since = None
            s.last_error = None
            s.last_ping = s.last_contact = time.monotonic()
            # ours are in ``inflight`` (a run that ended unseen makes this conservative)
            s.others = max(0, info["workers_busy"] + info["queued"] - len(s.inflight))
            orphans, s.orphans = s.orphans, set()
            s.checked.set()
            self._cond.notify_all()
        if was is not True:
            if was is False:
                log.info("server %s answers again", s.key)
            for sid in orphans:  # superseded attempts must not run again after a restart
                with contextlib.suppress(ZmqRuntimeError):
                    s.mon.cancel(sid)
            self._drain_pending()

    def _ping_quietly(self, s: _Server) -> None:
        with contextlib.suppress(Exception):
            self._ping(s)

    def _sweep(self, s: _Server, runs: list[tuple[str, _Run]]) -> None:
        """One LIST of the server's queued and running runs; ask about the rest one by one."""
        limit = 2 * len(runs) + 1000
        listed = s.mon.list_executions(limit=limit, states=["queued", "running"])
        s.last_contact = time.monotonic()
        live = {st["id"]: st for st in listed}
        with self._cond:
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

    def _long_poll(self, s: _Server) -> bool:
        """Wait (briefly) on the oldest run there; True if it ended (others may have too)."""
        with self._cond:
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
        s.last_contact = time.monotonic()
        self._observe(s, run, sid, status)
        return True

    def _observe(self, s: _Server, run: _Run, sid: str, status: dict[str, Any]) -> None:
        with self._cond:
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
        self._finalize(run, status, sid=sid, results=results)

    def _finalize(
        self,
        run: _Run,
        status: dict[str, Any],
        *,
        sid: str | None = None,
        results: dict[str, list[Any]] | None = None,
        by_pool: bool = False,
    ) -> bool:
        """Record the run's end, once: a superseded attempt's end is ignored."""
        with self._cond:
            if sid is not None and run.sid != sid:
                self._stats["superseded_ignored"] += 1
                return False
            if run.final is not None:  # seen by another thread first
                return False
            if run.server is not None and run.sid is not None:
                run.server.inflight.pop(run.sid, None)
            run.final = self._decorate(run, status)
            run.state = status["state"]
            run.results = results
            self._stats["finished"] += 1
            if by_pool:
                self._stats["failed_by_pool"] += 1
            callbacks = list(run.callbacks)
            run.callbacks.clear()
            self._cond.notify_all()
        for callback in callbacks:
            callback(run.id)
        return True

    # ------------------------------------------------------------------ failover
    def _confirm_down(self, s: _Server, exc: Exception) -> None:
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

    def _mark_down(self, s: _Server, exc: Exception) -> None:
        with self._cond:
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
            self._cond.notify_all()
        if not first:
            log.warning(
                "server %s stopped answering (%s): %d run(s) to fail over", s.key, exc, len(victims)
            )
        reason = f"server {s.key} stopped answering ({exc})"
        for sid, run in victims:
            self._recover(s, run, sid, reason)

    def _lost(self, s: _Server, run: _Run, sid: str, reason: str) -> None:
        with self._cond:  # whoever takes the run out of ``inflight`` decides its fate
            if s.inflight.get(sid) is not run or run.final is not None:
                return
            del s.inflight[sid]
        self._recover(s, run, sid, reason)

    def _recover(self, s: _Server, run: _Run, sid: str, reason: str) -> None:
        """Decide the fate of a run its server lost: resubmit it, or report it failed."""
        with self._cond:
            if run.final is not None or run.sid != sid:
                return
            state = run.state
        if run.cancel_requested:
            self._finalize(
                run, self._synth(run, "cancelled", f"cancel requested, then {reason}"), by_pool=True
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
            self._finalize(run, self._synth(run, "failed", error, error=error), by_pool=True)
        else:
            error = (
                f"{reason} while the run was running; it was not resubmitted elsewhere "
                f"because retries={run.retries} (submit with retries>0 to allow that)"
            )
            self._finalize(run, self._synth(run, "failed", error, error=error), by_pool=True)

    def _resubmit(self, run: _Run, exclude: set[_Server], reason: str) -> None:
        tried = set(exclude)
        old_server = run.server
        old_key = f"{old_server.key}/{run.sid}" if old_server is not None else None
        while not self._closing.is_set():
            target = self._choose(tried)
            if target is None:
                with self._cond:
                    if run.final is not None:
                        return
                    if old_key is not None:
                        _note_move(run, old_key, old_server, reason)
                    run.server, run.sid, run.state = None, None, "queued"
                    run.status = None
                    run.pending_since = time.monotonic()
                    self._pending.append(run)
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
            with self._cond:
                if run.final is not None:  # cancelled meanwhile: the new attempt is unwanted
                    cancel_new = True
                else:
                    cancel_new = False
                    if old_key is not None:
                        _note_move(run, old_key, old_server, reason)
                    self._stats["resubmitted"] += 1
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
        with self._cond:
            waiting, self._pending = self._pending, []
        for run in waiting:
            if run.final is not None:
                continue
            self._resubmit(run, set(), "a server answers again")

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self._cond:
            expired = [
                r
                for r in self._pending
                if r.pending_since is not None and now - r.pending_since > self.pending_timeout
            ]
            if not expired:
                return
            self._pending = [r for r in self._pending if r not in expired]
        for run in expired:
            reason = run.history[-1]["reason"] if run.history else "its server was lost"
            error = (
                f"{reason}; no server of this pool answered within {self.pending_timeout:g} s "
                "to take the run over"
            )
            self._finalize(run, self._synth(run, "failed", error, error=error), by_pool=True)

    # ------------------------------------------------------------------ ids and statuses
    def _resolve(self, exec_id: str) -> tuple[_Server, str]:
        """A pool id not issued by this pool: ``host:port/sid``, or a bare server id."""
        key, sep, sid = exec_id.rpartition("/")
        if sep:
            s = self._by_key.get(key)
            if s is None:
                raise UnknownExecution(
                    f"execution id {exec_id!r} names server {key}, which is not in this pool "
                    f"({', '.join(self._by_key)})"
                )
            return s, sid
        for s in self._servers:
            if s.up is False:
                continue
            try:
                s.ctl.get_status(exec_id)
                return s, exec_id
            except (UnknownExecution, ServerUnavailable):
                continue
        raise UnknownExecution(f"no server of this pool knows execution id {exec_id!r}")

    def _where(self, exec_id: str, run: _Run | None) -> tuple[_Server, str]:
        if run is None:
            return self._resolve(exec_id)
        with self._cond:
            s, sid = run.server, run.sid
        if s is None or sid is None:
            raise ServerUnavailable(f"run {exec_id} has no server at the moment")
        return s, sid

    def _decorate(self, run: _Run, status: dict[str, Any]) -> dict[str, Any]:
        s, sid = run.server, run.sid
        out = _decorate(status, run.id, s, sid)
        out["resubmitted"] = len(run.history)
        out["history"] = [dict(h) for h in run.history]
        out["retries"] = run.retries
        return out

    def _synth(
        self, run: _Run, state: str, message: str, *, error: str | None = None
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
        out = self._decorate(run, base)
        out["by_pool"] = True
        return out


# --------------------------------------------------------------------------- helpers


def _decorate(
    status: dict[str, Any], exec_id: str, s: _Server | None, sid: str | None
) -> dict[str, Any]:
    out = dict(status)
    out["id"] = exec_id
    out["server"] = s.key if s is not None else None
    out["server_id"] = sid
    return out


def _rewrite_event(
    event: dict[str, Any], exec_id: str, s: _Server, sid: str, run: _Run | None = None
) -> dict[str, Any]:
    out = dict(event)
    out["id"] = exec_id
    out["server"] = s.key
    if "status" in out:
        out["status"] = _decorate(out["status"], exec_id, s, sid)
        if run is not None:
            out["status"]["resubmitted"] = len(run.history)
    return out


def _state_event(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": EventKind.STATE.value,
        "id": status["id"],
        "seq": None,
        "server": status.get("server"),
        "status": status,
    }


def _note_move(run: _Run, old_key: str, old_server: _Server | None, reason: str) -> None:
    """Record in a run's history the attempt it is leaving, and why."""
    run.history.append(
        {
            "id": old_key,
            "server": old_server.key if old_server else None,
            "reason": reason,
            "time": time.time(),
        }
    )


if TYPE_CHECKING:  # mypy: both classes implement the execute/status/results contract

    def _implements_the_contract(c: ExecutionClient, p: ExecutionPool) -> list[ExecutionAPI]:
        return [c, p]
