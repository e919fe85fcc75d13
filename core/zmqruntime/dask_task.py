"""One run attempt as a Dask task: the side that executes inside a Dask worker.

:func:`run_task` is what the server submits (see :mod:`zmqruntime.dask_executor`). It
runs the pipeline with the same ``ctx`` as a native worker (:class:`~zmqruntime.worker.
PipelineRunner`) and talks to the server over two TCP connections, always CURVE with keys
the server made for its tasks (a task never holds a key of the server's users):

* a DEALER for control: ``hello`` (the server answers ``go``, or ``abort`` for an attempt
  it no longer wants), heartbeats (answered ``ack``), and ``cancel`` from the server;
* a PUSH for everything the run produces, in order: events, ``stored`` messages that
  carry the result's bytes (the server writes the file: a Dask worker need not share the
  server's disk), and ``done`` last.

The two connections (a :class:`Link`) are kept by the Dask worker process between tasks,
one per task running at a time: a connection and its CURVE handshake per task cost about
4 ms a run. Every frame list therefore starts with this execution's identity
(``TOKEN.NONCE``), and the server's replies carry it back: the server takes messages only
from the execution it said ``go`` to, so a dead attempt's late messages are never mixed with
the next attempt's, and a task ignores replies meant for the link's previous task.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import latest, protocol
from .context import LogWriter
from .transport import ClientSecurity
from .worker import EVENT_HWM, INTERRUPT_DELAY, LOG_FLUSH_INTERVAL, CodeCache, PipelineRunner

#: the ZAP domain of the server's task sockets: only the task key is accepted there
TASK_DOMAIN = "zmqruntime-tasks"
HEARTBEAT_INTERVAL = 0.5
#: a server that answered nothing (no ``ack``) for this long is gone: the run is cancelled
SERVER_TIMEOUT = 15.0
HELLO_TIMEOUT = 60.0
#: a reliable send (a result) that the server does not take for this long fails the run
SEND_TIMEOUT_MS = 120_000
#: what a kept link may still deliver when its Dask worker process exits
LINK_LINGER_MS = 5_000
#: an idle link to another server (e.g. one that restarted: new ports, new keys) is closed
LINK_IDLE_CLOSE = 60.0

_codes = CodeCache()  # per Dask worker process: a repeated pipeline compiles once


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt of a run (the Dask task); returns its "done" message.

    ``spec``: ``id``, ``token``, ``ctl`` and ``events`` (the server's task endpoints),
    ``keys`` (``server``, ``public``, ``secret``: z85 CURVE keys) and ``task`` (the code
    and config). A second execution of the same attempt (Dask re-ran it after its worker
    died) is told ``abort`` by the server and returns without running anything.
    """
    session = TaskSession(spec)
    try:
        return session.run()
    finally:
        session.close()


