"""The native worker supervisor: spawn, heartbeat, exit, backoff.

:class:`NativeSupervisor` runs the server's runs on pre-started worker processes
(``python -m zmqruntime.worker``). It plugs into the server beside the Dask executor
(:class:`zmqruntime.dask_executor.DaskExecutor`) through the same small interface:
``start(server)`` binds its sockets and returns them with their handlers for the
server's loop to poll; ``cancel(run)``, ``hard_cancel(run, reason, state)``, ``tick()``,
``info()`` and ``shutdown()``. Where the Dask executor takes every queued run
(``submit``), the native supervisor takes one per idle worker (``dispatch``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol
from .errors import ProtocolError
from .messages import WorkerMessage
from .runstate import RunState
from .server_core import Run

if TYPE_CHECKING:
    from .server import ExecutionServer

log = logging.getLogger("zmqruntime.server")

WORKER_START_TIMEOUT = 60.0
MAX_RESPAWN_DELAY = 30.0  # workers that keep dying before they are ready: back off up to this
EXIT_SETTLE = 0.2  # seconds a dead worker's last messages get to arrive


@dataclass
class WorkerHandle:
    wid: str
    proc: subprocess.Popen
    started: float
    ready: bool = False
    retiring: bool = False
    exited_at: float | None = None
    current: str | None = None
    last_seen: float = 0.0


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class NativeSupervisor:
    """The server's worker processes: one run at a time each, replaced when they die."""

    def __init__(self, n_workers: int) -> None:
        self.n_workers = n_workers
        self.workers: dict[str, WorkerHandle] = {}
        self._counter = 0
        self._start_failures = 0  # workers in a row that died before they were ready
        self._respawn_due: list[float] = []  # monotonic times at which to start a worker

    # ------------------------------------------------------------------ interface
    def start(self, server: ExecutionServer) -> list[tuple[zmq.Socket, Callable[[list], None]]]:
        """Bind the workers' sockets (ipc in the server's private dir), start the workers;
        return the sockets the server's loop polls, with their handlers."""
        self.server = server
        self.ctl = server.zctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.events = server.zctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.AFFINITY, server.bulk_affinity)
        self.events.setsockopt(zmq.LINGER, 0)
        if zmq.has("ipc") and os.name != "nt":
            self.ctl_url = f"ipc://{server.ipc_dir}/ctl"
            self.events_url = f"ipc://{server.ipc_dir}/events"
            self.ctl.bind(self.ctl_url)
            self.events.bind(self.events_url)
        else:  # pragma: no cover - Windows
            p1 = self.ctl.bind_to_random_port("tcp://127.0.0.1")
            p2 = self.events.bind_to_random_port("tcp://127.0.0.1")
            self.ctl_url = f"tcp://127.0.0.1:{p1}"
            self.events_url = f"tcp://127.0.0.1:{p2}"
        for _ in range(self.n_workers):
            self.spawn()
        return [(self.ctl, self.on_ctl), (self.events, server._on_worker_event)]

    def info(self) -> dict[str, Any]:
        return {"kind": "native", "workers": self.n_workers}

    def busy(self) -> int:
        return sum(1 for w in self.workers.values() if w.current)

    def ready(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready)

    def cancel(self, run: Run) -> None:
        """Cooperative cancel (the worker interrupts the pipeline 0.25 s later)."""
        if run.worker:
            self.send(run.worker, {"type": WorkerMessage.CANCEL.value, "id": run.id})

    def hard_cancel(self, run: Run, reason: str, state: str) -> None:
        """The grace period is over: the run's worker is killed (and replaced)."""
        handle = self.workers.get(run.worker or "")
        if handle is None:
            return
        log.info(
            "run %s ignored cancel for %.1f s: killing worker %s",
            run.id,
            self.server.cancel_grace,
            handle.wid,
        )
        self.kill(handle, reason, state)

    def dispatch(self) -> None:
        """Queued runs to idle workers, oldest first."""
        core = self.server.core
        idle = [
            w
            for w in self.workers.values()
            if w.ready and w.current is None and w.exited_at is None
        ]
        while core.queue and idle:
            worker = idle.pop(0)
            code = worker.proc.poll()
            if code is not None:  # died since the last tick: a run sent to it would be lost
                self.on_exit(worker, code)
                continue
            exec_id = core.queue.popleft()
            run = core.runs[exec_id]
            worker.current = exec_id
            run.worker = worker.wid
            task = core.next_task(run)  # read from the store after a restart
            self.send(worker.wid, {"type": WorkerMessage.TASK.value, "id": exec_id, **task})
            core.start(run)

    def on_done(self, run: Run, retiring: bool) -> None:
        """The run's worker reported its end: it is idle again, or retires."""
        worker = self.workers.get(run.worker or "")
        if worker is not None:
            worker.current = None
            if retiring:  # interrupted: it exits and a fresh worker replaces it
                worker.ready, worker.retiring = False, True

    def tick(self) -> None:
        """Exits (after their last messages had time to arrive), heartbeats, start
        timeouts, and the workers whose restart was put off."""
        now = time.monotonic()
        if self._respawn_due and min(self._respawn_due) <= now:
            self._respawn_due.remove(min(self._respawn_due))
            self.spawn()
        timeout = self.server.heartbeat_timeout
        for worker in list(self.workers.values()):
            code = worker.proc.poll()
            if code is not None:
                # its last messages (a "done") may still be on their way through
                # the socket: let them arrive before judging what became of its run
                if worker.exited_at is None:
                    worker.exited_at = now
                elif now - worker.exited_at >= EXIT_SETTLE:
                    self.on_exit(worker, code)
            elif worker.ready and now - worker.last_seen > timeout:
                log.warning(
                    "worker %s sent no heartbeat for %.1f s: killing it",
                    worker.wid,
                    now - worker.last_seen,
                )
                self.kill(worker, f"worker hung: no heartbeat for {timeout:g} s")
            elif not worker.ready and now - worker.started > WORKER_START_TIMEOUT:
                log.error("worker %s did not start within %.0f s", worker.wid, WORKER_START_TIMEOUT)
                self.kill(worker, "worker failed to start")

    def shutdown(self) -> None:
        for worker in self.workers.values():
            self.send(worker.wid, {"type": WorkerMessage.SHUTDOWN.value})
        deadline = time.monotonic() + 2.0
        for worker in list(self.workers.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()

    def close(self) -> None:
        for sock in (getattr(self, "ctl", None), getattr(self, "events", None)):
            if sock is not None:
                sock.close(linger=0)

    # ------------------------------------------------------------------ workers
    def spawn(self) -> None:
        self._counter += 1
        wid = f"w{self._counter}"
        cmd = [
            sys.executable,
            "-m",
            "zmqruntime.worker",
            "--id",
            wid,
            "--control",
            self.ctl_url,
            "--events",
            self.events_url,
            "--data-dir",
            str(self.server.data_dir),
        ]
        with open(self.server.log_file, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.workers[wid] = WorkerHandle(wid, proc, time.monotonic(), last_seen=time.monotonic())

    def send(self, wid: str, msg: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.ctl.send_multipart([wid.encode(), *protocol.encode(msg)], copy=False)

    def on_ctl(self, frames: list[Any]) -> None:
        wid = frames[0].bytes.decode()
        worker = self.workers.get(wid)
        if worker is None:
            return
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError:
            log.warning("worker %s sent an undecodable message", wid)
            return
        worker.last_seen = time.monotonic()
        if msg.get("type") == WorkerMessage.READY and not worker.ready:
            worker.ready = True
            self._start_failures = 0
            log.info("worker %s ready (pid %s)", wid, msg.get("pid"))
            self.server._dispatch()

    def kill(self, worker: WorkerHandle, reason: str, state: str = "failed") -> None:
        with contextlib.suppress(OSError):
            worker.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=5)
        self.on_exit(worker, worker.proc.returncode, reason=reason, state=state)

    def on_exit(
        self,
        worker: WorkerHandle,
        code: int | None,
        reason: str | None = None,
        state: str = "failed",
    ) -> None:
        server = self.server
        self.workers.pop(worker.wid, None)
        server.rings.forget(worker.proc.pid)  # its ring's memory goes with it
        if worker.current and reason is None:
            # its last words (a "done") may still wait in the socket: hear them first
            server._drain(self.events, server._on_worker_event, 10_000)
        run = server.core.runs.get(worker.current or "")
        if run is not None and run.state is RunState.RUNNING and run.worker == worker.wid:
            if reason is None:
                reason = f"the worker process died ({describe_exit(code)})"
            server.core.run_lost(run, reason, state)
        elif worker.retiring:
            log.info(
                "worker %s retired after its run (interrupted, or threads left running); "
                "starting a fresh one",
                worker.wid,
            )
        elif reason is None and not server._stopping and worker.ready:
            log.warning("worker %s exited (%s)", worker.wid, describe_exit(code))
        if server._stopping:
            return
        if worker.ready or worker.retiring:
            self.spawn()
            return
        # it never started (a broken environment?): retry, but not in a tight loop
        self._start_failures += 1
        delay = min(MAX_RESPAWN_DELAY, 0.5 * 2 ** (self._start_failures - 1))
        log.warning(
            "worker %s died before it was ready (%s); starting another in %.1f s "
            "(its output is above)",
            worker.wid,
            describe_exit(code),
            delay,
        )
        self._respawn_due.append(time.monotonic() + delay)
