"""The wire format, without sockets (sans-IO, like h11).

Every message is a list of frames: ``[SIGNATURE, header, *buffers]``. The header is a
msgpack map; numpy arrays anywhere in it are msgpack ext values that point at one of
the raw buffer frames, so array bytes are never copied into msgpack. Both drivers (the
server and the client) only call :func:`encode` and :func:`decode`; docs/protocol.md
is the prose twin of this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError

PROTOCOL_VERSION = 1
SIGNATURE_PREFIX = b"zmqr/"
SIGNATURE = SIGNATURE_PREFIX + str(PROTOCOL_VERSION).encode()

#: msgpack ext code of an array reference: ext payload = msgpack [buffer index, dtype, shape, order]
EXT_NDARRAY = 1

#: Largest control request the server accepts (ZMQ_MAXMSGSIZE on the control socket).
MAX_CONTROL_MESSAGE = 64 * 1024 * 1024


class ControlMessageType(str, enum.Enum):
    """Requests on the control channel. A new request is one member plus one handler.

    The handler of member ``FOO = "foo"`` is the method ``handle_foo`` of whatever object
    is passed to :meth:`dispatch`.
    """

    PING = "ping"
    EXECUTE = "execute"
    EXECUTE_MANY = "execute_many"
    STATUS = "status"
    WAIT = "wait"
    WAIT_MANY = "wait_many"
    LIST = "list"
    CANCEL = "cancel"
    RESULTS = "results"
    LOGS = "logs"
    SOURCE = "source"
    SHUTDOWN = "shutdown"

    def dispatch(self, handler: object, body: dict[str, Any]) -> Any:
        method: Callable[[dict[str, Any]], Any] | None = getattr(
            handler, f"handle_{self.value}", None
        )
        if method is None:
            raise ProtocolError(f"request type {self.value!r} has no handler")
        return method(body)


class ReplyType(str, enum.Enum):
    OK = "ok"
    ERROR = "error"


class EventKind(str, enum.Enum):
    """Events on the data channel (topic = execution id)."""

    STATE = "state"
    PROGRESS = "progress"
    LOG = "log"
    RESULT = "result"
    PREVIEW = "preview"


class ErrorCode(str, enum.Enum):
    """Machine-readable codes of error replies."""

    BAD_REQUEST = "bad_request"
    PROTOCOL_VERSION = "protocol_version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_EXECUTION = "unknown_execution"
    TOO_LARGE = "too_large"
    SHUTTING_DOWN = "shutting_down"
    NO_SPACE = "no_space"
    INTERNAL = "internal"


FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
STATES = ("queued", "running", "completed", "failed", "cancelled")


# --------------------------------------------------------------------------- arrays


def array_to_buffer(arr: np.ndarray) -> tuple[memoryview, str]:
    """A zero-copy buffer of the array's memory and its order ("C" or "F").

    C- or Fortran-contiguous arrays are sent as they lie in memory; anything else (a
    strided view) is copied once into C order, since it has no single buffer.
    """
    if arr.dtype.hasobject:
        raise TypeError("arrays of Python objects cannot be sent; use a numeric dtype")
    if arr.flags.c_contiguous:
        order = "C"
    elif arr.flags.f_contiguous:
        order = "F"
    else:
        arr = np.ascontiguousarray(arr)
        order = "C"
    if arr.size == 0:
        return memoryview(b""), order
    flat = arr.reshape(-1, order="A") if order == "C" else arr.T.reshape(-1)
    return memoryview(flat.view(np.uint8)), order


def dtype_to_wire(dtype: np.dtype) -> Any:
    """``dtype.str`` for plain types; numpy's descr list for structured ones."""
    if dtype.fields is None:
        return dtype.str
    return [list(item) for item in np.lib.format.dtype_to_descr(dtype)]


def dtype_from_wire(spec: Any) -> np.dtype:
    if isinstance(spec, str):
        return np.dtype(spec)
    if isinstance(spec, list):
        return np.lib.format.descr_to_dtype([tuple(item) for item in spec])
    raise ProtocolError(f"bad dtype specification {spec!r}")


