"""Runs on a Dask cluster: the executor behind ``zmqruntime serve --dask SPEC``.

The server keeps its control and data channels, store, queue and states; this executor
replaces the native worker pool. Each run attempt is one Dask task (key = the run id, so
the dashboard names it; ``pure=False``, Dask's ``retries=0``) running
:func:`zmqruntime.dask_task.run_task` in a Dask worker; the task reports back over two
TCP sockets that this executor binds beside the server (see :mod:`zmqruntime.dask_task`).

Threads: the server's loop calls the interface below and handles the two sockets it
polls (task control, and the relay's inbox); a *relay* thread receives everything tasks
produce, writes result bytes to ``DATA_DIR/results/<id>/`` (so Dask workers need not share
the server's disk) and forwards the rest to the loop; a *dask* thread owns the Dask client
(connect, submit, cancel, restart, the cluster's figures for ``ping``), so no Dask call
ever blocks the loop.

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
import queue
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
from .dask_task import TASK_DOMAIN, run_task
from .resultfile import write_npy
from .store import storage_failure
from .transport import ServerSecurity, is_loopback, tcp_url

log = logging.getLogger("zmqruntime.dask")

#: ``--dask`` names of dask-jobqueue's cluster classes
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "htcondor": "HTCondorCluster",
}
#: a task whose future finished while its run still runs: its "done" gets this long
DONE_SETTLE = 2.0
INFO_INTERVAL = 1.0
RECONNECT_DELAY = 5.0
#: jobqueue clusters scale with the queue between these when --dask-adapt is not given
DEFAULT_JOBQUEUE_ADAPT = (0, 1)


class ExecutorUnavailable(RuntimeError):
    """--dask was asked for, but what it needs is not installed or the spec is wrong."""


def parse_spec(spec: str) -> tuple[str, Any]:
    """``local:N`` -> ("local", N); ``slurm`` etc. -> ("jobqueue", class name); anything
    else is a scheduler address -> ("address", spec)."""
    spec = spec.strip()
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            workers = int(n) if n else 1
        except ValueError:
            raise ExecutorUnavailable(f"--dask {spec}: expected local:N (N workers)") from None
        if workers < 1:
            raise ExecutorUnavailable(f"--dask {spec}: N must be at least 1")
        return "local", workers
    if spec.lower() in JOBQUEUE:
        return "jobqueue", spec.lower()
    if not spec:
        raise ExecutorUnavailable("--dask needs ADDRESS, local:N or one of " + ", ".join(JOBQUEUE))
    return "address", spec


def parse_adapt(text: str | None) -> tuple[int, int] | None:
    """``MIN:MAX`` -> (MIN, MAX)."""
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        minimum, maximum = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ExecutorUnavailable(f"--dask-adapt {text}: expected MIN:MAX (two integers)") from None
    if not 0 <= minimum <= maximum:
        raise ExecutorUnavailable(f"--dask-adapt {text}: expected 0 <= MIN <= MAX")
    return minimum, maximum


def check_installed(kind: str) -> None:
    """Raise ExecutorUnavailable naming the extra when Dask (or dask-jobqueue) is missing."""
    needed = ["distributed"] + (["dask_jobqueue"] if kind == "jobqueue" else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as exc:
            raise ExecutorUnavailable(
                f"--dask needs {module.replace('_', '-')} ({exc}): pip install 'zmqruntime[dask]'"
            ) from None


@dataclass(eq=False)
class Attempt:
    """One attempt of a run: one Dask task, accepted from one execution of it."""

    token: str
    run_id: str
    key: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    identity: bytes | None = None  # the execution that was told "go"
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
        self.cluster_kind, self.cluster_arg = parse_spec(spec)
        check_installed(self.cluster_kind)
        if adapt is not None and self.cluster_kind == "address":
            raise ExecutorUnavailable(
                "--dask-adapt scales a cluster this server starts (local:N or a job queue); "
                "an existing scheduler's cluster scales where it was started"
            )
        if adapt is None and self.cluster_kind == "jobqueue":
            adapt = DEFAULT_JOBQUEUE_ADAPT
        self.adapt = adapt
        self.host = host  # where the task sockets listen (default: the server's host)
        self.contact = contact  # the name Dask workers reach them by (default: host)
        self.attempts: dict[str, Attempt] = {}  # token -> attempt (read by the relay too)
        self.by_run: dict[str, str] = {}  # run id -> token of its current attempt
        self._cmds: queue.Queue[tuple] = queue.Queue()
        self._outcomes: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._info: dict[str, Any] = {"kind": "dask", "spec": spec, "ready": False}
        self._auth: ThreadAuthenticator | None = None
        self.client: Any = None
        self.cluster: Any = None
        self._futures: dict[str, Any] = {}  # the dask thread's only

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
        self._dask = threading.Thread(target=self._dask_loop, name="zmqruntime-dask", daemon=True)
        self._dask.start()
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
        self._cmds.put(("submit", token, key, spec, run.resources))

    def cancel(self, run: Any) -> None:
        """Cooperative cancel (the task interrupts the pipeline 0.25 s later, as a native
        worker does); a task that has not started yet is withdrawn from Dask."""
        attempt = self._attempt_of(run)
        if attempt is None:
            return
        if attempt.identity is None:
            self._revoke(attempt)
            self._cmds.put(("cancel", attempt.token))
        else:
            self._reply(attempt.identity, {"type": "cancel"})

    def hard_cancel(self, run: Any, reason: str, state: str) -> None:
        """The grace period is over: its Dask worker is restarted, and the run ends now."""
        attempt = self._attempt_of(run)
        if attempt is None:
            return
        self._revoke(attempt)
        where = f" (Dask worker {attempt.worker} restarted)" if attempt.worker else ""
        self._cmds.put(("restart", attempt.token, attempt.worker))
        self.server._run_lost(run, reason + where, state)
        self.server._dispatch()

    def tick(self) -> None:
        """Outcomes of finished Dask futures; heartbeats; "done" messages that never came."""
        now = time.monotonic()
        while True:
            try:
                token, status, value = self._outcomes.get_nowait()
            except queue.Empty:
                break
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
        out = dict(self._info)
        out["tasks"] = len(self.attempts)
        return out

    def shutdown(self) -> None:
        """Cancel running tasks, then close the client (and the cluster this server
        started: its batch jobs are cancelled), the relay and the sockets."""
        for attempt in list(self.attempts.values()):
            if attempt.identity is not None:
                self._reply(attempt.identity, {"type": "cancel"})
        self._cmds.put(("stop",))
        self._stop.set()
        self._dask.join(timeout=60)
        self._relay_thread.join(timeout=10)
        self.ctl.close(linger=0)
        self.inbox.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

    # ------------------------------------------------------------------ loop thread
    def _attempt_of(self, run: Any) -> Attempt | None:
        token = self.by_run.get(run.record["id"])
        return self.attempts.get(token) if token else None

    def _reply(self, identity: bytes, msg: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.ctl.send_multipart([identity, *protocol.encode(msg)], copy=False)

    def _on_ctl(self, frames: list[Any]) -> None:
        identity = frames[0].bytes
        try:
            msg = protocol.decode(frames[1:])
        except protocol.ProtocolError:
            log.warning("a Dask task sent an undecodable control message")
            return
        attempt = self.attempts.get(identity.split(b".")[0].decode(errors="replace"))
        kind = msg.get("type")
        if kind == "heartbeat":
            if attempt is not None and attempt.identity == identity:
                attempt.last_seen = time.monotonic()
                self._reply(identity, {"type": "ack"})
            else:  # an execution this server no longer wants: it stops
                self._reply(identity, {"type": "cancel"})
            return
        if kind != "hello":
            return
        run = self.server.runs.get(attempt.run_id) if attempt is not None else None
        if attempt is None or run is None or run.worker != attempt.token:
            self._reply(identity, {"type": "abort", "reason": "this run no longer wants it"})
        elif attempt.identity is None:
            with attempt.lock:
                attempt.identity = identity
            attempt.worker = msg.get("worker")
            attempt.last_seen = time.monotonic()
            self.server._mark_running(run)
            self._reply(identity, {"type": "go"})
        elif attempt.identity != identity:
            # Dask ran this attempt again: its first worker died (allowed-failures > 0 on
            # that scheduler). Our retries decide, with a fresh task.
            self._reply(identity, {"type": "abort", "reason": "a second execution"})
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
        self._cmds.put(("cancel", attempt.token))
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
        self._cmds.put(("release", attempt.token))

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
        name = str(meta["file"])
        if Path(name).name != name or name in ("", ".", ".."):
            raise OSError(f"bad result file name {name!r}")
        run_dir = self.server.store.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / name
        try:
            if meta.get("kind") == "array":
                array = protocol.buffer_to_array(
                    frame.buffer, meta["dtype"], meta["shape"], meta.get("order", "C")
                )
                write_npy(path, array)
            else:
                path.write_bytes(frame.buffer)
        except protocol.ProtocolError as exc:
            path.unlink(missing_ok=True)
            raise OSError(f"a damaged result: {exc}") from None
        except OSError:
            path.unlink(missing_ok=True)  # a partial file: give its space back
            raise

    # ------------------------------------------------------------------ dask thread
    def _dask_loop(self) -> None:
        last_info = 0.0
        while True:
            if self.client is None:
                try:
                    self._connect()
                except Exception as exc:
                    problem = f"cannot start Dask ({self.spec}): {type(exc).__name__}: {exc}"
                    log.error("%s; trying again in %g s", problem, RECONNECT_DELAY)
                    self._info.update(ready=False, problem=problem)
                    if self._stop.wait(RECONNECT_DELAY):
                        break
                    continue
            try:
                cmd = self._cmds.get(timeout=INFO_INTERVAL)
            except queue.Empty:
                cmd = None
            if cmd is not None and cmd[0] == "stop":
                break
            if cmd is not None:
                try:
                    self._command(*cmd)
                except Exception:
                    log.exception("Dask: %s failed", cmd[0])
            if time.monotonic() - last_info >= INFO_INTERVAL:
                last_info = time.monotonic()
                try:
                    self._refresh_info()
                except Exception as exc:
                    self._info["problem"] = f"Dask scheduler: {type(exc).__name__}: {exc}"
        self._close_dask()

    def _connect(self) -> None:
        import dask
        from distributed import Client

        # a run is never re-run by Dask after its worker died: our retries decide
        dask.config.set({"distributed.scheduler.allowed-failures": 0})
        if self.cluster_kind == "local":
            from distributed import LocalCluster

            self.cluster = LocalCluster(
                n_workers=self.cluster_arg,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",  # loopback only; a random port
                silence_logs=logging.WARNING,
            )
        elif self.cluster_kind == "jobqueue":
            import dask_jobqueue

            # configured the Dask way: jobqueue.yaml or DASK_JOBQUEUE__<QUEUE>__... variables
            self.cluster = getattr(dask_jobqueue, JOBQUEUE[self.cluster_arg])()
        if self.cluster is not None and self.adapt is not None:
            self.cluster.adapt(minimum=self.adapt[0], maximum=self.adapt[1])
        target = self.cluster if self.cluster is not None else self.cluster_arg
        self.client = Client(target, timeout="30s", set_as_default=False)
        self._refresh_info()  # before "ready": a ping that sees ready sees the cluster too
        self._info.update(ready=True, problem=None)
        log.info("Dask: connected to %s (%s)", self.client.scheduler.address, self.spec)

    def _command(self, kind: str, token: str, *args: Any) -> None:
        if kind == "submit":
            key, spec, resources = args
            future = self.client.submit(
                run_task, spec, key=key, pure=False, retries=0, resources=resources or None
            )
            self._futures[token] = future
            future.add_done_callback(lambda f, t=token: self._on_future(t, f))
            return
        future = self._futures.pop(token, None)
        if kind == "release":
            if future is not None:
                future.release()
            return
        if future is not None:  # cancel, restart
            future.cancel()
        if kind == "restart" and args[0]:
            status = self.client.restart_workers([args[0]], raise_for_error=False)
            log.info("Dask: restarted worker %s: %s", args[0], status)

    def _on_future(self, token: str, future: Any) -> None:
        """A Dask callback thread: the outcome goes to the loop (its tick).

        A finished task's value is never fetched: its "done" came over the task's own
        socket, and a fetch would cost a transfer per run (and, once its worker is gone,
        make Dask run the task again to recompute it)."""
        status, value = future.status, None
        try:
            if status == "error":
                value = future.exception(timeout=30)
        except Exception as exc:
            status, value = "error", exc
        self._outcomes.put((token, status, value))

    def _refresh_info(self) -> None:
        info = self.client.scheduler_info(n_workers=-1)
        workers = info.get("workers", {})
        names = {str(w.get("name")) for w in workers.values()}
        pending = None
        if self.cluster_kind == "jobqueue":
            pending = sum(1 for name in self.cluster.worker_spec if str(name) not in names)
        dashboard = None
        port = info.get("services", {}).get("dashboard")
        if port:
            host = self.client.scheduler.address.split("://")[-1].rsplit(":", 1)[0]
            dashboard = f"http://{host}:{port}/status"
        resources: dict[str, float] = {}
        for w in workers.values():
            for name, amount in (w.get("resources") or {}).items():
                resources[name] = resources.get(name, 0) + amount
        self._info.update(
            scheduler=self.client.scheduler.address,
            cluster=self.cluster_kind if self.cluster_kind != "jobqueue" else self.cluster_arg,
            workers=len(workers),
            threads=sum(int(w.get("nthreads", 0)) for w in workers.values()),
            memory=sum(int(w.get("memory_limit") or 0) for w in workers.values()),
            resources=resources,
            pending_jobs=pending,
            adapt=list(self.adapt) if self.adapt else None,
            dashboard=dashboard,
            loopback=is_loopback(self.client.scheduler.address.split("://")[-1].rsplit(":", 1)[0]),
        )

    def _close_dask(self) -> None:
        try:
            if self.client is not None and self._futures:
                self.client.cancel(list(self._futures.values()), force=True)
            self._futures.clear()
            if self.client is not None:
                self.client.close(timeout=10)
            if self.cluster is not None:
                self.cluster.close(timeout=30)  # a job queue's jobs are cancelled here
        except Exception:
            log.exception("Dask: closing the client or cluster failed")
