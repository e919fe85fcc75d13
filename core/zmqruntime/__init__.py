"""zmqruntime: run Python pipelines on local or remote servers over ZeroMQ.

>>> from zmqruntime import ExecutionClient
>>> client = ExecutionClient(port=5555)        # spawns a local server if none answers
>>> exec_id = client.execute(pipeline_code, config_code)
>>> client.get_results(exec_id)
"""

__version__ = "0.1.0"

from .client import ExecutionClient, raise_for_status  # noqa: E402
from .context import Config, Context  # noqa: E402
from .errors import (  # noqa: E402
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
from .pool import ExecutionPool, MapItem  # noqa: E402
from .server import ExecutionServer  # noqa: E402
from .stream import load_directory  # noqa: E402

__all__ = [
    "AuthenticationFailed",
    "Config",
    "Context",
    "ExecutionCancelled",
    "ExecutionClient",
    "ExecutionFailed",
    "ExecutionPool",
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