def buffer_to_array(buf: Any, dtype: Any, shape: Sequence[int], order: str) -> np.ndarray:
    """An array over a received buffer, without copying (read-only when the buffer is)."""
    dt = dtype_from_wire(dtype)
    shape = tuple(int(s) for s in shape)
    if order not in ("C", "F"):
        raise ProtocolError(f"bad array order {order!r}")
    mv = memoryview(buf)
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if mv.nbytes != expected:
        raise ProtocolError(
            f"array buffer has {mv.nbytes} bytes, header says {expected} ({dt}, {shape})"
        )
    if expected == 0:
        return np.empty(shape, dtype=dt, order=order)
    flat = np.frombuffer(mv, dtype=dt)
    return flat.reshape(shape, order=order)


# --------------------------------------------------------------------------- codec


@dataclass
class _Packer:
    buffers: list[Any] = field(default_factory=list)

    def default(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            buf, order = array_to_buffer(obj)
            self.buffers.append(buf)
            meta = [len(self.buffers) - 1, dtype_to_wire(obj.dtype), list(obj.shape), order]
            return msgpack.ExtType(EXT_NDARRAY, msgpack.packb(meta))
        if isinstance(obj, complex) or (isinstance(obj, np.generic) and obj.dtype.kind == "c"):
            return self.default(np.asarray(obj))  # msgpack has no complex: a 0-d array
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        raise TypeError(
            f"cannot send a value of type {type(obj).__name__}: use numpy arrays, bytes, "
            "str, numbers, bool, None, and lists or dicts of these"
        )


def pack(obj: Any) -> tuple[bytes, list[Any]]:
    """msgpack bytes of ``obj`` plus the raw buffers of the arrays it contains."""
    packer = _Packer()
    data = msgpack.packb(obj, default=packer.default, use_bin_type=True, datetime=False)
    return data, packer.buffers


def unpack(data: Any, buffers: Sequence[Any] | None = ()) -> Any:
    """Inverse of :func:`pack`; arrays are views on ``buffers`` (no copy).

    With ``buffers=None`` array references stay msgpack ExtType values, so that a relay
    (the server) can re-pack a header and forward the original buffer frames untouched.
    """

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != EXT_NDARRAY or buffers is None:
            return msgpack.ExtType(code, payload)
        try:
            index, dtype, shape, order = msgpack.unpackb(payload, raw=False)
            return buffer_to_array(buffers[index], dtype, shape, order)
        except (ValueError, TypeError, IndexError) as exc:
            raise ProtocolError(f"bad array reference: {exc}") from exc

    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable msgpack header: {exc}") from exc


def encode(header: dict[str, Any]) -> list[Any]:
    """Frames of one message: signature, header, then one frame per array."""
    data, buffers = pack(header)
    return [SIGNATURE, data, *buffers]


def check_signature(sig: Any) -> None:
    sig = bytes(sig)
    if not sig.startswith(SIGNATURE_PREFIX):
        raise ProtocolError(f"not a zmqruntime message (first frame {sig[:16]!r})")
    if sig != SIGNATURE:
        other = sig[len(SIGNATURE_PREFIX) :].decode("ascii", "replace")
        raise ProtocolError(
            f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, "
            f"the peer speaks {other}",
            code=ErrorCode.PROTOCOL_VERSION,
        )


def decode(frames: Sequence[Any], *, resolve_arrays: bool = True) -> dict[str, Any]:
    """The header of a message with its arrays resolved; raises ProtocolError."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames, got {len(frames)}")
    check_signature(frames[0])
    buffers = [_as_buffer(f) for f in frames[2:]] if resolve_arrays else None
    header = unpack(_as_buffer(frames[1]), buffers)
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return header


def _as_buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


# --------------------------------------------------------------------------- messages


def request(msg_type: ControlMessageType, req: int, body: dict[str, Any] | None = None) -> list:
    return encode({"type": msg_type.value, "req": req, "body": body or {}})


def reply(req: Any, body: dict[str, Any] | None = None) -> list:
    return encode({"type": ReplyType.OK.value, "req": req, "body": body or {}})


def error_reply(req: Any, code: ErrorCode, message: str) -> list:
    body = {"code": code.value, "message": message}
    return encode({"type": ReplyType.ERROR.value, "req": req, "body": body})


def parse_request(frames: Sequence[Any]) -> tuple[ControlMessageType, Any, dict[str, Any]]:
    """Validate a control request; raises ProtocolError naming what is wrong."""
    header = decode(frames)
    req = header.get("req")
    try:
        msg_type = ControlMessageType(header.get("type"))
    except ValueError:
        raise ProtocolError(
            f"unknown request type {header.get('type')!r}", code=ErrorCode.UNKNOWN_TYPE, req=req
        ) from None
    for key in ("req", "body"):
        if key not in header:
            raise ProtocolError(f"request header has no {key!r} field", req=req)
    body = header["body"]
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a map", req=req)
    n_buffers = len(frames) - 2
    if n_buffers and _array_refs(frames[1]) != set(range(n_buffers)):
        raise ProtocolError(
            f"wrong number of frames: {n_buffers} buffer frame(s) after the header, "
            "but the header's arrays do not refer to exactly these",
            req=req,
        )
    return msg_type, req, body


def _array_refs(data: Any) -> set[int]:
    """Buffer indices that a (successfully decoded) header's arrays refer to."""
    refs: set[int] = set()

    def ext_hook(code: int, payload: bytes) -> None:
        if code == EXT_NDARRAY:
            refs.add(msgpack.unpackb(payload)[0])

    msgpack.unpackb(_as_buffer(data), ext_hook=ext_hook, raw=False, strict_map_key=False)
    return refs


def event(exec_id: str, kind: EventKind, seq: int, body: dict[str, Any]) -> list[Any]:
    """Frames of one data-channel event: topic first, so SUB filters by execution id."""
    header = {"kind": kind.value, "id": exec_id, "seq": seq, **body}
    return [exec_id.encode(), *encode(header)]


def relay_event(header: dict[str, Any], buffers: Sequence[Any]) -> list[Any]:
    """Frames of an event re-published by the server: new header, original buffers.

    ``header`` was decoded with ``resolve_arrays=False``; its array references still
    point at ``buffers``, which are forwarded as received (zero-copy).
    """
    data = msgpack.packb(header, use_bin_type=True)
    return [header["id"].encode(), SIGNATURE, data, *buffers]


def parse_event(frames: Sequence[Any], rings: Any = None, arrays: bool = True) -> dict[str, Any]:
    """An event's header with its arrays resolved (``arrays=False``: left unresolved,
    as msgpack ExtType values, which costs no copy: to look at ``kind`` and ``name``).

    An event from the server's local socket may carry no buffer frames but an ``shm``
    descriptor instead (see :mod:`zmqruntime.shm`): ``rings`` (a ``RingReader``) copies
    the arrays out of shared memory. If the ring was overwritten first, the event comes
    back with ``overwritten: True`` and no ``value`` (a result is then in the store).
    """
    if len(frames) < 3:
        raise ProtocolError("an event needs a topic, a signature and a header")
    if not arrays:
        return decode(frames[1:], resolve_arrays=False)
    if len(frames) == 3:
        check_signature(frames[1])
        peek = unpack(_as_buffer(frames[2]), None)
        descriptor = peek.get("shm") if isinstance(peek, dict) else None
        if descriptor is not None:
            if rings is None:
                raise ProtocolError("an event in shared memory, but no reader of it here")
            try:
                buffers = rings.read(descriptor)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if buffers is None:
                del peek["shm"]
                peek.pop("value", None)
                return {**peek, "overwritten": True}
            header = unpack(_as_buffer(frames[2]), buffers)
            del header["shm"]
            return header
    return decode(frames[1:])
