"""Newest-wins delivery of live values: a preview stream's frames, a run's progress.

A live value that cannot go now (the pipe to the server is full, or the stream's last
frame is still on its way) is not dropped: it is kept as its stream's *pending newest*,
replacing an older pending one, and goes as soon as there is room (the next send, the io
thread's next turn) and at the latest before the run's ``done``. A watcher may miss the
frames in between, never a stream's last one, and progress never sticks short of where
the pipeline got (a dropped ``progress(1, 1)`` once did, for the whole run).

Used by the native worker and by a Dask task, which send their events the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import zmq

#: event kinds whose newest value supersedes the older ones
LIVE_KINDS = frozenset({"preview", "progress"})

#: ``send(body, block)``: sends one live event and returns its tracker (or None); raises
#: zmq.Again when it cannot go without blocking and ``block`` is False
Send = Callable[[dict[str, Any], bool], "zmq.MessageTracker | None"]


def stream_key(kind: str, body: dict[str, Any]) -> Hashable:
    """Which stream a live event belongs to: one per preview name, one for progress."""
    return (kind, body.get("name")) if kind == "preview" else (kind,)


class LatestSlots:
    """Per live stream: the tracker of the frame on its way, and the pending newest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[Hashable, zmq.MessageTracker] = {}
        self._pending: dict[Hashable, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def offer(self, key: Hashable, body: dict[str, Any], send: Send) -> None:
        """Send ``body`` now if its stream is free and the pipe has room; else keep it
        as the stream's pending newest (a copy of its array: the pipeline may reuse it)."""
        with self._lock:
            self._flush(send, block=False)
            if key not in self._pending and not self._busy(key):
                try:
                    self._track(key, send(body, False))
                    return
                except zmq.Again:
                    pass
            self._pending[key] = _kept(body, self._pending.get(key))

    def flush(self, send: Send, block: bool = False) -> None:
        """Send the pending values whose streams are free (``block``: all of them, waiting
        for room; before a run's ``done``, so that its last values arrive first)."""
        with self._lock:
            self._flush(send, block)

    def clear(self) -> None:
        """Forget everything (a new run starts)."""
        with self._lock:
            self._pending.clear()
            self._in_flight.clear()

    def _flush(self, send: Send, block: bool) -> None:
        for key in list(self._pending):
            if not block and self._busy(key):
                continue
            try:
                tracker = send(self._pending[key], block)
            except zmq.Again:
                return  # the pipe is full: the rest wait too
            del self._pending[key]
            self._track(key, tracker)

    def _busy(self, key: Hashable) -> bool:
        tracker = self._in_flight.get(key)
        return tracker is not None and not tracker.done

    def _track(self, key: Hashable, tracker: zmq.MessageTracker | None) -> None:
        if tracker is None:
            self._in_flight.pop(key, None)
        else:
            self._in_flight[key] = tracker


def _kept(body: dict[str, Any], older: dict[str, Any] | None) -> dict[str, Any]:
    """``body`` with a private copy of its array, in the older pending one's buffer when
    it fits (a stream that lags at every frame then copies into one buffer, not many)."""
    value = body.get("value")
    if not isinstance(value, np.ndarray):
        return body
    old = older.get("value") if older is not None else None
    if (
        isinstance(old, np.ndarray)
        and old.shape == value.shape
        and old.dtype == value.dtype
        and not value.dtype.hasobject
    ):
        np.copyto(old, value)
        return {**body, "value": old}
    return {**body, "value": np.array(value, copy=True)}
