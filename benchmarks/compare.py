"""zmqruntime side by side with raw pyzmq, Dask distributed, ipyparallel and Ray.

    python benchmarks/compare.py            # the full comparison (a few minutes)
    python benchmarks/compare.py --quick    # a reduced one (under a minute)
    python benchmarks/compare.py --json out.json

Six workloads (issues 6 and 19), each system in its own child process (the runner), one
system after the other, so that no system's background threads or processes compete
with another's measurement. The runner measures start-up from its own first line (before
any third-party import) to the first result, then runs the workloads on the system
it started, stops it and reports JSON; this process prints one markdown table.

1. round trip: submit one trivial run, wait for its result (median, p99);
2. throughput: N trivial runs submitted at once, all results gathered (runs/s);
3. arrays back: N runs each returning a 2048x2048 uint16 array (frames/s), in two
   rows that compare like with like: "live only" (the array travels in memory: Dask,
   ipyparallel and Ray results, raw pyzmq) and "stored to disk" (zmqruntime's results,
   which are always stored; the peers' tasks write the array with np.save to the same
   filesystem and return its path, and the client np.loads it);
4. streaming: one run sending N such frames, consumed as they come, again in two rows:
   "live only" (zmqruntime's ctx.preview, Dask's distributed.Queue, ipyparallel's
   publish_data, a Ray streaming generator, raw pyzmq) and "stored to disk"
   (zmqruntime's ctx.emit -> stream(); the peers write each frame with np.save and
   report its path through the same channel, and the client np.loads it);
5. cancel: time from cancel() to the final state of a run in a busy loop, and whether
   the running code actually stopped (a heartbeat file it writes stops changing);
6. start-up: from nothing to the first result.

Two ceilings stand beside the systems: raw pyzmq (PUSH/PULL over loopback, for the
live rows) and the result-file ceiling (the same frames written as result files by
one process, the way zmqruntime's worker writes them, for the stored rows).
Ray runs on loopback with as many CPUs as the others have workers
(``ray.init(num_cpus=..., include_dashboard=False, _node_ip_address="127.0.0.1")``).

Every system's state lives in a temporary directory (see common.isolation), and every
process started is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # start-up (workload 6) is measured from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common  # noqa: E402

SYSTEMS = ("pyzmq", "disk", "zmqruntime", "dask", "ipyparallel", "ray")
PEERS = ("dask", "ipyparallel", "ray")
LABELS = {
    "pyzmq": "raw pyzmq",
    "disk": "result-file ceiling",
    "zmqruntime": "zmqruntime",
    "dask": "Dask distributed",
    "ipyparallel": "ipyparallel",
    "ray": "Ray",
}
WORKLOADS = ("roundtrip", "throughput", "arrays", "streaming", "cancel", "startup")


@dataclass
class Sizes:
    roundtrip: int = 200
    throughput: int = 2000
    arrays: int = 50
    streaming: int = 200
    #: the busy loop of workload 5 ends by itself after this long; it must outlast
    #: zmqruntime's cancel grace (2 s) so that the kill, not the end, is measured
    busy_seconds: float = 6.0


FULL = Sizes()
QUICK = Sizes(roundtrip=50, throughput=300, arrays=10, streaming=40, busy_seconds=3.5)


# --------------------------------------------------------------------------- the tasks
# Plain functions, so that Dask and ipyparallel ship them by value; zmqruntime gets
# the same source as pipeline code.


def trivial(i: int = 0) -> int:
    return 1


def make_frame(i: int = 0) -> Any:
    import numpy as np

    return np.full((2048, 2048), i & 0xFFFF, np.uint16)


def busy_loop(marker: str, seconds: float) -> int:
    """A loop that never looks for a cancel request; its heartbeat file shows it runs."""
    import time

    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        if n % 50_000 == 0:
            with open(marker, "w") as f:
                f.write(str(n))
    return n


def dask_stream(queue_name: str, n: int) -> int:
    import numpy as np
    from distributed import Queue

    queue = Queue(queue_name)
    frame = np.full((2048, 2048), 7, np.uint16)
    for _ in range(n):
        queue.put(frame)
    return n


def ipp_stream(n: int) -> int:
    import numpy as np
    from ipyparallel.datapub import publish_data

    frame = np.full((2048, 2048), 7, np.uint16)
    for i in range(n):
        publish_data({"frame": frame, "i": i})
    return n


def save_frame(directory: str, i: int = 0) -> str:
    """A run whose result is stored: the frame written with np.save; its path returned."""
    import numpy as np

    path = f"{directory}/frame-{i:05d}.npy"
    np.save(path, np.full((2048, 2048), i & 0xFFFF, np.uint16), allow_pickle=False)
    return path


def dask_stream_stored(queue_name: str, directory: str, n: int) -> int:
    import numpy as np
    from distributed import Queue

    queue = Queue(queue_name)
    frame = np.full((2048, 2048), 7, np.uint16)
    for i in range(n):
        path = f"{directory}/stream-{i:05d}.npy"
        np.save(path, frame, allow_pickle=False)
        queue.put(path)
    return n


def ipp_stream_stored(directory: str, n: int) -> int:
    import numpy as np
    from ipyparallel.datapub import publish_data

    frame = np.full((2048, 2048), 7, np.uint16)
    for i in range(n):
        np.save(f"{directory}/stream-{i:05d}.npy", frame, allow_pickle=False)
        publish_data({"i": i})  # newest wins: the client reads every file up to i
    return n


def ray_stream(n: int) -> Any:
    import numpy as np

    frame = np.full((2048, 2048), 7, np.uint16)
    for _ in range(n):
        yield frame


def ray_stream_stored(directory: str, n: int) -> Any:
    import numpy as np

    frame = np.full((2048, 2048), 7, np.uint16)
    for i in range(n):
        path = f"{directory}/stream-{i:05d}.npy"
        np.save(path, frame, allow_pickle=False)
        yield path


def load_frame(path: str) -> Any:
    import numpy as np

    frame = np.load(path, allow_pickle=False)
    assert frame.nbytes == common.FRAME_BYTES
    return frame


ZMQR_TRIVIAL = "def run(ctx, config):\n    return 1\n"
ZMQR_ARRAY = (
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    return np.full((2048, 2048), config.i & 0xFFFF, np.uint16)\n"
)
ZMQR_STREAM = (
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    frame = np.full((2048, 2048), 7, np.uint16)\n"
    "    for _ in range(config.n):\n"
    "        ctx.emit('frame', frame)\n"
)
ZMQR_PREVIEW = (
    "import numpy as np\n\n"
    "def run(ctx, config):\n"
    "    frame = np.full((2048, 2048), 7, np.uint16)\n"
    "    for _ in range(config.n):\n"
    "        ctx.preview('frame', frame)\n"
)
ZMQR_BUSY = inspect.getsource(busy_loop) + (
    "\n\ndef run(ctx, config):\n    return busy_loop(config.marker, config.seconds)\n"
)
ZMQR_COOPERATIVE = (
    "import time\n\n"
    "def run(ctx, config):\n"
    "    end = time.monotonic() + config.seconds\n"
    "    n = 0\n"
    "    while time.monotonic() < end and not ctx.cancelled:\n"
    "        n += 1\n"
    "        if n % 50_000 == 0:\n"
    "            with open(config.marker, 'w') as f:\n"
    "                f.write(str(n))\n"
    "    return n\n"
)


# --------------------------------------------------------------------------- systems


class System:
    """One system under test; the runner calls start() first and stop() always."""

    name = ""
    streaming_mechanism = ""
    stored_mechanism = ""
    cancel_mechanism = ""
    submit_api = ""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def start(self) -> None:
        """Start from nothing and fetch one trivial result."""
        raise NotImplementedError

    def wait_all_workers(self) -> None:
        """Block until the whole pool is up (start() returns at the first result)."""

    def roundtrip(self) -> None:
        raise NotImplementedError

    def throughput(self, n: int) -> None:
        raise NotImplementedError

    def arrays(self, n: int) -> None:
        """N runs each returning a frame that travels in memory (NotImplementedError: none)."""
        raise NotImplementedError

    def arrays_stored(self, n: int, directory: Path) -> None:
        """N runs each storing a frame on disk (under ``directory``); the client reads them."""
        raise NotImplementedError

    def streaming(self, n: int) -> int:
        """Run one task sending n frames live; return how many the client saw."""
        raise NotImplementedError

    def streaming_stored(self, n: int, directory: Path) -> int:
        """Run one task storing n frames on disk as it goes; the client reads each as it
        is reported; return how many it read."""
        raise NotImplementedError

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def wait_for_heartbeat(marker: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the busy loop never started")
        time.sleep(0.002)


def heartbeat(marker: Path) -> str:
    with contextlib.suppress(OSError):
        return marker.read_text()
    return ""


def still_running(marker: Path, window: float = 0.5) -> bool:
    """Whether the busy loop still writes its heartbeat ``window`` s after the cancel."""
    before = heartbeat(marker)
    time.sleep(window)
    return heartbeat(marker) != before


def wait_quiet(marker: Path, timeout: float) -> None:
    """Let a busy loop that could not be stopped run out, so it cannot skew what follows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and still_running(marker, 0.3):
        pass


