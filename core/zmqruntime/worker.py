"""The worker process: runs one pipeline at a time for the server.

Two sockets, two threads. The *io thread* owns a DEALER to the server's worker router:
it announces the worker, sends heartbeats, receives tasks and cancel requests, and
flushes coalesced log lines. The *main thread* runs the pipeline and sends its events
through a PUSH socket (guarded by a lock the io thread also takes to flush logs). A
PUSH that is full blocks a result (no loss); a preview or progress update waits as its
stream's pending newest (:mod:`zmqruntime.latest`) and goes once there is room.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import linecache
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import latest, protocol, shm
from .context import Context, LogWriter, ResultWriter, build_config
from .errors import ExecutionCancelled
from .messages import WorkerMessage
from .resultfile import ResultFiles, RunFiles, aligned_copy
from .store import StorageFailed

HEARTBEAT_INTERVAL = 0.5
#: a cancelled pipeline that has neither stopped nor looked at ctx.cancelled after this
#: long is interrupted: an ExecutionCancelled is raised in its thread (pure-Python loops
#: stop at once; code stuck in a C call is killed by the server after its grace period)
INTERRUPT_DELAY = 0.25
#: exit status of a worker that retires after an interrupt (its state may be unclean)
EXIT_RECYCLE = 75
#: scheduling priority of workers relative to the server (a higher nice is lower priority)
WORKER_NICE = 5
LOG_FLUSH_INTERVAL = 0.1
EVENT_HWM = 16


class CodeCache:
    """Compiled code objects keyed by source hash, so a repeated pipeline compiles once."""

    def __init__(self, max_entries: int = 256) -> None:
        self._codes: dict[str, tuple[Any, str]] = {}
        self._max = max_entries

    def __call__(self, source: str, label: str) -> Any:
        key = hashlib.sha256(source.encode()).hexdigest()
        cached = self._codes.get(key)
        if cached is not None:
            return cached[0]
        filename = f"<{label.strip('<>')} {key[:8]}>"
        code = compile(source, filename, "exec")
        # let tracebacks show the pipeline's source lines
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        if len(self._codes) >= self._max:
            _, evicted = self._codes.pop(next(iter(self._codes)))
            linecache.cache.pop(evicted, None)  # else linecache keeps every source ever run
        self._codes[key] = (code, filename)
        return code


class PipelineRunner:
    """Runs one pipeline at a time in the calling thread: the config, the code, ``ctx``,
    the captured output, the cooperative cancel and the interrupt (an ExecutionCancelled
    raised in that thread). Native workers and Dask tasks (:mod:`zmqruntime.dask_task`)
    share it: they differ only in how events and results leave (``send``, the writer).
    """

    def __init__(self, codes: CodeCache | None = None) -> None:
        self.main_thread = threading.get_ident()  # the thread that runs pipelines
        self.interrupt_lock = threading.Lock()
        self.interruptible = False  # that thread runs pipeline code (guarded by the lock)
        self.interrupted = False
        self.recycle = False  # a run left threads behind: retire after it, like an interrupt
        self.cancel_event = threading.Event()
        self.current: str | None = None
        self.current_ctx: Context | None = None
        self.codes = codes or CodeCache()

    def interrupt(self) -> None:
        """Raise ExecutionCancelled in the pipeline's thread, if it still runs pipeline code."""
        ctx = self.current_ctx
        if ctx is not None and ctx.cancel_observed:
            return  # it saw the cancel and is winding down: leave it the grace period
        with self.interrupt_lock:
            if self.interruptible and self.cancel_event.is_set():
                self.interrupted = True
                _async_raise(self.main_thread, ExecutionCancelled)

    @contextlib.contextmanager
    def pipeline_code(self):
        """The region where an interrupt may land: the user's code, nothing of ours."""
        with self.interrupt_lock:
            self.interruptible = True
        try:
            yield
        finally:
            self.leave_pipeline_code()

    def leave_pipeline_code(self) -> None:
        with self.interrupt_lock:
            self.interruptible = False
            _async_raise(self.main_thread, None)  # drop an interrupt not yet delivered

    def run_pipeline(
        self,
        exec_id: str,
        task: dict[str, Any],
        send: Callable[[str, dict[str, Any], bool], None],
        writer: Any,
        results_dir: Path | RunFiles,
        ring: shm.Ring | None = None,
        capture: Callable[[LogWriter], contextlib.AbstractContextManager] | None = None,
        check_threads: bool = True,
    ) -> dict[str, Any]:
        """Run one task in this thread; return its "done" message (not sent).

        ``writer`` is a :class:`ResultWriter` (or one with its methods) already started
        for this run; every result is stored (``flush``) before this returns. ``capture``
        redirects print() to the run's log (default: this process's stdout and stderr).
        """
        self.main_thread = threading.get_ident()
        self.cancel_event.clear()
        self.current = exec_id
        ctx = Context(exec_id, send, results_dir, self.cancel_event, writer, ring)
        self.current_ctx = ctx
        state, error, tb = "completed", None, None
        log_writer = LogWriter(ctx)
        threads_before = set(threading.enumerate())
        try:
            with self.pipeline_code():
                config = build_config(task.get("config_code"), task.get("config"), self.codes)
                ns: dict[str, Any] = {"__name__": "__zmqruntime_pipeline__"}
                exec(self.codes(task["pipeline_code"], "<pipeline>"), ns)
                run = ns.get("run")
                if not callable(run):
                    raise TypeError("pipeline_code must define a function run(ctx, config)")
                with (capture or _capture_process_output)(log_writer):
                    value = run(ctx, config)
                if value is not None:
                    ctx.emit("return", value)
            if ctx.cancelled:
                state = "cancelled"
        except ExecutionCancelled:
            state = "cancelled"
        except BaseException as exc:  # the pipeline's failure is the run's, not the worker's
            state = "cancelled" if ctx.cancelled else "failed"
            # a result the disk refused: the reason says it all ("disk full while ...")
            error = str(exc) if isinstance(exc, StorageFailed) else f"{type(exc).__name__}: {exc}"
            tb = _pipeline_traceback(exc)
        finally:
            self.leave_pipeline_code()  # also when the interrupt landed in the region's exit
            ctx.close()  # from now on the run's ctx refuses: nothing more is filed under it
            log_writer.close_run()
            self.current_ctx = None
            if check_threads:
                self._note_threads_left(ctx, threads_before)
            ctx.flush_logs()
        try:
            writer.flush()  # every result is on disk and indexed before "done"
        except OSError as exc:
            if state != "failed":
                state, error, tb = "failed", str(exc), None
        self.current = None
        done = {
            "type": WorkerMessage.DONE.value,
            "id": exec_id,
            "state": state,
            "error": error,
            "traceback": tb,
            "n_results": ctx.n_results,
        }
        if self.interrupted:
            done["message"] = "cancelled: the pipeline was interrupted"
        return done

    def _note_threads_left(self, ctx: Context, before: set[threading.Thread]) -> None:
        """Threads a run started and left running can no longer emit (its ctx is closed),
        but they may hold memory, CPU or files: say so in the run's log, and retire this
        worker after the run so that the next run starts in a clean process."""
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left:
            return
        names = ", ".join(t.name for t in left[:5]) + (" ..." if len(left) > 5 else "")
        ctx._append_log(
            f"[zmqruntime: {len(left)} thread(s) started by this run still run after it "
            f"ended ({names}); they can no longer emit, and this worker is replaced]"
        )
        self.recycle = True


