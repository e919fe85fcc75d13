"""A client written from docs/protocol.md alone: raw pyzmq + msgpack, no zmqruntime code."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import zmq

SIG = b"zmqr/1"


def request(sock: zmq.Socket, msg_type: str, req: int, body: dict) -> dict:
    sock.send_multipart([SIG, msgpack.packb({"type": msg_type, "req": req, "body": body})])
    assert sock.poll(5000), f"no reply to {msg_type}"
    frames = sock.recv_multipart()
    assert frames[0] == SIG
    header = msgpack.unpackb(frames[1], raw=False)
    assert header["req"] == req
    return {"header": header, "buffers": frames[2:]}


def array_from(ext: msgpack.ExtType, buffers: list[bytes]) -> np.ndarray:
    assert ext.code == 1
    index, dtype, shape, order = msgpack.unpackb(ext.data, raw=False)
    return np.frombuffer(buffers[index], dtype=dtype).reshape(shape, order=order)


def test_a_client_from_the_spec_alone(server):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{server.port}")
    sub = ctx.socket(zmq.SUB)
    try:
        pong = request(req, "ping", 1, {})["header"]
        assert pong["type"] == "ok" and pong["body"]["server"] == "zmqruntime"
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{pong['body']['data_port']}")
        time.sleep(0.3)  # slow joiner: let the subscription reach the server

        pipeline = (
            "import numpy as np\n"
            "def run(ctx, config):\n"
            "    ctx.emit('frame', np.arange(6, dtype=np.uint16).reshape(2, 3))\n"
            "    return config.x * 2\n"
        )
        reply = request(req, "execute", 2, {"pipeline_code": pipeline, "config": {"x": 21}})
        exec_id = reply["header"]["body"]["id"]

        status = request(req, "wait", 3, {"id": exec_id, "timeout": 10.0})["header"]["body"]
        assert status["state"] == "completed" and status["n_results"] == 2

        got = request(req, "results", 4, {"id": exec_id})
        items = got["header"]["body"]["results"]
        assert [i["name"] for i in items] == ["frame", "return"]
        np.testing.assert_array_equal(
            array_from(items[0]["value"], got["buffers"]),
            np.arange(6, dtype=np.uint16).reshape(2, 3),
        )
        assert items[1]["value"] == 42

        kinds = []
        deadline = time.monotonic() + 60  # the run has ended: wait for its final state event
        while sub.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            frames = sub.recv_multipart()
            assert frames[0] == exec_id.encode() and frames[1] == SIG
            event = msgpack.unpackb(frames[2], raw=False)
            kinds.append(event["kind"])
            if event["kind"] == "result" and event["index"] == 0:
                np.testing.assert_array_equal(
                    array_from(event["value"], frames[3:]),
                    np.arange(6, dtype=np.uint16).reshape(2, 3),
                )
            if event["kind"] == "state" and event["status"]["state"] == "completed":
                break
        assert kinds[0] == "state" and kinds[-1] == "state" and "result" in kinds

        err = request(req, "status", 5, {"id": "0000000000000000"})["header"]
        assert err["type"] == "error" and err["body"]["code"] == "unknown_execution"
        # another protocol version is refused by name
        req.send_multipart([b"zmqr/2", msgpack.packb({"type": "ping", "req": 6, "body": {}})])
        assert req.poll(5000)
        header = msgpack.unpackb(req.recv_multipart()[1], raw=False)
        assert header["body"]["code"] == "protocol_version"
        assert "speaks 1" in header["body"]["message"] and "speaks 2" in header["body"]["message"]
    finally:
        req.close(linger=0)
        sub.close(linger=0)
        ctx.term()