class RawZmq(System):
    name = "pyzmq"
    streaming_mechanism = "PUSH/PULL, one frame per message, copy=False"
    submit_api = "PUSH task / PULL result, N worker processes"

    def start(self) -> None:
        self.pool = common.RawPool(self.workers)
        self.pool.submit(common.OP_TRIVIAL, 0)
        self.pool.recv()

    def wait_all_workers(self) -> None:
        self.pool.wait_ready()

    def roundtrip(self) -> None:
        self.pool.submit(common.OP_TRIVIAL, 1)
        self.pool.recv()

    def throughput(self, n: int) -> None:
        for i in range(n):
            self.pool.submit(common.OP_TRIVIAL, i)
        for _ in range(n):
            self.pool.recv()

    def arrays(self, n: int) -> None:
        for i in range(n):
            self.pool.submit(common.OP_ARRAY, i)
        for _ in range(n):
            frames = self.pool.recv()
            assert len(frames[1]) == common.FRAME_BYTES

    def streaming(self, n: int) -> int:
        self.pool.submit(common.OP_STREAM, n)
        count = 0
        while True:
            frames = self.pool.recv()
            if frames[0].bytes == b"end":
                return count
            assert len(frames[1]) == common.FRAME_BYTES
            count += 1

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        return []  # raw sockets have no notion of a run to cancel

    def stop(self) -> None:
        if hasattr(self, "pool"):
            self.pool.close()


