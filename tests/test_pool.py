"""ExecutionPool against several real servers on loopback: contract, dispatch, failover."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from zmqruntime import (
    ExecutionCancelled,
    ExecutionClient,
    ExecutionFailed,
    ExecutionPool,
    UnknownExecution,
)
from zmqruntime import cli as zcli
from zmqruntime.transport import (
    free_port,
    generate_keys,
    keys_for,
    parse_endpoint,
    read_servers_file,
)

PIPE = """
import os
import time
import numpy as np

def run(ctx, config):
    t = config.get("t", 0)
    end = time.monotonic() + t
    gate = config.get("until")  # a file whose creation ends the wait early
    while time.monotonic() < end and not (gate and os.path.exists(gate)):
        ctx.check_cancelled()
        time.sleep(0.02)
    ctx.emit("twice", np.full(3, config["i"] * 2))
    return config["i"]
"""


def ep(server) -> str:
    return f"tcp://127.0.0.1:{server.port}"


def key(server) -> str:
    return f"127.0.0.1:{server.port}"


def hard_kill(server) -> None:
    """SIGKILL a server and its workers: the machine is gone, nothing says goodbye."""
    procs = [psutil.Process(server.proc.pid)]
    with contextlib.suppress(psutil.Error):
        procs += procs[0].children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    server.proc.wait(timeout=10)
    psutil.wait_procs(procs, timeout=10)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def pools():
    made: list[ExecutionPool] = []

    def make(servers, **kwargs) -> ExecutionPool:
        kwargs.setdefault("timeout", 3.0)
        kwargs.setdefault("heartbeat", 0.2)
        p = ExecutionPool(servers, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# --------------------------------------------------------------------------- no sockets


def test_endpoints_and_servers_file(tmp_path: Path):
    assert parse_endpoint("tcp://node1:5555") == ("node1", 5555)
    assert parse_endpoint("10.0.0.5:6000") == ("10.0.0.5", 6000)
    assert parse_endpoint("tcp://[::1]:5555") == ("::1", 5555)
    for bad in ("node1", "tcp://node1", "tcp://node1:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    f = tmp_path / "servers.txt"
    f.write_text("# lab machines\ntcp://node1:5555  # scope PC\n\n  node2:5556\n")
    assert read_servers_file(f) == ["tcp://node1:5555", "node2:5556"]
    f.write_text("tcp://node1:5555\nnot an endpoint\n")
    with pytest.raises(ValueError, match="not an endpoint"):
        read_servers_file(f)


def test_keys_lookup(tmp_path: Path):
    generate_keys(tmp_path / "all")
    assert keys_for(tmp_path / "all", "h", 1) == tmp_path / "all"
    generate_keys(tmp_path / "per" / "node1_5555")
    generate_keys(tmp_path / "per" / "node2")
    assert keys_for(tmp_path / "per", "node1", 5555) == tmp_path / "per" / "node1_5555"
    assert keys_for(tmp_path / "per", "node2", 7000) == tmp_path / "per" / "node2"
    with pytest.raises(FileNotFoundError, match="node3"):
        keys_for(tmp_path / "per", "node3", 5555)
    assert keys_for({"node4:1": tmp_path / "all"}, "node4", 1) == tmp_path / "all"
    assert keys_for(None, "x", 1) is None


# --------------------------------------------------------------------------- contract


def test_contract_and_ids_name_their_server(make_server, pools):
    a, b = make_server("a", workers=1), make_server("b", workers=1)
    pool = pools([ep(a), ep(b)])
    ids = [pool.execute(PIPE, config={"i": i}, name=f"r{i}") for i in range(4)]
    assert {i.rpartition("/")[0] for i in ids} == {key(a), key(b)}
    for n, exec_id in enumerate(ids):
        res = pool.get_results(exec_id, timeout=60)
        assert res["return"] == [n]
        np.testing.assert_array_equal(res["twice"][0], np.full(3, 2 * n))
        status = pool.get_status(exec_id)
        assert status["id"] == exec_id and status["state"] == "completed"
        assert status["server"] == exec_id.rpartition("/")[0]
        assert status["server_id"] == exec_id.rpartition("/")[2]
        assert status["resubmitted"] == 0
        assert pool.wait(exec_id)["state"] == "completed"
        # the id's server part is enough for a fresh pool, and the server's own id works
        direct = ExecutionClient(a.port if status["server"] == key(a) else b.port, auto_spawn=False)
        try:
            assert direct.get_status(status["server_id"])["state"] == "completed"
        finally:
            direct.close()
    fresh = pools([ep(b), ep(a)])
    assert fresh.get_status(ids[0])["state"] == "completed"
    assert fresh.get_results(ids[1])["return"] == [1]
    bare = ids[2].rpartition("/")[2]
    assert fresh.get_status(bare)["server"] == ids[2].rpartition("/")[0]
    listed = {s["id"] for s in fresh.list_executions()}
    assert set(ids) <= listed
    with pytest.raises(UnknownExecution):
        pool.get_status(f"{key(a)}/0123456789abcdef")
    with pytest.raises(UnknownExecution, match="not in this pool"):
        pool.get_status("10.9.9.9:1/0123456789abcdef")
    with pytest.raises(UnknownExecution):
        pool.get_status("0123456789abcdef")


def test_stream_cancel_and_failed_run(make_server, pools):
    a, b = make_server("a", workers=1), make_server("b", workers=1)
    pool = pools([ep(a), ep(b)])
    exec_id = pool.execute(PIPE, config={"i": 5, "t": 0.3})
    events = list(pool.stream(exec_id))
    assert all(e["id"] == exec_id for e in events)
    assert events[-1]["kind"] == "state" and events[-1]["status"]["state"] == "completed"
    results = [e for e in events if e["kind"] == "result"]
    assert [e["name"] for e in results] == ["twice", "return"]

    slow = pool.execute(PIPE, config={"i": 1, "t": 60})
    wait_for(lambda: pool.get_status(slow)["state"] == "running", what="slow run to start")
    assert pool.cancel(slow)["cancelled"] is True
    assert pool.wait(slow, timeout=30)["state"] == "cancelled"
    with pytest.raises(ExecutionCancelled):
        pool.get_results(slow)
    assert pool.cancel(slow)["cancelled"] is False

    bad = pool.execute("def run(ctx, config):\n    raise ValueError('bad well')\n")
    with pytest.raises(ExecutionFailed, match="bad well"):
        pool.get_results(bad, timeout=30)
    assert pool.get_status(bad)["resubmitted"] == 0  # a pipeline error is not failed over


# --------------------------------------------------------------------------- dispatch


def test_dispatch_by_free_capacity_not_round_robin(make_server, pools):
    small, big = make_server("small", workers=1), make_server("big", workers=3)
    # the big server is listed first and fully taken by another client's runs
    other = big.client()
    blockers = [other.execute(PIPE, config={"i": 0, "t": 60}) for _ in range(3)]
    wait_for(lambda: other.ping()["workers_busy"] == 3, what="big server busy")
    pool = pools([ep(big), ep(small)])
    first = pool.execute(PIPE, config={"i": 1, "t": 60})
    assert first.startswith(key(small) + "/"), pool.servers()
    for exec_id in blockers:
        other.cancel(exec_id)
    wait_for(lambda: other.ping()["workers_busy"] == 0, what="blockers cancelled")
    pool.refresh()
    # free: big 3, small 0 (our run) -> the next three go to big, whatever the order
    nxt = [pool.execute(PIPE, config={"i": 2, "t": 60}) for _ in range(3)]
    assert all(i.startswith(key(big) + "/") for i in nxt), pool.servers()
    # now both are full: the next one queues where the queue is shortest per worker
    info = {s["server"]: s for s in pool.servers()}
    assert info[key(big)]["free"] == 0 and info[key(small)]["free"] == 0
    for exec_id in [first, *nxt]:
        pool.cancel(exec_id)
    for exec_id in [first, *nxt]:
        assert pool.wait(exec_id, timeout=30)["state"] == "cancelled"


def test_map_yields_every_config_once_spread_over_servers(make_server, pools):
    a, b = make_server("a", workers=2), make_server("b", workers=2)
    pool = pools([ep(a), ep(b)])
    configs = [{"i": i, "t": 0.05} for i in range(24)]
    items = list(pool.map(PIPE, configs, timeout=60))
    assert sorted(item.index for item in items) == list(range(24))
    for item in items:
        assert item.ok and item.result()["return"] == [item.config["i"]]
        np.testing.assert_array_equal(item.results["twice"][0], np.full(3, 2 * item.index))
    used = {item.status["server"] for item in items}
    assert used == {key(a), key(b)}
    assert pool.stats()["finished"] == 24


def test_map_reports_failures_and_cancels_on_early_close(make_server, pools):
    a = make_server("a", workers=2)
    pool = pools([ep(a)])
    code = PIPE.replace(
        "    return config", "    if config['i'] == 3:\n        1 / 0\n    return config"
    )
    items = {item.index: item for item in pool.map(code, [{"i": i} for i in range(6)])}
    assert sorted(items) == list(range(6))
    assert not items[3].ok and isinstance(items[3].error, ExecutionFailed)
    with pytest.raises(ExecutionFailed, match="ZeroDivisionError"):
        items[3].result()
    assert all(items[i].ok for i in (0, 1, 2, 4, 5))

    gen = pool.map(PIPE, [{"i": i, "t": 0.1 if i == 0 else 60} for i in range(5)], window=5)
    first = next(gen)
    assert first.index == 0
    out = [i for i in pool._runs if i != first.id and pool._runs[i].name.startswith("map-")]
    gen.close()
    still = [i for i in out if pool._runs[i].final is None or i == first.id]
    for exec_id in still:
        assert pool.wait(exec_id, timeout=30)["state"] == "cancelled"
    assert len(still) == 4


# --------------------------------------------------------------------------- failover


def test_failover_moves_queued_and_retried_runs_and_reports_the_rest(make_server, pools, tmp_path):
    a = make_server("a", workers=2)
    b_port = free_port()
    pool = pools([ep(a), f"tcp://127.0.0.1:{b_port}"], timeout=2.0)
    # the runs last until the gate file appears (after a is killed), however slowly b starts
    gate = str(tmp_path / "gate")
    # b is not up yet, so everything lands on a: two running, two queued behind them
    r0 = pool.execute(PIPE, config={"i": 0, "t": 120, "until": gate}, retries=0, name="r0")
    r1 = pool.execute(PIPE, config={"i": 1, "t": 120, "until": gate}, retries=1, name="r1")
    wait_for(lambda: pool.get_status(r0)["state"] == "running", what="r0 running")
    wait_for(lambda: pool.get_status(r1)["state"] == "running", what="r1 running")
    r2 = pool.execute(PIPE, config={"i": 2, "t": 120, "until": gate}, retries=0, name="r2")
    r3 = pool.execute(PIPE, config={"i": 3, "t": 120, "until": gate}, retries=0, name="r3")
    ids = [r0, r1, r2, r3]
    assert all(i.startswith(key(a) + "/") for i in ids)
    wait_for(lambda: pool.get_status(r3)["state"] == "queued", what="r3 seen queued")
    streamed: list[dict] = []
    watcher = threading.Thread(target=lambda: streamed.extend(pool.stream(r2)), daemon=True)
    watcher.start()

    b = make_server("b", workers=2, port=b_port)
    wait_for(lambda: {s["server"]: s["up"] for s in pool.servers()}[key(b)], what="b up")
    hard_kill(a)
    # the gate opens once r1-r3 have moved to b (and r0 has failed)
    wait_for(
        lambda: all(pool.get_status(i).get("server") == key(b) for i in ids[1:]),
        timeout=60,
        what="r1-r3 moved to b",
    )
    Path(gate).touch()

    finals = {s["id"]: s for s in pool.as_completed(ids, timeout=90)}
    assert sorted(finals) == sorted(ids)  # each exactly once
    assert finals[r0]["state"] == "failed"
    assert "stopped answering" in finals[r0]["error"] and "retries=0" in finals[r0]["error"]
    with pytest.raises(ExecutionFailed, match="stopped answering"):
        pool.get_results(r0)
    for exec_id in (r1, r2, r3):
        status = finals[exec_id]
        assert status["state"] == "completed", status
        assert status["server"] == key(b) and status["resubmitted"] == 1
        assert status["history"][0]["server"] == key(a)
        assert pool.get_results(exec_id)["return"] == [int(status["name"][1])]
    assert "running" in finals[r1]["history"][0]["reason"]
    assert "queued" in finals[r2]["history"][0]["reason"]
    watcher.join(timeout=30)
    assert streamed[-1]["status"]["state"] == "completed"
    assert any(e["kind"] == "state" and e["status"].get("resubmitted") for e in streamed)
    stats = pool.stats()
    assert stats["finished"] == 4 and stats["resubmitted"] == 3 and stats["failed_by_pool"] == 1

    # a comes back with its store: the attempts that moved away must not run again there
    old = [finals[i]["history"][0]["id"].rpartition("/")[2] for i in (r1, r2, r3)]
    a2 = make_server("a", workers=2, port=a.port)
    direct = a2.client()

    def settled():
        states = [direct.get_status(sid)["state"] for sid in old]
        return states if all(s in ("cancelled", "failed", "completed") for s in states) else None

    states = wait_for(settled, timeout=30, what="orphans on the restarted server to end")
    assert states == ["cancelled"] * 3
    assert pool.get_status(r1)["state"] == "completed"  # unchanged


def test_lost_runs_fail_with_a_reason_when_no_server_is_left(make_server, pools):
    a = make_server("a", workers=1)
    pool = pools([ep(a)], timeout=1.5, pending_timeout=1.0)
    running = pool.execute(PIPE, config={"i": 0, "t": 60}, retries=2)
    wait_for(lambda: pool.get_status(running)["state"] == "running", what="running")
    queued = pool.execute(PIPE, config={"i": 1})
    hard_kill(a)
    for exec_id in (running, queued):
        status = pool.wait(exec_id, timeout=60)
        assert status["state"] == "failed"
        assert "no server of this pool answered" in status["error"]
        assert "stopped answering" in status["error"]
    events = list(pool.stream(queued))
    assert [e["status"]["state"] for e in events] == ["failed"]
    with pytest.raises(ExecutionFailed, match="no server of this pool answered"):
        pool.get_results(running)
    assert pool.ping()["up"] == 0
    with pytest.raises(Exception, match="no server of this pool is answering"):
        pool.execute(PIPE, config={"i": 2})


# --------------------------------------------------------------------------- CLI


def test_cli_with_several_servers(make_server, tmp_path: Path, capsys):
    a, b = make_server("a", workers=1), make_server("b", workers=1)
    pipe = tmp_path / "pipe.py"
    pipe.write_text(PIPE)
    servers = ["--server", ep(a), "--server", ep(b)]

    def cli(*argv: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exc:
            zcli.main(list(argv))
        out = capsys.readouterr()
        return exc.value.code, out.out + out.err

    ids = []  # each command is a fresh pool: it sees the first run busy and picks the other
    for i in range(4):
        code, out = cli("submit", str(pipe), "--set", f"i={i}", "--set", "t=1.5", *servers)
        assert code == 0
        ids.append(out.strip())
    assert {i.rpartition("/")[0] for i in ids} == {key(a), key(b)}
    listing = tmp_path / "servers.txt"
    listing.write_text(f"# two local servers\n{ep(b)}\n{ep(a)}  # second\n")
    code, out = cli("watch", ids[0], "--quiet", "--servers-file", str(listing))
    assert code == 0 and "completed" in out
    code, out = cli("status", ids[1], "--json", "--servers-file", str(listing))
    assert code == 0 and ('"state": "completed"' in out or '"state": "running"' in out)
    code, out = cli("results", ids[2], "--out", str(tmp_path / "r2"), *servers)
    assert code == 0 and (tmp_path / "r2" / "index.json").exists()
    code, out = cli("status", "--json", *servers)
    assert code == 0 and all(i in out for i in ids)
    code, out = cli("submit", str(pipe), "--set", "i=9", "--set", "t=60", *servers)
    slow = out.strip()
    code, out = cli("cancel", slow, "--wait", *servers)
    assert code == 0 and "cancelled" in out
    code, out = cli("status", f"{key(a)}/0123456789abcdef", *servers)
    assert code == zcli.EXIT_UNKNOWN_ID
    # without --server the single-server behaviour is unchanged
    code, out = cli(
        "status", ids[0].rpartition("/")[2], "--port", str(int(ids[0].split(":")[1].split("/")[0]))
    )
    assert code == 0 and "completed" in out