class Link:
    """A Dask worker process's two connections to one server's task sockets, used by one
    task at a time and kept for the next (see :func:`_acquire`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        keys = spec["keys"]
        self.key = (spec["ctl"], spec["events"], keys["server"])
        security = ClientSecurity(keys["public"], keys["secret"], keys["server"])
        # one context per Dask worker process: its I/O thread delivers a task's "done"
        # while the next task starts
        zctx: zmq.Context = zmq.Context.instance()
        self.ctl = zctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        security.apply(self.ctl)
        self.ctl.connect(spec["ctl"])
        self.events = zctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.SNDHWM, EVENT_HWM)
        self.events.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self.events.setsockopt(zmq.LINGER, LINK_LINGER_MS)
        security.apply(self.events)
        self.events.connect(spec["events"])
        self.idle_since = 0.0

    def close(self, linger_ms: int = LINK_LINGER_MS) -> None:
        self.ctl.close(linger=0)
        self.events.close(linger=linger_ms)  # what is queued may still leave


_links: dict[tuple[str, str, str], list[Link]] = {}  # idle links, per server
_links_lock = threading.Lock()


def _acquire(spec: dict[str, Any]) -> Link:
    """An idle link to the spec's server, or a new one; idle links to other servers that
    waited LINK_IDLE_CLOSE are closed."""
    key = (spec["ctl"], spec["events"], spec["keys"]["server"])
    now = time.monotonic()
    stale: list[Link] = []
    with _links_lock:
        for other, idle in list(_links.items()):
            if other != key:
                stale += [link for link in idle if now - link.idle_since > LINK_IDLE_CLOSE]
                idle[:] = [link for link in idle if now - link.idle_since <= LINK_IDLE_CLOSE]
                if not idle:
                    del _links[other]
        mine = _links.get(key)
        link = mine.pop() if mine else None
    for old in stale:
        old.close()
    return link if link is not None else Link(spec)


def _give_back(link: Link) -> None:
    link.idle_since = time.monotonic()
    with _links_lock:
        _links.setdefault(link.key, []).append(link)


class TaskSession:
    """One execution: a link to the server, an io thread, and the runner."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.exec_id: str = spec["id"]
        self.identity = f"{spec['token']}.{secrets.token_hex(4)}".encode()
        self.task = spec["task"]
        self.zctx: zmq.Context = zmq.Context.instance()
        self.link = _acquire(spec)
        self.ctl = self.link.ctl
        self.events = self.link.events
        self.reusable = False  # the link goes back to the pool only after a clean run
        self.events_lock = threading.Lock()
        # the io thread sleeps in poll(); this pair wakes it when the run ends
        wake_url = f"inproc://zmqruntime-task-wake-{id(self)}"
        self._wake_rx = self.zctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_url)
        self._wake_tx = self.zctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_url)
        self.live = latest.LatestSlots()  # previews and progress: newest wins, last kept
        self.runner = PipelineRunner(_codes)
        self.stop = threading.Event()
        self.interrupt_at: float | None = None
        self.server_lost = False
        self.results_dir: Path | None = None

    # -- the task's thread
    def run(self) -> dict[str, Any]:
        reply = self._hello()
        self.reusable = bool(reply.pop("answered", False))  # the server answers on this link
        if reply.get("type") != "go":
            return {"type": "aborted", "id": self.exec_id, "reason": reply.get("reason")}
        io_thread = threading.Thread(target=self._io_loop, name="zmqruntime-task-io", daemon=True)
        io_thread.start()
        self.results_dir = Path(tempfile.mkdtemp(prefix="zmqr-task-"))  # ctx names files here
        try:
            done = self.runner.run_pipeline(
                self.exec_id,
                self.task,
                self._send,
                RemoteResultWriter(self),
                self.results_dir,
                capture=_capture_thread_output,
                check_threads=False,  # a Dask worker runs threads of its own
            )
            if self.server_lost:
                done.update(state="failed", error="the zmqruntime server stopped answering")
            else:
                self.live.flush(self._send_live, block=True)  # the last frame and progress
            self._send_frames(protocol.encode(done))
        except BaseException:
            self.reusable = False  # e.g. a result the server took nothing of for minutes
            raise
        finally:
            self.stop.set()
            self._wake_tx.send(b"")  # the next task may start at once: no wait for a poll
            io_thread.join(timeout=5)
            if io_thread.is_alive() or self.server_lost:
                self.reusable = False
        return done

    def _hello(self) -> dict[str, Any]:
        from distributed import get_worker

        try:
            worker = get_worker().address
        except ValueError:  # not in a Dask worker (a test calling run_task directly)
            worker = None
        hello = {"type": "hello", "id": self.exec_id, "worker": worker, "pid": os.getpid()}
        self.ctl.send_multipart([self.identity, *protocol.encode(hello)])
        deadline = time.monotonic() + HELLO_TIMEOUT
        while self.ctl.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = self.ctl.recv_multipart()
            if frames[0] != self.identity:
                continue  # a late reply to the link's previous task
            with contextlib.suppress(protocol.ProtocolError):
                return {**protocol.decode(frames[1:]), "answered": True}
        return {"type": "abort", "reason": "the zmqruntime server did not answer"}

    def _send(self, kind: str, body: dict[str, Any], reliable: bool) -> None:
        event = {"type": "event", "id": self.exec_id, "kind": kind, **body}
        if kind in latest.LIVE_KINDS and not reliable:  # newest wins, as in a native worker
            self.live.offer(latest.stream_key(kind, body), event, self._send_live)
        elif reliable:
            if self.live:  # a frame waiting for room goes before what follows it
                self.live.flush(self._send_live, block=True)
            self._send_frames(protocol.encode(event))
        else:
            with self.events_lock, contextlib.suppress(zmq.Again):
                msg = [self.identity, *protocol.encode(event)]
                self.events.send_multipart(msg, copy=False, flags=zmq.NOBLOCK)

    def _send_live(self, event: dict[str, Any], block: bool) -> zmq.MessageTracker | None:
        """Send a preview or progress event (LatestSlots' ``send``); zmq.Again when it
        cannot go without blocking."""
        if not block:
            if not self.events_lock.acquire(blocking=False):
                raise zmq.Again()
            try:
                msg = [self.identity, *protocol.encode(event)]
                return self.events.send_multipart(msg, copy=False, flags=zmq.NOBLOCK, track=True)
            finally:
                self.events_lock.release()
        self._send_frames(protocol.encode(event))
        return None

    def _send_frames(self, frames: list[Any]) -> None:
        """A reliable send: blocks while the server is behind, fails after SEND_TIMEOUT_MS."""
        with self.events_lock:
            try:
                self.events.send_multipart([self.identity, *frames], copy=False)
            except zmq.Again:
                raise OSError(
                    f"the zmqruntime server took nothing for {SEND_TIMEOUT_MS / 1000:g} s"
                ) from None

    # -- io thread
    def _io_loop(self) -> None:
        last_beat = last_flush = last_heard = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self.stop.is_set():
            wait = LOG_FLUSH_INTERVAL
            if self.interrupt_at is not None:
                wait = max(0.0, min(wait, self.interrupt_at - time.monotonic()))
            ready = dict(poller.poll(int(wait * 1000)))
            if self._wake_rx in ready:
                break
            if self.ctl in ready:
                frames = self.ctl.recv_multipart()
                if frames[0] == self.identity:  # else: meant for the link's previous task
                    with contextlib.suppress(protocol.ProtocolError):
                        msg = protocol.decode(frames[1:])
                        last_heard = time.monotonic()
                        if msg.get("type") == "cancel":
                            self._cancel()
            now = time.monotonic()
            if self.interrupt_at is not None and now >= self.interrupt_at:
                self.interrupt_at = None
                self.runner.interrupt()
            if now - last_flush >= LOG_FLUSH_INTERVAL:
                ctx = self.runner.current_ctx
                if ctx is not None and not self.events_lock.locked():
                    ctx.flush_logs()
                if self.live:  # previews and progress that found the pipe full
                    self.live.flush(self._send_live)
                last_flush = now
            if now - last_beat >= HEARTBEAT_INTERVAL:
                beat = protocol.encode({"type": "heartbeat"})
                self.ctl.send_multipart([self.identity, *beat])
                last_beat = now
            if now - last_heard > SERVER_TIMEOUT and not self.server_lost:
                self.server_lost = True  # nobody would store what this run makes: stop it
                self._cancel()

    def _cancel(self) -> None:
        if not self.runner.cancel_event.is_set():
            self.runner.cancel_event.set()
            self.interrupt_at = time.monotonic() + INTERRUPT_DELAY

    def close(self) -> None:
        self._wake_rx.close(linger=0)
        self._wake_tx.close(linger=0)
        if self.reusable:
            _give_back(self.link)  # the "done" leaves while the next task starts
        else:  # a server that did not answer, or a thread still on the link
            self.link.close(linger_ms=0 if self.server_lost else LINK_LINGER_MS)
        if self.results_dir is not None:
            shutil.rmtree(self.results_dir, ignore_errors=True)


