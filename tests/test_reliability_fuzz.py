"""Bad input: over 10,000 malformed messages from raw pyzmq sockets (DEALER and REQ);
each gets an error reply or is dropped, and changes nothing."""

from __future__ import annotations

import random
import time
from collections import Counter

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_util import BLOCKING, QUICK, read_pid

from zmqruntime import protocol

SIG = protocol.SIGNATURE
REPLY_TIMEOUT_MS = 5000
#: request types that change nothing when valid; "execute" and "shutdown" are fuzzed
#: only in shapes that are invalid by construction
READ_ONLY = ["ping", "status", "wait", "list", "results", "logs", "cancel"]
FIELDS = ["id", "pipeline_code", "config_code", "config", "name", "retries", "timeout"]
FIELDS += ["limit", "start", "states", "max_bytes"]


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def header(msg_type, body=None, req=1, **extra) -> bytes:
    return pack({"type": msg_type, "req": req, "body": {} if body is None else body, **extra})


def array_ref(index, dtype, shape, order="C") -> msgpack.ExtType:
    return msgpack.ExtType(protocol.EXT_NDARRAY, pack([index, dtype, shape, order]))


class Fuzzer:
    """Sends malformed messages on one raw socket and checks every answer is an error."""

    def __init__(self, ctx: zmq.Context, port: int, kind: int) -> None:
        self.ctx, self.port, self.kind = ctx, port, kind
        self.sock = self._connect()
        self.sent = 0
        self.codes: Counter[str] = Counter()

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(self.kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{self.port}")
        return sock

    def _reply(self) -> dict:
        assert self.sock.poll(REPLY_TIMEOUT_MS), "the server did not answer a bad message"
        frames = self.sock.recv_multipart()
        if self.kind == zmq.DEALER and frames and frames[0] == b"":
            frames = frames[1:]  # we looked like a REQ peer (empty first frame)
        return protocol.decode(frames)

    def send(self, frames: list[bytes], *, valid_ok: bool = False) -> dict:
        """One message, one reply; the reply must be an error unless ``valid_ok``."""
        self.sock.send_multipart(frames)
        self.sent += 1
        reply = self._reply()
        if reply["type"] == "error":
            self.codes[reply["body"]["code"]] += 1
        else:
            assert valid_ok, f"a malformed message was accepted: {frames!r:.300} -> {reply!r:.300}"
            self.codes["ok"] += 1
        return reply

    def send_batch(self, messages: list[list[bytes]]) -> None:
        """Pipelined (DEALER only): send them all, then collect as many error replies."""
        for frames in messages:
            self.sock.send_multipart(frames)
        self.sent += len(messages)
        for _ in messages:
            reply = self._reply()
            assert reply["type"] == "error", reply
            self.codes[reply["body"]["code"]] += 1

    def send_unanswered(self, frames: list[bytes]) -> None:
        """A message the server drops (oversize): no reply, and this socket is replaced."""
        self.sock.send_multipart(frames)
        self.sent += 1
        assert not self.sock.poll(1000), "an oversize message was answered"
        self.sock.close(linger=0)
        self.sock = self._connect()
        self.codes["dropped"] += 1

    def close(self) -> None:
        self.sock.close(linger=0)


def structured_cases(rng: random.Random) -> list[tuple[str, list[bytes]]]:
    """One case per way of being wrong, each with a few variants."""
    ping = header("ping")
    cases: list[tuple[str, list[bytes]]] = []
    # wrong signature / version
    for sig in [b"", b"zmqr", b"zmqr/", b"ZMQR/1", b"zmqr/1 ", b"\x00" * 8, b"GET / HTTP/1.1"]:
        cases.append(("signature", [sig, ping]))
    for sig in [b"zmqr/0", b"zmqr/2", b"zmqr/999", b"zmqr/\xff\xfe", b"zmqr/-1"]:
        cases.append(("version", [sig, ping]))
    # part counts
    cases += [("parts", [SIG]), ("parts", [ping]), ("parts", [b""]), ("parts", [b"", b""])]
    cases += [("parts", [SIG, ping, b"x" * n]) for n in (0, 1, 100)]
    cases += [("parts", [SIG, ping, b"", b"", b""]), ("parts", [SIG, ping, *[b"z"] * 50])]
    # not msgpack, truncated msgpack, absurd lengths, deep nesting
    for data in [
        b"",
        b"\xc1",
        b"\x81",
        b"\x82\xa4type",
        b"\xdb\xff\xff\xff\xff",
        b"\xdd\xff\xff\xff\xff",
    ]:
        cases.append(("msgpack", [SIG, data]))
    cases.append(("msgpack", [SIG, b"\x91" * 100_000]))
    cases.append(("msgpack", [SIG, pack({"type": "ping", "req": 1, "body": {}})[:-1]]))
    # headers that are not maps
    for obj in [
        None,
        True,
        0,
        -1,
        1.5,
        "ping",
        b"ping",
        [],
        ["ping", 1, {}],
        msgpack.ExtType(9, b""),
    ]:
        cases.append(("not a map", [SIG, pack(obj)]))
    # type: unknown or of the wrong type
    for t in [None, 0, 1.0, True, [], {}, b"ping", "", "PING", "Ping", "handle_ping", "dispatch"]:
        cases.append(("type", [SIG, header(t)]))
    for t in ["__class__", "__init__", "_record", "_status", "reply", "event", "done", "ready"]:
        cases.append(("type", [SIG, header(t)]))
    cases += [("type", [SIG, pack({"req": 1, "body": {}})])]  # no type at all
    # body of the wrong type
    for body in [None, 0, "x", b"x", [], [1, 2], 1.5, True]:
        cases.append(("body", [SIG, pack({"type": "list", "req": 1, "body": body})]))
    # missing fields
    for t in ["status", "wait", "cancel", "results", "logs", "execute"]:
        cases.append(("missing", [SIG, header(t, {})]))
        cases.append(("missing", [SIG, header(t, {"ID": "x", "Id": 1})]))
    # wrong field types and values
    bad_values = [0, -1, 1.5, True, b"id", [], {}, ["a"], {"a": 1}, 2**63, -(2**63), 2**64 - 1]
    for t in ["status", "wait", "cancel", "results", "logs"]:
        for v in bad_values:
            cases.append(("field type", [SIG, header(t, {"id": v})]))
    unknown_id = {"id": "0123456789abcdef"}
    for t in ["status", "wait", "cancel", "results", "logs"]:
        cases.append(("unknown id", [SIG, header(t, unknown_id)]))
        cases.append(("unknown id", [SIG, header(t, {"id": ""})]))
        cases.append(("unknown id", [SIG, header(t, {"id": "x" * 10_000})]))
        cases.append(("unknown id", [SIG, header(t, {"id": "' OR 1=1; --"})]))
    # (unknown fields are ignored, for newer clients: each bad value goes where it is read)
    for key, values, readers in [
        ("limit", ["10", 1.5, [], {}, b"1", True, -1, -(2**63)], ["list", "results", "logs"]),
        ("start", ["0", 0.5, [], -1, -(2**63)], ["results", "logs"]),
        ("states", ["completed", 1, [1], [None], [[]], [{}], [b"queued"], ["done"]], ["list"]),
        ("max_bytes", ["1", 2.5, [], -5], ["results"]),
    ]:
        for v in values:
            for t in readers:
                cases.append(("field value", [SIG, header(t, {**unknown_id, key: v})]))
    for v in ["1", [], {}, b"", True, float("nan"), 2**64 - 1, -(2**63), float("-inf")]:
        cases.append(("field value", [SIG, header("wait", {**unknown_id, "timeout": v})]))
    # execute: never valid here (a valid one would change something)
    code = "def run(ctx, config):\n    return 1\n"
    for body in [
        {"pipeline_code": None},
        {"pipeline_code": 1},
        {"pipeline_code": b"def run(ctx, config): pass"},
        {"pipeline_code": ["def run"]},
        {"pipeline_code": {"code": code}},
        {"pipeline_code": code, "config_code": 1},
        {"pipeline_code": code, "config_code": [code]},
        {"pipeline_code": code, "config": "a=1"},
        {"pipeline_code": code, "config": [1, 2]},
        {"pipeline_code": code, "config": 7},
        {"pipeline_code": code, "name": 5},
        {"pipeline_code": code, "name": b"bytes"},
        {"pipeline_code": code, "retries": "3"},
        {"pipeline_code": code, "retries": 1.5},
        {"pipeline_code": code, "retries": True},
        {"pipeline_code": code, "retries": 2**64 - 1},
        {"pipeline_code": code, "retries": 101},
        {"pipeline_code": code, "retries": -1},
        {"pipeline_code": code, "config": {1: "int key"}},
        {"pipeline_code": code, "config": {b"bytes key": 1}},
        {"pipeline_code": code, "config": {"a": float("nan"), 1: "int key"}, "retries": "x"},
    ]:
        cases.append(("execute", [SIG, header("execute", body)]))
    # the batch requests: a bad entry anywhere refuses the whole batch
    for body in [
        {"pipeline_code": code, "configs": [{}, {"a": 1}], "retries": 101},
        {"pipeline_code": code, "configs": [{}, {1: "int key"}]},
        {"pipeline_code": code, "configs": [{}, "a=1"]},
        {"pipeline_code": code, "configs": [{}], "names": [1]},
        {"pipeline_code": code, "configs": [{}], "names": ["a", "b"]},
        {"pipeline_code": code, "configs": {"a": 1}},
        {"pipeline_code": None, "configs": [{}]},
    ]:
        cases.append(("execute_many", [SIG, header("execute_many", body)]))
    for body in [
        {"ids": "0123456789abcdef"},
        {"ids": [1]},
        {"ids": ["0123456789abcdef"]},  # unknown id
        {"ids": [], "timeout": float("nan")},
        {"ids": [], "max_bytes": -1},
        {"ids": [], "with_results": 1},
    ]:
        cases.append(("wait_many", [SIG, header("wait_many", body)]))
    # array references that lie
    for ref, buffers in [
        (array_ref(0, "<u2", [4]), []),  # no buffer
        (array_ref(3, "<u2", [4]), [b"\x00" * 8]),  # index out of range
        (array_ref(-1, "<u2", [4]), [b"\x00" * 8]),
        (array_ref(0, "<u2", [5]), [b"\x00" * 8]),  # size mismatch
        (array_ref(0, "|O", [1]), [b"\x00" * 8]),  # object dtype
        (array_ref(0, "nonsense", [1]), [b"\x00"]),
        (array_ref(0, [["a", "<u2"], ["a", "<u2"]], [1]), [b"\x00" * 4]),  # duplicate field
        (array_ref(0, [[1, 2, 3]], [1]), [b"\x00"]),
        (array_ref(0, "<u1", [2**62, 4]), [b""]),  # overflowing shape
        (array_ref(0, "<u1", [2**32, 2**32]), [b""]),
        (array_ref(0, "<u1", [-1]), [b""]),
        (array_ref(0, "<u1", "4"), [b"\x00" * 4]),
        (array_ref(0, "<u1", [4], "K"), [b"\x00" * 4]),
        (msgpack.ExtType(protocol.EXT_NDARRAY, b"\xc1garbage"), [b""]),
        (msgpack.ExtType(protocol.EXT_NDARRAY, pack([0, "<u1"])), [b""]),
        (msgpack.ExtType(protocol.EXT_NDARRAY, pack({"a": 1})), [b""]),
    ]:
        body = {"pipeline_code": 0, "config": {"x": ref}}
        cases.append(("array", [SIG, pack({"type": "execute", "req": 1, "body": body}), *buffers]))
        cases.append(("array", [SIG, pack({"type": "status", "req": ref, "body": {}}), *buffers]))
    return cases


def corrupted_cases(rng: random.Random, n: int) -> list[list[bytes]]:
    """Requests with a few random bytes changed: mostly invalid, sometimes still a valid
    read-only request (a list with a mangled field name is a list)."""
    valid = [header("status", {"id": "0123456789abcdef"}), header("list", {"limit": 5})]
    out = []
    for _ in range(n):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out.append([SIG, bytes(data)])
    return out


def random_message(rng: random.Random) -> list[bytes]:
    n = rng.choice([1, 1, 2, 2, 2, 3, 5])
    frames = [rng.randbytes(rng.choice([0, 1, 6, 16, 100, 1000])) for _ in range(n)]
    if rng.random() < 0.3:
        frames[0] = SIG  # get past the signature check sometimes
    elif frames[0].startswith(b"zmqr/1"):
        frames[0] = b"x" + frames[0]
    return frames


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), msgpack_values, max_size=5)
types = st.sampled_from(READ_ONLY) | st.text(max_size=12) | msgpack_values


