"""The wire format, without sockets (sans-IO, like h11).

Every message is a list of frames: ``[SIGNATURE, header, *buffers]``. The header is a
msgpack map; numpy arrays anywhere in it are msgpack ext values that point at one of
the raw buffer frames, so array bytes are never copied into msgpack. Both drivers (the
server and the client) only call :func:`encode` and :func:`decode`; docs/protocol.md
is the prose twin of this module.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np

from .errors import ProtocolError

PROTOCOL_VERSION = 1
SIGNATURE_PREFIX = b"zmqr/"
SIGNATURE = SIGNATURE_PREFIX + str(PROTOCOL_VERSION).encode()

#: msgpack ext code of an array reference: ext payload = msgpack [buffer index, dtype, shape, order]
EXT_NDARRAY = 1

#: Largest control request the server accepts, all frames together: a larger one gets a
#: ``too_large`` error reply. ZMQ_MAXMSGSIZE on the control socket drops (with the
#: connection) a single frame larger than this before it is even read.
MAX_CONTROL_MESSAGE = 64 * 1024 * 1024


class ControlMessageType(str, enum.Enum):
    """Requests on the control channel. A new request is one member, the dataclass its
    body decodes into (``messages.REQUESTS``) and its handler (``server_requests.HANDLERS``).
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
    return flat.view(np.uint8).data, order


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
        return np.empty(shape, dtype=dt, order=cast(Any, order))
    flat = np.frombuffer(mv, dtype=dt)
    return flat.reshape(shape, order=cast(Any, order))


# --------------------------------------------------------------------------- codec

#: msgpack ext code of a tuple: ext payload = msgpack array of its items (packed the same way)
EXT_TUPLE = 2
#: msgpack ext code of a complex number: ext payload = real, imag as little-endian float64
EXT_COMPLEX = 3
_COMPLEX = struct.Struct("<dd")


def _pack_with(packer: _Packer, obj: Any) -> bytes:
    # strict types: tuples and subclasses of dict/list/int/... reach ``default``, so that
    # tuples come back as tuples (and can be dict keys) instead of as lists
    return msgpack.packb(
        obj, default=packer.default, use_bin_type=True, datetime=False, strict_types=True
    )


@dataclass
class _Packer:
    buffers: list[Any] = field(default_factory=list)

    def default(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            buf, order = array_to_buffer(obj)
            self.buffers.append(buf)
            meta = [len(self.buffers) - 1, dtype_to_wire(obj.dtype), list(obj.shape), order]
            return msgpack.ExtType(EXT_NDARRAY, msgpack.packb(meta))
        if isinstance(obj, np.generic):  # numpy scalars travel as the Python scalar
            if obj.dtype.kind == "c":
                return self.default(complex(obj))
            if obj.dtype.kind in "biuUS" or (obj.dtype.kind == "f" and obj.itemsize <= 8):
                return obj.item()
            return self.default(np.asarray(obj))  # datetime, void...: a 0-d array
        if isinstance(obj, complex):
            return msgpack.ExtType(EXT_COMPLEX, _COMPLEX.pack(obj.real, obj.imag))
        if isinstance(obj, tuple):  # named tuples too: they come back as plain tuples
            return msgpack.ExtType(EXT_TUPLE, _pack_with(self, list(obj)))
        for base in (bool, int, float, str, bytes, dict, list):  # subclasses: their base
            if isinstance(obj, base):
                return cast(Any, base)(obj)
        if isinstance(obj, (set, frozenset)):
            return list(obj)
        raise TypeError(
            f"cannot send a value of type {type(obj).__name__}: use numpy arrays, bytes, "
            "str, numbers, bool, None, and lists, tuples or dicts of these"
        )


def pack(obj: Any) -> tuple[bytes, list[Any]]:
    """msgpack bytes of ``obj`` plus the raw buffers of the arrays it contains.

    Raises TypeError (or ValueError / OverflowError for an int beyond 64 bits) for a value
    this codec cannot carry.
    """
    packer = _Packer()
    return _pack_with(packer, obj), packer.buffers


def unpack(data: Any, buffers: Sequence[Any] | None = ()) -> Any:
    """Inverse of :func:`pack`; arrays are views on ``buffers`` (no copy).

    With ``buffers=None`` every extension value (arrays, tuples, complex numbers) stays a
    msgpack ExtType, so that a relay (the server) can store or re-pack a value byte for
    byte and forward the original buffer frames untouched, without understanding it.
    """
    try:
        return _unpackb(data, _ExtHook(buffers))
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable msgpack header: {exc}") from exc


class _ExtHook:
    """Decodes ext values; an object rather than a closure that calls itself, because such a
    closure is a reference cycle that would keep ``buffers`` (whole frames) alive until the
    cyclic garbage collector happens to run."""

    __slots__ = ("buffers",)

    def __init__(self, buffers: Sequence[Any] | None) -> None:
        self.buffers = buffers

    def __call__(self, code: int, payload: bytes) -> Any:
        buffers = self.buffers
        if buffers is None:
            return msgpack.ExtType(code, payload)
        try:
            if code == EXT_NDARRAY:
                index, dtype, shape, order = msgpack.unpackb(payload, raw=False)
                return buffer_to_array(buffers[index], dtype, shape, order)
            if code == EXT_TUPLE:
                return tuple(_unpackb(payload, self))
            if code == EXT_COMPLEX:
                return complex(*_COMPLEX.unpack(payload))
        except ProtocolError:
            raise
        except (ValueError, TypeError, IndexError, struct.error) as exc:
            what = "array reference" if code == EXT_NDARRAY else f"extension value (code {code})"
            raise ProtocolError(f"bad {what}: {exc}") from exc
        return msgpack.ExtType(code, payload)


def _unpackb(data: Any, ext_hook: Callable[[int, bytes], Any]) -> Any:
    return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)


