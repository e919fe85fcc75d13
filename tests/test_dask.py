"""What only a server on Dask does: resources, the cluster in ping and `servers`, exactly
once across a dead attempt, and a real SLURM cluster (dask-jobqueue) on 127.0.0.1.

The public contract itself (execute, results, stream, every cancel path, crashes,
retries, restart) runs on native and Dask servers alike: see the tests that take
``any_client`` / ``make_any_server`` (conftest.EXECUTORS).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, start_server
from reliability_util import wait_for
from slurm_cluster import SlurmCluster, missing

from zmqruntime import ZmqRuntimeError, resources

pytest.importorskip("distributed", reason="pip install 'zmqruntime[dask]' for the Dask tests")

QUICK = "def run(ctx, config):\n    return config.value\n"

#: first attempt: emits, leaves a marker, and its worker process dies; second: completes
DIES_AFTER_A_RESULT = """
import os
def run(ctx, config):
    first = not os.path.exists(config.marker)
    open(config.marker, "a").close()
    ctx.emit("attempt", "first" if first else "second")
    if first:
        ctx.flush_logs()
        os._exit(9)
    return "done"
"""


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """serve --dask local:1, its worker declaring one GPU (Dask's config variables)."""
    variable = "DASK_DISTRIBUTED__WORKER__RESOURCES"  # a dict: Dask lowercases __NAME keys
    saved = os.environ.get(variable)
    os.environ[variable] = '{"GPU": 1}'
    try:
        server = start_server(tmp_path_factory.mktemp("gpu"), workers=1, executor="dask")
    finally:
        if saved is None:
            del os.environ[variable]
        else:
            os.environ[variable] = saved
    yield server
    server.stop()


def test_ping_and_servers_show_the_dask_cluster(gpu_server):
    c = gpu_server.client()
    info = wait_for(
        lambda: (e := c.ping()["executor"]).get("resources") and e, what="the cluster's figures"
    )
    assert info["kind"] == "dask" and info["cluster"] == "local" and info["ready"]
    assert info["workers"] == 1 and info["threads"] == 1 and info["resources"] == {"GPU": 1}
    assert info["scheduler"].startswith("tcp://127.0.0.1:")  # Dask stays on loopback
    assert info["dashboard"] is None or info["dashboard"].startswith("http://127.0.0.1:")
    out = subprocess.run(
        [sys.executable, "-m", "zmqruntime", "servers"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},  # one line per cell
    )
    assert out.returncode == 0, out.stderr
    assert "dask local" in out.stdout and "1 workers, 1 threads" in out.stdout


def test_resources_map_to_dask_worker_resources(gpu_server, client):
    c = gpu_server.client()
    ok = c.execute(QUICK, config={"value": "on the GPU worker"}, resources={"GPU": 1})
    assert c.get_results(ok, timeout=60) == {"return": ["on the GPU worker"]}
    # no worker has a TPU: the run waits (queued) until cancelled
    waiting = c.execute(QUICK, config={"value": 0}, resources={"TPU": 1})
    time.sleep(1.0)
    assert c.get_status(waiting)["state"] == "queued"
    assert c.cancel(waiting)["state"] == "cancelled"
    with pytest.raises(ZmqRuntimeError, match="positive numbers"):
        c.execute(QUICK, resources={"GPU": -1})
    # a native server says what resources need (``client``: a native server)
    with pytest.raises(ZmqRuntimeError, match="needs a server whose runs execute on Dask"):
        client.execute(QUICK, resources={"GPU": 1})


def test_local_cluster_workers_allocate_as_native_workers_do(gpu_server):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 for its workers, which made numpy-heavy
    pipelines (the nuclei example) 1.8x slower than on native workers; not on local:N."""
    c = gpu_server.client()
    probe = "import os\ndef run(ctx, config):\n    return repr(os.environ.get(config.name))\n"
    exec_id = c.execute(probe, config={"name": "MALLOC_TRIM_THRESHOLD_"})
    assert c.get_results(exec_id, timeout=60) == {"return": ["None"]}
    exec_id = c.execute(probe, config={"name": "OMP_NUM_THREADS"})  # Dask's other settings stay
    assert c.get_results(exec_id, timeout=60) == {"return": ["'1'"]}


@pytest.mark.timeout(240)
def test_resources_survive_a_server_restart(tmp_path):
    data_dir = tmp_path / "server"
    first = start_server(data_dir, workers=1, executor="dask")  # its worker has no GPU
    try:
        exec_id = first.client().execute(QUICK, config={"value": 1}, resources={"GPU": 1})
        time.sleep(1.0)
        assert first.client().get_status(exec_id)["state"] == "queued"
    finally:
        first.stop()  # a queued run waits for the next server on this data dir
    second = start_server(data_dir, workers=1, executor="dask")  # no GPU there either
    try:
        c = second.client()
        wait_for(lambda: c.ping()["executor"].get("ready"), what="the cluster")
        time.sleep(2.0)
        assert c.get_status(exec_id)["state"] == "queued"  # still waiting for a GPU worker
        c.cancel(exec_id)
    finally:
        second.stop()


def test_a_dead_attempts_results_are_never_mixed_with_the_retry(gpu_server, tmp_path):
    c = gpu_server.client()
    exec_id = c.execute(DIES_AFTER_A_RESULT, config={"marker": str(tmp_path / "m")}, retries=1)
    status = c.wait(exec_id, timeout=60)
    assert status["state"] == "completed", status
    assert status["attempts"] == 2
    assert c.get_results(exec_id) == {"attempt": ["second"], "return": ["done"]}
    wait_for(lambda: c.ping()["workers_ready"] == 1, timeout=60, what="Dask's new worker")


# --------------------------------------------------------------------------- SLURM


def _nuclei_runs(server: ServerProcess) -> dict[str, dict]:
    """The nuclei example, one run per image of the committed subset, all at once."""
    examples = resources.examples_dir()
    pipeline = (examples / "nuclei_pipeline.py").read_text()
    config_code = (examples / "nuclei_config.py").read_text()
    folder = EXAMPLE_DATA / "dsb2018_stage1_fluo_nuclei" / "images"
    images = sorted(p.name for p in folder.glob("*.png"))
    c = server.client()
    ids = {
        name: c.execute(
            pipeline, config_code, config={"input_dir": str(folder), "pattern": name}, name=name
        )
        for name in images
    }
    return {name: c.get_results(exec_id, timeout=120) for name, exec_id in ids.items()}


def _assert_same(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in ("counts", "return"):
            assert a[name][key] == b[name][key], (name, key)
        for key in ("image", "labels"):
            for x, y in zip(a[name][key], b[name][key], strict=True):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)


@pytest.mark.timeout(240)
def test_slurm_runs_the_nuclei_example_as_the_native_workers_do(
    make_server, monkeypatch, tmp_path: Path
):
    reason = missing()
    if reason:
        pytest.skip(f"no SLURM cluster can be started here: {reason}")
    native = _nuclei_runs(make_server("native", workers=2))
    with SlurmCluster() as slurm:
        for key, value in slurm.env().items():
            monkeypatch.setenv(key, value)
        # adaptive: no job until runs come, then up to two (one core each on a 2-CPU node)
        server = make_server("slurm", workers=0, extra=["--dask", "slurm", "--dask-adapt", "0:2"])
        c = server.client()
        info = wait_for(lambda: (e := c.ping()["executor"]).get("ready") and e, what="SLURM")
        assert info["cluster"] == "slurm" and info["adapt"] == [0, 2]
        t0 = time.monotonic()
        on_slurm = _nuclei_runs(server)
        print(f"\n  6 nuclei runs on SLURM-launched Dask workers in {time.monotonic() - t0:.1f} s")
        _assert_same(on_slurm, native)
        assert list((slurm.dir / "jobs").glob("*.err")), "no SLURM job ran a Dask worker"
        server.stop()  # SIGTERM: the server closes its cluster, which cancels the jobs
        wait_for(lambda: not slurm.jobs(), timeout=30, what="squeue to be empty")
