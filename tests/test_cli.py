"""Every ``zmqruntime`` command, run as a user would: a subprocess against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zmqruntime import local
from zmqruntime.transport import free_port

COMMANDS = [
    "serve",
    "submit",
    "status",
    "cancel",
    "results",
    "watch",
    "servers",
    "stop",
    "keys",
    "purge",
    "demo",
]


def cli(*args: str, timeout: float = 120, check: bool = True, cwd: Path | None = None):
    proc = subprocess.run(
        [sys.executable, "-m", "zmqruntime", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "count.py"
    path.write_text(
        "import numpy as np, time\n"
        "def run(ctx, config):\n"
        "    for i in range(config.n):\n"
        "        print('step', i)\n"
        "        ctx.progress(i + 1, config.n)\n"
        "        ctx.emit('frame', np.full((4, 4), i, dtype=np.uint16))\n"
        "        time.sleep(config.delay)\n"
        "    return config.n\n"
    )
    (tmp_path / "count_config.py").write_text("n = 3\ndelay = 0.01\n")
    return path


def test_help_of_every_command():
    out = cli("--help").stdout
    for command in COMMANDS:
        assert command in out
        sub = cli(command, "--help") if command != "keys" else cli("keys", "generate", "--help")
        assert "usage:" in sub.stdout


def test_submit_wait_status_results(server, pipeline, tmp_path):
    port = str(server.port)
    proc = cli(
        "submit",
        str(pipeline),
        "--config",
        str(tmp_path / "count_config.py"),
        "--port",
        port,
        "--wait",
        "--set",
        "n=4",
    )
    assert "completed" in proc.stdout and "5 result(s)" in proc.stdout
    assert "step 3" in proc.stdout  # log lines are shown live
    exec_id = proc.stdout.split()[1]
    status = json.loads(cli("status", exec_id, "--port", port, "--json").stdout)
    assert status["state"] == "completed" and status["n_results"] == 5
    table = cli("status", "--port", port).stdout
    assert exec_id in table and "completed" in table
    out = tmp_path / "out"
    cli("results", exec_id, "--out", str(out), "--port", port)
    index = json.loads((out / "index.json").read_text())
    assert [e["name"] for e in index["results"]] == ["frame"] * 4 + ["return"]
    np.testing.assert_array_equal(
        np.load(out / index["results"][2]["file"]), np.full((4, 4), 2, dtype=np.uint16)
    )


def test_submit_then_watch(server, pipeline, tmp_path):
    port = str(server.port)
    exec_id = cli(
        "submit",
        str(pipeline),
        "--config",
        str(tmp_path / "count_config.py"),
        "--port",
        port,
        "--set",
        "delay=0.3",
    ).stdout.strip()
    assert len(exec_id) == 16
    watched = cli("watch", exec_id, "--port", port)
    assert "completed" in watched.stdout and "step 2" in watched.stdout


def test_watch_of_a_run_that_already_ended_shows_its_whole_log_once(server, pipeline, tmp_path):
    port = str(server.port)
    c = server.client()
    exec_id = c.execute(pipeline.read_text(), config={"n": 5, "delay": 0})
    c.wait(exec_id, timeout=60)
    watched = cli("watch", exec_id, "--port", port).stdout
    assert [line.split("│ ")[1] for line in watched.splitlines() if "│ " in line] == [
        f"step {i}" for i in range(5)
    ]


def test_failed_run_exit_code_and_traceback(server, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def run(ctx, config):\n    raise RuntimeError('broken pipeline')\n")
    proc = cli("submit", str(bad), "--port", str(server.port), "--wait", check=False)
    assert proc.returncode == 1
    assert "RuntimeError: broken pipeline" in proc.stderr and "Traceback" in proc.stderr


def test_cancel_command(server, tmp_path):
    loop = tmp_path / "loop.py"
    loop.write_text(
        "import time\ndef run(ctx, config):\n    while not ctx.cancelled:\n"
        "        time.sleep(0.01)\n"
    )
    port = str(server.port)
    exec_id = cli("submit", str(loop), "--port", port).stdout.strip()
    proc = cli("cancel", exec_id, "--port", port, "--wait")
    assert "cancel" in proc.stdout and "cancelled" in proc.stdout
    again = cli("cancel", exec_id, "--port", port)
    assert "already cancelled" in again.stdout
    results = cli("results", exec_id, "--out", str(tmp_path / "o"), "--port", port, check=False)
    assert results.returncode == 5


def test_errors_are_clear(server):
    proc = cli("status", "ffffffffffffffff", "--port", str(server.port), check=False)
    assert proc.returncode == 4 and "never issued" in proc.stderr
    dead = str(free_port())
    proc = cli("status", "--port", dead, check=False)
    assert proc.returncode == 3 and f"127.0.0.1:{dead}" in proc.stderr
    proc = cli("submit", "missing.py", "--port", dead, check=False)
    assert proc.returncode != 0 and "missing.py" in proc.stderr


def test_servers_and_stop(make_server):
    server = make_server("a", workers=1)
    listing = cli("servers").stdout
    assert str(server.port) in listing and "0/1" in listing
    listing = json.loads(cli("servers", "--json").stdout)
    assert server.port in [e["port"] for e in listing]
    proc = cli("stop", str(server.port))
    assert "stopped" in proc.stdout
    server.proc.wait(timeout=15)
    assert local.find_server(server.port) is None


def test_stop_force_kills_by_pid(make_server):
    server = make_server("b", workers=1)
    proc = cli("stop", str(server.port), "--force")
    assert f"pid {server.proc.pid}" in proc.stdout
    assert server.proc.wait(timeout=15) != 0
    assert local.find_server(server.port) is None
    # nothing registered on a port: nothing is killed, and it says why
    proc = cli("stop", str(free_port()), "--force", check=False)
    assert proc.returncode == 3 and "nothing killed" in proc.stderr


def test_keys_generate(tmp_path):
    keys = tmp_path / "keys"
    out = cli("keys", "generate", str(keys)).stdout
    assert "server.key" in out
    assert (keys / "authorized_clients" / "client.key").exists()
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"


def test_purge(server, pipeline, tmp_path):
    client = server.client()
    exec_id = client.execute(pipeline.read_text(), config={"n": 1, "delay": 0})
    client.wait(exec_id, timeout=30)
    server.stop()
    time.sleep(0.2)
    out = cli("purge", "--keep-days", "0", "--data-dir", str(server.data_dir)).stdout
    assert "removed 1" in out
    assert not (server.data_dir / "results" / exec_id).exists()


def test_demo_runs_headless_and_writes_results(tmp_path):
    port = str(free_port())
    proc = cli(
        "demo",
        "--frames",
        "12",
        "--size",
        "128",
        "--interval",
        "0.01",
        "--port",
        port,
        "--out",
        str(tmp_path / "demo"),
        cwd=tmp_path,
        timeout=180,
    )
    assert "completed" in proc.stdout, proc.stdout + proc.stderr
    assert "stopped the server the demo started" in proc.stdout
    index = json.loads((tmp_path / "demo" / "index.json").read_text())
    names = [e["name"] for e in index["results"]]
    assert names == ["max_projection", "counts", "return"]
    projection = np.load(tmp_path / "demo" / index["results"][0]["file"])
    assert projection.shape == (128, 128) and projection.dtype == np.uint16
    counts = index["results"][1]["value"]
    assert len(counts["cells"]) == 12 and min(counts["cells"]) > 0
    assert local.find_server(int(port)) is None
