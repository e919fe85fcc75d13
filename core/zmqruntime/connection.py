"""Connection: the control channel to one zmqruntime server.

One DEALER socket with its CURVE credentials, a timeout on every request, and the local
server it may spawn. Both :class:`~zmqruntime.client.ExecutionClient` and
:class:`~zmqruntime.pool.ExecutionPool` (through one client per server) talk to servers
through it. A socket whose request timed out is closed and replaced, so a dead server
never leaves a caller stuck; one lock serialises the socket, so threads may share a
connection.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

from . import local, protocol
from .errors import (
    AuthenticationFailed,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    UnknownExecution,
)
from .protocol import ControlMessageType, ErrorCode
from .transport import ClientSecurity, is_loopback, port_accepts_tcp, tcp_url

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Connection:
    """Requests to one server at ``host:port``, each answered within a timeout.

    ``auto_spawn`` starts a local server (with ``workers`` and ``data_dir``) when nothing
    listens on a loopback port. ``keys`` is a key directory (``zmqruntime keys generate``)
    for CURVE servers.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5555,
        *,
        timeout: float = 5.0,
        keys: str | Path | None = None,
        auto_spawn: bool = True,
        workers: int | None = None,
        data_dir: str | Path | None = None,
        spawn_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self.keys = Path(keys) if keys else None
        self.security = ClientSecurity.from_dir(self.keys) if self.keys else None
        self.auto_spawn = auto_spawn
        self.workers = workers
        self.data_dir = Path(data_dir) if data_dir else None
        self.spawn_timeout = spawn_timeout
        self.endpoint = tcp_url(host, self.port)
        self.spawned: psutil.Process | None = None  # the server this connection started
        self.zctx = zmq.Context()  # also for the caller's SUB sockets (closed with it)
        self._lock = threading.RLock()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._req_ids = itertools.count(1)
        self._server_info: dict[str, Any] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Connection({self.endpoint!r})"

    def close(self) -> None:
        """Close the socket and every socket made from :attr:`zctx`."""
        with self._lock:
            self._discard_socket()
            self._closed = True
        self.zctx.destroy(linger=0)  # term() would wait for an abandoned stream's socket

    def server_info(self) -> dict[str, Any]:
        """The server's first ping reply: checked once, spawning a server if allowed."""
        if self._server_info is not None:
            return self._server_info
        with self._lock:
            if self._server_info is not None:
                return self._server_info
            if is_loopback(self.host) and not port_accepts_tcp(self.host, self.port):
                if not self.auto_spawn:
                    raise ServerUnavailable(
                        f"no zmqruntime server at {self.endpoint} (connection refused) and "
                        "auto_spawn is off: start one with 'zmqruntime serve --port "
                        f"{self.port}'"
                    )
                self._spawn()
            info = self._send(ControlMessageType.PING, {}, self.timeout)
            if info.get("server") != "zmqruntime":
                raise ProtocolError(f"{self.endpoint} answered, but not as a zmqruntime server")
            self._server_info = info
            return info

    def request(
        self, msg_type: ControlMessageType, body: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and return the reply's body; a server error raises.

        Raises ServerUnavailable when no reply comes within ``timeout`` (default: the
        connection's), AuthenticationFailed when the server refuses the credentials.
        """
        self.server_info()
        return self._send(msg_type, body, self.timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> None:
        lock = local.spawn_lock(self.port)
        try:
            lock.acquire(timeout=self.spawn_timeout)
        except TimeoutError as exc:
            raise ServerUnavailable(
                f"timed out waiting for another client spawning a server on port {self.port}"
            ) from exc
        try:
            if port_accepts_tcp(self.host, self.port):
                return  # another client won the race
            extra = ["--keys", str(self.keys)] if self.keys else []
            proc = local.spawn_server(self.port, self.host, self.workers, self.data_dir, extra)
            deadline = time.monotonic() + self.spawn_timeout
            while time.monotonic() < deadline:
                if not _running(proc):
                    log_dir = self.data_dir or local.default_data_dir(self.port)
                    said = local.last_words(log_dir / "spawn.out")
                    raise ServerUnavailable(
                        f"the server spawned on port {self.port} exited at once"
                        + (f": {said}" if said else "")
                        + f" (see {log_dir / 'spawn.out'})"
                    )
                if port_accepts_tcp(self.host, self.port):
                    self.spawned = proc
                    return
                time.sleep(0.02)
            raise ServerUnavailable(
                f"a spawned server did not open port {self.port} within {self.spawn_timeout:g} s"
            )
        finally:
            lock.release()

    def _send(
        self, msg_type: ControlMessageType, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise ServerUnavailable("this client is closed")
            req = next(self._req_ids)
            frames = protocol.request(msg_type, req, body)
            # checked here, where it is clear, rather than by a server that drops the frame
            protocol.check_request_size(sum(memoryview(f).nbytes for f in frames))
            sock = self._socket()
            sock.send_multipart(frames, copy=False)
            deadline = time.monotonic() + timeout
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            if self._monitor is not None:  # a refused handshake ends the wait at once
                poller.register(self._monitor, zmq.POLLIN)
            while True:
                remaining = deadline - time.monotonic()
                ready = dict(poller.poll(int(remaining * 1000) + 1)) if remaining > 0 else {}
                if sock not in ready:
                    raise self._on_timeout(msg_type, timeout)
                header = protocol.decode(sock.recv_multipart(copy=False))
                if header.get("req") == req:
                    break
        reply_body = header.get("body") or {}
        if header.get("type") == protocol.ReplyType.ERROR.value:
            raise remote_error(reply_body)
        return reply_body

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self.zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.security:
                self.security.apply(sock)
            self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _discard_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def _on_timeout(self, msg_type: ControlMessageType, timeout: float) -> Exception:
        """The error for a request that got no reply (the socket is replaced)."""
        refused = self._monitor is not None and self._monitor.poll(0)
        self._discard_socket()
        if refused:
            if self.security is None:
                advice = "the server requires keys: pass keys=DIR (see 'zmqruntime keys')"
            else:  # libzmq rarely says which side of the handshake went wrong
                advice = (
                    "check that this client's client.key is in the server's authorized_clients, "
                    "that server.key is that server's public key, and that the server runs "
                    "with --keys"
                )
            return AuthenticationFailed(
                f"{self.endpoint} refused this client's credentials (CURVE handshake failed): "
                + advice
            )
        return ServerUnavailable(
            f"no reply from the zmqruntime server at {self.endpoint} within {timeout:g} s "
            f"({msg_type.value} request)"
        )


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remote_error(body: dict[str, Any]) -> Exception:
    """The exception for a server's error reply."""
    code, message = body.get("code", "internal"), body.get("message", "error")
    if code == ErrorCode.UNKNOWN_EXECUTION.value:
        return UnknownExecution(message)
    if code in (
        ErrorCode.PROTOCOL_VERSION.value,
        ErrorCode.UNKNOWN_TYPE.value,
        ErrorCode.TOO_LARGE.value,
    ):
        return ProtocolError(message, code=code)
    return RemoteError(code, message)