class RemoteResultWriter:
    """What a native worker's ResultWriter does, over the wire: each result's bytes go to
    the server in a ``stored`` message (the server writes the file, then indexes it).

    Sends block while the server is behind (the socket's high-water mark), so memory stays
    bounded; everything is sent once ``submit`` returns, hence ``flush`` has nothing to do.
    """

    def __init__(self, session: TaskSession) -> None:
        self._session = session

    def submit(
        self, index: int, name: str, meta: dict, path: Path | None, value: Any, nbytes: int
    ) -> None:
        s = self._session
        msg = {"type": "stored", "id": s.exec_id, "index": index, "name": name, "meta": meta}
        frames = protocol.encode(msg)
        if path is not None:
            if isinstance(value, np.ndarray):
                payload = protocol.array_to_buffer(value)[0] if value.nbytes else b""
            else:
                payload = value
            frames.append(payload)
        s._send_frames(frames)

    def flush(self) -> None:
        """Nothing waits here: each result left in ``submit``."""


class _ThreadRoutedOutput(io.TextIOBase):
    """sys.stdout/stderr in a Dask worker: each thread that runs a pipeline writes to its
    run's log, every other thread to the original stream (a worker with several threads
    runs several pipelines at once; a process-wide redirect would mix their output)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.targets: dict[int, LogWriter] = {}

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        target = self.targets.get(threading.get_ident())
        return (target or self.original).write(s)

    def flush(self) -> None:
        if threading.get_ident() not in self.targets:
            with contextlib.suppress(Exception):
                self.original.flush()


_install_lock = threading.Lock()


@contextlib.contextmanager
def _capture_thread_output(writer: LogWriter):
    with _install_lock:
        routed = []
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _ThreadRoutedOutput):
                stream = _ThreadRoutedOutput(stream)
                setattr(sys, name, stream)
            routed.append(stream)
    me = threading.get_ident()
    for stream in routed:
        stream.targets[me] = writer
    try:
        yield
    finally:
        for stream in routed:
            stream.targets.pop(me, None)
