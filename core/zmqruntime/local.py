"""The servers started on this machine: where they are recorded, spawned and stopped.

Each running server writes ``server-<port>.json`` into a private runtime dir (0700). A
server is identified by pid *and* process create time, so a recycled pid is never
mistaken for it, and nothing is ever killed just because it listens on a port.

A server also holds ``server.lock`` in its data dir for its whole life (an exclusive
``flock``), so a second server on the same data dir stops before it reads or writes
anything there; the file names the holder (pid, port) for that second server's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs
import psutil
from filelock import FileLock

# the port checks that tools managing this host's servers need (the GUI among them)
from .transport import free_port as free_port
from .transport import is_loopback as is_loopback
from .transport import port_accepts_tcp as port_accepts_tcp

APP = "zmqruntime"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def runtime_dir() -> Path:
    """Private per-user dir for the registry and spawn locks (ZMQRUNTIME_RUNTIME_DIR wins)."""
    override = os.environ.get("ZMQRUNTIME_RUNTIME_DIR")
    if override:
        return _private_dir(Path(override))
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        return _private_dir(Path(platformdirs.user_runtime_dir(APP)))


def default_data_dir(port: int) -> Path:
    """Where a server keeps its records by default: one dir per port, kept across restarts."""
    base = os.environ.get("ZMQRUNTIME_DATA_DIR")
    root = Path(base) if base else Path(platformdirs.user_data_dir(APP))
    return _private_dir(root / "servers" / str(port))


@dataclass
class ServerEntry:
    port: int
    host: str
    pid: int
    create_time: float
    data_dir: str
    log_file: str
    data_port: int
    workers: int
    started: float

    @property
    def path(self) -> Path:
        return registry_path(self.port)

    def is_alive(self) -> bool:
        """The recorded process still runs and is the same process (pid + create time)."""
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 1.0 and proc.status() != "zombie"
        except psutil.Error:
            return False


def registry_path(port: int) -> Path:
    return runtime_dir() / f"server-{port}.json"


def register(entry: ServerEntry) -> None:
    path = entry.path
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(entry), indent=2))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def unregister(port: int, pid: int) -> None:
    """Remove the entry if it is still ours (another server may have taken the port)."""
    entry = read_entry(registry_path(port))
    if entry is not None and entry.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()


def read_entry(path: Path) -> ServerEntry | None:
    try:
        return ServerEntry(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_servers(drop_stale: bool = True) -> list[ServerEntry]:
    """Live servers of this user on this machine; stale entries are removed."""
    entries = []
    for path in sorted(runtime_dir().glob("server-*.json")):
        entry = read_entry(path)
        if entry is not None and entry.is_alive():
            entries.append(entry)
        elif drop_stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return sorted(entries, key=lambda e: e.port)


def find_server(port: int) -> ServerEntry | None:
    entry = read_entry(registry_path(port))
    return entry if entry is not None and entry.is_alive() else None


def spawn_lock(port: int) -> FileLock:
    """Held while a client spawns a server on ``port``: two racing clients start one."""
    return FileLock(str(runtime_dir() / f"spawn-{port}.lock"))


class StartRefused(RuntimeError):
    """A server cannot start here: its data dir or a port is taken (``serve`` exits 3)."""


class DataDirInUse(StartRefused):
    """Another server holds the data dir's lock."""


class PortInUse(StartRefused):
    """Something else listens on the control or the data port."""


LOCK_NAME = "server.lock"


