"""The exceptions a caller of zmqruntime can catch, one per way things go wrong."""

from __future__ import annotations

from typing import Any


class ZmqRuntimeError(Exception):
    """Base of every error this package raises on purpose."""


class ProtocolError(ZmqRuntimeError):
    """A peer sent something that is not a valid message of this protocol version."""

    def __init__(self, message: str, *, code: Any = None, req: Any = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else "bad_request"
        self.req = req


class ServerUnavailable(ZmqRuntimeError):
    """No server answered at the endpoint within the timeout."""


class AuthenticationFailed(ServerUnavailable):
    """The server did not accept this client's CURVE key (or the keys are missing)."""


class UnknownExecution(ZmqRuntimeError, KeyError):
    """The server never issued this execution id (or its retention rule removed it)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown execution"


class ExecutionFailed(ZmqRuntimeError):
    """The pipeline raised, or its worker died; carries the remote traceback."""

    def __init__(self, message: str, *, traceback: str | None = None, status: Any = None):
        super().__init__(message)
        self.traceback = traceback
        self.status = status

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n\nRemote traceback:\n{self.traceback}" if self.traceback else base


class ExecutionCancelled(ZmqRuntimeError):
    """The execution was cancelled before it completed."""

    # raised by class (no arguments) when a worker interrupts a pipeline: then the
    # default message is what the run's status says
    def __init__(
        self, message: str = "cancelled: the pipeline was interrupted", *, status: Any = None
    ):
        super().__init__(message)
        self.status = status


class RunEnded(ZmqRuntimeError, RuntimeError):
    """A pipeline's ``ctx`` was used after its run ended (e.g. by a thread left running)."""


class RemoteError(ZmqRuntimeError):
    """The server answered a request with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
