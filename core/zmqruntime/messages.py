"""Typed messages: the worker protocol's message types, and control request bodies as
frozen dataclasses, checked when they are decoded.

Pure like :mod:`zmqruntime.protocol` (no sockets); the wire format is the one in
docs/protocol.md and does not change: a request's ``body`` map decodes into the dataclass
of its ``type`` (:data:`REQUESTS`), and a body that does not fit raises ProtocolError
(``bad_request``) naming the field. Unknown fields are ignored (newer clients).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ProtocolError
from .protocol import STATES, ControlMessageType

MAX_WAIT = 30.0  # seconds a long poll is held at most
MAX_RETRIES = 100
MAX_BATCH = 10_000  # runs per execute_many / wait_many request
MAX_COUNT = 2**62  # ints sent to SQLite (limits, offsets) are capped here
#: arrays per ``results`` reply by default: small replies let the one I/O thread that
#: sends every control reply get to a ping between them while gigabytes are fetched
RESULTS_REPLY_BYTES = 8 * 1024 * 1024
WAIT_RESULTS_BYTES = 32 * 1024 * 1024  # small results that ride along with a wait reply


class WorkerMessage(str, enum.Enum):
    """The ``type`` of messages between the server and its workers (docs/protocol.md §5)."""

    # worker -> server, control socket
    READY = "ready"
    HEARTBEAT = "heartbeat"
    # server -> worker, control socket
    TASK = "task"
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    # worker -> server, events socket
    EVENT = "event"
    STORED = "stored"
    DONE = "done"
    # a Dask task <-> the server (zmqruntime.dask_executor / dask_task)
    HELLO = "hello"
    GO = "go"
    ABORT = "abort"
    ACK = "ack"
    STORE_FAILED = "store_failed"


# --------------------------------------------------------------------------- field checks
def _optional(body: dict, key: str, types: Any) -> Any:
    value = body.get(key)
    allowed = types if isinstance(types, tuple) else (types,)
    if isinstance(value, tuple) and list in allowed:  # tuples travel as tuples
        value = list(value)
    if value is not None and (
        not isinstance(value, types) or isinstance(value, bool) and bool not in allowed
    ):
        expected = getattr(types, "__name__", None) or "/".join(t.__name__ for t in types)
        raise ProtocolError(f"field {key!r} must be {expected}, got {type(value).__name__}")
    return value


def _require(body: dict, key: str, types: Any) -> Any:
    if body.get(key) is None:
        raise ProtocolError(f"missing field {key!r}")
    return _optional(body, key, types)


def _count(body: dict, key: str, default: int) -> int:
    """A non-negative int field (0 or absent: ``default``), capped to what SQLite takes."""
    value = _optional(body, key, int)
    if value is not None and value < 0:
        raise ProtocolError(f"field {key!r} must not be negative, got {value}")
    return min(value or default, MAX_COUNT)


def _timeout(body: dict, default: float) -> float:
    """A long poll's ``timeout`` in seconds, at most MAX_WAIT; 0 or less: answer at once."""
    value = _optional(body, "timeout", (int, float))
    timeout = default if value is None else min(float(value), MAX_WAIT)
    if math.isnan(timeout):  # would park the request forever
        raise ProtocolError("field 'timeout' must be a number of seconds, got NaN")
    return timeout


def _config(config: Any, what: str = "config") -> dict | None:
    if config is not None and not all(isinstance(k, str) for k in config):
        raise ProtocolError(f"field '{what}' must map names (str) to values")
    return config


def _retries(body: dict) -> int:
    retries = _optional(body, "retries", int) or 0
    if not 0 <= retries <= MAX_RETRIES:
        raise ProtocolError(f"field 'retries' must be 0 to {MAX_RETRIES}, got {retries}")
    return int(retries)


def _resources(value: Any) -> dict[str, float] | None:
    """Dask worker resources, e.g. {"GPU": 1}: names to positive numbers."""
    if not value:
        return None
    if not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in value.items()
    ) or not all(0 < v < math.inf for v in value.values()):
        raise ProtocolError("field 'resources' must map names (str) to positive numbers")
    return dict(value)


# --------------------------------------------------------------------------- requests
class Request:
    """A decoded control request body; ``TYPE`` is its ControlMessageType."""

    TYPE: ClassVar[ControlMessageType]

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Request:
        raise NotImplementedError


@dataclass(frozen=True)
class Ping(Request):
    TYPE = ControlMessageType.PING

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Ping:
        return cls()


@dataclass(frozen=True)
class Shutdown(Request):
    TYPE = ControlMessageType.SHUTDOWN

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Shutdown:
        return cls()


@dataclass(frozen=True)
class Execute(Request):
    TYPE = ControlMessageType.EXECUTE
    pipeline_code: str
    config_code: str | None = None
    config: dict | None = None
    name: str | None = None
    retries: int = 0
    resources: dict[str, float] | None = None

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Execute:
        config = _config(_optional(body, "config", dict))
        retries = _retries(body)
        resources = _resources(_optional(body, "resources", dict))
        return cls(
            _require(body, "pipeline_code", str),
            _optional(body, "config_code", str),
            config,
            _optional(body, "name", str),
            retries,
            resources,
        )


