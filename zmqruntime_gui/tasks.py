"""Run blocking calls off the GUI thread and deliver their outcome back on it.

``TaskRunner.submit(fn, on_done, on_error, key=...)`` runs ``fn()`` in a thread pool;
its return value (or exception) comes back to ``on_done`` / ``on_error`` on the GUI
thread. Outcomes travel in a plain Python queue and only an argument-less signal
crosses threads to wake the GUI thread, so no Python object is ever owned by Qt's
queued-call machinery. A ``key`` keeps at most one task of that key in flight: a poll
of a dead server that is still waiting is not stacked up behind by the next tick.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

from PySide6 import QtCore

log = logging.getLogger("zmqruntime_gui")

Callback = Callable[[Any], object] | None  # what it returns is ignored


class TaskRunner(QtCore.QObject):
    """A thread pool whose results arrive as calls on the GUI thread."""

    sigWake = QtCore.Signal()

    def __init__(self, max_threads: int = 16, parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="zmqruntime-gui"
        )
        self._lock = threading.Lock()
        self._next = 0
        self._pending: dict[int, tuple[Callback, Callback, str | None]] = {}
        self._futures: set[concurrent.futures.Future] = set()
        self._keys: set[str] = set()
        self._done: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
        self._closed = False
        self.sigWake.connect(self._deliver, QtCore.Qt.ConnectionType.QueuedConnection)

    def submit(
        self,
        fn: Callable[[], Any],
        on_done: Callback = None,
        on_error: Callback = None,
        key: str | None = None,
    ) -> bool:
        """Start ``fn`` in the pool; False (and nothing started) when ``key`` is busy."""
        with self._lock:
            if self._closed or (key is not None and key in self._keys):
                return False
            self._next += 1
            token = self._next
            self._pending[token] = (on_done, on_error, key)
            if key is not None:
                self._keys.add(key)
            future = self._pool.submit(self._run, token, fn)
            self._futures.add(future)
        future.add_done_callback(self._forget_future)
        return True

    def _forget_future(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def _run(self, token: int, fn: Callable[[], Any]) -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # delivered to on_error on the GUI thread
            result, error = None, exc
        if self._closed:
            return
        self._done.put((token, result, error))
        self.sigWake.emit()

    def busy(self, key: str) -> bool:
        with self._lock:
            return key in self._keys

    @QtCore.Slot()
    def _deliver(self) -> None:
        while True:
            try:
                token, result, error = self._done.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                entry = self._pending.pop(token, None)
                if entry is None:
                    continue
                on_done, on_error, key = entry
                if key is not None:
                    self._keys.discard(key)
            try:
                if error is None:
                    if on_done is not None:
                        on_done(result)
                elif on_error is not None:
                    on_error(error)
                else:
                    log.warning(
                        "background task failed: %s",
                        "".join(traceback.format_exception(error)).strip(),
                    )
            except Exception:  # a bad callback must not take the event loop down
                log.exception("error in a task callback")

    def shutdown(self, wait_s: float = 8.0) -> bool:
        """Drop queued jobs and wait for running ones (each bounded by its timeout)."""
        with self._lock:
            self._closed = True
            futures = list(self._futures)
        for f in futures:
            f.cancel()
        _, not_done = concurrent.futures.wait(futures, timeout=wait_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return not not_done
