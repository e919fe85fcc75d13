"""Reading stored results into memory before the server sends them.

The server answers ``results`` (and ``wait`` with results) with arrays memory-mapped from
their files, and ZeroMQ's I/O thread reads them while it sends. Result files are written
with O_DIRECT, so they are rarely in the page cache: that I/O thread would wait on the
disk, and it is the one thread that serves every control connection, so a ping from
another client would wait behind a bulk fetch. Here a thread of its own faults the pages
in first; the reply is sent once they are resident, and the loop never waits.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any

import numpy as np
import zmq

PAGE = 4096


class Prefetcher:
    """Touches mapped buffers off the loop; tells the loop over an inproc socket."""

    def __init__(self, zctx: zmq.Context) -> None:
        self._url = f"inproc://zmqruntime-prefetch-{id(self)}"
        self.done = zctx.socket(zmq.PULL)  # the loop polls this and sends the replies
        self.done.bind(self._url)
        self._push = zctx.socket(zmq.PUSH)
        self._push.connect(self._url)
        self._jobs: queue.Queue[tuple[int, list[Any]] | None] = queue.Queue()
        self._pending: dict[int, Any] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def submit(self, buffers: list[Any], payload: Any) -> None:
        """Fault ``buffers`` in; then :meth:`ready` hands ``payload`` back to the loop."""
        job = next(self._ids)
        self._pending[job] = payload
        self._jobs.put((job, buffers))

    def ready(self) -> list[Any]:
        """Payloads whose buffers are resident now (call when ``done`` is readable)."""
        out = []
        while True:
            try:
                job = int(self.done.recv(zmq.NOBLOCK))
            except zmq.Again:
                return out
            out.append(self._pending.pop(job))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, buffers = item
            for buf in buffers:
                try:
                    view = np.frombuffer(buf, dtype=np.uint8)
                    if view.size:
                        np.bitwise_or.reduce(view[::PAGE])  # one read per page: all resident
                except (TypeError, ValueError, OSError):
                    pass  # not touchable here: the I/O thread reads it as before
            self._push.send(str(job).encode())
        self._push.close(linger=0)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        self.done.close(linger=0)
