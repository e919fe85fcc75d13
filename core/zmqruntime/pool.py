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
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import ExecutionClient, raise_for_status
from .errors import (
    ExecutionCancelled,
    ExecutionFailed,
    ServerUnavailable,
    UnknownExecution,
    ZmqRuntimeError,
)
from .pool_dispatch import Dispatcher
from .pool_state import (
    MapItem,
    ServerSlot,
    decorate,
    rewrite_event,
    run_status,
    state_event,
    synth_status,
)
from .protocol import FINAL_STATES, EventKind
from .stream import DirectorySink
from .transport import endpoint_key, keys_for, parse_endpoint, tcp_url

if TYPE_CHECKING:
    from .api import ExecutionAPI

__all__ = ["ExecutionPool", "MapItem"]


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
        slots: list[ServerSlot] = []
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
                slots.append(ServerSlot(i, host, port, key, ctl, mon))
        except BaseException:
            for s in slots:
                s.ctl.close()
                s.mon.close()
            raise
        self._core = Dispatcher(
            slots,
            timeout=self.timeout,
            heartbeat=self.heartbeat,
            pending_timeout=self.pending_timeout,
        )
        self._runs = self._core.runs  # (the tests look at a run's records)
        self.endpoint = ", ".join(tcp_url(s.host, s.port) for s in slots)
        self._core.start()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop following the servers (their runs go on) and close every connection."""
        self._core.close()

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
        return self._core.execute(pipeline_code, config_code, config, name, retries, prefetch=False)

    def get_status(self, exec_id: str) -> dict[str, Any]:
        """The run's status dict plus ``server``, ``server_id``, ``resubmitted``, ``history``.

        While the run's server does not answer, the last status seen is returned with
        ``server_up: False``; the pool's failover decides what happens to the run.
        """
        run = self._core.runs.get(exec_id)
        if run is None:
            found, fsid = self._core.resolve(exec_id)
            return decorate(found.ctl.get_status(fsid), exec_id, found, fsid)
        with self._core.cond:
            if run.final is not None:
                return dict(run.final)
            s, sid = run.server, run.sid
            if s is None or sid is None:
                return synth_status(run, "queued", run.history[-1]["reason"] if run.history else "")
        try:
            status = s.ctl.get_status(sid)
        except ServerUnavailable as exc:
            with self._core.cond:
                if run.final is not None:
                    return dict(run.final)
                out = run_status(run, run.status or synth_status(run, run.state, ""))
                out.update(server_up=False, message=f"server not answering: {exc}")
                return out
        except UnknownExecution:
            with self._core.cond:
                if run.final is not None:
                    return dict(run.final)
                return run_status(run, run.status or synth_status(run, run.state, ""))
        if status["state"] in FINAL_STATES:
            if not run.prefetch:
                self._core.finalize(run, status, sid=sid)
            with self._core.cond:
                if run.final is not None:
                    return dict(run.final)
                if run.sid == sid:  # completed there; results on their way to the pool
                    status = {**status, "state": "running", "message": "fetching results"}
        with self._core.cond:
            if run.sid == sid:
                run.status, run.state = status, status["state"]
            return run_status(run, status)

    def wait(self, exec_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends (wherever it ended up) and return its final status."""
        run = self._core.runs.get(exec_id)
        if run is None:
            s, sid = self._core.resolve(exec_id)
            return decorate(s.ctl.wait(sid, timeout), exec_id, s, sid)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._core.cond:
            while run.final is None:
                if self._core.closing.is_set():
                    raise ServerUnavailable("this pool is closed")
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"execution {exec_id} still {run.state} after {timeout:g} s"
                        )
                    self._core.cond.wait(min(remaining, 1.0))
                else:
                    self._core.cond.wait(1.0)
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
        run = self._core.runs.get(exec_id)
        if format != "npy":
            s, sid = self._core.where(exec_id, run)
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
        s, sid = self._core.where(exec_id, run)
        return s.ctl.get_results(sid, timeout, directory=directory)

    def cancel(self, exec_id: str) -> dict[str, Any]:
        """Ask the run to stop, wherever it is; a cancelled run is never resubmitted."""
        run = self._core.runs.get(exec_id)
        if run is None:
            found, fsid = self._core.resolve(exec_id)
            return found.ctl.cancel(fsid)
        with self._core.cond:
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
                self._core.pending = [r for r in self._core.pending if r is not run]
        if s is None or sid is None:
            self._core.finalize(
                run, synth_status(run, "cancelled", "cancelled while waiting for a server")
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
        run = self._core.runs.get(exec_id)
        if run is None:
            found, fsid = self._core.resolve(exec_id)
            for event in found.ctl.stream(fsid, previews=previews, poll_interval=poll_interval):
                yield rewrite_event(event, exec_id, found, fsid)
            return
        last_sid: str | None = None
        while True:
            with self._core.cond:
                while run.final is None and run.server is None:  # waiting for a server
                    if self._core.closing.is_set():
                        raise ServerUnavailable("this pool is closed")
                    self._core.cond.wait(0.5)
                final, s, sid = run.final, run.server, run.sid
            if final is not None and final.get("by_pool"):
                yield state_event(final)
                return
            assert s is not None and sid is not None
            if last_sid is not None and sid != last_sid:  # announce the move
                yield state_event(self.get_status(exec_id))
            last_sid = sid
            try:
                for event in s.ctl.stream(sid, previews=previews, poll_interval=poll_interval):
                    if event["kind"] == EventKind.STATE.value and (
                        event["status"]["state"] in FINAL_STATES
                    ):
                        if not run.prefetch:
                            self._core.finalize(run, event["status"], sid=sid)
                        break
                    if run.sid != sid:  # moved while we listened to the old attempt
                        break
                    yield rewrite_event(event, exec_id, s, sid, run)
            except (ServerUnavailable, UnknownExecution):
                pass  # the tracker notices too and decides the run's fate
            with self._core.cond:  # the pool's verdict: ended on this attempt, or moved on
                while run.final is None and run.sid == sid:
                    if self._core.closing.is_set():
                        raise ServerUnavailable("this pool is closed")
                    self._core.cond.wait(0.5)
                if run.final is not None and run.sid == sid:
                    final = dict(run.final)
                else:
                    final = None
            if final is not None:
                yield state_event(final)
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
                limit = window or self._core.default_window()
                while not exhausted and len(out) < limit:
                    try:
                        config = next(configs_iter)
                    except StopIteration:
                        exhausted = True
                        break
                    exec_id = self._core.execute(
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
                run = self._core.runs[exec_id]
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
            run = self._core.runs.get(exec_id)
            if run is None:
                raise UnknownExecution(f"{exec_id!r} was not submitted through this pool")
            wanted.add(exec_id)
            with self._core.cond:
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
                yield dict(self._core.runs[exec_id].final or {})

    def list_executions(
        self, limit: int = 200, states: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Recent runs of every answering server, newest first, ids as ``host:port/id``."""
        out: list[dict[str, Any]] = []
        for s in self._core.servers:
            if s.up is False:
                continue
            try:
                for status in s.ctl.list_executions(limit=limit, states=states):
                    out.append(decorate(status, f"{s.key}/{status['id']}", s, status["id"]))
            except ServerUnavailable:
                continue
        out.sort(key=lambda st: st.get("created") or 0, reverse=True)
        return out[:limit]

    def get_logs(self, exec_id: str, start: int = 0) -> list[dict[str, Any]]:
        """Stored log lines of the run's current attempt."""
        s, sid = self._core.where(exec_id, self._core.runs.get(exec_id))
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
            "pending": len(self._core.pending),
        }

    def servers(self) -> list[dict[str, Any]]:
        """What the pool knows of each server: up/down, capacity, its last error."""
        with self._core.cond:
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
                for s in self._core.servers
            ]

    def refresh(self) -> None:
        """Ping every server now (the trackers do it every ``heartbeat`` seconds anyway)."""
        threads = [
            threading.Thread(target=self._core.ping_quietly, args=(s,)) for s in self._core.servers
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stats(self) -> dict[str, int]:
        """Counters: submitted, resubmitted, finished, failed_by_pool, superseded_ignored."""
        with self._core.cond:
            return dict(self._core.stats)


if TYPE_CHECKING:  # mypy: both classes implement the execute/status/results contract

    def _implements_the_contract(c: ExecutionClient, p: ExecutionPool) -> list[ExecutionAPI]:
        return [c, p]
