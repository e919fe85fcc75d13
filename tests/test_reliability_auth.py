"""Authentication and encryption: CURVE keys with an allow-list on both channels, refused
insecure binds, private key files and runtime dirs."""

from __future__ import annotations

import contextlib
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import zmq
from reliability_util import QUICK

from zmqruntime import AuthenticationFailed, ExecutionClient, local, protocol
from zmqruntime.connection import HANDSHAKE_FAILED
from zmqruntime.server import ExecutionServer, InsecureBindRefused
from zmqruntime.transport import ClientSecurity, free_port, generate_keys, port_accepts_tcp


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zmqruntime", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A key dir made by the CLI, as a user would."""
    out = cli("keys", "generate", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    return tmp_path / "keys"


@pytest.fixture
def stranger(tmp_path: Path) -> Path:
    """Someone else's keys: a valid client pair that no server of ours allows."""
    generate_keys(tmp_path / "stranger")
    return tmp_path / "stranger"


def non_loopback_address() -> str:
    """This machine's first non-loopback IPv4 address, else the wildcard."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "0.0.0.0"


# --------------------------------------------------------------------------- key files


def test_key_files_and_dirs_are_private(keys):
    assert mode(keys) == 0o700
    assert mode(keys / "authorized_clients") == 0o700
    files = sorted(p.name for p in keys.iterdir() if p.is_file())
    assert files == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for p in [*keys.iterdir(), *(keys / "authorized_clients").iterdir()]:
        if p.is_file():
            assert mode(p) == 0o600, p
    assert (keys / "authorized_clients" / "client.key").read_bytes() == (
        keys / "client.key"
    ).read_bytes()


def test_generating_keys_never_overwrites_existing_ones(keys):
    before = (keys / "server.key_secret").read_bytes()
    out = cli("keys", "generate", str(keys))
    assert out.returncode == 2
    assert "already" in out.stderr
    assert (keys / "server.key_secret").read_bytes() == before


def test_runtime_and_data_dirs_are_private(make_server, tmp_path):
    s = make_server("private", workers=1)
    assert mode(local.runtime_dir()) == 0o700
    assert mode(local.registry_path(s.port)) == 0o600
    # the store is private even in a data dir that others may read
    assert mode(s.data_dir / "results") == 0o700
    assert mode(s.data_dir / "executions.sqlite") == 0o600
    assert mode(s.data_dir / "executions.sqlite-wal") == 0o600
    assert mode(s.data_dir / "server.log") == 0o600
    fresh = tmp_path / "fresh" / "data"  # a --data-dir the server creates itself
    s2 = make_server("private2", workers=1, extra=["--data-dir", str(fresh)])
    assert s2.client().ping()["data_dir"] == str(fresh)
    assert mode(fresh) == 0o700
    # and the default data dir, under the user's data dir
    assert mode(local.default_data_dir(s.port)) == 0o700
    # the workers' ipc sockets live in a private temp dir
    worker = psutil.Process(s.proc.pid).children()[0]
    ipc = Path(worker.cmdline()[worker.cmdline().index("--control") + 1][len("ipc://") :])
    assert mode(ipc.parent) == 0o700


# --------------------------------------------------------------------------- refused binds


def test_a_non_loopback_bind_without_keys_is_refused_before_binding():
    host = non_loopback_address()
    port = free_port()
    out = cli("serve", "--host", host, "--port", str(port), "--workers", "1")
    assert out.returncode == 2
    assert f"refusing to bind to {host}" in out.stderr
    assert "--keys" in out.stderr and "--insecure" in out.stderr
    assert not port_accepts_tcp("127.0.0.1", port)
    assert local.find_server(port) is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "my-workstation.example.org"):
        with pytest.raises(InsecureBindRefused, match="--keys"):
            ExecutionServer(port=port, host=host, data_dir=Path("/nonexistent/never-made"))
    assert not Path("/nonexistent/never-made").exists()


def test_insecure_and_loopback_binds_are_allowed(tmp_path):
    # construction checks the address; nothing is bound until serve_forever
    for host, kwargs in [
        ("0.0.0.0", {"insecure": True}),
        ("127.0.0.1", {}),
        ("127.0.0.2", {}),
        ("localhost", {}),
        ("::1", {}),
    ]:
        server = ExecutionServer(port=free_port(), host=host, data_dir=tmp_path / "d", **kwargs)
        assert server.security is None


# --------------------------------------------------------------------------- CURVE


def test_an_allowed_client_runs_code_on_a_keyed_server(make_server, keys):
    s = make_server("keyed", workers=1, keys=keys)
    c = s.client()
    assert c.ping()["secure"] is True
    assert c.get_results(c.execute(QUICK, config={"value": 7}), timeout=30) == {"return": [7]}


@pytest.mark.parametrize(
    ("who", "advice"),
    [
        ("no keys", "the server requires keys"),
        ("unknown client key", "authorized_clients"),
        ("wrong server key", "authorized_clients"),
        ("keys for an open server", "runs with --keys"),
    ],
)
def test_an_unauthorised_client_gets_authentication_failed(
    make_server, keys, stranger, tmp_path, who, advice
):
    s = make_server("keyed", workers=1, keys=None if who == "keys for an open server" else keys)
    if who == "keys for an open server":
        client_keys = keys
    elif who == "no keys":
        client_keys = None
    elif who == "unknown client key":
        client_keys = tmp_path / "mixed"
        client_keys.mkdir(mode=0o700)
        for name in ("client.key", "client.key_secret"):
            (client_keys / name).write_bytes((stranger / name).read_bytes())
        (client_keys / "server.key").write_bytes((keys / "server.key").read_bytes())
    else:  # our allowed client key, but it expects another server
        client_keys = tmp_path / "mixed"
        client_keys.mkdir(mode=0o700)
        for name in ("client.key", "client.key_secret"):
            (client_keys / name).write_bytes((keys / name).read_bytes())
        (client_keys / "server.key").write_bytes((stranger / "server.key").read_bytes())
    timeout = 3.0
    with ExecutionClient(port=s.port, auto_spawn=False, timeout=timeout, keys=client_keys) as c:
        t0 = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="CURVE") as info:
            c.execute(QUICK, config={"value": 1})
        elapsed = time.monotonic() - t0
    print(f"\n  {who}: AuthenticationFailed after {elapsed:.2f} s: {info.value}")
    assert advice in str(info.value)
    assert elapsed <= timeout + 0.5
    allowed = s.client(keys=None) if who == "keys for an open server" else s.client()
    assert allowed.list_executions() == []  # nothing ran


def _sub(
    port: int, security: ClientSecurity | None, ctx: zmq.Context, monitor: int = 0
) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A subscriber; with ``monitor`` events, its monitor socket is attached before the
    connect, so a handshake refused at once is not missed."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if security is not None:
        security.apply(sub)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    watcher = sub.get_monitor_socket(monitor) if monitor else None
    sub.connect(f"tcp://127.0.0.1:{port}")
    return sub, watcher


def _drain(sock: zmq.Socket, seconds: float) -> list[list[bytes]]:
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            got.append(sock.recv_multipart())
    return got


def _events_to_the_end(sock: zmq.Socket, timeout: float = 30.0) -> list[dict]:
    """The run's events up to its final state event (waits for that, not for silence)."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
        events.append(protocol.parse_event(sock.recv_multipart()))
        if events[-1]["kind"] == "state" and events[-1]["status"]["state"] == "completed":
            break
    return events


LOGS_FOR_A_WHILE = """
import time
def run(ctx, config):
    for i in range(15):
        ctx.log(f"{config.marker} {i}")
        ctx.progress(i + 1, 15)
        time.sleep(0.1)
    return config.marker
"""


def test_the_data_channel_serves_only_allowed_clients(make_server, keys, stranger):
    s = make_server("keyed-data", workers=1, keys=keys)
    c = s.client()
    data_port = c.ping()["data_port"]
    ctx = zmq.Context()
    try:
        allowed, _ = _sub(data_port, ClientSecurity.from_dir(keys), ctx)
        plain, plain_monitor = _sub(data_port, None, ctx, HANDSHAKE_FAILED)
        other, other_monitor = _sub(
            data_port, ClientSecurity.from_dir(stranger), ctx, HANDSHAKE_FAILED
        )
        monitors = [plain_monitor, other_monitor]
        time.sleep(0.5)
        exec_id = c.execute(LOGS_FOR_A_WHILE, config={"marker": "data-channel"})
        assert c.wait(exec_id, timeout=30)["state"] == "completed"
        events = _events_to_the_end(allowed)
        assert any(e["kind"] == "log" and "data-channel" in e["text"] for e in events)
        assert any(e["kind"] == "state" for e in events)
        # the others got nothing at all, because their handshakes were refused
        assert _drain(plain, 0.2) == [] and _drain(other, 0.2) == []
        for monitor in monitors:
            assert monitor is not None and monitor.poll(5000), "no refused handshake was reported"
    finally:
        ctx.destroy(linger=0)


def test_a_keyed_server_on_all_interfaces_still_checks_keys(make_server, keys, stranger):
    s = make_server("wildcard", workers=1, keys=keys, extra=["--host", "0.0.0.0"])
    c = s.client()
    assert c.ping()["host"] == "0.0.0.0"
    assert c.get_results(c.execute(QUICK, config={"value": 3}), timeout=30) == {"return": [3]}
    with (
        ExecutionClient(port=s.port, auto_spawn=False, timeout=2.0) as nobody,
        pytest.raises(AuthenticationFailed),
    ):
        nobody.ping()


def test_cli_connects_with_keys_and_fails_clearly_without(make_server, keys, tmp_path):
    s = make_server("keyed-cli", workers=1, keys=keys)
    pipeline = tmp_path / "p.py"
    pipeline.write_text(QUICK)
    common = ["--port", str(s.port), "--no-spawn", "--set", "value=9"]
    out = cli("submit", str(pipeline), *common, "--keys", str(keys), "--wait")
    assert out.returncode == 0, out.stderr
    assert "completed" in out.stdout
    out = cli("submit", str(pipeline), *common, "--timeout", "2")
    assert out.returncode == 3
    assert "refused this client's credentials" in out.stderr


# --------------------------------------------------------------------------- encryption


class RecordingProxy:
    """A TCP forwarder that keeps every byte it passes, to check what travels in clear."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for t in self.threads:
            t.join(timeout=5)
            assert not t.is_alive(), "a proxy thread did not stop"


def _traffic_through_proxies(server, keys: Path | None, marker: str) -> tuple[bytes, bytes]:
    """Run a pipeline that logs ``marker`` with both channels going through proxies."""
    control = RecordingProxy(server.port)
    data = RecordingProxy(server.port + 1)
    ctx = zmq.Context()
    try:
        sub, _ = _sub(data.port, ClientSecurity.from_dir(keys) if keys else None, ctx)
        with ExecutionClient(port=control.port, auto_spawn=False, keys=keys) as c:
            time.sleep(0.5)  # let the subscription reach the server
            exec_id = c.execute(LOGS_FOR_A_WHILE, config={"marker": marker})
            assert c.get_results(exec_id, timeout=30) == {"return": [marker]}
            assert marker in c.get_logs(exec_id)[0]["text"]
        events = _events_to_the_end(sub)
        assert any(e["kind"] == "log" and marker in e["text"] for e in events)
        sub.close(linger=0)
    finally:
        ctx.term()
        control.close()
        data.close()
    return bytes(control.captured), bytes(data.captured)


def test_both_channels_are_encrypted(make_server, keys):
    marker = "MARKER-7f3a91c2e5"
    plain = make_server("plain", workers=1)
    control, data = _traffic_through_proxies(plain, None, marker)
    # the check can fail: without keys, code, logs and results travel in clear
    assert marker.encode() in control and marker.encode() in data

    secure = make_server("secure", workers=1, keys=keys)
    control, data = _traffic_through_proxies(secure, keys, marker)
    assert len(control) > 1000 and len(data) > 1000
    assert marker.encode() not in control
    assert marker.encode() not in data
    assert b"def run" not in control  # the pipeline's source is encrypted too
