"""A pool across real hosts on one machine: one network namespace per host.

Each host is a network namespace with its own veth pair on a private /24 inside
10.213.0.0/16 (the root side is 10.213.X.1, the host 10.213.X.2); only these addresses
are used. One server runs in each namespace on that address, so it must use CURVE keys
(one key directory per host, as on real machines). A pool in the root namespace sends
300 runs over the 3 hosts; one host's server and workers are killed mid-run. Every run
must end exactly once: completed (with the right result), or failed with a reason.

Needs root and iproute2 (``ip``); skipped with the reason where namespaces cannot be
created. CI runs as root and runs it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

import zmqruntime
from zmqruntime import ExecutionClient, ExecutionPool, ServerUnavailable
from zmqruntime.transport import free_port, generate_keys, port_accepts_tcp

N_HOSTS = 3
N_RUNS = 300
WORKERS = 2
KILL_AFTER = 60  # runs finished before the host dies
PREFIX = "zmqrt"  # namespace names: zmqrt<pid>h<i>, so leftovers of dead runs are found

PIPE = """
import time
import numpy as np

def run(ctx, config):
    end = time.monotonic() + config["t"]
    while time.monotonic() < end:
        ctx.check_cancelled()
        time.sleep(0.01)
    ctx.emit("well", np.full((4, 4), config["i"], dtype=np.uint16))
    return config["i"]
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces exist on Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces (ip netns add) needs root; CI runs as root"
    if shutil.which("ip") is None:
        return "the 'ip' command is missing: install the iproute2 package"
    probe = f"{PREFIX}{os.getpid()}probe"
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"this machine cannot create network namespaces: {result.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def remove_stale_namespaces() -> None:
    """Namespaces left by a test process that was killed before its finalizers ran."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)h\d+", name)
        if m and not psutil.pid_exists(int(m.group(1))):
            ip("netns", "del", name, check=False)


def free_subnets(n: int) -> list[int]:
    """Third octets X such that 10.213.X.0/24 is not used on this machine."""
    used = set()
    text = ip("-4", "-o", "addr", check=False).stdout + ip("-4", "route", check=False).stdout
    for m in re.finditer(r"\b10\.213\.(\d+)\.", text):
        used.add(int(m.group(1)))
    start = 20 + os.getpid() % 200
    out = [x for x in [*range(start, 250), *range(20, start)] if x not in used]
    return out[:n]


@dataclass
class Host:
    index: int
    netns: str
    address: str
    port: int
    keys: Path
    data_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.key}"


@dataclass
class Lab:
    hosts: list[Host]
    keys_root: Path
    cleanups: list = field(default_factory=list)


def kill_host(host: Host) -> None:
    """SIGKILL the host's server and its workers (the machine is gone)."""
    if host.proc is None:
        return
    try:
        procs = [psutil.Process(host.proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        host.proc.wait(timeout=10)
    psutil.wait_procs(procs, timeout=10)


def start_host_server(host: Host, timeout: float = 60.0) -> None:
    env = dict(os.environ)
    package_root = str(Path(zmqruntime.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    host.data_dir.mkdir(parents=True, exist_ok=True)
    host.log = host.data_dir / "stdout.txt"
    cmd = [
        "ip", "netns", "exec", host.netns,
        sys.executable, "-m", "zmqruntime", "serve",
        "--host", host.address, "--port", str(host.port),
        "--keys", str(host.keys), "--workers", str(WORKERS),
        "--data-dir", str(host.data_dir),
    ]  # fmt: skip
    with open(host.log, "ab") as out:
        host.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not port_accepts_tcp(host.address, host.port):
        if host.proc.poll() is not None:
            raise RuntimeError(f"server in {host.netns} exited: {host.log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server in {host.netns} did not open its port")
        time.sleep(0.05)
    with ExecutionClient(host.port, host.address, auto_spawn=False, keys=host.keys) as c:
        while c.ping()["workers_ready"] < WORKERS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers in {host.netns} did not start")
            time.sleep(0.05)


@pytest.fixture
def lab(tmp_path: Path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    remove_stale_namespaces()
    octets = free_subnets(N_HOSTS)
    assert len(octets) == N_HOSTS, "no free 10.213.X.0/24 subnets left on this machine"
    keys_root = tmp_path / "keys"
    hosts: list[Host] = []
    cleanups: list = []
    try:
        for i, x in enumerate(octets):
            netns = f"{PREFIX}{os.getpid()}h{i}"
            root_if, ns_if = f"zr{os.getpid() % 100000}r{i}", f"zr{os.getpid() % 100000}n{i}"
            ip("netns", "add", netns)
            cleanups.append(lambda n=netns: ip("netns", "del", n, check=False))
            ip("link", "add", root_if, "type", "veth", "peer", "name", ns_if)
            cleanups.append(lambda r=root_if: ip("link", "del", r, check=False))
            ip("link", "set", ns_if, "netns", netns)
            ip("addr", "add", f"10.213.{x}.1/24", "dev", root_if)
            ip("link", "set", root_if, "up")
            ip("-n", netns, "addr", "add", f"10.213.{x}.2/24", "dev", ns_if)
            ip("-n", netns, "link", "set", ns_if, "up")
            ip("-n", netns, "link", "set", "lo", "up")
            address = f"10.213.{x}.2"
            assert ipaddress.ip_address(address).is_private
            host = Host(i, netns, address, free_port(), keys_root / address, tmp_path / netns)
            generate_keys(host.keys)  # per host: its own server key pair and allow-list
            hosts.append(host)
            cleanups.append(lambda h=host: kill_host(h))
        for host in hosts:
            start_host_server(host)
        yield Lab(hosts, keys_root, cleanups)
    finally:
        for cleanup in reversed(cleanups):  # processes first, then links, then namespaces
            with contextlib.suppress(Exception):
                cleanup()
        left = [h.netns for h in hosts if h.netns in ip("netns", "list", check=False).stdout]
        assert not left, f"namespaces left behind: {left}"


@pytest.mark.timeout(600)
def test_300_runs_over_3_hosts_one_killed_mid_run(lab: Lab):
    hosts = lab.hosts
    # the servers are not reachable from the root namespace without their own keys
    wrong = {h.key: lab.keys_root / hosts[0].address for h in hosts}
    with ExecutionPool([h.endpoint for h in hosts], keys=wrong, timeout=1.5) as bad:
        bad.refresh()
        up = {s["server"]: s for s in bad.servers()}
        assert up[hosts[0].key]["up"] and not up[hosts[1].key]["up"]
        assert "credentials" in up[hosts[1].key]["last_error"]

    victim = hosts[1]
    pool = ExecutionPool([h.endpoint for h in hosts], keys=lab.keys_root, timeout=3.0)
    lab.cleanups.append(pool.close)
    ids = []
    config_of: dict[str, int] = {}
    for i in range(N_RUNS):
        exec_id = pool.execute(PIPE, config={"i": i, "t": 0.08}, name=f"run-{i:03d}", retries=i % 2)
        ids.append(exec_id)
        config_of[exec_id] = i
    first_server = Counter(i.rpartition("/")[0] for i in ids)
    assert set(first_server) == {h.key for h in hosts}
    assert min(first_server.values()) >= N_RUNS // N_HOSTS - 20, first_server  # spread

    finals: dict[str, dict] = {}
    results_ok = 0
    unreachable = []  # completed on the victim before it died: results stay on its disk
    killed_at = None
    for status in pool.as_completed(ids, timeout=300):
        exec_id = status["id"]
        assert exec_id not in finals, f"{exec_id} ended twice"
        finals[exec_id] = status
        if status["state"] == "completed":
            try:
                res = pool.get_results(exec_id)
            except ServerUnavailable:
                assert status["server"] == victim.key and killed_at is not None
                unreachable.append(exec_id)
            else:
                assert res["return"] == [config_of[exec_id]]
                assert int(res["well"][0][0, 0]) == config_of[exec_id]
                results_ok += 1
        if len(finals) == KILL_AFTER:
            queued_there = sum(
                1 for i in ids if i not in finals and pool._runs[i].server is not None
                and pool._runs[i].server.key == victim.key and pool._runs[i].state == "queued"
            )  # fmt: skip
            assert queued_there > 0, "the victim should still hold queued runs"
            kill_host(victim)
            killed_at = time.monotonic()

    assert killed_at is not None
    assert sorted(finals) == sorted(ids)  # every run ended, each once
    assert pool.stats()["finished"] == N_RUNS
    failed = {i: s for i, s in finals.items() if s["state"] != "completed"}
    for exec_id, status in failed.items():
        # only runs running on the lost host without retries may be lost, with the reason
        assert status["state"] == "failed", status
        assert status["server"] == victim.key
        assert "stopped answering" in status["error"] and "retries=0" in status["error"]
        assert config_of[exec_id] % 2 == 0
    assert len(failed) <= WORKERS
    moved = {i: s for i, s in finals.items() if s["resubmitted"]}
    assert moved, "the victim's queued runs should have been resubmitted"
    for status in moved.values():
        assert status["history"][0]["server"] == victim.key
        assert status["server"] != victim.key
        assert status["state"] == "completed"
    assert results_ok + len(unreachable) + len(failed) == N_RUNS

    # on the surviving hosts no run was executed to completion twice
    done_names = Counter()
    for host in hosts:
        if host is victim:
            continue
        with ExecutionClient(host.port, host.address, auto_spawn=False, keys=host.keys) as c:
            for st in c.list_executions(limit=10 * N_RUNS, states=["completed"]):
                done_names[st["name"]] += 1
    assert done_names and max(done_names.values()) == 1
    survivors_completed = sum(
        1 for s in finals.values() if s["state"] == "completed" and s["server"] != victim.key
    )
    assert sum(done_names.values()) == survivors_completed
    print(
        f"\n{N_RUNS} runs over {N_HOSTS} namespaced hosts: {len(moved)} resubmitted after "
        f"{victim.key} died, {len(failed)} reported failed, {len(unreachable)} completed "
        f"on it before it died; first placement {dict(first_server)}"
    )
