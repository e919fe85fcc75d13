"""The wire format without sockets: round trips, arrays, version and malformed input."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from zmqruntime import ProtocolError, protocol
from zmqruntime.protocol import ControlMessageType, ErrorCode

DTYPES = [
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    ">u2",
    "<f8",
]


def roundtrip(value):
    frames = protocol.encode({"v": value})
    # what a socket delivers: separate bytes objects
    return protocol.decode([bytes(memoryview(f)) for f in frames])["v"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_dtypes_roundtrip(dtype):
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    out = roundtrip(arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        lambda: np.arange(20, dtype=np.int16).reshape(4, 5)[::2, 1::2],  # non-contiguous
        lambda: np.array(3.5),  # 0-d
        lambda: np.zeros((0, 5), dtype=np.uint8),  # empty
        lambda: np.zeros((3, 0)),
        lambda: np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),  # structured
    ],
)
def test_array_layouts_roundtrip(make):
    arr = make()
    out = roundtrip(arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_fortran_array_is_sent_without_copy():
    arr = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    frames = protocol.encode({"a": arr})
    buf = frames[2]
    assert isinstance(buf, memoryview)
    assert np.shares_memory(np.frombuffer(buf, dtype=np.uint8), arr)


def test_received_array_is_a_view_on_the_buffer():
    arr = np.arange(1000, dtype=np.uint16)
    frames = [bytes(memoryview(f)) for f in protocol.encode({"a": arr})]
    out = protocol.decode(frames)["a"]
    assert np.shares_memory(out, np.frombuffer(frames[2], dtype=np.uint8))


def test_nested_values_roundtrip():
    value = {
        "a": [1, 2.5, None, True, "x", b"\x00\xff"],
        "b": {"c": np.arange(3)},
        "n": np.int64(7),
    }
    out = roundtrip(value)
    assert out["a"] == [1, 2.5, None, True, "x", b"\x00\xff"]
    np.testing.assert_array_equal(out["b"]["c"], np.arange(3))
    assert out["n"] == 7


def test_unsendable_values_raise_clear_type_error():
    with pytest.raises(TypeError, match="cannot send a value of type object"):
        protocol.encode({"v": object()})
    with pytest.raises(TypeError, match="Python objects"):
        protocol.encode({"v": np.array([object()], dtype=object)})


def test_version_mismatch_is_explicit():
    frames = protocol.encode({"type": "ping", "req": 1, "body": {}})
    frames[0] = b"zmqr/99"
    with pytest.raises(ProtocolError, match="version mismatch.*speaks 1.*speaks 99") as info:
        protocol.decode(frames)
    assert info.value.code == ErrorCode.PROTOCOL_VERSION


@pytest.mark.parametrize(
    "frames, match",
    [
        ([b"zmqr/1"], "at least 2 frames"),
        ([b"HTTP/1.1", b"x"], "not a zmqruntime message"),
        ([b"zmqr/1", b"\xc1"], "undecodable"),
        ([b"zmqr/1", msgpack.packb([1, 2])], "header must be a map"),
        ([b"zmqr/1", msgpack.packb({"type": "nope", "req": 1})], "unknown request type"),
        ([b"zmqr/1", msgpack.packb({"type": "ping", "req": 1, "body": 3})], "body must be"),
    ],
)
def test_malformed_requests_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_request(frames)


def test_bad_array_reference_is_a_protocol_error():
    meta = msgpack.packb([5, "<u2", [3], "C"])  # buffer 5 does not exist
    header = msgpack.packb({"a": msgpack.ExtType(protocol.EXT_NDARRAY, meta)})
    with pytest.raises(ProtocolError, match="bad array reference"):
        protocol.decode([protocol.SIGNATURE, header])
    meta = msgpack.packb([0, "<u2", [3], "C"])  # 3 uint16 need 6 bytes, 5 given
    header = msgpack.packb({"a": msgpack.ExtType(protocol.EXT_NDARRAY, meta)})
    with pytest.raises(ProtocolError, match="5 bytes, header says 6"):
        protocol.decode([protocol.SIGNATURE, header, b"12345"])


def test_every_request_type_has_one_body_dataclass_and_one_handler():
    from zmqruntime import messages
    from zmqruntime.server_requests import HANDLERS

    assert set(messages.REQUESTS) == set(ControlMessageType) == set(HANDLERS)
    status = messages.decode_request(ControlMessageType.STATUS, {"id": "abc", "new": 1})
    assert status == messages.Status("abc")  # unknown fields are ignored
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.id = "x"  # type: ignore[misc]
    with pytest.raises(ProtocolError, match="missing field 'id'"):
        messages.decode_request(ControlMessageType.STATUS, {})
    with pytest.raises(ProtocolError, match="field 'limit' must be int, got str"):
        messages.decode_request(ControlMessageType.LIST, {"limit": "3"})
    with pytest.raises(ProtocolError, match="field 'retries' must be 0 to 100"):
        messages.decode_request(ControlMessageType.EXECUTE, {"pipeline_code": "x", "retries": 101})
    wait = messages.decode_request(ControlMessageType.WAIT, {"id": "a", "timeout": 99})
    assert wait.timeout == messages.MAX_WAIT and wait.ids == ("a",)
    many = messages.decode_request(
        ControlMessageType.EXECUTE_MANY,
        {"pipeline_code": "x", "configs": [None, {"a": 1}], "names": ("n", None)},
    )
    assert many.configs == (None, {"a": 1}) and many.names == ("n", None)


def test_relay_keeps_buffers_untouched():
    arr = np.arange(10, dtype=np.float32)
    frames = protocol.encode({"type": "event", "id": "abc", "kind": "result", "value": arr})
    header = protocol.decode(frames, resolve_arrays=False)
    del header["type"]
    header["seq"] = 4
    relayed = protocol.relay_event(header, frames[2:])
    assert relayed[3] is frames[2]
    event = protocol.parse_event([bytes(memoryview(f)) for f in relayed])
    assert event["seq"] == 4 and event["id"] == "abc"
    np.testing.assert_array_equal(event["value"], arr)


def test_public_api_names():
    import zmqruntime

    for name in (
        "ExecutionClient",
        "UnknownExecution",
        "ExecutionFailed",
        "ExecutionCancelled",
        "ServerUnavailable",
        "ProtocolError",
        "AuthenticationFailed",
    ):
        assert name in zmqruntime.__all__
        assert hasattr(zmqruntime, name)
    assert issubclass(zmqruntime.UnknownExecution, KeyError)