class DiskCeiling(System):
    """The stored rows' ceiling: one process writing the frames as result files."""

    name = "disk"
    stored_mechanism = ""

    def start(self) -> None:
        pass

    def ceiling_fps(self, n: int, directory: Path) -> float:
        """Frames/s of writing ``n`` frames as result files (bench_stream.disk_ceiling)."""
        from bench_stream import disk_ceiling

        fps, self.stored_mechanism = disk_ceiling(n, directory)
        return fps

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        return []

    def stop(self) -> None:
        pass


class Zmqruntime(System):
    name = "zmqruntime"
    streaming_mechanism = "ctx.preview() -> ExecutionClient.stream() (live only, newest wins)"
    stored_mechanism = (
        "results stored by the worker; ctx.emit() -> stream(), execute_many() -> gather()"
    )
    cancel_mechanism = (
        "client.cancel(): ctx.cancelled, then an interrupt after 0.25 s, a kill after the grace"
    )
    submit_api = "client.execute_many() then client.gather() (as Dask's map + gather)"

    def start(self) -> None:
        from zmqruntime import ExecutionClient
        from zmqruntime.transport import free_port

        self.client = ExecutionClient(
            free_port(), auto_spawn=True, workers=self.workers, timeout=60.0
        )
        self.client.get_results(self.client.execute(ZMQR_TRIVIAL))

    def wait_all_workers(self) -> None:
        deadline = time.monotonic() + 60
        while self.client.ping()["workers_ready"] < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError("the zmqruntime workers did not all start")
            time.sleep(0.01)

    def roundtrip(self) -> None:
        self.client.get_results(self.client.execute(ZMQR_TRIVIAL))

    def throughput(self, n: int) -> None:
        ids = self.client.execute_many(ZMQR_TRIVIAL, [None] * n)
        assert self.client.gather(ids) == [{"return": [1]}] * n

    def arrays_stored(self, n: int, directory: Path) -> None:
        ids = self.client.execute_many(ZMQR_ARRAY, [{"i": i} for i in range(n)])
        for results in self.client.gather(ids):
            (frame,) = results["return"]
            assert frame.nbytes == common.FRAME_BYTES

    def streaming(self, n: int) -> int:
        exec_id = self.client.execute(ZMQR_PREVIEW, config={"n": n})
        count = 0
        for event in self.client.stream(exec_id):
            if event["kind"] == "preview":
                assert event["value"].nbytes == common.FRAME_BYTES
                count += 1
            elif event["kind"] == "state" and event["status"]["state"] in (
                "completed",
                "failed",
                "cancelled",
            ):
                assert event["status"]["state"] == "completed", event["status"]
        return count  # previews are newest-wins: the client may see fewer than n

    def streaming_stored(self, n: int, directory: Path) -> int:
        exec_id = self.client.execute(ZMQR_STREAM, config={"n": n})
        count = self.fetched = 0
        for event in self.client.stream(exec_id):
            if event["kind"] == "result":
                assert event["value"].nbytes == common.FRAME_BYTES
                count += 1
                self.fetched += bool(event.get("fetched"))  # dropped live, filled from store
            elif event["kind"] == "state" and event["status"]["state"] in (
                "completed",
                "failed",
                "cancelled",
            ):
                assert event["status"]["state"] == "completed", event["status"]
        return count

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        out = []
        for variant, code in (("busy", ZMQR_BUSY), ("cooperative", ZMQR_COOPERATIVE)):
            path = marker.with_name(f"{marker.name}-{variant}")
            exec_id = self.client.execute(code, config={"marker": str(path), "seconds": seconds})
            wait_for_heartbeat(path)
            t0 = time.perf_counter()
            self.client.cancel(exec_id)
            status = self.client.wait(exec_id, timeout=60)
            elapsed = time.perf_counter() - t0
            out.append(
                {
                    "variant": variant,
                    "cancel_to_final_s": elapsed,
                    "final_state": status["state"],
                    "still_running": still_running(path),
                }
            )
            wait_quiet(path, seconds)
            self.wait_all_workers()  # the busy variant costs a worker, respawned
        return out

    def stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            common.stop_spawned(client)


