"""The QThread that follows one run on the data channel.

It subscribes to the run's topic (on the server's host, large frames come through
shared memory) and sorts what arrives into a :class:`FollowBox`:
the newest preview frame per stream (older unread ones are simply replaced), the
newest progress and state, log lines and result notices. It emits no signal per
event: the GUI's timers read the box at their own pace, so a camera at 100 fps costs
the event loop nothing but the frames it actually draws. The thread also prepares
the next frame to draw (block-averaged to screen resolution), once the view has taken
the previous one, so that work stays off the GUI thread too.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import zmq
from PySide6 import QtCore

from zmqruntime import EventKind, ExecutionClient

from .model import FollowBox

log = logging.getLogger("zmqruntime_gui")

POLL_MS = 10  # also how soon a frame taken by the view is followed by the next
DRAIN_LIMIT = 256
#: events waiting in this process at most: the view wants the newest frame only, and
#: whatever else is dropped (logs, results) is fetched from the server by index
RCV_HWM = 2


class RunFollower(QtCore.QThread):
    """Subscribe to ``box.key``'s events until stopped or until the run ends."""

    def __init__(
        self, client: ExecutionClient, box: FollowBox, parent: QtCore.QObject | None = None
    ) -> None:
        super().__init__(parent)
        self.client = client
        self.box = box
        self._stop = threading.Event()
        self.setObjectName(f"follow-{box.key.exec_id}")

    def stop(self) -> None:
        """Ask the thread to end (within one poll interval); does not wait."""
        self._stop.set()

    def run(self) -> None:
        try:
            sub = self.client.subscribe(self.box.key.exec_id, hwm=RCV_HWM)
        except Exception as exc:  # the server went away before we could subscribe
            self.box.error = f"cannot follow {self.box.key.exec_id}: {exc}"
            return
        box = self.box
        box.preparer = self
        box.preparer_alive = True
        try:
            while not self._stop.is_set() and not box.finished:
                if sub.poll(POLL_MS):
                    # newest wins here too: of a burst of frames only the last is copied
                    for event in sub.drain(DRAIN_LIMIT):
                        self._handle(event)
                # the view's next frame is made ready here, off the GUI thread
                box.prepare_newest()
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                self.box.error = f"data channel error: {exc}"
        finally:
            if box.preparer is self:  # a follower that replaced this one keeps preparing
                box.preparer_alive = False
            sub.close()

    def _handle(self, event: dict) -> None:
        kind = event.get("kind")
        box = self.box
        if kind == EventKind.PREVIEW.value:
            value = event.get("value")
            if isinstance(value, np.ndarray):
                box.put_frame(
                    str(event.get("name", "preview")),
                    value,
                    event.get("seq"),
                    event.get("t"),
                    event.get("meta"),
                )
        elif kind == EventKind.PROGRESS.value:
            box.put_progress(
                event.get("progress"), event.get("message"), event.get("done"), event.get("total")
            )
        elif kind == EventKind.LOG.value and event.get("partial"):
            pass  # a line still being redrawn (a progress bar): its last version comes stored
        elif kind == EventKind.LOG.value:
            box.put_log(event.get("index"), str(event.get("text", "")), event.get("t"))
        elif kind == EventKind.RESULT.value:
            box.put_result(int(event.get("index", -1)), str(event.get("name", "")))
        elif kind == EventKind.STATE.value:
            status = event.get("status")
            if isinstance(status, dict):
                box.put_status(status)
