"""ExecutionServer: the thin loop that owns the sockets and feeds the server's parts.

One thread, one poll loop: the control ROUTER on ``port`` (clients' requests, answered in
the same loop turn), the data XPUB on ``port + 1`` and a local data XPUB on an ipc
endpoint (events; topic = execution id), and the sockets of whatever runs the runs.
The parts, each in its own module:

* :mod:`zmqruntime.server_core`: runs, queue, waiters, cancel deadlines; every state
  change through one checked transition (:mod:`zmqruntime.runstate`). No sockets.
* :mod:`zmqruntime.server_requests`: control requests, decoded into the dataclasses of
  :mod:`zmqruntime.messages` and handled through one table.
* :mod:`zmqruntime.server_supervisor`: native worker processes (spawn, heartbeat, exit,
  backoff); :mod:`zmqruntime.dask_executor` plugs in beside it through the same interface.
* :mod:`zmqruntime.server_relay`: worker events to the store and to watchers.
* :mod:`zmqruntime.server_storage`: free space and runs failed for a full disk.

Nothing in the loop waits on a worker or a watcher: results are written to disk by the
workers and forwarded here frame by frame (zero-copy), so a control request is never
queued behind bulk data.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from . import local, protocol, shm
from .errors import ProtocolError
from .prefetch import Prefetcher
from .protocol import ErrorCode, EventKind
from .runstate import RunState
from .server_core import Run, RunCore
from .server_relay import EventRelay, TcpEvent
from .server_requests import ControlHandlers, Exchange
from .server_setup import banner, bind_refused, registry_entry, setup_logging
from .server_storage import DEFAULT_MIN_FREE_MB, DiskGuard
from .server_supervisor import NativeSupervisor
from .store import Store
from .transport import ServerSecurity, data_port_of, is_loopback, tcp_url

log = logging.getLogger("zmqruntime.server")

TICK = 0.05
DATA_HWM = 8  # per watcher: a stalled watcher holds at most this many events in memory
#: the same on the local data socket, whose events are small (arrays of 256 KiB up to half
#: a ring come as shared-memory descriptors): room for a burst (the backlog a worker sends
#: once a stalled server reads again) that HWM 8 dropped even for a watcher reading as fast
#: as it could; a stalled watcher holds at most 128 x 256 KiB, except arrays over 64 MiB
#: (and every array where a worker has no ring), which travel inline and count whole
LOCAL_DATA_HWM = 128
#: ZMQ_AFFINITY bitmasks of the server's three I/O threads: control connections are
#: spread over two (a client fetching stored results fills one with replies, while
#: another client's ping goes through the other), bulk sockets have the third
CONTROL_IO_THREADS = (1 << 0) | (1 << 2)
BULK_IO_THREAD = 1 << 1
IO_THREADS = 3
#: seconds of worker events handled per loop turn at most (copies out of rings for tcp
#: watchers take time): then control requests get their turn
WORKER_EVENTS_BUDGET = 0.005


class InsecureBindRefused(RuntimeError):
    """Binding to a non-loopback address without CURVE keys needs an explicit --insecure."""


class ExecutionServer:
    """Runs pipelines submitted over the control channel in a pool of worker processes."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        workers: int | None = None,
        data_dir: Path | str | None = None,
        cancel_grace: float = 2.0,
        keys: Path | str | None = None,
        insecure: bool = False,
        heartbeat_timeout: float = 10.0,
        keep_days: float | None = None,
        max_store_gb: float | None = None,
        retention_interval: float = 600.0,
        min_free_mb: float = DEFAULT_MIN_FREE_MB,
        executor: Any = None,
    ) -> None:
        if not is_loopback(host) and keys is None and not insecure:
            raise InsecureBindRefused(
                f"refusing to bind to {host}: anyone who reaches that address could run code "
                "on this machine. Pass --keys DIR (CURVE keys, see 'zmqruntime keys "
                "generate') or, on a trusted network only, --insecure."
            )
        self.port = port
        self.host = host
        self.data_port = data_port_of(port)
        self.n_workers = workers or os.cpu_count() or 1
        self.data_dir = Path(data_dir) if data_dir else local.default_data_dir(port)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # private when we make it
        self.log_file = self.data_dir / "server.log"
        self.cancel_grace = cancel_grace
        self.heartbeat_timeout = heartbeat_timeout
        self.keep_days = keep_days
        self.max_store_gb = max_store_gb
        self.retention_interval = retention_interval
        self._last_retention = time.monotonic()
        self.disk = DiskGuard(self, self.data_dir, min_free_mb)
        self.lock = local.DataDirLock(self.data_dir)
        self._log_handler: logging.Handler | None = None
        self._registered = False
        self.security = ServerSecurity.from_dir(Path(keys)) if keys else None
        #: runs, queue, waiters: the socket-free state machine (its store is set in _serve)
        self.requests = ControlHandlers(self)
        self.core = RunCore(None, self._publish, self.requests.answer)
        self.runs = self.core.runs  # read by the Dask executor
        self.queue = self.core.queue
        self._stopping = False
        self._started = time.time()
        self.store_token: str | None = None  # set with the data dir's lock (serve)
        self.bad_messages = 0
        self.rings = shm.RingReader(drop_pages=True)  # workers' rings, for tcp watchers
        #: runs go to this instead of native workers (zmqruntime.dask_executor.DaskExecutor)
        self.executor = executor
        #: the native workers (none when a Dask executor runs the runs)
        self.supervisor = NativeSupervisor(self.n_workers) if executor is None else None
        self.bulk_affinity = BULK_IO_THREAD
        self._executor_sockets: list[tuple[zmq.Socket, Any]] = []

    # ------------------------------------------------------------------ setup
    def _bind(self) -> None:
        # control traffic never waits behind megabytes of frames (see IO_THREADS)
        self.zctx = zmq.Context(io_threads=IO_THREADS)
        if self.security:
            self.security.start(self.zctx)
        self.control = self.zctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.AFFINITY, CONTROL_IO_THREADS)
        self.control.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_CONTROL_MESSAGE)
        self.control.setsockopt(zmq.LINGER, 0)
        # XPUB: the server hears which runs tcp watchers follow, so it reads a frame out
        # of shared memory only for a run that someone elsewhere watches
        self.data = self.zctx.socket(zmq.XPUB)
        self.data.setsockopt(zmq.AFFINITY, BULK_IO_THREAD)
        self.data.setsockopt(zmq.SNDHWM, DATA_HWM)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data_local = self.zctx.socket(zmq.XPUB)
        self.data_local.setsockopt(zmq.AFFINITY, BULK_IO_THREAD)
        self.data_local.setsockopt(zmq.SNDHWM, LOCAL_DATA_HWM)
        self.data_local.setsockopt(zmq.LINGER, 0)
        for sock in (self.control, self.data, self.data_local):
            if self.security:
                self.security.apply(sock)
        for sock, port in ((self.control, self.port), (self.data, self.data_port)):
            try:
                sock.bind(tcp_url(self.host, port))
            except zmq.ZMQError as exc:  # not an OSError in pyzmq 27: say what is wrong
                raise bind_refused(self.host, port, port != self.port, exc) from None
        self.ipc_dir = Path(tempfile.mkdtemp(prefix="zmqr-"))
        self.data_local_url: str | None = None
        if zmq.has("ipc") and os.name != "nt":
            self.data_local_url = f"ipc://{self.ipc_dir}/data"
            self.data_local.bind(self.data_local_url)
        self.probe = shm.try_probe()
        self.prefetch = Prefetcher(self.zctx)
        self.relay = EventRelay(self)

    def _recover(self) -> None:
        """Bring back what a previous server on this data dir left (RunCore.recover); the
        runs it failed as interrupted are announced by the loop's first turn."""
        n = self.core.recover()
        self.store.commit()
        if n:
            log.info("recovered %d queued run(s) from %s", n, self.data_dir)

    # ------------------------------------------------------------------ main loop
    def serve_forever(self, announce: bool = True) -> None:
        """Serve until a shutdown request, SIGTERM or SIGINT.

        The order is what keeps a failed start harmless: the data dir's lock first (a
        second server on it stops before reading or writing anything there), then the
        ports (a taken port stops it before any recovery), then the store, and the
        registry entry last. Raises ``local.StartRefused`` (DataDirInUse, PortInUse).
        """
        holder = {"pid": os.getpid(), "port": self.port, "host": self.host}
        # a client that finds this token in the lock file sees this server's very files
        # (same host, or a shared filesystem): it may read finished results from them
        self.store_token = secrets.token_hex(16)
        self.lock.acquire({**holder, "started": self._started, "token": self.store_token})
        try:
            self._log_handler = setup_logging(self.log_file)
            try:
                self._bind()
                self._serve(announce)
            except local.StartRefused as exc:
                log.error("%s", exc)
                raise
            finally:
                self._shutdown()
                if self._registered:
                    local.unregister(self.port, os.getpid())
        finally:
            if self._log_handler is not None:
                logging.getLogger("zmqruntime").removeHandler(self._log_handler)
                self._log_handler.close()
                self._log_handler = None
            self.lock.release()

    def _serve(self, announce: bool) -> None:
        self.store = Store(self.data_dir, background_checkpoints=True)
        self.core.store = self.store
        if self.keep_days is not None or self.max_store_gb is not None:
            self._apply_retention()
        self._recover()
        self.disk.refresh()
        local.register(registry_entry(self))
        self._registered = True
        if self.executor is not None:
            self._executor_sockets = self.executor.start(self)
            self._dispatch()  # runs recovered from the store go to Dask at once
        elif self.supervisor is not None:
            self._executor_sockets = self.supervisor.start(self)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "serving on %s (data %s), %d workers, data dir %s",
            tcp_url(self.host, self.port),
            tcp_url(self.host, self.data_port),
            self.n_workers,
            self.data_dir,
        )
        hint = shm.huge_pages_hint() if self.supervisor is not None else None
        if hint:
            log.info("%s", hint)
        problem = self.disk.problem()
        if problem:
            log.warning("%s", problem)
        if announce:
            with contextlib.suppress(OSError):  # stdout may be a file on the full disk
                for line in banner(self, problem):
                    print(line, flush=True)
        # what startup made (modules, the recovered runs) lives as long as the server: kept
        # out of the collector's full passes, each of which held the loop (and every request
        # waiting on it) for 10-25 ms, a third to half of that for these objects
        gc.collect()
        gc.freeze()
        try:
            self._loop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stopping = True

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in (
            self.control,
            self.data,
            self.data_local,
            self.prefetch.done,
            *(sock for sock, _ in self._executor_sockets),
        ):
            poller.register(sock, zmq.POLLIN)
        last_tick = 0.0
        while not self._stopping:
            ready = dict(poller.poll(int(TICK * 1000)))
            if self.control in ready:
                self._drain(self.control, self._on_control, 200)
            for sock, handler in self._executor_sockets:
                if sock in ready:
                    self._drain(sock, handler, 100, WORKER_EVENTS_BUDGET)
            if self.data in ready:
                self.relay.tcp_watch.update()
            if self.data_local in ready:
                self.relay.local_watch.update()
            if self.prefetch.done in ready:
                for payload, error in self.prefetch.ready():
                    if isinstance(payload, TcpEvent):
                        self.relay.on_tcp_event_ready(payload, error)
                        continue
                    route, frames, req = payload
                    if error is not None:
                        log.warning("%s", error)
                        frames = protocol.error_reply(req, ErrorCode.INTERNAL, error)
                    self._send_now(route, frames)
            self.relay.send_pending_previews()  # TCP watchers' newest frames, once free
            now = time.monotonic()
            if now - last_tick >= TICK:
                self._guarded(self._tick)
                last_tick = now
            self._guarded(self._announce_finished)

    def _guarded(self, step) -> None:
        """Run a step of the loop; a failure is logged and costs that step, not the server."""
        try:
            step()
        except Exception:
            log.exception("error in %s; the server carries on", step.__name__)

    def _drain(self, sock: zmq.Socket, handler, limit: int, budget: float | None = None) -> None:
        """Handle up to ``limit`` waiting messages, or fewer once ``budget`` seconds pass."""
        deadline = time.monotonic() + budget if budget is not None else None
        for _ in range(limit):
            if deadline is not None and time.monotonic() > deadline:
                return  # the rest waits one loop turn: control requests go first
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # one bad message costs itself, never the server
                self.bad_messages += 1
                log.exception("error handling a message; the server carries on")

    # ------------------------------------------------------------------ control channel
    def _on_control(self, frames: list[zmq.Frame]) -> None:
        self._announce_finished()  # no reply may report a final state that is not durable
        # ROUTER prefix: identity, then an empty delimiter if the peer is a REQ socket
        route = [frames[0].bytes]
        rest = frames[1:]
        if rest and len(rest[0]) == 0:
            route.append(b"")
            rest = rest[1:]
        ex = Exchange(route, None)
        reply = self.requests.respond(ex, rest)
        if reply is None:
            return  # parked (a long-poll wait): answered later
        self._send(ex, reply)

    def _send(self, ex: Exchange, frames: list[Any]) -> None:
        """Send a reply; one holding stored arrays waits for the prefetch thread to read
        them (off this loop) and is sent when it is done."""
        if ex.reads:
            reads, ex.reads = ex.reads, []
            self.prefetch.submit(reads, (ex.route, frames, ex.req))
            return
        self._send_now(ex.route, frames)

    def _send_now(self, route: list[bytes], frames: list[Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.control.send_multipart([*route, *frames], copy=False)

    def _submit(
        self,
        pipeline_code: str,
        config_code: str | None,
        config: dict | None,
        name: str | None,
        retries: int,
        resources: dict[str, float] | None = None,
    ) -> Run:
        if self._stopping:
            raise ProtocolError("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
        return self.core.submit(pipeline_code, config_code, config, name, retries, resources)

    def _fail_run(self, run: Run, reason: str) -> None:
        """End a running run as failed (the Dask executor's call too): see DiskGuard."""
        self.disk.fail_run(run, reason)

    # ------------------------------------------------------------------ workers
    def _cancel_on_worker(self, run: Run) -> None:
        """Ask the run's worker (or Dask task) to stop: cooperative, then an interrupt."""
        if self.executor is not None:
            self.executor.cancel(run)
        elif self.supervisor is not None:
            self.supervisor.cancel(run)

    def _on_worker_event(self, frames: list[Any]) -> None:
        """A worker's event (the Dask executor forwards its tasks' here too)."""
        self.relay.on_worker_event(frames)

    def _publish(self, run: Run, kind: EventKind, body: dict[str, Any]) -> None:
        relay = getattr(self, "relay", None)
        if relay is not None:  # none before the sockets are bound
            relay.publish(run, kind, body)

    def _data_local_info(self) -> dict[str, Any] | None:
        if self.data_local_url is None:
            return None
        probe = self.probe.describe() if self.probe is not None else None
        return {"url": self.data_local_url, "shm_probe": probe}

    def _on_done(self, run: Run, msg: dict[str, Any]) -> None:
        """The run's worker (or Dask task) reported its end (RunCore.on_done)."""
        if self.supervisor is not None:
            self.supervisor.on_done(run, bool(msg.get("retiring")))
        self.core.on_done(run, msg)
        self._dispatch()

    def _dispatch(self) -> None:
        if self._stopping or not self.disk.accepting():
            return  # a nearly full disk: queued runs wait until there is room again
        if self.executor is not None:
            # Dask places and scales: every queued run is submitted (an adaptive cluster
            # grows with them); each stays "queued" until its task starts (_mark_running)
            while self.queue:
                run = self.runs[self.queue.popleft()]
                self.executor.submit(run, self.core.next_task(run))
            return
        if self.supervisor is not None:
            self.supervisor.dispatch()

    def _mark_running(self, run: Run) -> None:
        """A run's attempt starts (the Dask executor's call, when its task says hello)."""
        self.core.start(run)

    def _tick(self) -> None:
        now = time.monotonic()
        self.disk.refresh()  # queued runs start once a full disk has room again
        if self.executor is not None:
            self.executor.tick()
        if (
            self.keep_days is not None or self.max_store_gb is not None
        ) and now - self._last_retention >= self.retention_interval:
            self._last_retention = now
            self._apply_retention()  # a server that runs for months keeps its store bounded
        if self.supervisor is not None:
            self.supervisor.tick()
        for run, reason, state in self.core.overdue(now, self.cancel_grace):
            if self.executor is not None:
                run.cancel_deadline = None
                log.info("run %s ignored cancel for %.1f s", run.id, self.cancel_grace)
                self.executor.hard_cancel(run, reason, state)
            elif self.supervisor is not None:
                self.supervisor.hard_cancel(run, reason, state)
        self.core.expire_waiters(now)

    def _run_lost(self, run: Run, reason: str, state: str = "failed") -> None:
        """A running run's worker (or Dask task) died or was killed (RunCore.run_lost)."""
        self.core.run_lost(run, reason, state)

    # ------------------------------------------------------------------ state changes
    def _finish(self, run: Run, state: RunState | str, **fields: str | None) -> None:
        """End a run (RunCore.finish: error, traceback, message); the Dask executor's call."""
        self.core.finish(run, state, **fields)

    def _announce_finished(self) -> None:
        """Commit, then tell watchers and waiters: a final state is durable before anyone
        hears of it, and one commit serves every run that ended in this loop turn."""
        waited = bool(self.store.backlog) or not self.store.writable
        if not self.store.commit():
            # a full disk: the runs whose writes wait fail, and the final states that wait
            # are answered from memory (announced all the same: a client must hear that its
            # run failed, even if a crash before the disk takes it would make it "interrupted")
            self.disk.on_store_failure()
        elif waited:
            self.core.unsaved.clear()
            log.info("the store is writable again; accepting new runs")
            self._dispatch()
        self.core.announce()

    # ------------------------------------------------------------------ retention, shutdown
    def _apply_retention(self) -> None:
        max_bytes = int(self.max_store_gb * 1e9) if self.max_store_gb is not None else None
        n = self.store.purge(self.keep_days, max_bytes)
        if n:
            log.info("retention removed %d finished run(s)", n)

    def _shutdown(self) -> None:
        """Stop workers, end running runs, close the store and the sockets. Each step is
        guarded: a failing one (a full disk) is logged and the rest still run. Copes with a
        start that failed half-way (no store, some sockets)."""
        log.info("shutting down")
        for step in (self._stop_workers, self._end_runs, self._close_store, self._close_sockets):
            try:
                step()
            except Exception:
                log.exception("shutting down: %s failed; carrying on", step.__name__)

    def _stop_workers(self) -> None:
        if self.executor is not None and self._executor_sockets:
            self.executor.shutdown()  # cancels its tasks; a cluster it started is closed
        if self.supervisor is not None:
            self.supervisor.shutdown()

    def _end_runs(self) -> None:
        if not hasattr(self, "store"):
            return
        self.core.interrupt_running()
        self._announce_finished()
        for waiter in self.core.drop_waiters():  # queued runs stay queued for a restart
            reply = protocol.error_reply(
                waiter.req, ErrorCode.SHUTTING_DOWN, "the server is shutting down"
            )
            self._send(Exchange(waiter.route, waiter.req), reply)

    def _close_store(self) -> None:
        if hasattr(self, "store"):
            self.store.close()  # never raises for a full disk: it logs what is lost

    def _close_sockets(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()
        names = ("control", "data", "data_local")
        for sock in (getattr(self, name, None) for name in names):
            if sock is not None:
                sock.close(linger=0)
        self.rings.close()
        if hasattr(self, "prefetch"):
            self.prefetch.close()
        probe = getattr(self, "probe", None)
        if probe is not None:
            probe.close()
        if self.security:
            self.security.stop()
        if hasattr(self, "zctx"):
            self.zctx.term()
        if hasattr(self, "ipc_dir"):
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