@contextlib.contextmanager
def _capture_process_output(writer: LogWriter):
    with contextlib.redirect_stdout(writer), contextlib.redirect_stderr(writer):
        yield


class Worker(PipelineRunner):
    def __init__(self, worker_id: str, control: str, events: str, data_dir: Path) -> None:
        super().__init__()
        self.worker_id = worker_id
        self.data_dir = Path(data_dir)
        self.files = ResultFiles(self.data_dir)  # the store's layout: where results go
        self.zctx = zmq.Context()
        self.control_endpoint = control
        self.events = self.zctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.SNDHWM, EVENT_HWM)
        self.events.setsockopt(zmq.LINGER, 5000)
        self.events.connect(events)
        self.events_lock = threading.Lock()
        self.live = latest.LatestSlots()  # previews and progress: newest wins, last kept
        self.interrupt_at: float | None = None
        self.tasks: queue.Queue[dict | None] = queue.Queue()
        # large arrays go through shared memory; a result's room is freed once on disk
        self.ring = shm.try_ring()
        release = self.ring.free if self.ring is not None else None
        self.writer = ResultWriter(lambda index, name, meta: None, release=release)
        self.parent = os.getppid()
        self.stop = threading.Event()

    # -- sending (main thread, and io thread for log flushes)
    def send_event(self, exec_id: str, kind: str, body: dict[str, Any], reliable: bool) -> None:
        header = {"type": WorkerMessage.EVENT.value, "id": exec_id, "kind": kind}
        if kind in latest.LIVE_KINDS and not reliable:
            self.live.offer(latest.stream_key(kind, body), {**header, **body}, self._send_live)
            return
        if reliable and self.live:  # a frame waiting for room goes before what follows it
            self.live.flush(self._send_live, block=True)
        frames = self._frames({**header, **body})
        with self.events_lock:
            if reliable:
                self.events.send_multipart(frames, copy=False)
            else:
                with contextlib.suppress(zmq.Again):
                    self.events.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def _send_live(self, event: dict[str, Any], block: bool) -> zmq.MessageTracker | None:
        """Send a preview or progress event (LatestSlots' ``send``): a large frame goes
        through the ring, and its room is freed at once (readable until the ring comes
        round: newest wins); zmq.Again when it cannot go without blocking."""
        if not self.events_lock.acquire(blocking=block):
            raise zmq.Again()
        room = None
        try:
            if not block and not self.events.poll(0, zmq.POLLOUT):
                raise zmq.Again()  # no room: the frame is not copied into the ring for nothing
            if event["kind"] == "preview":
                value, room = self._preview_room(event["value"])
                event = {**event, "value": value}
            frames = self._frames(event)
            if block:
                self.events.send_multipart(frames, copy=False)
                return None
            return self.events.send_multipart(frames, copy=False, flags=zmq.NOBLOCK, track=True)
        finally:
            self.events_lock.release()
            if room is not None and self.ring is not None:
                self.ring.free(room)

    def _frames(self, header: dict[str, Any]) -> list[Any]:
        """An event's frames; its large arrays, where they lie in the ring, as a descriptor."""
        frames = protocol.encode(header)
        if self.ring is not None and len(frames) > 2:
            descriptor = self.ring.describe(frames[2:])
            if descriptor is not None:  # the bytes are in the ring: send where they lie
                frames = protocol.encode({**header, "shm": descriptor})[:2]
        return frames

    def _preview_room(self, value: Any) -> tuple[Any, np.ndarray | None]:
        """A large preview frame copied into the ring, and its room (None: it stays in
        the socket path)."""
        if self.ring is None or not isinstance(value, np.ndarray):
            return value, None
        if value.nbytes < shm.MIN_BYTES or value.dtype.hasobject:
            return value, None
        room = self.ring.alloc(value.nbytes, wait=False)
        if room is None:
            return value, None
        return aligned_copy(value, room), room

    # -- io thread
    def io_loop(self) -> None:
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.control_endpoint)
        sock.send_multipart(
            protocol.encode({"type": WorkerMessage.READY.value, "pid": os.getpid()})
        )
        last_beat = last_flush = time.monotonic()
        try:
            while not self.stop.is_set():
                wait = LOG_FLUSH_INTERVAL
                if self.interrupt_at is not None:
                    wait = max(0.0, min(wait, self.interrupt_at - time.monotonic()))
                if sock.poll(int(wait * 1000)):
                    self.on_control(protocol.decode(sock.recv_multipart()))
                now = time.monotonic()
                if self.interrupt_at is not None and now >= self.interrupt_at:
                    self.interrupt_at = None
                    self.interrupt()
                if now - last_flush >= LOG_FLUSH_INTERVAL:
                    ctx = self.current_ctx
                    # best effort: never queue behind a result blocked on a full socket,
                    # so heartbeats and cancel requests keep flowing
                    if ctx is not None and not self.events_lock.locked():
                        ctx.flush_logs()
                    if self.live:  # previews and progress that found the pipe full
                        self.live.flush(self._send_live)
                    last_flush = now
                if now - last_beat >= HEARTBEAT_INTERVAL:
                    sock.send_multipart(
                        protocol.encode(
                            {"type": WorkerMessage.HEARTBEAT.value, "current": self.current}
                        )
                    )
                    last_beat = now
                    if os.getppid() != self.parent:  # the server died: don't linger as an orphan
                        os._exit(3)
        finally:
            sock.close()

    def on_control(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == WorkerMessage.TASK:
            self.tasks.put(msg)
        elif kind == WorkerMessage.CANCEL:
            if msg.get("id") == self.current:
                self.cancel_event.set()
                self.interrupt_at = time.monotonic() + INTERRUPT_DELAY

        elif kind == WorkerMessage.SHUTDOWN:
            self.stop.set()
            self.tasks.put(None)

    # -- main thread
    def run(self) -> None:
        io = threading.Thread(target=self.io_loop, name="worker-io", daemon=True)
        io.start()
        while True:
            task = self.tasks.get()
            if task is None:
                break
            self.execute(task)
        io.join(timeout=2)
        self.writer.close()
        if self.ring is not None:
            self.ring.close()
        with self.events_lock:
            self.events.close()  # lingers until the last message (a "done") is sent
        self.zctx.term()
        if self.interrupted or self.recycle:
            sys.exit(EXIT_RECYCLE)

    def execute(self, task: dict[str, Any]) -> None:
        exec_id = task["id"]

        def send(kind: str, body: dict[str, Any], reliable: bool) -> None:
            self.send_event(exec_id, kind, body, reliable)

        def stored(index: int, name: str, meta: dict[str, Any]) -> None:
            msg = {
                "type": WorkerMessage.STORED.value,
                "id": exec_id,
                "index": index,
                "name": name,
                "meta": meta,
            }
            with self.events_lock:
                self.events.send_multipart(protocol.encode(msg))

        self.writer.start_run(stored)
        self.live.clear()
        done = self.run_pipeline(
            exec_id, task, send, self.writer, self.files.writer(exec_id), self.ring
        )
        self.live.flush(self._send_live, block=True)  # the last frame and progress first
        if self.interrupted or self.recycle:
            done["retiring"] = True
        with self.events_lock:
            self.events.send_multipart(protocol.encode(done))
        if self.interrupted or self.recycle:
            # an exception thrown into arbitrary code may leave its state unclean: this
            # worker retires (its "done" is sent first) and the server starts a fresh one
            self.stop.set()
            self.tasks.put(None)


def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in another thread at its next bytecode (None: cancel a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type else None
    )


def _pipeline_traceback(exc: BaseException) -> str:
    """The traceback without the worker's own frames: the user's code starts at run()."""
    frames = traceback.extract_tb(exc.__traceback__)
    keep = [f for f in frames if not f.filename.endswith(("zmqruntime/worker.py",))]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(keep)]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="zmqruntime worker (started by the server)")
    parser.add_argument("--id", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--data-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    if hasattr(os, "nice"):
        # pipelines yield the CPU to the server's control loop: it answers at once even
        # when every core is busy with user code
        with contextlib.suppress(OSError):
            os.nice(WORKER_NICE)
    Worker(args.id, args.control, args.events, args.data_dir).run()
    sys.exit(0)


if __name__ == "__main__":
    main()