def test_fuzz_the_control_channel(make_server, tmp_path):
    s = make_server("fuzz", workers=1)
    client = s.client()
    log_lines_before = (s.data_dir / "server.log").read_text().count("\n")
    rng = random.Random(20240611)
    ctx = zmq.Context()
    fuzzers = {kind: Fuzzer(ctx, s.port, kind) for kind in (zmq.DEALER, zmq.REQ)}
    dealer, req = fuzzers[zmq.DEALER], fuzzers[zmq.REQ]
    t0 = time.monotonic()
    try:
        # 1. one case per way of being wrong, from both socket types
        cases = structured_cases(rng)
        for fuzzer in (dealer, req):
            for _, frames in cases:
                fuzzer.send(frames)
            for frames in corrupted_cases(rng, 300):
                fuzzer.send(frames, valid_ok=True)

        # 2. raw random bytes, pipelined in batches from the DEALER
        for _ in range(60):
            dealer.send_batch([random_message(rng) for _ in range(100)])
        for _ in range(500):  # and lockstep from the REQ
            req.send(random_message(rng))

        # 3. hypothesis: headers of every shape with plausible and implausible fields
        @settings(
            max_examples=2500,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(msg_type=types, req_id=msgpack_values, body=bodies, extra=st.booleans())
        def fuzz_headers(msg_type, req_id, body, extra):
            if msg_type in ("execute", "shutdown"):
                return  # valid ones would change something; invalid ones are covered above
            frames = [SIG, pack({"type": msg_type, "req": req_id, "body": body})]
            if extra:
                frames.append(b"\x00" * 8)
            reply = dealer.send(frames, valid_ok=msg_type in READ_ONLY)
            assert reply["type"] in ("ok", "error")

        fuzz_headers()

        # 4. oversize: over ZMQ_MAXMSGSIZE, the connection is dropped, nothing answered
        big = b"\x00" * (protocol.MAX_CONTROL_MESSAGE + 1)
        dealer.send_unanswered([SIG, big])
        dealer.send_unanswered([SIG, header("ping"), big])
        del big
    finally:
        for fuzzer in fuzzers.values():
            fuzzer.close()
        ctx.term()
    elapsed = time.monotonic() - t0
    total = dealer.sent + req.sent
    codes = dealer.codes + req.codes
    print(
        f"\n  fuzz: {total} malformed messages sent in {elapsed:.1f} s "
        f"({dealer.sent} DEALER, {req.sent} REQ); replies: {dict(codes)}"
    )
    assert total >= 10_000

    # afterwards: alive, unchanged, every bad message counted, logged once per kind
    info = client.ping()
    assert info["pid"] == s.proc.pid and info["queued"] == 0
    # every message that reached the server and was bad is counted (oversize ones never do)
    assert info["bad_messages"] >= total - codes["ok"] - codes["unknown_execution"] - 2
    assert client.list_executions() == []
    log = (s.data_dir / "server.log").read_text()
    warnings = log.count("\n") - log_lines_before
    print(f"  server.log grew by {warnings} lines")
    assert warnings <= 60, log[-5000:]
    assert "Traceback" not in log
    assert client.get_results(client.execute(QUICK, config={"value": "ok"}), timeout=30) == {
        "return": ["ok"]
    }


def test_a_wait_with_a_nan_timeout_does_not_park_forever(make_server, tmp_path):
    s = make_server("nan", workers=1)
    client = s.client()
    exec_id = client.execute(BLOCKING, config={"pid_file": str(tmp_path / "pid"), "seconds": 60})
    read_pid(tmp_path / "pid")
    ctx = zmq.Context()
    try:
        fuzzer = Fuzzer(ctx, s.port, zmq.DEALER)
        reply = fuzzer.send([SIG, header("wait", {"id": exec_id, "timeout": float("nan")})])
        assert "timeout" in reply["body"]["message"]
        nan = {"ids": [exec_id], "timeout": float("nan")}
        reply = fuzzer.send([SIG, header("wait_many", nan)])
        assert "timeout" in reply["body"]["message"]
        for timeout in (-1.0, 0.0):  # no wait at all: the status at once
            reply = fuzzer.send(
                [SIG, header("wait", {"id": exec_id, "timeout": timeout})], valid_ok=True
            )
            assert reply["body"]["state"] == "running"
    finally:
        ctx.destroy(linger=0)
    client.cancel(exec_id)
