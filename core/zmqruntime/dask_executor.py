"""Runs on a Dask cluster: the executor behind ``zmqruntime serve --dask SPEC``.

The server keeps its control and data channels, store, queue and states; this executor
replaces the native worker pool. Each run attempt is one Dask task (key = the run id, so
the dashboard names it; ``pure=False``, Dask's ``retries=0``) running
:func:`zmqruntime.dask_task.run_task` in a Dask worker; the task reports back over two
TCP sockets that this executor binds beside the server (see :mod:`zmqruntime.dask_task`).

Threads: the server's loop calls the interface below and handles the two sockets it
polls (task control, and the relay's inbox); a *relay* thread receives everything tasks
produce, writes result bytes to ``DATA_DIR/results/<id>/`` (so Dask workers need not share
the server's disk) and forwards the rest to the loop; a *dask* thread
(:class:`zmqruntime.dask_cluster.DaskCluster`) owns the Dask client (connect, submit,
cancel, restart, the cluster's figures for ``ping``), so no Dask call ever blocks the loop.

Exactly once: an attempt is accepted from one execution only (the first ``hello``); when
its worker dies, its task errs, stops sending heartbeats, or runs a second time (a
scheduler with ``allowed-failures`` > 0 re-ran it), the attempt is revoked under its lock:
from then on none of its messages is stored or relayed, and the server's ``retries``
decide whether a fresh attempt (a new task) runs, from nothing.

The interface (what the server calls; issue 18's executor seam): ``start(server)`` ->
sockets to poll, ``submit(run, task)``, ``cancel(run)``, ``hard_cancel(run, reason,
state)``, ``tick()``, ``info()``, ``shutdown()``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import protocol
from .dask_cluster import DaskCluster, ExecutorUnavailable, parse_adapt, parse_spec
from .dask_task import TASK_DOMAIN
from .resultfile import SUFFIXES
from .store import storage_failure
from .transport import ServerSecurity, tcp_url

__all__ = ["DaskExecutor", "ExecutorUnavailable", "parse_adapt", "parse_spec"]

log = logging.getLogger("zmqruntime.dask")

#: a task whose future finished while its run still runs: its "done" gets this long
DONE_SETTLE = 2.0


@dataclass(eq=False)
class Attempt:
    """One attempt of a run: one Dask task, accepted from one execution of it."""

    token: str
    run_id: str
    key: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    identity: bytes | None = None  # the execution that was told "go"
    route: bytes = b""  # the ROUTER's id of the connection it talks over (kept between tasks)
    worker: str | None = None  # its Dask worker's address
    revoked: bool = False
    store_failed: bool = False
    last_seen: float = 0.0
    ended_at: float | None = None  # its future finished (the "done" may still be on its way)


class DaskExecutor:
    """Runs the server's runs as Dask tasks (see the module's docstring)."""

    kind = "dask"

    def __init__(
        self,
        spec: str,
        adapt: tuple[int, int] | None = None,
        host: str | None = None,
        contact: str | None = None,
    ) -> None:
        self.spec = spec
        self.dask = DaskCluster(spec, adapt)  # raises ExecutorUnavailable: bad spec, no Dask
        self.host = host  # where the task sockets listen (default: the server's host)
        self.contact = contact  # the name Dask workers reach them by (default: host)
        self.attempts: dict[str, Attempt] = {}  # token -> attempt (read by the relay too)
        self.by_run: dict[str, str] = {}  # run id -> token of its current attempt
        self._stop = threading.Event()
        self._auth: ThreadAuthenticator | None = None

    # ------------------------------------------------------------------ interface
    def start(self, server: Any) -> list[tuple[zmq.Socket, Callable[[list], None]]]:
        """Bind the task sockets (CURVE), start the relay and dask threads; return the
        sockets the server's loop polls, with their handlers."""
        self.server = server
        zctx: zmq.Context = server.zctx
        key_dir = Path(server.ipc_dir) / "task-keys"  # the server's private temp dir
        key_dir.mkdir(mode=0o700)
        _, secret_file = zmq.auth.create_certificates(key_dir, "task")
        task_public, task_secret = zmq.auth.load_certificate(secret_file)
        Path(secret_file).unlink()  # the public key stays: the authenticator allows it
        server_public, server_secret = zmq.curve_keypair()
        self.task_keys = {"server": server_public, "public": task_public, "secret": task_secret}
        auth = server.security.authenticator if server.security is not None else None
        if auth is None:
            self._auth = auth = ThreadAuthenticator(zctx)
            auth.start()
        auth.configure_curve(domain=TASK_DOMAIN, location=str(key_dir))
        security = ServerSecurity(server_public, server_secret, key_dir)
        host = self.host or server.host
        contact = self.contact or (socket.getfqdn() if host in ("0.0.0.0", "::", "*") else host)
        base = tcp_url(host, 0).rsplit(":", 1)[0]
        self.ctl = zctx.socket(zmq.ROUTER)
        pull = zctx.socket(zmq.PULL)
        for sock in (self.ctl, pull):
            security.apply(sock)
            sock.zap_domain = TASK_DOMAIN.encode()
            sock.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 64)
        self.ctl_url = tcp_url(contact, self.ctl.bind_to_random_port(base))
        self.events_url = tcp_url(contact, pull.bind_to_random_port(base))
        inbox_url = f"inproc://zmqruntime-dask-{id(self)}"
        self.inbox = zctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(inbox_url)
        forward = zctx.socket(zmq.PUSH)
        forward.setsockopt(zmq.LINGER, 0)
        forward.connect(inbox_url)
        self._relay_thread = threading.Thread(
            target=self._relay_loop, args=(pull, forward), name="zmqruntime-dask-relay"
        )
        self._relay_thread.start()
        self.dask.start()
        log.info("Dask executor (%s): tasks report to %s and %s", self.spec, *self.endpoints())
        return [(self.ctl, self._on_ctl), (self.inbox, self._on_inbox)]

    def endpoints(self) -> tuple[str, str]:
        return self.ctl_url, self.events_url

    def submit(self, run: Any, task: dict[str, Any]) -> None:
        """Hand one attempt of ``run`` to Dask; the run stays queued until its task starts."""
        run_id = run.record["id"]
        done_before = run.record["attempts"]
        token = secrets.token_hex(8)
        key = run_id if done_before == 0 else f"{run_id}-attempt{done_before + 1}"
        self.attempts[token] = Attempt(token, run_id, key)
        self.by_run[run_id] = token
        run.worker = token
        spec = {
            "id": run_id,
            "token": token,
            "ctl": self.ctl_url,
            "events": self.events_url,
            "keys": self.task_keys,
            "task": task,
        }
        self.dask.submit(token, key, spec, run.resources)

    def cancel(self, run: Any) -> None:
        """Cooperative cancel (the task interrupts the pipeline 0.25 s later, as a native
        worker does); a task that has not started yet is withdrawn from Dask."""
        attempt = self._attempt_of(run)
        if attempt is None:
            return
        if attempt.identity is None:
            self._revoke(attempt)
            self.dask.cancel(attempt.token)
        else:
            self._reply(attempt.route, attempt.identity, {"type": "cancel"})

    def hard_cancel(self, run: Any, reason: str, state: str) -> None:
        """The grace period is over: its Dask worker is restarted, and the run ends now."""
        attempt = self._attempt_of(run)
        if attempt is None:
            return
        self._revoke(attempt)
        where = f" (Dask worker {attempt.worker} restarted)" if attempt.worker else ""
        self.dask.restart(attempt.token, attempt.worker)
        self.server._run_lost(run, reason + where, state)
        self.server._dispatch()

    def tick(self) -> None:
        """Outcomes of finished Dask futures; heartbeats; "done" messages that never came."""
        now = time.monotonic()
        for token, status, value in self.dask.outcomes():
            attempt = self.attempts.get(token)
            if attempt is not None:
                self._on_outcome(attempt, status, value, now)
        timeout = self.server.heartbeat_timeout
        for attempt in list(self.attempts.values()):
            if attempt.identity is None or attempt.revoked:
                continue
            if attempt.ended_at is not None and now - attempt.ended_at > DONE_SETTLE:
                self._lost(attempt, "its Dask task ended, but its last messages never arrived")
            elif now - attempt.last_seen > timeout:
                self._lost(attempt, f"its Dask task sent no heartbeat for {timeout:g} s")

    def info(self) -> dict[str, Any]:
        """For ping: the cluster as last seen by the dask thread (never a network call)."""
        out = self.dask.info()
        out["tasks"] = len(self.attempts)
        return out

    def shutdown(self) -> None:
        """Cancel running tasks, then close the client (and the cluster this server
        started: its batch jobs are cancelled), the relay and the sockets."""
        for attempt in list(self.attempts.values()):
            if attempt.identity is not None:
                self._reply(attempt.route, attempt.identity, {"type": "cancel"})
        self._stop.set()
        self.dask.stop(timeout=60)
        self._relay_thread.join(timeout=10)
        self.ctl.close(linger=0)
        self.inbox.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

    # ------------------------------------------------------------------ loop thread
    def _attempt_of(self, run: Any) -> Attempt | None:
        token = self.by_run.get(run.record["id"])
        return self.attempts.get(token) if token else None

    def _reply(self, route: bytes, identity: bytes, msg: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.ctl.send_multipart([route, identity, *protocol.encode(msg)], copy=False)

    def _on_ctl(self, frames: list[Any]) -> None:
        if len(frames) < 3:
            return
        route, identity = frames[0].bytes, frames[1].bytes  # a connection, an execution
        try:
            msg = protocol.decode(frames[2:])
        except protocol.ProtocolError:
            log.warning("a Dask task sent an undecodable control message")
            return
        attempt = self.attempts.get(identity.split(b".")[0].decode(errors="replace"))
        kind = msg.get("type")
        if kind == "heartbeat":
            if attempt is not None and attempt.identity == identity:
                attempt.last_seen = time.monotonic()
                attempt.route = route
                self._reply(route, identity, {"type": "ack"})
            else:  # an execution this server no longer wants: it stops
                self._reply(route, identity, {"type": "cancel"})
            return
        if kind != "hello":
            return
        run = self.server.runs.get(attempt.run_id) if attempt is not None else None
        if attempt is None or run is None or run.worker != attempt.token:
            self._reply(route, identity, {"type": "abort", "reason": "this run no longer wants it"})
        elif attempt.identity is None:
            with attempt.lock:
                attempt.identity = identity
            attempt.route = route
            attempt.worker = msg.get("worker")
            attempt.last_seen = time.monotonic()
            self.server._mark_running(run)
            self._reply(route, identity, {"type": "go"})
        elif attempt.identity != identity:
            # Dask ran this attempt again: its first worker died (allowed-failures > 0 on
            # that scheduler). Our retries decide, with a fresh task.
            self._reply(route, identity, {"type": "abort", "reason": "a second execution"})
            self._lost(attempt, f"Dask worker {attempt.worker} died (Dask started it again)")

    def _on_inbox(self, frames: list[Any]) -> None:
        """What the relay forwards: ``[b"E", identity, *event]`` or ``[b"F", identity,
        *store_failed]``; acted on only while the attempt is current."""
        identity = frames[1].bytes
        attempt = self.attempts.get(identity.split(b".")[0].decode(errors="replace"))
        if attempt is None or attempt.revoked or attempt.identity != identity:
            return
        run = self.server.runs.get(attempt.run_id)
        if run is None or run.worker != attempt.token:
            return
        if frames[0].bytes == b"F":
            reason = protocol.decode(frames[2:])["reason"]
            if run.record["state"] == "running":
                self.server._fail_run(run, reason)
            return
        self.server._on_worker_event(frames[2:])
        if run.record["state"] != "running" or run.worker != attempt.token:
            self._end(attempt)  # its "done" arrived: the run is over

    def _on_outcome(self, attempt: Attempt, status: str, value: Any, now: float) -> None:
        run = self.server.runs.get(attempt.run_id)
        if run is None or run.worker != attempt.token:
            self._end(attempt)
            return
        if status == "finished":
            attempt.ended_at = now  # its "done" normally arrived first; tick() waits a bit
            return
        what = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else status
        if attempt.identity is None:  # it failed before the pipeline could start
            self._revoke(attempt)
            error = f"the Dask task failed before the pipeline started ({what[:500]})"
            log.error("run %s: %s", attempt.run_id, error)
            self.server._finish(run, "failed", error=error, message=error)
            self.server._dispatch()
            return
        if type(value).__name__ == "KilledWorker":
            what = "KilledWorker"
        self._lost(attempt, f"Dask worker {attempt.worker} lost: {what[:300]}")

    def _lost(self, attempt: Attempt, why: str) -> None:
        """The attempt's execution is dead (or must be treated so): none of its messages
        counts from now on, and the server retries or fails the run."""
        self._revoke(attempt)
        self.dask.cancel(attempt.token)
        run = self.server.runs.get(attempt.run_id)
        if run is not None and run.worker == attempt.token and run.record["state"] == "running":
            self.server._run_lost(run, f"the worker process died ({why})")
            self.server._dispatch()

    def _revoke(self, attempt: Attempt) -> None:
        with attempt.lock:  # waits for a result file being written for it
            attempt.revoked = True
        self.attempts.pop(attempt.token, None)
        if self.by_run.get(attempt.run_id) == attempt.token:
            del self.by_run[attempt.run_id]

    def _end(self, attempt: Attempt) -> None:
        self._revoke(attempt)
        self.dask.release(attempt.token)

    # ------------------------------------------------------------------ relay thread
    def _relay_loop(self, pull: zmq.Socket, forward: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not pull.poll(200):
                    continue
                frames = pull.recv_multipart(copy=False)
                try:
                    self._relay(frames, forward)
                except Exception:  # one bad message costs itself
                    log.exception("relaying a Dask task's message failed")
        finally:
            pull.close(linger=0)
            forward.close(linger=0)

    def _relay(self, frames: list[Any], forward: zmq.Socket) -> None:
        if len(frames) < 3:
            return
        identity = frames[0].bytes
        attempt = self.attempts.get(identity.split(b".")[0].decode(errors="replace"))
        if attempt is None:
            return
        with attempt.lock:
            if attempt.revoked or attempt.identity != identity:
                return  # a dead attempt's late message: never mixed with the next one's
            header = protocol.decode(frames[1:3], resolve_arrays=False)
            if header.get("id") != attempt.run_id:
                log.warning("a Dask task sent a message for another run; dropped")
                return
            if header.get("type") != "stored":
                forward.send_multipart([b"E", *frames], copy=False)
                return
            if attempt.store_failed:
                return
            if len(frames) > 3:
                try:
                    self._write_result(attempt.run_id, header, frames[3])
                except OSError as exc:
                    attempt.store_failed = True
                    what = f"result {header.get('index')} of run {attempt.run_id}"
                    reason = storage_failure(what, self.server.data_dir, exc)
                    msg = {"type": "store_failed", "id": attempt.run_id, "reason": reason}
                    forward.send_multipart([b"F", identity, *protocol.encode(msg)])
                    return
            forward.send_multipart([b"E", identity, frames[1], frames[2]], copy=False)

    def _write_result(self, run_id: str, header: dict[str, Any], frame: Any) -> None:
        """Write one result file as a native worker would (same names and formats)."""
        meta = header["meta"]
        kind, index = meta.get("kind"), header.get("index")
        if kind not in SUFFIXES or not isinstance(index, int) or index < 0:
            raise OSError(f"a result header without a file kind or index: {kind!r} {index!r}")
        files = self.server.store.files.writer(run_id)  # the store names the file
        path = files.new_file(index, kind)
        if str(meta.get("file")) != path.name:
            raise OSError(f"bad result file name {meta.get('file')!r} (expected {path.name})")
        try:
            if kind == "array":
                files.write(
                    path,
                    protocol.buffer_to_array(
                        frame.buffer, meta["dtype"], meta["shape"], meta.get("order", "C")
                    ),
                )
            else:
                files.write(path, frame.buffer)
        except protocol.ProtocolError as exc:
            path.unlink(missing_ok=True)
            raise OSError(f"a damaged result: {exc}") from None
        except OSError:
            path.unlink(missing_ok=True)  # a partial file: give its space back
            raise