class Dask(System):
    name = "dask"
    streaming_mechanism = (
        "distributed.Queue (maxsize 16): worker put() -> scheduler -> client get()"
    )
    stored_mechanism = (
        "tasks np.save each frame and return its path (streaming: put it on the Queue); "
        "the client np.loads it"
    )
    cancel_mechanism = "Future.cancel(): the future is cancelled, the worker thread runs on"
    submit_api = "client.submit() / client.map(pure=False), client.gather()"

    def start(self) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=self.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)
        self.client.submit(trivial, 0, pure=False).result()

    def wait_all_workers(self) -> None:
        self.client.wait_for_workers(self.workers, timeout=60)

    def roundtrip(self) -> None:
        self.client.submit(trivial, 1, pure=False).result()

    def throughput(self, n: int) -> None:
        futures = self.client.map(trivial, range(n), pure=False)
        assert self.client.gather(futures) == [1] * n

    def arrays(self, n: int) -> None:
        futures = self.client.map(make_frame, range(n), pure=False)
        for frame in self.client.gather(futures):
            assert frame.nbytes == common.FRAME_BYTES
        del futures

    def arrays_stored(self, n: int, directory: Path) -> None:
        futures = self.client.map(save_frame, [str(directory)] * n, range(n), pure=False)
        for path in self.client.gather(futures):
            load_frame(path)
        del futures

    def streaming(self, n: int) -> int:
        from distributed import Queue

        name = f"frames-{time.monotonic_ns()}"
        queue = Queue(name, maxsize=16)
        future = self.client.submit(dask_stream, name, n, pure=False)
        for _ in range(n):
            assert queue.get(timeout=120).nbytes == common.FRAME_BYTES
        assert future.result() == n
        return n

    def streaming_stored(self, n: int, directory: Path) -> int:
        from distributed import Queue

        name = f"paths-{time.monotonic_ns()}"
        queue = Queue(name, maxsize=16)
        future = self.client.submit(dask_stream_stored, name, str(directory), n, pure=False)
        for _ in range(n):
            load_frame(queue.get(timeout=120))
        assert future.result() == n
        return n

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        future = self.client.submit(busy_loop, str(marker), seconds, pure=False)
        wait_for_heartbeat(marker)
        t0 = time.perf_counter()
        future.cancel()
        while not future.cancelled():
            time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        result = {
            "variant": "busy",
            "cancel_to_final_s": elapsed,
            "final_state": future.status,
            "still_running": still_running(marker),
        }
        wait_quiet(marker, seconds)
        return [result]

    def stop(self) -> None:
        for name in ("client", "cluster"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception as exc:
                    print(f"dask {name}.close() failed: {exc}", file=sys.stderr)


class IPyParallel(System):
    name = "ipyparallel"
    streaming_mechanism = "datapub.publish_data() -> iopub -> AsyncResult.data (newest wins)"
    stored_mechanism = (
        "tasks np.save each frame and return its path (streaming: publish_data of the "
        "newest index, the client reads every file up to it); the client np.loads it"
    )
    cancel_mechanism = (
        "AsyncResult.abort() only drops queued tasks; Client.send_signal(SIGINT) stops running code"
    )
    submit_api = "load_balanced_view().apply_async() / map_async(chunksize=1)"

    def start(self) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=self.workers, log_level=logging.ERROR)
        self.rc = self.cluster.start_and_connect_sync()
        self.view = self.rc.load_balanced_view()
        self.view.apply_async(trivial, 0).get(timeout=60)

    def wait_all_workers(self) -> None:
        self.rc.wait_for_engines(self.workers, timeout=60)

    def roundtrip(self) -> None:
        self.view.apply_async(trivial, 1).get(timeout=60)

    def throughput(self, n: int) -> None:
        assert self.view.map_async(trivial, range(n), chunksize=1).get(timeout=600) == [1] * n

    def arrays(self, n: int) -> None:
        for frame in self.view.map_async(make_frame, range(n), chunksize=1).get(timeout=600):
            assert frame.nbytes == common.FRAME_BYTES

    def arrays_stored(self, n: int, directory: Path) -> None:
        ar = self.view.map_async(save_frame, [str(directory)] * n, range(n), chunksize=1)
        for path in ar.get(timeout=600):
            load_frame(path)

    def streaming_stored(self, n: int, directory: Path) -> int:
        ar = self.view.apply_async(ipp_stream_stored, str(directory), n)
        read = 0
        deadline = time.monotonic() + 600
        while read < n and time.monotonic() < deadline:
            i = ar.data.get("i")
            if i is None or i < read:
                time.sleep(0.0005)
                continue
            while read <= i:
                load_frame(f"{directory}/stream-{read:05d}.npy")
                read += 1
        assert ar.get(timeout=60) == n
        return read

    def streaming(self, n: int) -> int:
        ar = self.view.apply_async(ipp_stream, n)
        seen = set()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            i = ar.data.get("i")
            if i is not None:
                seen.add(i)
                if i == n - 1:
                    break
            time.sleep(0.0005)
        assert ar.get(timeout=60) == n
        return len(seen)  # data_pub keeps only the newest frame: the client sees fewer

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        engine = self.rc.ids[0]
        ar = self.rc[engine].apply_async(busy_loop, str(marker), seconds)
        wait_for_heartbeat(marker)
        t0 = time.perf_counter()
        self.rc.send_signal("SIGINT", targets=[engine], block=True)
        ar.wait(timeout=60)
        elapsed = time.perf_counter() - t0
        state = "completed" if ar.successful() else "error"
        with contextlib.suppress(Exception):
            ar.get(0)
        result = {
            "variant": "busy",
            "cancel_to_final_s": elapsed,
            "final_state": state,
            "still_running": still_running(marker),
        }
        wait_quiet(marker, seconds)
        return [result]

    def stop(self) -> None:
        rc = getattr(self, "rc", None)
        if rc is not None:
            with contextlib.suppress(Exception):
                rc.close()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as exc:
                print(f"ipyparallel stop_cluster failed: {exc}", file=sys.stderr)


class Ray(System):
    name = "ray"
    streaming_mechanism = (
        'a streaming generator (num_returns="streaming"): each yielded frame in the object '
        "store, ray.get() by the client"
    )
    stored_mechanism = (
        "tasks np.save each frame and return its path (streaming: the generator yields "
        "it); the client np.loads it"
    )
    cancel_mechanism = "ray.cancel(ref, force=True): the worker process is killed"
    submit_api = "f.remote() per run, ray.get() on the list"

    def start(self) -> None:
        import ray

        self.ray = ray
        ray.init(
            num_cpus=self.workers,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(Path(os.environ["ZMQRUNTIME_DATA_DIR"]).parent / "ray"),
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        self.trivial = ray.remote(trivial)
        self.make_frame = ray.remote(make_frame)
        self.save_frame = ray.remote(save_frame)
        self.busy_loop = ray.remote(max_retries=0)(busy_loop)
        self.stream = ray.remote(num_returns="streaming")(ray_stream)
        self.stream_stored = ray.remote(num_returns="streaming")(ray_stream_stored)
        ray.get(self.trivial.remote(0))

    def wait_all_workers(self) -> None:
        # Ray starts workers on demand: run one task per CPU at once so both exist
        self.ray.get([self.trivial.remote(i) for i in range(self.workers * 4)])

    def roundtrip(self) -> None:
        self.ray.get(self.trivial.remote(1))

    def throughput(self, n: int) -> None:
        assert self.ray.get([self.trivial.remote(i) for i in range(n)]) == [1] * n

    def arrays(self, n: int) -> None:
        for frame in self.ray.get([self.make_frame.remote(i) for i in range(n)]):
            assert frame.nbytes == common.FRAME_BYTES

    def arrays_stored(self, n: int, directory: Path) -> None:
        refs = [self.save_frame.remote(str(directory), i) for i in range(n)]
        for path in self.ray.get(refs):
            load_frame(path)

    def streaming(self, n: int) -> int:
        count = 0
        for ref in self.stream.remote(n):
            assert self.ray.get(ref).nbytes == common.FRAME_BYTES
            count += 1
        return count

    def streaming_stored(self, n: int, directory: Path) -> int:
        count = 0
        for ref in self.stream_stored.remote(str(directory), n):
            load_frame(self.ray.get(ref))
            count += 1
        return count

    def cancel(self, marker: Path, seconds: float) -> list[dict[str, Any]]:
        ref = self.busy_loop.remote(str(marker), seconds)
        wait_for_heartbeat(marker)
        t0 = time.perf_counter()
        self.ray.cancel(ref, force=True)
        try:
            self.ray.get(ref, timeout=60)
            state = "completed"
        except self.ray.exceptions.TaskCancelledError:
            state = "cancelled"
        except self.ray.exceptions.RayError as exc:
            state = type(exc).__name__
        elapsed = time.perf_counter() - t0
        result = {
            "variant": "busy",
            "cancel_to_final_s": elapsed,
            "final_state": state,
            "still_running": still_running(marker),
        }
        wait_quiet(marker, seconds)
        return [result]

    def stop(self) -> None:
        ray = getattr(self, "ray", None)
        if ray is not None:
            try:
                ray.shutdown()
            except Exception as exc:
                print(f"ray.shutdown() failed: {exc}", file=sys.stderr)


SYSTEM_CLASSES: dict[str, type[System]] = {
    cls.name: cls for cls in (RawZmq, DiskCeiling, Zmqruntime, Dask, IPyParallel, Ray)
}
PEER_PACKAGES = {
    "dask": ["dask", "distributed"],
    "ipyparallel": ["ipyparallel", "ipykernel"],
    "ray": ["ray"],
}


# --------------------------------------------------------------------------- the runner


def run_system(
    name: str,
    workloads: list[str],
    sizes: Sizes,
    workers: int,
    out: Path,
    profile: Path | None = None,
) -> int:
    """Child process: start one system, run the workloads, write JSON to ``out``."""
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated runner still cleans up
    report: dict[str, Any] = {"system": name, "figures": {}, "errors": {}, "notes": {}}
    figures, errors = report["figures"], report["errors"]
    system = SYSTEM_CLASSES[name](workers)
    profiler = None
    report["notes"] = {
        "streaming": system.streaming_mechanism,
        "stored": system.stored_mechanism,
        "cancel": system.cancel_mechanism,
        "submit": system.submit_api,
    }
    report["versions"] = common.versions(PEER_PACKAGES.get(name, []))
    try:
        system.start()
        if "startup" in workloads and name != "disk":
            figures["startup_s"] = time.perf_counter() - _T0
        system.wait_all_workers()
        if profile is not None:
            profiler = common.Profiler(profile, name)
            profiler.start()
        for workload in workloads:
            if workload == "startup":
                continue
            _log(f"  {name}: {workload}")
            try:
                figures.update(WORKLOAD_FUNCS[workload](system, sizes))
            except NotImplementedError:
                pass  # the system has nothing to measure here (a ceiling)
            except Exception as exc:
                errors[workload] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    except Exception as exc:
        errors["startup"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        report["notes"]["stored"] = system.stored_mechanism  # the ceiling says it late
        if profiler is not None:
            report["profiles"] = [str(p) for p in profiler.stop()]
        try:
            system.stop()
        finally:
            strays = common.kill_descendants()
            if strays:
                report["notes"]["strays_killed"] = strays
            out.write_text(json.dumps(report, indent=1))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def w_roundtrip(system: System, sizes: Sizes) -> dict[str, float]:
    for _ in range(10):
        system.roundtrip()
    times = []
    for _ in range(sizes.roundtrip):
        t0 = time.perf_counter()
        system.roundtrip()
        times.append(time.perf_counter() - t0)
    return {
        "roundtrip_median_ms": common.percentile(times, 50) * 1e3,
        "roundtrip_p99_ms": common.percentile(times, 99) * 1e3,
    }


def w_throughput(system: System, sizes: Sizes) -> dict[str, float]:
    system.throughput(min(50, sizes.throughput))  # warm-up
    t0 = time.perf_counter()
    system.throughput(sizes.throughput)
    return {"throughput_runs_s": sizes.throughput / (time.perf_counter() - t0)}


def stored_dir(tag: str) -> Path:
    """A fresh folder for stored frames on the filesystem of zmqruntime's store."""
    path = Path(os.environ["ZMQRUNTIME_DATA_DIR"]).parent / f"stored-{tag}-{time.monotonic_ns()}"
    path.mkdir()
    return path


def _timed(call: Any, n: int, tag: str, stored: bool) -> tuple[float, Any]:
    """(frames/s, what the call returned) of ``call(n[, directory])``; a warm-up first.
    Stored frames are deleted after each call, outside the timing."""
    import shutil

    out = None
    for k in (2, n):
        directory = stored_dir(tag) if stored else None
        try:
            t0 = time.perf_counter()
            out = call(k, directory) if stored else call(k)
            elapsed = time.perf_counter() - t0
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
    return n / elapsed, out


def w_arrays(system: System, sizes: Sizes) -> dict[str, float]:
    n = sizes.arrays
    if isinstance(system, DiskCeiling):
        return {"arrays_stored_frames_s": system.ceiling_fps(n, stored_dir("ceiling"))}
    out: dict[str, float] = {}
    with contextlib.suppress(NotImplementedError):
        out["arrays_live_frames_s"] = _timed(system.arrays, n, "arrays", False)[0]
    with contextlib.suppress(NotImplementedError):
        out["arrays_stored_frames_s"] = _timed(system.arrays_stored, n, "arrays", True)[0]
    return out


def w_streaming(system: System, sizes: Sizes) -> dict[str, float]:
    n = sizes.streaming
    if isinstance(system, DiskCeiling):
        return {"streaming_stored_frames_s": system.ceiling_fps(n, stored_dir("ceiling"))}
    out: dict[str, float] = {}
    with contextlib.suppress(NotImplementedError):
        fps, seen = _timed(system.streaming, n, "stream", False)
        out.update(streaming_live_frames_s=fps, streaming_live_frames_seen=seen)
    with contextlib.suppress(NotImplementedError):
        fps, seen = _timed(system.streaming_stored, n, "stream", True)
        out.update(streaming_stored_frames_s=fps, streaming_stored_frames_seen=seen)
        if hasattr(system, "fetched"):
            out["streaming_stored_frames_fetched"] = system.fetched
    return out


def w_cancel(system: System, sizes: Sizes) -> dict[str, Any]:
    marker = Path(os.environ["ZMQRUNTIME_DATA_DIR"]).parent / f"heartbeat-{system.name}"
    out: dict[str, Any] = {}
    for result in system.cancel(marker, sizes.busy_seconds):
        out[f"cancel_{result['variant']}_ms"] = result["cancel_to_final_s"] * 1e3
        out[f"cancel_{result['variant']}_state"] = result["final_state"]
        out[f"cancel_{result['variant']}_still_running"] = result["still_running"]
    return out


WORKLOAD_FUNCS = {
    "roundtrip": w_roundtrip,
    "throughput": w_throughput,
    "arrays": w_arrays,
    "streaming": w_streaming,
    "cancel": w_cancel,
}


# --------------------------------------------------------------------------- the table

ROWS = [
    # key, label, unit, lower is better
    ("roundtrip_median_ms", "1. round trip, median", "ms", True),
    ("roundtrip_p99_ms", "1. round trip, p99", "ms", True),
    ("throughput_runs_s", "2. throughput, {throughput} trivial runs", "runs/s", False),
    (
        "arrays_live_frames_s",
        "3a. arrays back, live only (in memory): {arrays} runs x 2048² uint16",
        "frames/s",
        False,
    ),
    (
        "arrays_stored_frames_s",
        "3b. arrays back, stored to disk, read by the client: {arrays} runs",
        "frames/s",
        False,
    ),
    (
        "streaming_live_frames_s",
        "4a. streaming, live only: one run sending {streaming} frames",
        "frames/s",
        False,
    ),
    (
        "streaming_stored_frames_s",
        "4b. streaming, stored to disk: one run storing {streaming} frames, each read as reported",
        "frames/s",
        False,
    ),
    ("cancel_busy_ms", "5. cancel → final state, busy loop", "ms", True),
    ("cancel_busy_still_running", "5. busy loop still running after the final state?", "", None),
    ("cancel_cooperative_ms", "5. cancel → final state, loop checking ctx.cancelled", "ms", True),
    ("startup_s", "6. start-up: nothing → first result", "s", True),
]


def target_verdict(key: str, fig: dict[str, dict[str, Any]]) -> str:
    z = fig.get("zmqruntime", {})
    value = z.get(key)
    if value is None:
        return ""
    if key == "roundtrip_median_ms":
        return f"≤ 1 ms: {'met' if value <= 1.0 else 'missed'}"
    if key == "throughput_runs_s":
        return f"≥ 3,000/s: {'met' if value >= 3000 else 'missed'}"
    if key == "streaming_live_frames_s":
        raw = fig.get("pyzmq", {}).get(key)
        if not raw:
            return "≥ 70% of raw pyzmq: n/a"
        share = value / raw
        return f"≥ 70% of raw pyzmq: {share:.0%}, {'met' if share >= 0.7 else 'missed'}"
    if key in ("streaming_stored_frames_s", "arrays_stored_frames_s"):
        goal = 0.9 if key.startswith("streaming") else 0.7
        disk = fig.get("disk", {}).get(key)
        if not disk:
            return f"≥ {goal:.0%} of the ceiling: n/a"
        share = value / disk
        verdict = (
            f"≥ {goal:.0%} of the ceiling: {share:.0%}, {'met' if share >= goal else 'missed'}"
        )
        fetched = z.get("streaming_stored_frames_fetched")
        if key.startswith("streaming") and fetched is not None:
            seen = z.get("streaming_stored_frames_seen") or 1
            verdict += f"; fetched from the store {fetched} ({fetched / seen:.0%}, ≤ 5%: "
            verdict += f"{'met' if fetched <= 0.05 * seen else 'missed'})"
        return verdict
    return ""


def ahead_of_peers(key: str, lower_better: bool | None, fig: dict[str, dict[str, Any]]) -> str:
    z = fig.get("zmqruntime", {}).get(key)
    peers = [fig.get(p, {}).get(key) for p in PEERS]
    peers = [p for p in peers if isinstance(p, (int, float)) and not isinstance(p, bool)]
    if lower_better is None or not isinstance(z, (int, float)) or not peers:
        return ""
    ahead = all(z < p for p in peers) if lower_better else all(z > p for p in peers)
    return "yes" if ahead else "no"


def cell(system: str, key: str, unit: str, fig: dict[str, dict[str, Any]]) -> str:
    value = fig.get(system, {}).get(key)
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes, runs on" if value else "no, stopped"
    if isinstance(value, str):
        return value
    text = common.fmt(value)
    base = fig.get("zmqruntime", {}).get(key)
    if system != "zmqruntime" and isinstance(base, (int, float)) and base:
        text += f" ({value / base:.2g}×)"
    return text


def render(reports: dict[str, dict[str, Any]], args: argparse.Namespace, sizes: Sizes) -> str:
    systems = [s for s in SYSTEMS if s in reports]
    fig = {s: reports[s]["figures"] for s in systems}
    # a text row: did the busy loop keep running after the reported final state?
    for s in systems:
        if "cancel_busy_still_running" in fig[s]:
            fig[s]["cancel_busy_still_running"] = bool(fig[s]["cancel_busy_still_running"])
    header = ["workload", "unit", *(LABELS[s] for s in systems), "zmqruntime target"]
    header.append("zmqruntime ahead of every peer")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, label, unit, lower in ROWS:
        if not any(key in fig[s] for s in systems):
            continue
        row = [label.format(**asdict(sizes)), unit]
        row += [cell(s, key, unit, fig) for s in systems]
        row += [target_verdict(key, fig), ahead_of_peers(key, lower, fig)]
        lines.append("| " + " | ".join(row) + " |")
    m = common.machine()
    vers: dict[str, str] = {}
    for s in systems:
        vers.update(reports[s].get("versions", {}))
    notes = [
        "",
        f"Machine: {m['cores']} logical cores ({m['physical_cores']} physical), {m['cpu']}, "
        f"{m['memory_gb']} GiB RAM, {m['os']}; 1-min load at the end: {m['load_1min']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        f"Command: `{' '.join(['python', 'benchmarks/compare.py', *args.argv])}` "
        f"({args.workers} workers per system; "
        f"{'quick' if args.quick else 'full'} sizes).",
        "Ratios in brackets: the figure ÷ zmqruntime's (times: > 1 means slower than "
        "zmqruntime; rates: < 1 means slower). 'Live only' rows keep nothing; 'stored to "
        "disk' rows have every frame in a file on the same filesystem before the client "
        "reads it. n/a: the system has no such mechanism (zmqruntime stores every result; "
        "the ceilings are not systems).",
    ]
    for s in systems:
        r = reports[s]
        n = r.get("notes", {})
        bits = []
        if n.get("submit"):
            bits.append(f"submit: {n['submit']}")
        if n.get("streaming"):
            bits.append(f"live: {n['streaming']}")
        if n.get("stored"):
            bits.append(f"stored: {n['stored']}")
        if n.get("cancel"):
            bits.append(f"cancel: {n['cancel']}")
        seen = r["figures"].get("streaming_live_frames_seen")
        if seen is not None and seen != sizes.streaming:
            bits.append(
                f"live, the client observed {seen} of {sizes.streaming} frames (newest wins)"
            )
        if "streaming_stored_frames_fetched" in r["figures"]:
            bits.append(
                f"{r['figures']['streaming_stored_frames_fetched']} of {sizes.streaming} stored "
                "frames were dropped live and fetched from the store"
            )
        for what in ("busy", "cooperative"):
            state = r["figures"].get(f"cancel_{what}_state")
            if state:
                bits.append(f"final state after cancel ({what}): {state}")
        for workload, err in r.get("errors", {}).items():
            bits.append(f"**{workload} failed: {err}**")
        if n.get("strays_killed"):
            bits.append(f"stray processes killed: {len(n['strays_killed'])}")
        notes.append(f"- {LABELS[s]}: " + "; ".join(bits) + ".")
    return "\n".join(lines + notes)


# --------------------------------------------------------------------------- main


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_children(args: argparse.Namespace, sizes: Sizes, root: Path) -> dict[str, Any]:
    reports: dict[str, Any] = {}
    limit = 180 if args.quick else 1200
    for name in args.only:
        out = root / f"report-{name}.json"
        log_file = root / f"runner-{name}.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-system",
            name,
            "--out",
            str(out),
            "--workers",
            str(args.workers),
            "--workloads",
            ",".join(args.workloads),
        ]
        if args.quick:
            cmd.append("--quick")
        if args.profile:
            cmd += ["--profile", str(args.profile.resolve())]
        _log(f"{LABELS[name]} ...")
        t0 = time.monotonic()
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _log(f"{name} ran past {limit} s: stopping it")
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            except KeyboardInterrupt:  # the runner got the Ctrl-C too: let it clean up
                with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
                    proc.wait(timeout=20)
                raise
            finally:
                common.kill_descendants()
        _log(f"{LABELS[name]} done in {time.monotonic() - t0:.1f} s")
        if out.exists():
            reports[name] = json.loads(out.read_text())
        else:
            tail = log_file.read_text(errors="replace")[-3000:]
            _log(f"{name} wrote no report; its log ends with:\n{tail}")
            reports[name] = {
                "system": name,
                "figures": {},
                "errors": {"runner": f"exit code {proc.returncode}, no report"},
            }
        if reports[name].get("errors"):
            tail = log_file.read_text(errors="replace")[-3000:]
            _log(f"{name} reported errors; its log ends with:\n{tail}")
    return reports


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes: under a minute")
    parser.add_argument(
        "--only",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems to run (default: all of {','.join(SYSTEMS)})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads (default: all of {','.join(WORKLOADS)})",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers/engines per system")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (runner logs)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy every process of each system during its workloads; collapsed stacks "
        "and a hotspots.md summary go to this directory",
    )
    parser.add_argument("--run-system", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.only:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.run_system:
        return run_system(
            args.run_system, args.workloads, sizes, args.workers, args.out, args.profile
        )
    t0 = time.monotonic()
    with common.isolation(keep=args.keep) as root:
        try:
            reports = run_children(args, sizes, root)
        except KeyboardInterrupt:
            _log("interrupted: stopping everything started")
            return 130
        finally:
            strays = common.kill_descendants()
            if strays:
                _log(f"killed stray processes: {strays}")
        if args.keep:
            _log(f"runner logs kept in {root}")
    print(render(reports, args, sizes))
    if args.profile:
        summary = args.profile / "hotspots.md"
        parts = [common.hotspots(Path(p)) for r in reports.values() for p in r.get("profiles", [])]
        summary.write_text("\n".join(parts))
        _log(f"profiles in {args.profile}; summary: {summary}")
    _log(f"total {time.monotonic() - t0:.1f} s; command: {shlex.join(sys.argv)}")
    if args.json:
        # stable keys: "<system>_<figure>" at the top level (e.g.
        # zmqruntime_streaming_stored_frames_s, ray_roundtrip_median_ms), the runners'
        # whole reports under "reports"
        flat = {
            f"{name}_{key}": value
            for name, report in reports.items()
            for key, value in report.get("figures", {}).items()
        }
        common.write_json(
            args.json, "compare", {**flat, "sizes": asdict(sizes), "reports": reports}, argv
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