@dataclass(frozen=True)
class ExecuteMany(Request):
    """One run per config, in one request: for maps over many inputs."""

    TYPE = ControlMessageType.EXECUTE_MANY
    pipeline_code: str
    configs: tuple[dict | None, ...]
    config_code: str | None = None
    names: tuple[str | None, ...] | None = None
    retries: int = 0

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ExecuteMany:
        pipeline_code = _require(body, "pipeline_code", str)
        config_code = _optional(body, "config_code", str)
        configs = _require(body, "configs", list)
        names = _optional(body, "names", list)
        retries = _retries(body)
        if len(configs) > MAX_BATCH:
            raise ProtocolError(f"at most {MAX_BATCH} configs per request, got {len(configs)}")
        if names is not None and len(names) != len(configs):
            raise ProtocolError("'names' must have one entry per config")
        for i, config in enumerate(configs):
            if config is not None and not isinstance(config, dict):
                raise ProtocolError(f"configs[{i}] must be a map or nil")
            _config(config)
        for i, name in enumerate(names or []):
            if name is not None and not isinstance(name, str):
                raise ProtocolError(f"names[{i}] must be str or nil")
        return cls(
            pipeline_code,
            tuple(configs),
            config_code,
            tuple(names) if names is not None else None,
            retries,
        )


@dataclass(frozen=True)
class ById(Request):
    """A request about one run: ``status``, ``cancel``, ``source``."""

    id: str

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ById:
        return cls(_require(body, "id", str))


class Status(ById):
    TYPE = ControlMessageType.STATUS


class Cancel(ById):
    TYPE = ControlMessageType.CANCEL


class Source(ById):
    TYPE = ControlMessageType.SOURCE


@dataclass(frozen=True)
class WaitFor(Request):
    """A long poll on runs (``wait``: one, ``wait_many``: many)."""

    ids: tuple[str, ...]
    timeout: float
    with_results: bool
    max_bytes: int

    @classmethod
    def _rest(cls, body: dict[str, Any], ids: list[str], default_timeout: float) -> WaitFor:
        return cls(
            tuple(ids),
            _timeout(body, default_timeout),
            bool(_optional(body, "with_results", bool)),
            _count(body, "max_bytes", WAIT_RESULTS_BYTES),
        )


class Wait(WaitFor):
    """Answered when the run ends or after ``timeout`` (default MAX_WAIT) seconds; with
    ``with_results``, a completed run's stored results ride along up to ``max_bytes``."""

    TYPE = ControlMessageType.WAIT

    @classmethod
    def decode(cls, body: dict[str, Any]) -> WaitFor:
        return cls._rest(body, [_require(body, "id", str)], MAX_WAIT)


class WaitMany(WaitFor):
    """Answered when all runs have ended or after ``timeout`` (default 0: at once)."""

    TYPE = ControlMessageType.WAIT_MANY

    @classmethod
    def decode(cls, body: dict[str, Any]) -> WaitFor:
        ids = _require(body, "ids", list)
        if len(ids) > MAX_BATCH or not all(isinstance(i, str) for i in ids):
            raise ProtocolError(f"'ids' must be a list of at most {MAX_BATCH} str")
        return cls._rest(body, ids, 0.0)


@dataclass(frozen=True)
class ListRuns(Request):
    TYPE = ControlMessageType.LIST
    limit: int = 200
    states: tuple[str, ...] | None = None

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ListRuns:
        limit = _count(body, "limit", 200)
        states = _optional(body, "states", list)
        if states is not None and not all(s in STATES for s in states):
            raise ProtocolError(f"field 'states' must list states among {STATES}")
        return cls(limit, tuple(states) if states is not None else None)


@dataclass(frozen=True)
class Results(Request):
    TYPE = ControlMessageType.RESULTS
    id: str
    start: int = 0
    limit: int = 1000
    max_bytes: int = RESULTS_REPLY_BYTES
    values: bool | None = None  # False: a listing (what each result is), no bytes

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Results:
        return cls(
            _require(body, "id", str),
            _count(body, "start", 0),
            _count(body, "limit", 1000),
            _count(body, "max_bytes", RESULTS_REPLY_BYTES),
            _optional(body, "values", bool),
        )


@dataclass(frozen=True)
class Logs(Request):
    TYPE = ControlMessageType.LOGS
    id: str
    start: int = 0
    limit: int = 10_000

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Logs:
        return cls(
            _require(body, "id", str), _count(body, "start", 0), _count(body, "limit", 10_000)
        )


#: each control request type and the dataclass its body decodes into
REQUESTS: dict[ControlMessageType, type[Request]] = {
    cls.TYPE: cls
    for cls in (
        Ping,
        Execute,
        ExecuteMany,
        Status,
        Wait,
        WaitMany,
        ListRuns,
        Cancel,
        Results,
        Logs,
        Source,
        Shutdown,
    )
}


def decode_request(msg_type: ControlMessageType, body: dict[str, Any]) -> Request:
    """The body of a ``msg_type`` request as its dataclass; ProtocolError if it does not fit."""
    return REQUESTS[msg_type].decode(body)
