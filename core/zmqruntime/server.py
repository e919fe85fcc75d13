"""ExecutionServer: the control loop, scheduling and worker supervision.

One thread, one poll loop, four sockets:

* control ROUTER on ``port`` (clients' requests, answered in the same loop turn),
* data XPUB on ``port + 1`` (events of every run; topic = execution id),
* worker ROUTER and worker PULL on ipc endpoints in a private temp dir,

plus a local data PUB on an ipc endpoint there, for watchers on this host.

Nothing in the loop waits on a worker or a watcher: results are written to disk by the
workers and forwarded here frame by frame (zero-copy), so a control request is never
queued behind bulk data. Large arrays that a worker put in shared memory (see
:mod:`zmqruntime.shm`) travel here as descriptors: the local PUB forwards those, and
the bytes are read from the ring for the tcp watchers only when one subscribed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import zmq

from . import local, protocol, shm
from ._version import __version__
from .errors import ProtocolError, UnknownExecution
from .messages import WorkerMessage
from .prefetch import Prefetcher
from .protocol import ErrorCode, EventKind
from .runstate import RunState
from .server_core import Run, RunCore
from .server_requests import NO_REPLY, ControlHandlers, Exchange, RunsRefused
from .store import Store, fmt_bytes, free_bytes, storage_failure
from .transport import ServerSecurity, data_port_of, is_loopback, tcp_url

log = logging.getLogger("zmqruntime.server")

TICK = 0.05
DATA_HWM = 8  # per watcher: a stalled watcher holds at most this many events in memory
#: what varies between two bad requests of one kind: quoted text, bytes, numbers
_VARYING = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"|0x[0-9a-f]+|\d+")
WORKER_START_TIMEOUT = 60.0
MAX_RESPAWN_DELAY = 30.0  # workers that keep dying before they are ready: back off up to this
MAX_LOG_BYTES_PER_RUN = 64 * 1024 * 1024  # stored log text per run; more is live only
EXIT_SETTLE = 0.2  # seconds a dead worker's last messages get to arrive
#: ZMQ_AFFINITY bitmasks of the server's three I/O threads: control connections are
#: spread over two (a client fetching stored results fills one with replies, while
#: another client's ping goes through the other), bulk sockets have the third
CONTROL_IO_THREADS = (1 << 0) | (1 << 2)
BULK_IO_THREAD = 1 << 1
IO_THREADS = 3
#: seconds of worker events handled per loop turn at most (copies out of rings for tcp
#: watchers take time): then control requests get their turn
WORKER_EVENTS_BUDGET = 0.005
#: new runs are refused (and queued ones wait) while the data dir has less free than this
DEFAULT_MIN_FREE_MB = 100.0


class Watched:
    """The topics that watchers on one XPUB follow.

    The XPUB passes up each topic's first subscription (``\\x01`` + topic) and its last
    unsubscription (``\\x00`` + topic), so this set is exactly the topics with watchers.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.topics: set[bytes] = set()

    def update(self) -> None:
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed during shutdown
                return
            if data[:1] == b"\x01":
                self.topics.add(data[1:])
            elif data[:1] == b"\x00":
                self.topics.discard(data[1:])

    def follows(self, topic: bytes) -> bool:
        return any(topic.startswith(t) for t in self.topics)


PREVIEW_QUEUED = object()  # a preview frame for TCP watchers is in the prefetch queue


@dataclass
class TcpEvent:
    """An event for TCP watchers that waits in the prefetch queue (so order is kept)."""

    run: Any
    frames: list[Any] | None
    msg: dict[str, Any] | None = None
    descriptor: list | None = None
    preview_key: tuple | None = None

    def load(self, rings: shm.RingReader) -> str | None:
        """The prefetch thread's work: the event's bytes out of the ring, if it has any."""
        if self.descriptor is None:
            return None
        try:
            buffers = rings.read(self.descriptor)
        except ValueError as exc:
            return str(exc)
        if buffers is None:
            self.frames = None  # overwritten already
            return None
        header = {k: v for k, v in (self.msg or {}).items() if k != "shm"}
        self.frames = protocol.relay_event(header, buffers)
        return None


