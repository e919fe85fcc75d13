"""The Dask side of ``serve --dask SPEC``: a thread that owns the Dask client.

:class:`DaskCluster` connects to the cluster (an existing scheduler, a ``LocalCluster`` of
N worker processes, or a dask-jobqueue cluster that scales with ``--dask-adapt``; again
after a failure), submits one task per run attempt (:func:`zmqruntime.dask_task.run_task`),
cancels, releases and restarts workers, and keeps the cluster's figures for ``ping``. The
server's loop only puts commands on a queue and reads outcomes and figures: no Dask call
ever blocks it. What the tasks send back is :mod:`zmqruntime.dask_executor`'s business.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from .dask_task import run_task
from .transport import is_loopback

log = logging.getLogger("zmqruntime.dask")

#: ``--dask`` names of dask-jobqueue's cluster classes
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "htcondor": "HTCondorCluster",
}
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


class DaskCluster:
    """The thread that owns the Dask client (and the cluster it started)."""

    def __init__(self, spec: str, adapt: tuple[int, int] | None = None) -> None:
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
        self._cmds: queue.Queue[tuple] = queue.Queue()
        self._outcomes: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._info: dict[str, Any] = {"kind": "dask", "spec": spec, "ready": False}
        self.client: Any = None
        self.cluster: Any = None
        self._futures: dict[str, Any] = {}  # the dask thread's only
        #: finished futures whose release waits for the next submit (see _command)
        self._to_release: list[Any] = []
        self._thread = threading.Thread(target=self._dask_loop, name="zmqruntime-dask", daemon=True)

    # ------------------------------------------------------------------ the loop's side
    def start(self) -> None:
        self._thread.start()

    def submit(self, token: str, key: str, spec: dict[str, Any], resources: Any) -> None:
        """One attempt as one task (key: the dashboard's name for it)."""
        self._cmds.put(("submit", token, key, spec, resources))

    def cancel(self, token: str) -> None:
        self._cmds.put(("cancel", token))

    def release(self, token: str) -> None:
        self._cmds.put(("release", token))

    def restart(self, token: str, worker: str | None) -> None:
        """Cancel the attempt's task and restart its worker (code stuck in C)."""
        self._cmds.put(("restart", token, worker))

    def outcomes(self) -> list[tuple[str, str, Any]]:
        """(token, status, exception or None) of the futures that finished since last asked."""
        out = []
        while True:
            try:
                out.append(self._outcomes.get_nowait())
            except queue.Empty:
                return out

    def info(self) -> dict[str, Any]:
        """The cluster as last seen (never a network call)."""
        return dict(self._info)

    def stop(self, timeout: float = 60) -> None:
        """Cancel what is left, close the client and the cluster this server started."""
        self._cmds.put(("stop",))
        self._stop.set()
        self._thread.join(timeout=timeout)

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
                self._release_now()  # quiet: no submit will come soon to carry them
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

        dask.config.set(
            {
                # a run is never re-run by Dask after its worker died: our retries decide
                "distributed.scheduler.allowed-failures": 0,
                # the workers of a LocalCluster run with glibc's malloc as native workers
                # do: Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which also turns off
                # glibc's adaptive mmap threshold, so every large numpy temporary is a
                # fresh mmap (6x the page faults, 1.6x the CPU time in a scipy.ndimage
                # loop here; the nuclei example ran 1.8x slower than on a native worker)
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            }
        )
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
            self._release_now()  # in the same batch as the submit, not a batch before it
            key, spec, resources = args
            future = self.client.submit(
                run_task, spec, key=key, pure=False, retries=0, resources=resources or None
            )
            self._futures[token] = future
            future.add_done_callback(lambda f, t=token: self._on_future(t, f))
            return
        future = self._futures.pop(token, None)
        if kind == "release":
            # Dask batches what a client sends (one batch per 10 ms) and so does the scheduler
            # to a worker (5 ms): a release sent on its own, a few ms before the next
            # submit, held that submit back until the batch interval was over (about 10 ms
            # a run). Releases go with the next submit instead, or after a quiet second.
            if future is not None:
                self._to_release.append(future)
            return
        if future is not None:  # cancel, restart
            future.cancel()
        if kind == "restart" and args[0]:
            status = self.client.restart_workers([args[0]], raise_for_error=False)
            log.info("Dask: restarted worker %s: %s", args[0], status)

    def _release_now(self) -> None:
        for future in self._to_release:
            future.release()
        self._to_release.clear()

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
            self._to_release.clear()
            if self.client is not None:
                self.client.close(timeout=10)
            if self.cluster is not None:
                self.cluster.close(timeout=30)  # a job queue's jobs are cancelled here
        except Exception:
            log.exception("Dask: closing the client or cluster failed")