def check_value(obj: Any, what: str) -> tuple[bytes, list[Any]]:
    """``pack(obj)``, but a value the codec cannot carry raises TypeError naming ``what``.

    The value is also decoded once, so that what cannot come back (a set used as a dict
    key turns into an unhashable list) fails here, in the caller, not at the receiver.
    """
    try:
        data, buffers = pack(obj)
        unpack(data, buffers)
    except (TypeError, ValueError, OverflowError, RecursionError, ProtocolError) as exc:
        raise TypeError(f"{what} cannot be sent or stored: {exc}") from None
    return data, buffers


# A self-contained byte string of one value (arrays included): how values with arrays are
# kept in files and in the store. Layout: magic, u32 number of buffers, u64 header length,
# u64 length of each buffer, the msgpack header, then each buffer at a 64-byte boundary.
BLOB_MAGIC = b"ZMQV\x01\x00\x00\x00"
_BLOB_ALIGN = 64


def dumps(obj: Any) -> bytes:
    """One value, arrays and all, as a self-contained byte string (see :func:`loads`)."""
    return blob(*pack(obj))


def blob(data: bytes, buffers: Sequence[Any]) -> bytes:
    """The self-contained byte string of a value already packed by :func:`pack`."""
    sizes = [memoryview(b).nbytes for b in buffers]
    head = BLOB_MAGIC + struct.pack(f"<IQ{len(sizes)}Q", len(sizes), len(data), *sizes)
    parts: list[Any] = [head, data]  # bytes-like: joined without a copy each
    pos = len(head) + len(data)
    for buf, size in zip(buffers, sizes):
        pad = -pos % _BLOB_ALIGN
        parts += [b"\0" * pad, memoryview(buf).cast("B") if size else b""]
        pos += pad + size
    return b"".join(parts)


def loads(blob: Any) -> Any:
    """Inverse of :func:`dumps`; arrays are read-only views on ``blob``.

    A byte string without the magic is read as plain msgpack (what older stores hold).
    """
    mv = memoryview(blob).cast("B")
    if bytes(mv[: len(BLOB_MAGIC)]) != BLOB_MAGIC:
        return unpack(mv, [])
    try:
        at = len(BLOB_MAGIC)
        (n,) = struct.unpack_from("<I", mv, at)
        if n > mv.nbytes // 8:
            raise ProtocolError(f"corrupt value: it claims {n} buffers")
        header_len, *sizes = struct.unpack_from(f"<Q{n}Q", mv, at + 4)
        pos = at + 4 + 8 * (n + 1)
        data = mv[pos : pos + header_len]
        pos += header_len
        buffers = []
        for size in sizes:
            pos += -pos % _BLOB_ALIGN
            buffers.append(mv[pos : pos + size])
            pos += size
        if pos > mv.nbytes:
            raise ProtocolError(f"truncated value: {mv.nbytes} bytes, needs {pos}")
    except struct.error as exc:
        raise ProtocolError(f"truncated value: {exc}") from None
    return unpack(data, buffers)


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


def check_request_size(nbytes: int) -> None:
    """Raise ProtocolError(code too_large) for a request over MAX_CONTROL_MESSAGE bytes."""
    if nbytes > MAX_CONTROL_MESSAGE:
        raise ProtocolError(
            f"request too large: {nbytes:,} bytes; a server accepts at most "
            f"{MAX_CONTROL_MESSAGE:,} bytes per request (send large data as files, or "
            "split it over several runs)",
            code=ErrorCode.TOO_LARGE,
        )


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
    _unpackb(_as_buffer(data), _RefCollector(refs))
    return refs


class _RefCollector:
    """The buffer indices of arrays, inside tuples too (see _ExtHook for why a class)."""

    __slots__ = ("refs",)

    def __init__(self, refs: set[int]) -> None:
        self.refs = refs

    def __call__(self, code: int, payload: bytes) -> Any:
        if code == EXT_NDARRAY:
            self.refs.add(msgpack.unpackb(payload)[0])
        elif code == EXT_TUPLE:
            return tuple(_unpackb(payload, self))
        return msgpack.ExtType(code, payload)  # hashable: ext values may be dict keys


def event(exec_id: str, kind: EventKind, seq: int, body: dict[str, Any]) -> list[Any]:
    """Frames of one data-channel event: topic first, so SUB filters by execution id."""
    header = {"kind": kind.value, "id": exec_id, "seq": seq, **body}
    return [exec_id.encode(), *encode(header)]


def relay_event(header: dict[str, Any], buffers: Sequence[Any]) -> list[Any]:
    """Frames of an event re-published by the server: new header, original buffers.

    ``header`` was decoded with ``resolve_arrays=False``; its array references still
    point at ``buffers``, which are forwarded as received (zero-copy).
    """
    data = msgpack.packb(header, use_bin_type=True)  # its ExtType values: byte for byte
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