class InsecureBindRefused(RuntimeError):
    """Binding to a non-loopback address without CURVE keys needs an explicit --insecure."""


class LogFileHandler(logging.FileHandler):
    """The server's log file: on a full disk a line is lost, with no traceback on stderr."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


@dataclass
class WorkerHandle:
    wid: str
    proc: subprocess.Popen
    started: float
    ready: bool = False
    retiring: bool = False
    exited_at: float | None = None
    current: str | None = None
    last_seen: float = 0.0


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
        self.min_free = max(0, int(min_free_mb * 1e6))
        self.disk_free = free_bytes(self.data_dir)
        self._space_ok = True
        self.lock = local.DataDirLock(self.data_dir)
        self._log_handler: logging.Handler | None = None
        self._registered = False
        self.security = ServerSecurity.from_dir(Path(keys)) if keys else None
        #: runs, queue, waiters: the socket-free state machine (its store is set in _serve)
        self.requests = ControlHandlers(self)
        self.core = RunCore(None, self._publish, self.requests.answer)
        self.runs = self.core.runs  # read by the Dask executor
        self.queue = self.core.queue
        self.workers: dict[str, WorkerHandle] = {}
        self._worker_counter = 0
        self._start_failures = 0  # workers in a row that died before they were ready
        self._respawn_due: list[float] = []  # monotonic times at which to start a worker
        self._stopping = False
        self._started = time.time()
        self.store_token: str | None = None  # set with the data dir's lock (serve)
        self._bad_input_logged: set[str] = set()
        self.bad_messages = 0
        self.rings = shm.RingReader(drop_pages=True)  # workers' rings, for tcp watchers
        self._tcp_queued = 0  # TCP events waiting in the prefetch thread (kept in order)
        #: runs go to this instead of native workers (zmqruntime.dask_executor.DaskExecutor)
        self.executor = executor
        self._executor_sockets: list[tuple[zmq.Socket, Any]] = []

    # ------------------------------------------------------------------ setup
    def _setup_logging(self) -> None:
        # workers' stderr lands here too (C libraries, crashes): private like the store
        os.close(os.open(self.log_file, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
        handler = LogFileHandler(self.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("zmqruntime")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        self._log_handler = handler

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
        self.data_local.setsockopt(zmq.SNDHWM, DATA_HWM)
        self.data_local.setsockopt(zmq.LINGER, 0)
        for sock in (self.control, self.data, self.data_local):
            if self.security:
                self.security.apply(sock)
        for sock, port in ((self.control, self.port), (self.data, self.data_port)):
            try:
                sock.bind(tcp_url(self.host, port))
            except zmq.ZMQError as exc:  # not an OSError in pyzmq 27: say what is wrong
                raise self._bind_refused(port, exc) from None
        self.ipc_dir = Path(tempfile.mkdtemp(prefix="zmqr-"))
        self.data_local_url: str | None = None
        if zmq.has("ipc") and os.name != "nt":
            self.data_local_url = f"ipc://{self.ipc_dir}/data"
            self.data_local.bind(self.data_local_url)
        self.probe = shm.try_probe()
        # what watchers follow, per data socket: an event nobody follows is not even packed
        self.tcp_watch = Watched(self.data)
        self.local_watch = Watched(self.data_local)
        self.prefetch = Prefetcher(self.zctx)
        self.worker_ctl = self.zctx.socket(zmq.ROUTER)
        self.worker_ctl.setsockopt(zmq.LINGER, 0)
        self.worker_events = self.zctx.socket(zmq.PULL)
        self.worker_events.setsockopt(zmq.AFFINITY, BULK_IO_THREAD)
        self.worker_events.setsockopt(zmq.LINGER, 0)
        if zmq.has("ipc") and os.name != "nt":
            self.worker_ctl_url = f"ipc://{self.ipc_dir}/ctl"
            self.worker_events_url = f"ipc://{self.ipc_dir}/events"
            self.worker_ctl.bind(self.worker_ctl_url)
            self.worker_events.bind(self.worker_events_url)
        else:  # pragma: no cover - Windows
            p1 = self.worker_ctl.bind_to_random_port("tcp://127.0.0.1")
            p2 = self.worker_events.bind_to_random_port("tcp://127.0.0.1")
            self.worker_ctl_url = f"tcp://127.0.0.1:{p1}"
            self.worker_events_url = f"tcp://127.0.0.1:{p2}"

    def _bind_refused(self, port: int, exc: zmq.ZMQError) -> local.StartRefused:
        which = "" if port == self.port else " (the data port, --port + 1)"
        url = tcp_url(self.host, port)
        if exc.errno != errno.EADDRINUSE:
            return local.StartRefused(f"cannot listen on {url}{which}: {exc}")
        holder = local.port_holder(port)
        by = f" by {holder}" if holder else ""
        return local.PortInUse(
            f"cannot listen on {url}: port {port}{which} is in use{by}; "
            "choose another --port (the server needs PORT and PORT+1 free)"
        )

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
            self._setup_logging()
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
        self.store = Store(self.data_dir)
        self.core.store = self.store
        if self.keep_days is not None or self.max_store_gb is not None:
            self._apply_retention()
        self._recover()
        self._refresh_space()
        entry = local.ServerEntry(
            port=self.port,
            host=self.host,
            pid=os.getpid(),
            create_time=psutil.Process().create_time(),
            data_dir=str(self.data_dir),
            log_file=str(self.log_file),
            data_port=self.data_port,
            workers=self.n_workers,
            started=self._started,
        )
        local.register(entry)
        self._registered = True
        if self.executor is not None:
            self._executor_sockets = self.executor.start(self)
            self._dispatch()  # runs recovered from the store go to Dask at once
        else:
            for _ in range(self.n_workers):
                self._spawn_worker()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "serving on %s (data %s), %d workers, data dir %s",
            tcp_url(self.host, self.port),
            tcp_url(self.host, self.data_port),
            self.n_workers,
            self.data_dir,
        )
        problem = self._storage_problem()
        if problem:
            log.warning("%s", problem)
        if announce:
            with contextlib.suppress(OSError):  # stdout may be a file on the full disk
                print(f"zmqruntime {__version__} server (pid {os.getpid()})", flush=True)
                print(f"  control: {tcp_url(self.host, self.port)}", flush=True)
                print(f"  data:    {tcp_url(self.host, self.data_port)}", flush=True)
                if self.executor is not None:
                    print(f"  executor: Dask ({self.executor.spec})", flush=True)
                else:
                    print(f"  workers: {self.n_workers}", flush=True)
                print(f"  data dir: {self.data_dir}", flush=True)
                print(f"  log:     {self.log_file}", flush=True)
                if problem:
                    print(f"  warning: {problem}", flush=True)
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
            self.worker_ctl,
            self.worker_events,
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
            if self.worker_ctl in ready:
                self._drain(self.worker_ctl, self._on_worker_ctl, 200)
            if self.worker_events in ready:
                self._drain(self.worker_events, self._on_worker_event, 100, WORKER_EVENTS_BUDGET)
            for sock, handler in self._executor_sockets:
                if sock in ready:
                    self._drain(sock, handler, 100, WORKER_EVENTS_BUDGET)
            if self.data in ready:
                self.tcp_watch.update()
            if self.data_local in ready:
                self.local_watch.update()
            if self.prefetch.done in ready:
                for payload, error in self.prefetch.ready():
                    if isinstance(payload, TcpEvent):
                        self._on_tcp_event_ready(payload, error)
                        continue
                    route, frames, req = payload
                    if error is not None:
                        log.warning("%s", error)
                        frames = protocol.error_reply(req, ErrorCode.INTERNAL, error)
                    self._send_now(route, frames)
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
        req = None
        try:
            msg_type, req, body = protocol.parse_request(rest)
            protocol.check_request_size(sum(len(f) for f in rest))  # frames are not copied
            ex.req = req
            result = self.requests.handle(ex, msg_type, body)
            if result is NO_REPLY:
                return
            reply = protocol.reply(req, result)
        except ProtocolError as exc:
            self._note_bad_input(str(exc))
            reply = protocol.error_reply(
                exc.req if exc.req is not None else req, ErrorCode(exc.code), str(exc)
            )
        except UnknownExecution as exc:
            reply = protocol.error_reply(req, ErrorCode.UNKNOWN_EXECUTION, str(exc))
        except RunsRefused as exc:  # not bad input: the request was fine, the disk is not
            reply = protocol.error_reply(req, ErrorCode.NO_SPACE, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            self._note_bad_input(f"{type(exc).__name__}: {exc}")
            reply = protocol.error_reply(req, ErrorCode.BAD_REQUEST, _bad_request_message(exc))
        except Exception as exc:  # a bug must cost one reply, never the server
            self._note_bad_input(f"internal error: {type(exc).__name__}: {exc}", exc_info=True)
            reply = protocol.error_reply(req, ErrorCode.INTERNAL, f"internal error: {exc}")
            ex.reads.clear()
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

    def _note_bad_input(self, what: str, exc_info: bool = False) -> None:
        """Count a bad request; log the first of each kind (quoted values and numbers
        stripped), so a flood of garbage cannot flood the log."""
        self.bad_messages += 1
        key = " ".join(
            _VARYING.sub("_", what).split()[:3]
        )  # "field _ must", "unknown request type"
        if key not in self._bad_input_logged and len(self._bad_input_logged) < 200:
            self._bad_input_logged.add(key)
            if exc_info:
                log.exception("%s (logged once per kind)", what[:500])
                return
            log.warning("bad request (logged once per kind): %s", what[:500])

    def _submit(
        self,
        pipeline_code: str,
        config_code: str | None,
        config: dict | None,
        name: str | None,
        retries: int,
    ) -> Run:
        if self._stopping:
            raise ProtocolError("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
        return self.core.submit(pipeline_code, config_code, config, name, retries)

    # ------------------------------------------------------------------ disk space
    def _refresh_space(self) -> bool:
        """Whether the data dir has --min-free-mb free (one statvfs, about a microsecond:
        read on every ping, execute and tick); when space is back, queued runs start."""
        self.disk_free = free_bytes(self.data_dir)
        ok = self.disk_free >= self.min_free
        if ok != self._space_ok:
            self._space_ok = ok
            if ok:
                log.info(
                    "%s free on %s again: accepting new runs",
                    fmt_bytes(self.disk_free),
                    self.data_dir,
                )
                self._dispatch()
            else:
                log.warning("not accepting new runs: %s", self._low_space())
        return self._space_ok

    def _low_space(self) -> str:
        return (
            f"{fmt_bytes(self.disk_free)} free on {self.data_dir}, under this server's "
            f"minimum of {fmt_bytes(self.min_free)} (--min-free-mb)"
        )

    def _accepting(self) -> bool:
        """New runs are taken, and queued ones started: enough space, a store that writes."""
        store = getattr(self, "store", None)
        return self._space_ok and (store is None or (store.writable and not store.backlog))

    def _storage_problem(self) -> str | None:
        store = getattr(self, "store", None)
        if store is not None and store.problem:
            return store.problem
        return None if self._space_ok else self._low_space()

    def _check_accepting(self) -> None:
        self._refresh_space()
        if not self._accepting():
            raise RunsRefused(
                f"not accepting new runs: {self._storage_problem()}. Free space there: new "
                "runs are accepted again as soon as it is back, without a restart"
            )

    def _storage_info(self) -> dict[str, Any]:
        """For ping: free space, the threshold, and what (if anything) is wrong."""
        self._refresh_space()
        return {
            "path": str(self.data_dir),
            "free_bytes": self.disk_free,
            "min_free_bytes": self.min_free,
            "accepting_runs": self._accepting(),
            "problem": self._storage_problem(),
            "unsaved_writes": len(self.store.backlog),
        }

    def _on_store_failure(self) -> None:
        """The store could not write: each running run with writes in its backlog fails
        (a run never ends completed with a result missing); queued runs wait for space."""
        for exec_id, what in list(self.store.unsaved.items()):
            run = self.runs.get(exec_id)
            if run is None or run.state is not RunState.RUNNING or run.fail_reason is not None:
                continue
            error = self.store.last_error or OSError("the store could not write")
            reason = storage_failure(f"{what} of run {exec_id}", self.data_dir, error)
            self._fail_run(run, reason)

    def _fail_run(self, run: Run, reason: str) -> None:
        """End a running run as failed for ``reason``: its worker is told to stop as on a
        cancel (killed after the grace period), and the run ends failed, not retried."""
        exec_id = run.record["id"]
        run.fail_reason = reason
        run.record["message"] = reason
        log.error("run %s fails: %s", exec_id, reason)
        if self.core.request_cancel(run, self.cancel_grace):
            self._cancel_on_worker(run)
        self._publish(
            run, EventKind.PROGRESS, {"progress": run.record["progress"], "message": reason}
        )

    # ------------------------------------------------------------------ workers
    def _spawn_worker(self) -> None:
        self._worker_counter += 1
        wid = f"w{self._worker_counter}"
        cmd = [
            sys.executable,
            "-m",
            "zmqruntime.worker",
            "--id",
            wid,
            "--control",
            self.worker_ctl_url,
            "--events",
            self.worker_events_url,
            "--data-dir",
            str(self.data_dir),
        ]
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.workers[wid] = WorkerHandle(wid, proc, time.monotonic(), last_seen=time.monotonic())

    def _cancel_on_worker(self, run: Run) -> None:
        """Ask the run's worker (or Dask task) to stop: cooperative, then an interrupt."""
        if self.executor is not None:
            self.executor.cancel(run)
        elif run.worker:
            self._send_worker(run.worker, {"type": WorkerMessage.CANCEL.value, "id": run.id})

    def _send_worker(self, wid: str, msg: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.worker_ctl.send_multipart([wid.encode(), *protocol.encode(msg)], copy=False)

    def _on_worker_ctl(self, frames: list[zmq.Frame]) -> None:
        wid = frames[0].bytes.decode()
        worker = self.workers.get(wid)
        if worker is None:
            return
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError:
            log.warning("worker %s sent an undecodable message", wid)
            return
        worker.last_seen = time.monotonic()
        if msg.get("type") == WorkerMessage.READY and not worker.ready:
            worker.ready = True
            self._start_failures = 0
            log.info("worker %s ready (pid %s)", wid, msg.get("pid"))
            self._dispatch()

    def _on_worker_event(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = protocol.decode(frames, resolve_arrays=False)
        except ProtocolError:
            log.warning("a worker sent an undecodable event")
            return
        run = self.runs.get(msg.get("id", ""))
        if run is None or run.state is not RunState.RUNNING:
            return  # a late event of a run that already ended (e.g. killed on cancel)
        record = run.record
        if msg["type"] == WorkerMessage.DONE:
            self._on_done(run, msg)
            return
        if msg["type"] == WorkerMessage.STORED:  # on disk: from now on fetchable from the store
            meta, index = msg["meta"], msg["index"]
            self.store.add_result(
                record["id"], index, msg["name"], meta, int(meta.get("nbytes", 0))
            )
            record["n_results"] = index + 1
            return
        kind = msg.get("kind")
        if kind == EventKind.LOG.value and msg.get("partial"):
            msg["index"] = None  # a line still being written: live only, stored once it ends
        elif kind == EventKind.LOG.value:
            run.log_bytes += len(msg["text"])
            if run.log_bytes > MAX_LOG_BYTES_PER_RUN:
                if run.log_bytes - len(msg["text"]) <= MAX_LOG_BYTES_PER_RUN:
                    msg["text"] = (
                        f"[zmqruntime: this run's log passed {MAX_LOG_BYTES_PER_RUN >> 20}"
                        " MiB; further lines are shown live but not stored]"
                    )
                else:
                    msg["index"] = None  # live only
            if "index" not in msg:
                msg["index"] = record["n_logs"]
                record["n_logs"] += 1
                self.store.add_log(record["id"], msg["index"], time.time(), msg["text"])
        elif kind == EventKind.PROGRESS.value:
            record["progress"] = msg.get("progress")
            if msg.get("message") is not None:
                record["message"] = msg["message"]
        del msg["type"]
        msg["seq"] = run.seq
        msg["t"] = time.time()
        run.seq += 1
        local, remote = self._watchers(msg["id"])
        if not (local or remote):
            return  # nobody follows this run: the seq still counts it
        frames = protocol.relay_event(msg, frames[2:])
        descriptor = msg.get("shm")
        with contextlib.suppress(zmq.ZMQError):
            if local:
                self.data_local.send_multipart(frames, copy=False)
        if remote:
            self._send_tcp(run, frames, msg, descriptor)

    def _watchers(self, exec_id: str) -> tuple[bool, bool]:
        """Whether watchers on the local and on the TCP data socket follow this run."""
        topic = exec_id.encode()
        self.local_watch.update()  # subscriptions that arrived since the last loop turn
        self.tcp_watch.update()
        return self.local_watch.follows(topic), self.tcp_watch.follows(topic)

    def _send_tcp(
        self,
        run: Run,
        frames: list[Any],
        msg: dict[str, Any] | None = None,
        descriptor: list | None = None,
    ) -> None:
        """Publish an event to TCP watchers, in order. One whose arrays lie in a worker's
        ring (``descriptor``) goes through the prefetch thread, which copies the bytes out
        of the ring off this loop; events after it wait in the same queue."""
        if descriptor is None and not self._tcp_queued:
            with contextlib.suppress(zmq.ZMQError):
                self.data.send_multipart(frames, copy=False)
            return
        key = None
        if descriptor is not None and msg is not None and msg.get("kind") == "preview":
            key = (msg["id"], msg.get("name"))
            tracker = run.remote_previews.get(key)
            if tracker is PREVIEW_QUEUED or (tracker is not None and not tracker.done):
                return  # newest wins: the last frame of this stream is still on its way
            run.remote_previews[key] = PREVIEW_QUEUED
        event = TcpEvent(run, frames, msg, descriptor, key)
        self._tcp_queued += 1
        self.prefetch.run(functools.partial(event.load, self.rings), event)

    def _on_tcp_event_ready(self, event: TcpEvent, error: str | None) -> None:
        self._tcp_queued -= 1
        if error is not None:
            log.warning("a worker sent a bad shared-memory descriptor: %s", error)
        if event.frames is None or error is not None:
            if event.preview_key is not None:
                event.run.remote_previews.pop(event.preview_key, None)
            return  # overwritten already: a result is fetched from the store, a preview lost
        with contextlib.suppress(zmq.ZMQError):
            if event.preview_key is None:
                self.data.send_multipart(event.frames, copy=False)
            else:
                event.run.remote_previews[event.preview_key] = self.data.send_multipart(
                    event.frames, copy=False, track=True
                )

    def _data_local_info(self) -> dict[str, Any] | None:
        if self.data_local_url is None:
            return None
        probe = self.probe.describe() if self.probe is not None else None
        return {"url": self.data_local_url, "shm_probe": probe}

    def _on_done(self, run: Run, msg: dict[str, Any]) -> None:
        try:
            state = RunState(msg.get("state", "failed"))
        except ValueError:
            state = RunState.FAILED
        if not state.final:
            state = RunState.FAILED
        if run.cancel_requested and state is not RunState.FAILED:
            state = RunState.CANCELLED
        worker = self.workers.get(run.worker or "")
        if worker is not None:
            worker.current = None
            if msg.get("retiring"):  # interrupted: it exits and a fresh worker replaces it
                worker.ready, worker.retiring = False, True
        message = {
            RunState.COMPLETED: "completed",
            RunState.CANCELLED: "cancelled by request",
        }.get(state)
        if run.fail_reason is not None:  # stopped by the server: its results were not stored
            self.core.finish(run, RunState.FAILED, error=run.fail_reason, message=run.fail_reason)
        else:
            self.core.finish(
                run,
                state,
                error=msg.get("error"),
                traceback=msg.get("traceback"),
                message=msg.get("message") or message or msg.get("error"),
            )
        self._dispatch()

    def _dispatch(self) -> None:
        if self._stopping or not self._accepting():
            return  # a nearly full disk: queued runs wait until there is room again
        if self.executor is not None:
            # Dask places and scales: every queued run is submitted (an adaptive cluster
            # grows with them); each stays "queued" until its task starts (_mark_running)
            while self.queue:
                run = self.runs[self.queue.popleft()]
                self.executor.submit(run, self.core.next_task(run))
            return
        idle = [
            w
            for w in self.workers.values()
            if w.ready and w.current is None and w.exited_at is None
        ]
        while self.queue and idle:
            worker = idle.pop(0)
            code = worker.proc.poll()
            if code is not None:  # died since the last tick: a run sent to it would be lost
                self._on_worker_exit(worker, code)
                continue
            exec_id = self.queue.popleft()
            run = self.runs[exec_id]
            worker.current = exec_id
            run.worker = worker.wid
            task = self.core.next_task(run)  # read from the store after a restart
            self._send_worker(worker.wid, {"type": WorkerMessage.TASK.value, "id": exec_id, **task})
            self.core.start(run)

    def _mark_running(self, run: Run) -> None:
        """A run's attempt starts (the Dask executor's call, when its task says hello)."""
        self.core.start(run)

    def _tick(self) -> None:
        now = time.monotonic()
        self._refresh_space()  # queued runs start once a full disk has room again
        if self.executor is not None:
            self.executor.tick()
        if self._respawn_due and min(self._respawn_due) <= now:
            self._respawn_due.remove(min(self._respawn_due))
            self._spawn_worker()
        if (
            self.keep_days is not None or self.max_store_gb is not None
        ) and now - self._last_retention >= self.retention_interval:
            self._last_retention = now
            self._apply_retention()  # a server that runs for months keeps its store bounded
        for worker in list(self.workers.values()):
            code = worker.proc.poll()
            if code is not None:
                # its last messages (a "done") may still be on their way through
                # the socket: let them arrive before judging what became of its run
                if worker.exited_at is None:
                    worker.exited_at = now
                elif now - worker.exited_at >= EXIT_SETTLE:
                    self._on_worker_exit(worker, code)
            elif worker.ready and now - worker.last_seen > self.heartbeat_timeout:
                log.warning(
                    "worker %s sent no heartbeat for %.1f s: killing it",
                    worker.wid,
                    now - worker.last_seen,
                )
                self._kill_worker(
                    worker, f"worker hung: no heartbeat for {self.heartbeat_timeout:g} s"
                )
            elif not worker.ready and now - worker.started > WORKER_START_TIMEOUT:
                log.error("worker %s did not start within %.0f s", worker.wid, WORKER_START_TIMEOUT)
                self._kill_worker(worker, "worker failed to start")
        for run in self.core.cancels_due(now):
            handle = self.workers.get(run.worker or "")
            if self.executor is not None and run.state is RunState.RUNNING:
                run.cancel_deadline = None
                log.info("run %s ignored cancel for %.1f s", run.record["id"], self.cancel_grace)
                if run.fail_reason is not None:
                    self.executor.hard_cancel(run, run.fail_reason, "failed")
                else:
                    self.executor.hard_cancel(
                        run,
                        f"cancelled: the pipeline did not stop within "
                        f"{self.cancel_grace:g} s, so its worker was killed",
                        "cancelled",
                    )
            elif run.state is RunState.RUNNING and handle is not None:
                log.info(
                    "run %s ignored cancel for %.1f s: killing worker %s",
                    run.record["id"],
                    self.cancel_grace,
                    handle.wid,
                )
                if run.fail_reason is not None:
                    self._kill_worker(handle, run.fail_reason)
                else:
                    self._kill_worker(
                        handle,
                        f"cancelled: the pipeline did not stop within "
                        f"{self.cancel_grace:g} s, so its worker was killed",
                        state="cancelled",
                    )
        self.core.expire_waiters(now)

    def _kill_worker(self, worker: WorkerHandle, reason: str, state: str = "failed") -> None:
        with contextlib.suppress(OSError):
            worker.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=5)
        self._on_worker_exit(worker, worker.proc.returncode, reason=reason, state=state)

    def _on_worker_exit(
        self,
        worker: WorkerHandle,
        code: int | None,
        reason: str | None = None,
        state: str = "failed",
    ) -> None:
        self.workers.pop(worker.wid, None)
        self.rings.forget(worker.proc.pid)  # its ring's memory goes with it
        if worker.current and reason is None:
            # its last words (a "done") may still wait in the socket: hear them first
            self._drain(self.worker_events, self._on_worker_event, 10_000)
        run = self.runs.get(worker.current or "")
        if run is not None and run.state is RunState.RUNNING and run.worker == worker.wid:
            if reason is None:
                reason = f"the worker process died ({describe_exit(code)})"
            self._run_lost(run, reason, state)
        elif worker.retiring:
            log.info(
                "worker %s retired after its run (interrupted, or threads left running); "
                "starting a fresh one",
                worker.wid,
            )
        elif reason is None and not self._stopping and worker.ready:
            log.warning("worker %s exited (%s)", worker.wid, describe_exit(code))
        if self._stopping:
            return
        if worker.ready or worker.retiring:
            self._spawn_worker()
            return
        # it never started (a broken environment?): retry, but not in a tight loop
        self._start_failures += 1
        delay = min(MAX_RESPAWN_DELAY, 0.5 * 2 ** (self._start_failures - 1))
        log.warning(
            "worker %s died before it was ready (%s); starting another in %.1f s "
            "(its output is above)",
            worker.wid,
            describe_exit(code),
            delay,
        )
        self._respawn_due.append(time.monotonic() + delay)

    def _run_lost(self, run: Run, reason: str, state: str = "failed") -> None:
        """A running run's worker (or Dask task) died or was killed (RunCore.run_lost)."""
        self.core.run_lost(run, reason, state)

    # ------------------------------------------------------------------ state changes
    def _finish(
        self,
        run: Run,
        state: RunState | str,
        *,
        error: str | None = None,
        traceback: str | None = None,
        message: str | None = None,
    ) -> None:
        """End a run (RunCore.finish; the Dask executor calls this too)."""
        self.core.finish(run, state, error=error, traceback=traceback, message=message)

    def _announce_finished(self) -> None:
        """Commit, then tell watchers and waiters: a final state is durable before anyone
        hears of it, and one commit serves every run that ended in this loop turn."""
        waited = bool(self.store.backlog) or not self.store.writable
        if not self.store.commit():
            # a full disk: the runs whose writes wait fail, and the final states that wait
            # are answered from memory (announced all the same: a client must hear that its
            # run failed, even if a crash before the disk takes it would make it "interrupted")
            self._on_store_failure()
        elif waited:
            self.core.unsaved.clear()
            log.info("the store is writable again; accepting new runs")
            self._dispatch()
        self.core.announce()

    def _publish(self, run: Run, kind: EventKind, body: dict[str, Any]) -> None:
        seq = run.seq
        run.seq += 1
        local, remote = self._watchers(run.record["id"])
        if not (local or remote):
            return
        frames = protocol.event(run.record["id"], kind, seq, {**body, "t": time.time()})
        if local:
            with contextlib.suppress(zmq.ZMQError):
                self.data_local.send_multipart(frames, copy=False)
        if remote:
            self._send_tcp(run, frames)

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
        for worker in self.workers.values():
            self._send_worker(worker.wid, {"type": WorkerMessage.SHUTDOWN.value})
        deadline = time.monotonic() + 2.0
        for worker in list(self.workers.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()

    def _end_runs(self) -> None:
        if not hasattr(self, "store"):
            return
        for run in list(self.runs.values()):
            if run.state is RunState.RUNNING:
                self.core.finish(
                    run,
                    RunState.FAILED,
                    error="interrupted: the server shut down while this run was running",
                    message="interrupted by server shutdown",
                )
        self._announce_finished()
        for run in self.runs.values():  # queued runs stay queued: they run after a restart
            parked = [(w.route, w.req) for w in run.waiters if not w.answered]
            for w in run.waiters:
                w.answered = True
            for route, req in parked:
                self._send(
                    Exchange(route, req),
                    protocol.error_reply(
                        req, ErrorCode.SHUTTING_DOWN, "the server is shutting down"
                    ),
                )

    def _close_store(self) -> None:
        if hasattr(self, "store"):
            self.store.close()  # never raises for a full disk: it logs what is lost

    def _close_sockets(self) -> None:
        names = ("control", "data", "data_local", "worker_ctl", "worker_events")
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


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _bad_request_message(exc: Exception) -> str:
    return f"bad request: {type(exc).__name__}: {exc}"
