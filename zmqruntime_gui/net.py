"""The GUI's side of the network, without Qt: clients per server, probes, spawning.

Every function here may block (up to a client timeout), so the window calls them only
from its task pool, never from the GUI thread. Each server gets two clients: a probe
client with a short timeout that only pings, so that a slow results download never
makes a healthy server look dead, and a work client for everything else.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Any

import psutil

from zmqruntime import ExecutionClient, ServerUnavailable, local
from zmqruntime.local import free_port, port_accepts_tcp

from .model import DEFAULT_PORT, Endpoint

PROBE_TIMEOUT = 1.5
WORK_TIMEOUT = 5.0


class Connections:
    """Lazily created clients, one probe and one work client per endpoint; thread-safe."""

    def __init__(
        self,
        probe_timeout: float = PROBE_TIMEOUT,
        work_timeout: float = WORK_TIMEOUT,
        keys: str | Path | None = None,
    ) -> None:
        self.probe_timeout = probe_timeout
        self.work_timeout = work_timeout
        self.keys = keys  # the default key directory (``zmqruntime-gui --keys DIR``)
        self._keys: dict[Endpoint, str | Path | None] = {}  # per server, from the settings
        self._lock = threading.Lock()
        self._probe: dict[Endpoint, ExecutionClient] = {}
        self._work: dict[Endpoint, ExecutionClient] = {}
        self._closed = False

    def _get(self, table: dict[Endpoint, ExecutionClient], ep: Endpoint, timeout: float):
        with self._lock:
            if self._closed:
                raise ServerUnavailable("the window is closing")
            client = table.get(ep)
            if client is None:
                client = ExecutionClient(
                    port=ep.port,
                    host=ep.host,
                    auto_spawn=False,
                    timeout=timeout,
                    keys=self.keys_for(ep),
                )
                table[ep] = client
            return client

    def keys_for(self, ep: Endpoint) -> str | Path | None:
        """The key directory the clients of ``ep`` use: its own, else the default."""
        return self._keys.get(ep) or self.keys

    def set_keys(self, ep: Endpoint, keys: str | Path | None) -> None:
        """Use ``keys`` for ``ep`` from now on (its clients are made anew)."""
        with self._lock:
            self._keys[ep] = keys
        self.forget(ep)

    def client(self, ep: Endpoint) -> ExecutionClient:
        """The work client of ``ep`` (requests with the normal timeout)."""
        return self._get(self._work, ep, self.work_timeout)

    def probe(self, ep: Endpoint) -> dict[str, Any]:
        """Ping ``ep``: the server's facts plus ``rtt_ms``; raises ServerUnavailable.

        A loopback port that refuses connections fails at once; anything else fails
        within the probe timeout. A failed probe client is dropped, so the next probe
        starts from a clean connection (the server may have been restarted).
        """
        if ep.is_local and not port_accepts_tcp(ep.host, ep.port, timeout=0.2):
            raise ServerUnavailable(f"nothing listens on {ep.key} (connection refused)")
        client = self._get(self._probe, ep, self.probe_timeout)
        try:
            return client.ping(timeout=self.probe_timeout)
        except Exception:
            with self._lock:
                if self._probe.get(ep) is client:
                    del self._probe[ep]
            client.close()
            raise

    def forget(self, ep: Endpoint) -> None:
        """Close the clients of ``ep`` (its followers must have stopped first)."""
        with self._lock:
            clients = [c for c in (self._probe.pop(ep, None), self._work.pop(ep, None)) if c]
        for c in clients:
            c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = [*self._probe.values(), *self._work.values()]
            self._probe.clear()
            self._work.clear()
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()


def check_key_dir(path: str | Path) -> str | None:
    """Why ``path`` cannot serve as a client key directory, or None if it can."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return f"{directory} is not a folder"
    missing = [n for n in ("client.key_secret", "server.key") if not (directory / n).is_file()]
    if missing:
        return (
            f"{directory} lacks {' and '.join(missing)}: it needs this machine's client key "
            "pair and the server's public key (see 'zmqruntime keys generate')"
        )
    return None


def local_endpoint(entry: local.ServerEntry) -> Endpoint:
    """Where to reach a server of this machine's registry (a wildcard bind -> loopback)."""
    host = entry.host if entry.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return Endpoint(host, entry.port)


def registry() -> dict[Endpoint, local.ServerEntry]:
    """The live servers this user started on this machine, by endpoint."""
    return {local_endpoint(e): e for e in local.list_servers()}


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``port`` and its data port ``port + 1`` right now.

    With SO_REUSEADDR, as ZeroMQ binds: connections of a server that just died (in
    TIME_WAIT) do not make its port look taken.
    """
    for p in (port, port + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, p))
            except OSError:
                return False
    return True


def suggest_port() -> int:
    """The default port when it is free, else any free pair."""
    return DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()


def spawn_local(port: int, workers: int | None) -> psutil.Process:
    """Start a detached ``zmqruntime serve`` on loopback; it outlives the window."""
    return local.spawn_server(port, "127.0.0.1", workers or None)


def has_exited(proc: psutil.Process) -> bool:
    """Whether a spawned (detached) server process is gone."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def spawn_output(port: int) -> str:
    """The last lines a spawned server printed (why it did not start)."""
    path = local.default_data_dir(port) / "spawn.out"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4000))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def read_tail(path: str | Path, max_bytes: int = 512 * 1024) -> str:
    """The end of a (local) log file, at most ``max_bytes``."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read()
    text = data.decode(errors="replace")
    if size > max_bytes:
        text = text.partition("\n")[2]  # drop the cut first line
    return text
