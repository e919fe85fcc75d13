"""Pieces shared by the benchmarks: isolation, cleanup, raw pyzmq workers, facts, stats.

Benchmarks must never touch the user's servers or settings, and never leave a process
behind: :func:`isolation` points every system's state (zmqruntime registry and data,
IPython profiles, Jupyter runtime files, Dask config and scratch space) at a temporary
directory, and :func:`kill_descendants` stops whatever this process started.

Run as a script (``python common.py raw-worker TASKS RESULTS``), this module is the
raw pyzmq worker: the physical ceiling the runtimes are compared with.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

FRAME_SHAPE = (2048, 2048)
FRAME_DTYPE = np.uint16
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1] * np.dtype(FRAME_DTYPE).itemsize

#: environment variables that relocate each system's state into the isolation dir
STATE_VARS = {
    "ZMQRUNTIME_RUNTIME_DIR": "zmqruntime-runtime",
    "ZMQRUNTIME_DATA_DIR": "zmqruntime-data",
    "IPYTHONDIR": "ipython",
    "JUPYTER_RUNTIME_DIR": "jupyter-runtime",
    "JUPYTER_DATA_DIR": "jupyter-data",
    "JUPYTER_CONFIG_DIR": "jupyter-config",
    "DASK_CONFIG": "dask-config",
    "DASK_TEMPORARY_DIRECTORY": "dask-scratch",
}


# --------------------------------------------------------------------------- isolation


@contextlib.contextmanager
def isolation(keep: bool = False) -> Iterator[Path]:
    """Point every system's state at a fresh temp dir; restore and remove it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="zmqr-bench-"))
    saved = {k: os.environ.get(k) for k in STATE_VARS}
    for var, sub in STATE_VARS.items():
        path = root / sub
        path.mkdir(mode=0o700)
        os.environ[var] = str(path)
    try:
        yield root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def stop_spawned(client: Any, timeout: float = 30.0) -> None:
    """Shut down the server a benchmark's client spawned; wait until it is gone (or kill it)."""
    try:
        client.shutdown(timeout=10)
    except Exception as exc:  # stop what we started even if it no longer answers
        print(f"zmqruntime shutdown request failed: {exc}", file=sys.stderr)
    if client.spawned is not None:
        try:
            client.spawned.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            client.spawned.kill()
            client.spawned.wait()
    client.close()


def kill_descendants(timeout: float = 5.0) -> list[str]:
    """Stop every process this one started (children of children too); name the strays."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    strays = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "multiprocessing.resource_tracker" not in cmdline:  # exits with its parent
                strays.append(f"{child.pid} {cmdline[:200]}")
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return strays


# --------------------------------------------------------------------------- facts


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def zmqruntime_version() -> str:
    """The version of the zmqruntime actually imported (the worktree's, with PYTHONPATH)."""
    try:
        import zmqruntime
    except ImportError:
        return "not importable"
    where = Path(zmqruntime.__file__).resolve().parent
    rev = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            rev = f" (git {out.stdout.strip()})"
    return f"{zmqruntime.__version__}{rev}"


def versions(names: Sequence[str] = ()) -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "zmqruntime": zmqruntime_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "numpy": np.__version__,
        "msgpack": package_version("msgpack"),
    }
    for name in names:
        out[name] = package_version(name)
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits, no exponent for everyday sizes."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = int(np.floor(np.log10(abs(value))))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


class RssSampler(threading.Thread):
    """Samples the resident memory of some processes until stopped: baseline and peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.baseline = {name: self._rss(p) for name, p in self.procs.items()}
        self.peak = dict(self.baseline)
        self.samples = 0
        self._stop_event = threading.Event()

    @staticmethod
    def _rss(proc: psutil.Process) -> int:
        try:
            return proc.memory_info().rss
        except psutil.Error:
            return 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], self._rss(proc))
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop sampling; per process: baseline, peak and growth in MB."""
        self._stop_event.set()
        self.join()
        mb = 1024 * 1024
        return {
            name: {
                "baseline_mb": self.baseline[name] / mb,
                "peak_mb": self.peak[name] / mb,
                "growth_mb": (self.peak[name] - self.baseline[name]) / mb,
            }
            for name in self.procs
        }


# --------------------------------------------------------------------------- profiling


def process_label(proc: psutil.Process) -> str:
    """A short, file-name-safe name for a process of one of the systems."""
    try:
        args = proc.cmdline()
    except psutil.Error:
        return f"pid{proc.pid}"
    text = " ".join(args)
    for needle, label in (
        ("zmqruntime.worker", "worker"),
        ("zmqruntime serve", "server"),
        ("raw-worker", "raw-worker"),
        ("ipcontroller", "ipcontroller"),
        ("ipyparallel.controller", "ipcontroller"),
        ("ipengine", "ipengine"),
        ("ipyparallel.engine", "ipengine"),
        ("multiprocessing.spawn", "dask-process"),
        ("resource_tracker", "resource-tracker"),
    ):
        if needle in text:
            return f"{label}-{proc.pid}"
    return f"{Path(args[0]).name if args else 'proc'}-{proc.pid}"


