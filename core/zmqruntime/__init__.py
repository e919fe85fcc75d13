"""zmqruntime: run Python pipelines on local or remote servers over ZeroMQ.

>>> from zmqruntime import ExecutionClient
>>> client = ExecutionClient(port=5555)        # spawns a local server if none answers
>>> exec_id = client.execute(pipeline_code, config_code)
>>> client.get_results(exec_id)
"""

from ._version import __version__
from .api import ExecutionAPI
from .client import ExecutionClient, raise_for_status
from .context import Config, Context
from .errors import (
    AuthenticationFailed,
    ExecutionCancelled,
    ExecutionFailed,
    ProtocolError,
    RemoteError,
    RunEnded,
    ServerUnavailable,
    UnknownExecution,
    ZmqRuntimeError,
)
from .pool import ExecutionPool, MapItem
from .protocol import FINAL_STATES, STATES, EventKind
from .server import ExecutionServer
from .stream import load_directory

__all__ = [
    "FINAL_STATES",
    "STATES",
    "AuthenticationFailed",
    "Config",
    "Context",
    "ExecutionAPI",
    "ExecutionCancelled",
    "ExecutionClient",
    "ExecutionFailed",
    "ExecutionPool",
    "EventKind",
    "ExecutionServer",
    "MapItem",
    "ProtocolError",
    "RemoteError",
    "RunEnded",
    "ServerUnavailable",
    "UnknownExecution",
    "ZmqRuntimeError",
    "__version__",
    "load_directory",
    "raise_for_status",
]
