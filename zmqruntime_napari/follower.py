"""The thread that follows a run's previews for a viewer: newest frame per stream wins.

Qt-free and napari-free, the same design as the desktop app's follower
(``zmqruntime_gui.follower``): the thread does every network call (connect, find the
run, subscribe, receive) and keeps only the newest frame of each preview stream in a
box; the viewer's timer takes what is there at its own pace. A camera at 100 fps costs
the viewer's event loop nothing but the frames it draws.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from zmqruntime import ExecutionClient
from zmqruntime.protocol import FINAL_STATES, EventKind

POLL_MS = 10
#: events waiting in this process at most (the viewer wants the newest frame only)
RCV_HWM = 2
#: how often a follower without a run looks for one
FIND_INTERVAL = 0.25


@dataclass
class Frame:
    """One preview frame: its stream name, array, image metadata (or None) and count."""

    name: str
    value: Any
    meta: dict[str, Any] | None
    number: int


class PreviewFollower(threading.Thread):
    """Follow run ``exec_id`` (None: the newest running or queued run, once there is one)
    on the server at ``host:port``; read frames with :meth:`take`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5555,
        exec_id: str | None = None,
        *,
        keys: str | None = None,
        timeout: float = 3.0,
    ) -> None:
        super().__init__(name=f"zmqruntime-preview-{host}:{port}", daemon=True)
        self.host, self.port, self.keys, self.timeout = host, int(port), keys, timeout
        self.exec_id = exec_id
        self.state: str | None = None
        self.error: str | None = None
        self.received = 0
        self._stop_event = threading.Event()
        self._frames_lock = threading.Lock()
        self._newest: dict[str, Frame] = {}

    # -- the viewer's side
    def take(self) -> list[Frame]:
        """The newest frame of each stream that arrived since the last call."""
        with self._frames_lock:
            frames, self._newest = list(self._newest.values()), {}
        return frames

    def stop(self, wait: float | None = 2.0) -> None:
        """End the thread (within one poll interval)."""
        self._stop_event.set()
        if wait is not None and self.is_alive() and threading.current_thread() is not self:
            self.join(wait)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES or self.error is not None

    # -- the thread
    def run(self) -> None:
        try:
            client = ExecutionClient(
                port=self.port,
                host=self.host,
                auto_spawn=False,
                timeout=self.timeout,
                keys=self.keys,
            )
        except Exception as exc:  # bad keys...
            self.error = f"cannot connect to {self.host}:{self.port}: {exc}"
            return
        try:
            self._follow(client)
        except Exception as exc:  # the server went away: say so, never raise in a thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()

    def _follow(self, client: ExecutionClient) -> None:
        while self.exec_id is None:
            runs = client.list_executions(limit=1, states=["running", "queued"])
            if runs:
                self.exec_id = runs[0]["id"]
            elif self._stop_event.wait(FIND_INTERVAL):
                return
        sub = client.subscribe(self.exec_id, hwm=RCV_HWM)
        try:
            self.state = client.get_status(self.exec_id)["state"]
            last_check = time.monotonic()
            while not self._stop_event.is_set() and self.state not in FINAL_STATES:
                if sub.poll(POLL_MS):
                    for event in sub.drain():
                        self._on_event(event)
                elif time.monotonic() - last_check > 1.0:  # a dropped final state
                    self.state = client.get_status(self.exec_id)["state"]
                    last_check = time.monotonic()
        finally:
            sub.close()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == EventKind.PREVIEW.value and not event.get("overwritten"):
            self.received += 1
            name = event["name"]
            frame = Frame(name, event["value"], event.get("meta"), self.received)
            with self._frames_lock:
                self._newest[name] = frame
        elif kind == EventKind.STATE.value:
            self.state = event["status"]["state"]
