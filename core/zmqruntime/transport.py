"""Addresses, socket options and CURVE keys: how bytes reach the other side securely.

Key directory layout (``zmqruntime keys generate DIR``)::

    DIR/server.key          server public key      (give to clients)
    DIR/server.key_secret   server secret key      (stays on the server, 0600)
    DIR/client.key          client public key
    DIR/client.key_secret   client secret key      (stays with the client, 0600)
    DIR/authorized_clients/ public keys the server accepts (client.key is put there)
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tcp_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def data_port_of(port: int) -> int:
    """The data channel listens next to the control channel."""
    return port + 1


def port_accepts_tcp(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether anything accepts TCP connections there (cheaper than a timed-out ping)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port whose neighbour (the data channel) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port < 65535 and not port_accepts_tcp(host, port + 1, timeout=0.05):
            with socket.socket() as s2:
                try:
                    s2.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of ports found")


# --------------------------------------------------------------------------- endpoints
# (as given to ExecutionPool, the CLI's --server and the GUI's server field)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port``, ``host:port`` or ``[v6addr]:port`` -> (host, port)."""
    text = endpoint.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a server endpoint (expected tcp://HOST:PORT): {endpoint!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def endpoint_key(host: str, port: int) -> str:
    """The server part of a pool id: ``host:port`` (IPv6 in brackets)."""
    return tcp_url(host, port)[len("tcp://") :]


def read_servers_file(path: str | Path) -> list[str]:
    """Endpoints listed one per line; blank lines and ``#`` comments are skipped."""
    out = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            parse_endpoint(line)  # fail early, with the offending line
            out.append(line)
    return out


def keys_for(
    keys: str | Path | Mapping[str, str | Path] | None, host: str, port: int
) -> Path | None:
    """The key directory for one server.

    ``keys`` is one directory for all servers (it holds ``server.key``), a directory of
    per-server directories named ``host_port`` or ``host``, or a mapping from
    ``host:port`` (or ``host``) to a directory.
    """
    if keys is None:
        return None
    key = endpoint_key(host, port)
    if isinstance(keys, Mapping):
        found = keys.get(key, keys.get(host))
        if found is None:
            raise ValueError(f"no key directory given for server {key}")
        return Path(found).expanduser()
    base = Path(keys).expanduser()
    if (base / "server.key").exists():
        return base
    for name in (f"{host}_{port}", host):
        if (base / name / "server.key").exists():
            return base / name
    raise FileNotFoundError(
        f"no keys for server {key} in {base}: expected {base}/server.key, "
        f"{base}/{host}_{port}/server.key or {base}/{host}/server.key"
    )


# --------------------------------------------------------------------------- CURVE keys


def generate_keys(directory: Path) -> dict[str, Path]:
    """Create a server and a client key pair, and allow the client's public key.

    Every file is 0600 and the dirs 0700. Existing keys are never overwritten: a new
    server key would lock out every client that trusts the old one.
    """
    directory = Path(directory)
    existing = [
        directory / name
        for name in ("server.key_secret", "client.key_secret", "server.key", "client.key")
        if (directory / name).exists()
    ]
    if existing:
        raise FileExistsError(
            f"{directory} already holds keys ({', '.join(p.name for p in existing)}); "
            "remove them first if you really mean to replace them"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    authorized = directory / "authorized_clients"
    authorized.mkdir(exist_ok=True)
    os.chmod(authorized, 0o700)
    # the dir is 0700 before any key is written, so no file is ever readable by others
    server_pub, server_sec = zmq.auth.create_certificates(directory, "server")
    client_pub, client_sec = zmq.auth.create_certificates(directory, "client")
    (authorized / "client.key").write_bytes(Path(client_pub).read_bytes())
    for path in (server_pub, server_sec, client_pub, client_sec, authorized / "client.key"):
        os.chmod(path, 0o600)
    return {
        "server_public": Path(server_pub),
        "server_secret": Path(server_sec),
        "client_public": Path(client_pub),
        "client_secret": Path(client_sec),
        "authorized": authorized,
    }


@dataclass
class ServerSecurity:
    """CURVE server keys plus a ZAP authenticator allowing the keys in ``authorized``."""

    public: bytes
    secret: bytes
    authorized: Path
    authenticator: ThreadAuthenticator | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> ServerSecurity:
        directory = Path(directory)
        secret_file = directory / "server.key_secret"
        if not secret_file.exists():
            raise FileNotFoundError(
                f"{secret_file} not found: create keys with 'zmqruntime keys generate {directory}'"
            )
        public, secret = _secret_pair(secret_file)
        authorized = directory / "authorized_clients"
        if not authorized.is_dir():
            raise FileNotFoundError(f"{authorized} not found: it lists the allowed client keys")
        return cls(public, secret, authorized)

    def start(self, zctx: zmq.Context) -> None:
        self.authenticator = ThreadAuthenticator(zctx)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(self.authorized))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


@dataclass
class ClientSecurity:
    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_dir(cls, directory: Path) -> ClientSecurity:
        directory = Path(directory)
        secret_file = directory / "client.key_secret"
        server_file = directory / "server.key"
        for f in (secret_file, server_file):
            if not f.exists():
                raise FileNotFoundError(
                    f"{f} not found: copy the client keys and the server's public key there"
                )
        public, secret = _secret_pair(secret_file)
        server_public, _ = zmq.auth.load_certificate(server_file)
        return cls(public, secret, server_public)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def _secret_pair(path: Path) -> tuple[bytes, bytes]:
    """The public and secret key of a ``*.key_secret`` file."""
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret
