"""Data-channel consumption: live events with gap filling, and where results land.

A :class:`Subscription` reads one subscription's events, whichever way they come (the
TCP data port, or on the server's host its local socket plus the workers' shared
memory). ``follow`` turns one plus the control channel into the stream a caller wants:
every result exactly once and in order (missed ones are fetched from the server's
store), live progress/logs/previews, then the final state, then the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import protocol, shm
from .protocol import FINAL_STATES, EventKind
from .resultfile import VALUE_FILE_SUFFIX, aligned_copy, read_value, write_npy

log = logging.getLogger("zmqruntime.stream")

FetchResults = Callable[[str, int, int], Iterator[dict[str, Any]]]
GetStatus = Callable[[str], dict[str, Any]]


class Subscription:
    """A SUB socket on the data channel and the reader of the arrays its events carry.

    ``rings`` is set when the socket is the server's local one: large arrays then come
    as shared-memory descriptors and are copied out of the workers' rings. ``recv``
    returns parsed events either way; one whose arrays were overwritten before they
    could be read comes with ``overwritten: True`` and no value (a result is then
    fetched from the store; a preview is simply gone).
    """

    def __init__(self, socket: zmq.Socket, rings: shm.RingReader | None = None) -> None:
        self.socket = socket
        self.rings = rings

    @property
    def local(self) -> bool:
        """True if large arrays arrive through shared memory."""
        return self.rings is not None

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms))

    def recv(self, flags: int = 0) -> dict[str, Any]:
        """The next event (raises zmq.Again with NOBLOCK, ProtocolError if malformed)."""
        return protocol.parse_event(self.socket.recv_multipart(flags, copy=False), self.rings)

    def drain(self, limit: int = 256) -> list[dict[str, Any]]:
        """The events waiting now (at most ``limit``), in order, without blocking.

        Of several previews of one stream only the newest is read: a viewer that lags
        copies no frame it would not show. A malformed event is logged and skipped.
        """
        waiting = []
        for _ in range(limit):
            try:
                waiting.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        newest: dict[Any, int] = {}
        heads: list[dict[str, Any] | None] = []
        for i, frames in enumerate(waiting):
            try:
                head = protocol.parse_event(frames, self.rings, arrays=False)
            except protocol.ProtocolError as exc:
                log.warning("undecodable event on the data channel: %s", exc)
                head = None
            heads.append(head)
            if head is not None and head.get("kind") == EventKind.PREVIEW.value:
                newest[(head.get("id"), head.get("name"))] = i
        events = []
        for i, (frames, head) in enumerate(zip(waiting, heads)):
            if head is None:
                continue
            if head.get("kind") == EventKind.PREVIEW.value:
                if newest[(head.get("id"), head.get("name"))] != i:
                    continue  # a newer frame of this stream is already here
            try:
                events.append(protocol.parse_event(frames, self.rings))
            except protocol.ProtocolError as exc:
                log.warning("undecodable event on the data channel: %s", exc)
        return events

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.rings is not None:
            self.rings.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def follow(
    sub: Subscription,
    exec_id: str,
    get_status: GetStatus,
    fetch_results: FetchResults,
    *,
    previews: bool = True,
    poll_interval: float = 0.5,
) -> Iterator[dict[str, Any]]:
    """Yield the events of one run; ``sub`` is already subscribed to its topic."""
    status = get_status(exec_id)
    next_index = 0
    if status["state"] in FINAL_STATES:
        yield from fetch_results(exec_id, 0, status["n_results"])
        yield _state_event(status)
        return
    while True:
        if sub.poll(int(poll_interval * 1000)):
            # everything waiting at once, of each preview stream only the newest: a caller
            # that lags gets the newest frame next, and the queues behind it empty, so the
            # frames sent meanwhile (the last one of a run above all) are not dropped
            for event in sub.drain():
                if event.get("overwritten"):
                    continue  # a result: fetched from the store with the next one
                kind = event.get("kind")
                if kind == EventKind.RESULT.value:
                    index = event["index"]
                    if index < next_index:
                        continue
                    if index > next_index:  # dropped on the way: the store has them
                        yield from fetch_results(exec_id, next_index, index)
                    yield event
                    next_index = index + 1
                elif kind == EventKind.STATE.value:
                    status = event["status"]
                    if status["state"] in FINAL_STATES:
                        yield from fetch_results(exec_id, next_index, status["n_results"])
                        yield event
                        return
                    yield event
                elif kind == EventKind.PREVIEW.value and not previews:
                    continue
                else:
                    yield event
        else:  # quiet: the final state may have been dropped, so ask
            status = get_status(exec_id)
            if status["state"] in FINAL_STATES:
                yield from fetch_results(exec_id, next_index, status["n_results"])
                yield _state_event(status)
                return


def _state_event(status: dict[str, Any]) -> dict[str, Any]:
    return {"kind": EventKind.STATE.value, "id": status["id"], "seq": None, "status": status}


class MemorySink:
    """Results kept in memory: ``{name: [value, ...]}`` in emit order."""

    def __init__(self) -> None:
        self.results: dict[str, list[Any]] = {}

    def add(self, index: int, name: str, value: Any, meta: dict | None = None) -> None:
        self.results.setdefault(name, []).append(value)

    def close(self) -> dict[str, list[Any]]:
        return self.results


class DirectorySink:
    """Results written to disk as they arrive; nothing stays in memory.

    Layout: ``DIR/<index>-<name>.npy`` for arrays, ``.bin`` for large bytes, ``.zmqv`` for
    values that JSON cannot hold exactly (arrays inside, tuples, non-str keys, bytes,
    complex numbers; read one with :func:`zmqruntime.resultfile.read_value`), and
    ``DIR/index.json``: ``{"execution": id, "results": [{"index", "name", "kind", "file" |
    "value", "dtype", "shape", "meta"}]}``; values JSON holds exactly live in the index
    itself; ``meta`` (only where stated) is the result's image metadata (imagemeta).
    ``<name>`` is the result's name made safe for any filesystem: other characters become
    ``_`` and a long name is cut, with a hash of the whole name so that names stay distinct.
    """

    def __init__(self, directory: Path, exec_id: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.exec_id = exec_id
        self.entries: list[dict[str, Any]] = []
        self.results: dict[str, list[Any]] = {}

    def add(self, index: int, name: str, value: Any, meta: dict | None = None) -> None:
        stem = f"{index:06d}-{safe_file_stem(name)}"
        entry: dict[str, Any] = {"index": index, "name": name}
        if meta is not None:  # the image metadata the pipeline stated (imagemeta)
            entry["meta"] = meta
        if isinstance(value, np.ndarray):
            path = self.directory / f"{stem}.npy"
            write_npy(path, aligned_copy(value))  # O_DIRECT where possible: little CPU
            entry.update(
                kind="array", file=path.name, dtype=str(value.dtype), shape=list(value.shape)
            )
            out: Any = path
        elif isinstance(value, (bytes, bytearray, memoryview)):
            path = self.directory / f"{stem}.bin"
            path.write_bytes(value)
            entry.update(kind="bytes", file=path.name)
            out = path
        elif _json_exact(value):
            entry.update(kind="value", value=value)
            out = value
        else:
            path = self.directory / f"{stem}{VALUE_FILE_SUFFIX}"
            path.write_bytes(protocol.dumps(value))
            entry.update(kind="value", file=path.name)
            out = path
        self.entries.append(entry)
        self.results.setdefault(name, []).append(out)
        if len(self.entries) % 100 == 0:
            self._write_index()

    def _write_index(self) -> None:
        tmp = self.directory / "index.json.tmp"
        tmp.write_text(json.dumps({"execution": self.exec_id, "results": self.entries}, indent=1))
        os.replace(tmp, self.directory / "index.json")

    def close(self) -> dict[str, list[Any]]:
        self._write_index()
        return self.results


#: the longest file name stem written for a result name (well under every filesystem's 255)
MAX_STEM = 100


def safe_file_stem(name: str) -> str:
    """A file name stem for a result name: portable characters only, at most MAX_STEM long.

    A name that had to be changed gets a hash of the original, so that two names never
    share a file ("a/b" and "a_b" stay apart).
    """
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)
    safe = safe.lstrip(".") or "_"
    if safe == name and len(safe) <= MAX_STEM:
        return safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[: MAX_STEM - 13]}-{digest}"


def _json_exact(value: Any) -> bool:
    """Whether JSON gives this value back exactly (str keys, lists, finite numbers...)."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)
    if isinstance(value, float):
        return math.isfinite(value)
    if type(value) is list:
        return all(_json_exact(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _json_exact(v) for k, v in value.items())
    return False


def load_directory(directory: Path) -> dict[str, list[Any]]:
    """Read back what a DirectorySink wrote: arrays memory-mapped, values as stored."""
    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    out: dict[str, list[Any]] = {}
    for entry in index["results"]:
        if entry["kind"] == "array":
            value: Any = np.load(directory / entry["file"], mmap_mode="r")
        elif entry["kind"] == "bytes":
            value = (directory / entry["file"]).read_bytes()
        elif "file" in entry:
            value = read_value(directory / entry["file"])
        else:
            value = entry["value"]
        out.setdefault(entry["name"], []).append(value)
    return out