class DataDirLock:
    """One server per data dir: an exclusive lock on ``DATA_DIR/server.lock``, held by an
    open file for the server's whole life (the kernel drops it when the process dies, so
    a crashed server never leaves a stale lock). After the first byte, the file records
    the holder (JSON: pid, port, host, started) for a refused server's message."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, holder: dict[str, Any]) -> None:
        """Take the lock or raise DataDirInUse naming the holder; writes nothing else."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # never O_TRUNC: not ours yet
        try:
            _lock_fd(fd)
        except OSError:
            os.close(fd)
            raise DataDirInUse(self._in_use_message()) from None
        self._fd = fd
        info = b"\n" + json.dumps(holder).encode() + b"\n"
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same
            os.pwrite(fd, info, 0)
            os.ftruncate(fd, len(info))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays for the next server
            self._fd = None

    def holder(self) -> dict[str, Any] | None:
        """What the holder wrote (pid, port...), or a registered server on this dir."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(1)  # byte 0 is the locked one on Windows
                info = json.loads(fh.read() or b"null")
            if isinstance(info, dict) and "pid" in info:
                return info
        except (OSError, ValueError):
            pass
        data_dir = self.path.parent.resolve()
        for entry in list_servers(drop_stale=False):
            if Path(entry.data_dir).resolve() == data_dir and entry.is_alive():
                return {"pid": entry.pid, "port": entry.port, "host": entry.host}
        return None

    def _in_use_message(self) -> str:
        data_dir = self.path.parent
        info = self.holder()
        if info is None:
            who = "another zmqruntime server (its pid could not be read)"
            stop = ""
        else:
            who = f"zmqruntime server pid {info['pid']} on port {info.get('port', '?')}"
            stop = f"stop it ('zmqruntime stop {info.get('port', 'PORT')}') or "
        return (
            f"data dir {data_dir} is in use by {who}: one server per data dir; "
            f"{stop}give this server another --data-dir"
        )


def _lock_fd(fd: int) -> None:
    """An exclusive, non-blocking lock on an open file; OSError if someone holds it."""
    if sys.platform == "win32":  # pragma: no cover - Windows (mypy checks per platform)
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` on this machine, for a message, or None if unknown:
    ``pid 123 (zmqruntime server on tcp://127.0.0.1:5555, data dir ...)``."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    pids = {
        c.pid
        for c in conns
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    }
    if not pids:
        return None
    pid = min(pids)
    for entry in list_servers(drop_stale=False):
        if entry.pid == pid and entry.is_alive():
            role = "" if entry.port == port else ", as its data port"
            return (
                f"pid {pid} (zmqruntime server on tcp://{entry.host}:{entry.port}{role}, "
                f"data dir {entry.data_dir})"
            )
    try:
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return f"pid {pid}"
    if len(cmdline) > 100:
        cmdline = cmdline[:97] + "..."
    return f"pid {pid} ({cmdline})"


# Started by a short-lived launcher, the server is not our child: it outlives us without
# becoming a zombie, and no Popen object is left to complain when it is collected.
_LAUNCHER = """
import subprocess, sys
with open(sys.argv[1], "ab") as out:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
print(p.pid)
"""


def last_words(out_file: Path, max_chars: int = 500) -> str:
    """The last paragraph a spawned server wrote (why it exited), or ""."""
    try:
        with open(out_file, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # the last paragraph: a message may be wrapped over several lines
    block: list[str] = []
    for line in reversed(tail.splitlines()):
        if line.strip():
            block.insert(0, line.strip())
        elif block:
            break
    return " ".join(block)[-max_chars:]


def spawn_server(
    port: int,
    host: str = "127.0.0.1",
    workers: int | None = None,
    data_dir: Path | None = None,
    extra_args: list[str] | None = None,
) -> psutil.Process:
    """Start ``zmqruntime serve`` detached from this process; return the server process."""
    list_servers()  # entries of servers that crashed go first
    cmd = [sys.executable, "-m", "zmqruntime", "serve", "--port", str(port), "--host", host]
    if workers:
        cmd += ["--workers", str(workers)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    cmd += extra_args or []
    log_dir = default_data_dir(port) if data_dir is None else Path(data_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out_file = log_dir / "spawn.out"
    if sys.platform != "win32":  # (mypy then checks the Windows branch on Windows only)
        launched = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(out_file), *cmd],
            capture_output=True,
            text=True,
            check=True,
        )
        return psutil.Process(int(launched.stdout.strip()))
    flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP  # pragma: no cover
    with open(out_file, "ab") as out:  # pragma: no cover - Windows
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, creationflags=flags
        )
    proc.returncode = 0  # detached on purpose: never wait for it here
    return psutil.Process(proc.pid)


def kill_server(entry: ServerEntry, timeout: float = 5.0) -> bool:
    """Kill a registered server and its workers, after checking it is still that process."""
    if not entry.is_alive():
        return False
    proc = psutil.Process(entry.pid)
    children = proc.children(recursive=True)
    for p in [proc, *children]:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs([proc, *children], timeout=timeout)
    with contextlib.suppress(FileNotFoundError):
        entry.path.unlink()
    return True


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
