"""What a server process sets up around its loop: the log file, the registry entry, the
banner, and the message of a port it could not bind."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import zmq

from . import local
from ._version import __version__
from .transport import tcp_url

if TYPE_CHECKING:
    from .server import ExecutionServer


class LogFileHandler(logging.FileHandler):
    """The server's log file: on a full disk a line is lost, with no traceback on stderr."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def setup_logging(log_file: Path) -> logging.Handler:
    """The ``zmqruntime`` loggers write to ``log_file`` (private, like the store)."""
    # workers' stderr lands here too (C libraries, crashes): private like the store
    os.close(os.open(log_file, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
    handler = LogFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("zmqruntime")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def bind_refused(host: str, port: int, is_data: bool, exc: zmq.ZMQError) -> local.StartRefused:
    """Why a port could not be bound, in words (pyzmq 27 raises no OSError)."""
    which = " (the data port, --port + 1)" if is_data else ""
    url = tcp_url(host, port)
    if exc.errno != errno.EADDRINUSE:
        return local.StartRefused(f"cannot listen on {url}{which}: {exc}")
    holder = local.port_holder(port)
    by = f" by {holder}" if holder else ""
    return local.PortInUse(
        f"cannot listen on {url}: port {port}{which} is in use{by}; "
        "choose another --port (the server needs PORT and PORT+1 free)"
    )


def registry_entry(server: ExecutionServer) -> local.ServerEntry:
    return local.ServerEntry(
        port=server.port,
        host=server.host,
        pid=os.getpid(),
        create_time=psutil.Process().create_time(),
        data_dir=str(server.data_dir),
        log_file=str(server.log_file),
        data_port=server.data_port,
        workers=server.n_workers,
        started=server._started,
    )


def banner(server: ExecutionServer, problem: str | None) -> list[str]:
    """What ``serve`` prints once it listens."""
    executor = server.executor
    runner = (
        f"executor: Dask ({executor.spec})"
        if executor is not None
        else f"workers: {server.n_workers}"
    )
    return [
        f"zmqruntime {__version__} server (pid {os.getpid()})",
        f"  control: {tcp_url(server.host, server.port)}",
        f"  data:    {tcp_url(server.host, server.data_port)}",
        f"  {runner}",
        f"  data dir: {server.data_dir}",
        f"  log:     {server.log_file}",
        *([f"  warning: {problem}"] if problem else []),
    ]