class Profiler:
    """py-spy attached to this process and its descendants while workloads run.

    Each process gets a collapsed-stack file (``py-spy record -f raw``): one line per
    distinct stack with its sample count; :func:`hotspots` summarises one.
    """

    def __init__(self, out_dir: Path, tag: str, rate: int = 200) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.rate = rate
        self.spies: list[tuple[subprocess.Popen, Path]] = []

    def start(self) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        me = psutil.Process()
        targets = [("client", me)]
        for proc in me.children(recursive=True):
            label = process_label(proc)
            if not label.startswith(("resource-tracker", "py-spy")):
                targets.append((label, proc))
        for label, proc in targets:
            out = self.out_dir / f"{self.tag}-{label}.txt"
            cmd = [exe, "record", "--pid", str(proc.pid), "-f", "raw", "-r", str(self.rate)]
            cmd += ["--nonblocking", "-o", str(out)]
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.spies.append((spy, out))
        time.sleep(0.5)  # let them attach before the workloads start

    def stop(self) -> list[Path]:
        """Stop sampling (py-spy writes its file on SIGINT); the files written."""
        for spy, _ in self.spies:
            with contextlib.suppress(OSError):
                spy.send_signal(signal.SIGINT)
        for spy, _ in self.spies:
            try:
                spy.wait(timeout=20)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        return [out for _, out in self.spies if out.exists()]


def hotspots(path: Path, top: int = 12) -> str:
    """Markdown summary of a collapsed-stack file: most samples by own and inclusive time."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        return f"### {Path(path).stem}\n\nno samples\n"
    lines = [f"### {Path(path).stem} ({total} samples)", "", "| own | inclusive | frame |"]
    lines.append("| --- | --- | --- |")
    ranked = sorted(own, key=own.get, reverse=True)[:top]
    for frame in ranked:
        lines.append(f"| {own[frame] / total:.1%} | {inclusive[frame] / total:.1%} | `{frame}` |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- raw pyzmq

OP_TRIVIAL, OP_ARRAY, OP_STREAM, OP_QUIT = b"t", b"a", b"s", b"q"


def new_frame(value: int = 7) -> np.ndarray:
    """One 2048x2048 uint16 camera frame (8 MiB)."""
    return np.full(FRAME_SHAPE, value, FRAME_DTYPE)


def raw_worker(tasks_url: str, results_url: str) -> None:
    """PULL tasks, PUSH results: the least a worker process can do over ZeroMQ."""
    ctx = zmq.Context()
    tasks = ctx.socket(zmq.PULL)
    tasks.setsockopt(zmq.RCVHWM, 0)
    tasks.connect(tasks_url)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.SNDHWM, 0)
    results.connect(results_url)
    results.send_multipart([b"ready", str(os.getpid()).encode()])
    parent = os.getppid()
    try:
        while True:
            if not tasks.poll(1000):
                if os.getppid() != parent:  # the benchmark died: do not linger
                    break
                continue
            op, arg = tasks.recv_multipart()
            if op == OP_TRIVIAL:
                results.send_multipart([b"r", arg])
            elif op == OP_ARRAY:
                results.send_multipart([b"r", new_frame(int(arg) & 0xFFFF)], copy=False)
            elif op == OP_STREAM:
                frame = new_frame()
                for _ in range(int(arg)):
                    results.send_multipart([b"f", frame], copy=False)
                results.send_multipart([b"end", arg])
            elif op == OP_QUIT:
                break
    finally:
        tasks.close(linger=0)
        results.close(linger=1000)
        ctx.term()


class RawPool:
    """N raw pyzmq worker processes fed by one PUSH socket, answering on one PULL socket."""

    def __init__(self, n_workers: int) -> None:
        self.n_workers = n_workers
        self.ctx = zmq.Context()
        self.tasks = self.ctx.socket(zmq.PUSH)
        self.tasks.setsockopt(zmq.SNDHWM, 0)
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.results = self.ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.RCVHWM, 0)
        self.results.setsockopt(zmq.LINGER, 0)
        tasks_port = self.tasks.bind_to_random_port("tcp://127.0.0.1")
        results_port = self.results.bind_to_random_port("tcp://127.0.0.1")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "raw-worker",
            f"tcp://127.0.0.1:{tasks_port}",
            f"tcp://127.0.0.1:{results_port}",
        ]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL) for _ in range(n_workers)]
        self.ready = 0

    def recv(self, timeout: float = 60.0) -> list[zmq.Frame]:
        """The next message that is not a worker's hello."""
        while True:
            if not self.results.poll(int(timeout * 1000)):
                raise TimeoutError("no message from the raw pyzmq workers")
            frames = self.results.recv_multipart(copy=False)
            if frames[0].bytes == b"ready":
                self.ready += 1
                continue
            return frames

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker said hello (and had time to finish connecting)."""
        deadline = time.monotonic() + timeout
        while self.ready < self.n_workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.results.poll(int(remaining * 1000)):
                raise TimeoutError(f"only {self.ready} of {self.n_workers} raw workers started")
            frames = self.results.recv_multipart()
            if frames[0] == b"ready":
                self.ready += 1
        time.sleep(0.2)  # their PULL connects may trail the hello by a moment

    def submit(self, op: bytes, arg: int = 0) -> None:
        self.tasks.send_multipart([op, str(arg).encode()])

    def close(self) -> None:
        for _ in self.procs:
            with contextlib.suppress(zmq.ZMQError):
                self.tasks.send_multipart([OP_QUIT, b"0"], flags=zmq.NOBLOCK)
        for proc in self.procs:  # a quit may reach a worker that already got one
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.tasks.close(linger=0)
        self.results.close(linger=0)
        self.ctx.term()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "raw-worker":
        raw_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: common.py raw-worker TASKS_URL RESULTS_URL")


def write_json(path: Path, benchmark: str, figures: dict[str, Any], argv: Sequence[str]) -> None:
    """``--json``: the figures at the top level under stable keys, plus where they came from
    (``benchmark``, ``machine``, ``versions``, ``command``), so runs can be compared by key."""
    doc = {
        **figures,
        "benchmark": benchmark,
        "machine": machine(),
        "versions": versions(),
        "command": list(argv),
        "time": time.time(),
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=float))
