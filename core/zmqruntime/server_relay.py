"""The event relay: worker events to the store and to watchers, on two data sockets.

The server decodes only the small header of a worker event (arrays stay msgpack ext
references), indexes results and log lines in the store, adds ``seq`` and ``t``, and
republishes it with the original buffer frames: on the local XPUB as is, and on the TCP
XPUB as is too unless its arrays lie in a worker's ring; then the prefetch thread copies
them out of the ring, off the loop (events after it wait in the same queue, so TCP
watchers see a run's events in order). An event is sent only where someone follows its
run (:class:`Watched`), and not even packed when nobody does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol, shm
from .errors import ProtocolError
from .messages import WorkerMessage
from .protocol import EventKind
from .runstate import RunState
from .server_core import Run

if TYPE_CHECKING:
    from .server import ExecutionServer

log = logging.getLogger("zmqruntime.server")

MAX_LOG_BYTES_PER_RUN = 64 * 1024 * 1024  # stored log text per run; more is live only


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


def _on_its_way(sent: Any) -> bool:
    """Whether a preview stream's last frame for TCP watchers is not through yet."""
    return sent is PREVIEW_QUEUED or (sent is not None and not sent.done)


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


class EventRelay:
    """Events of runs to watchers: relayed from workers, or made here (state, progress)."""

    def __init__(self, server: ExecutionServer) -> None:
        self.server = server
        self.data: zmq.Socket = server.data
        self.data_local: zmq.Socket = server.data_local
        self.prefetch = server.prefetch
        self.rings: shm.RingReader = server.rings
        # what watchers follow, per data socket: an event nobody follows is not even packed
        self.tcp_watch = Watched(self.data)
        self.local_watch = Watched(self.data_local)
        self._tcp_queued = 0  # TCP events waiting in the prefetch thread (kept in order)
        self._pending_runs: dict[str, Run] = {}  # runs with previews in pending_previews

    def on_worker_event(self, frames: list[Any]) -> None:
        """A worker's message on the events socket (or a Dask task's, forwarded): results
        and log lines indexed in the store, progress kept, the event relayed."""
        server = self.server
        try:
            msg = protocol.decode(frames, resolve_arrays=False)
        except ProtocolError:
            log.warning("a worker sent an undecodable event")
            return
        run = server.core.runs.get(msg.get("id", ""))
        if run is None or run.state is not RunState.RUNNING:
            return  # a late event of a run that already ended (e.g. killed on cancel)
        record = run.record
        if msg["type"] == WorkerMessage.DONE:
            server._on_done(run, msg)
            return
        if msg["type"] == WorkerMessage.STORED:  # on disk: from now on fetchable from the store
            meta, index = msg["meta"], msg["index"]
            server.store.add_result(
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
                server.store.add_log(record["id"], msg["index"], time.time(), msg["text"])
        elif kind == EventKind.PROGRESS.value:
            record["progress"] = msg.get("progress")
            if msg.get("message") is not None:
                record["message"] = msg["message"]
        del msg["type"]
        msg["seq"] = run.seq
        msg["t"] = time.time()
        run.seq += 1
        local, remote = self.watchers(msg["id"])
        if not (local or remote):
            return  # nobody follows this run: the seq still counts it
        frames = protocol.relay_event(msg, frames[2:])
        descriptor = msg.get("shm")
        with contextlib.suppress(zmq.ZMQError):
            if local:
                self.data_local.send_multipart(frames, copy=False)
        if remote:
            self.send_tcp(run, frames, msg, descriptor)

    def watchers(self, exec_id: str) -> tuple[bool, bool]:
        """Whether watchers on the local and on the TCP data socket follow this run."""
        topic = exec_id.encode()
        self.local_watch.update()  # subscriptions that arrived since the last loop turn
        self.tcp_watch.update()
        return self.local_watch.follows(topic), self.tcp_watch.follows(topic)

    def send_tcp(
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
            if _on_its_way(run.remote_previews.get(key)):
                # newest wins: the stream's last frame is still on its way, so this one
                # waits as the stream's pending newest (replacing an older one): its bytes
                # stay in the ring, unread, until it goes (send_pending_previews)
                run.pending_previews[key] = TcpEvent(run, frames, msg, descriptor, key)
                self._pending_runs[run.id] = run
                return
            run.remote_previews[key] = PREVIEW_QUEUED
        self._queue_tcp(TcpEvent(run, frames, msg, descriptor, key))

    def _queue_tcp(self, event: TcpEvent) -> None:
        self._tcp_queued += 1
        self.prefetch.run(functools.partial(event.load, self.rings), event)

    def send_pending_previews(self, run: Run | None = None) -> None:
        """Queue the pending previews whose stream's last frame is through (every loop
        turn), or all of one run's (``run``: before its final state, so they come first)."""
        if run is None and not self._pending_runs:
            return
        runs = [run] if run is not None else list(self._pending_runs.values())
        for r in runs:
            for key in list(r.pending_previews):
                if run is None and _on_its_way(r.remote_previews.get(key)):
                    continue
                r.remote_previews[key] = PREVIEW_QUEUED
                self._queue_tcp(r.pending_previews.pop(key))
            if not r.pending_previews:
                self._pending_runs.pop(r.id, None)

    def on_tcp_event_ready(self, event: TcpEvent, error: str | None) -> None:
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

    def publish(self, run: Run, kind: EventKind, body: dict[str, Any]) -> None:
        if kind is EventKind.STATE and run.pending_previews and run.state.final:
            self.send_pending_previews(run)  # a stream's last frame before the run's end
        seq = run.seq
        run.seq += 1
        local, remote = self.watchers(run.record["id"])
        if not (local or remote):
            return
        frames = protocol.event(run.record["id"], kind, seq, {**body, "t": time.time()})
        if local:
            with contextlib.suppress(zmq.ZMQError):
                self.data_local.send_multipart(frames, copy=False)
        if remote:
            self.send_tcp(run, frames)
