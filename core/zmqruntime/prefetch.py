"""Reading what a reply or an event carries into memory before the server sends it,
off its loop: stored results from their files, and large arrays out of workers' rings.

The server answers ``results`` (and ``wait`` with results) with arrays read from their
files. Reading in the loop would hold up every other request; mapping the files and
letting ZeroMQ's I/O thread read them while it sends would hold up every control
connection instead (one I/O thread serves them all, and result files are written with
O_DIRECT, so they are seldom in the page cache). Here a thread of its own reads them
(O_DIRECT too: about twice as fast as faulting pages in), and the loop sends the reply
once they are in memory. Copies out of a ring for TCP watchers are done here too.
Jobs finish in the order they were submitted.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from .resultfile import Read, read_into  # Read: file, offset of the data, where it goes

Work = Callable[[], str | None]  # runs in the prefetch thread; an error message or None


class Prefetcher:
    """Fills arrays from files off the loop; tells the loop over an inproc socket."""

    def __init__(self, zctx: zmq.Context) -> None:
        self._url = f"inproc://zmqruntime-prefetch-{id(self)}"
        self.done = zctx.socket(zmq.PULL)  # the loop polls this and sends the replies
        self.done.bind(self._url)
        self._push = zctx.socket(zmq.PUSH)
        self._push.connect(self._url)
        self._jobs: queue.Queue[tuple[int, Work] | None] = queue.Queue()
        self._pending: dict[int, Any] = {}
        self._errors: dict[int, str] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def submit(self, reads: list[Read], payload: Any) -> None:
        """Do ``reads``; then :meth:`ready` hands ``payload`` back to the loop."""
        self.run(lambda: _read_files(reads), payload)

    def run(self, work: Work, payload: Any) -> None:
        """Call ``work`` in the thread; then :meth:`ready` hands ``payload`` back."""
        job = next(self._ids)
        self._pending[job] = payload
        self._jobs.put((job, work))

    def ready(self) -> list[tuple[Any, str | None]]:
        """``(payload, error)`` of every job done (call when ``done`` is readable); error
        is None when every read succeeded, else what went wrong."""
        out: list[tuple[Any, str | None]] = []
        while True:
            try:
                job = int(self.done.recv(zmq.NOBLOCK))
            except zmq.Again:
                return out
            out.append((self._pending.pop(job), self._errors.pop(job, None)))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, work = item
            try:
                error = work()
            except Exception as exc:  # a bug costs this job, never the thread
                error = f"internal error: {type(exc).__name__}: {exc}"
            if error is not None:
                self._errors[job] = error
            self._push.send(str(job).encode())
        self._push.close(linger=0)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        self.done.close(linger=0)


def _read_files(reads: list[Read]) -> str | None:
    for path, offset, out in reads:
        try:
            read_into(path, offset, out)
        except OSError as exc:  # gone (retention) or unreadable: the reply says so
            return f"stored result {Path(path).name} unreadable: {exc}"
    return None
