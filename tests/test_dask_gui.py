"""The window's servers panel shows where a server runs its runs (issue 17): native worker
processes, or a Dask cluster with its workers, threads, pending jobs and dashboard, as the
server's ``ping`` tells it. Real servers on loopback (one ``--dask local:1``), the real
window (offscreen), the cells and tooltips its table view shows."""

from __future__ import annotations

import pytest
from conftest import start_server
from gui_support import screenshot
from PySide6 import QtCore

from zmqruntime_gui.model import Endpoint, ServerState
from zmqruntime_gui.servers_panel import COL_EXECUTOR, executor_lines, executor_text

pytest.importorskip("distributed", reason="pip install 'zmqruntime[dask]' for the Dask tests")

Role = QtCore.Qt.ItemDataRole


def _cell(window, ep: Endpoint, col: int, role=Role.DisplayRole):
    panel = window.servers_panel
    view_model = panel.table.model()  # what the table view shows, through Qt's model API
    for r in range(view_model.rowCount()):
        index = view_model.index(r, 0)
        if view_model.data(index, Role.UserRole) == ep:
            return view_model.data(view_model.index(r, col), role)
    return None


@pytest.mark.timeout(180)
def test_servers_panel_shows_the_dask_cluster_and_native_workers(window, qtbot, tmp_path, server):
    dask_server = start_server(tmp_path / "dask", workers=1, executor="dask")
    try:
        on_dask = Endpoint("127.0.0.1", dask_server.port)
        native = Endpoint("127.0.0.1", server.port)
        for ep in (on_dask, native):
            window.controller.watch(ep)

        def shown() -> bool:
            row = window.controller.servers.get(on_dask)
            return (
                row is not None
                and row.state == ServerState.ALIVE
                and _cell(window, on_dask, COL_EXECUTOR) == "Dask local · 1 worker, 1 thread"
                and _cell(window, native, COL_EXECUTOR) == "native"
            )

        qtbot.waitUntil(shown, timeout=60_000)
        assert window.servers_panel.model.headerData(
            COL_EXECUTOR, QtCore.Qt.Orientation.Horizontal, Role.DisplayRole
        ) == ("Executor")
        tip = _cell(window, on_dask, 0, Role.ToolTipRole)
        assert "executor: Dask (local:1)" in tip
        assert "scheduler: tcp://127.0.0.1:" in tip and "1 workers, 1 threads" in tip
        ping = dask_server.client().ping()["executor"]
        if ping.get("dashboard"):  # Dask serves one where bokeh is installed
            assert f"dashboard: <a href='{ping['dashboard']}'>" in tip
        else:
            assert "dashboard" not in tip
        assert "executor: native worker processes" in _cell(window, native, 0, Role.ToolTipRole)
        # the busy count in Workers follows the Dask runs too
        assert _cell(window, on_dask, 3) == "0/1"
        screenshot(window, "servers-dask")
    finally:
        dask_server.stop()
    # a server that stopped answering shows no executor figures from its last ping
    qtbot.waitUntil(lambda: _cell(window, on_dask, COL_EXECUTOR) == "–", timeout=30_000)


def test_executor_text_of_a_job_queue_cluster():
    """What ping says of a SLURM cluster that grows (no SLURM needed to format it)."""
    slurm = {
        "kind": "dask",
        "spec": "slurm",
        "cluster": "slurm",
        "ready": True,
        "scheduler": "tcp://10.0.0.5:8786",
        "workers": 2,
        "threads": 4,
        "pending_jobs": 3,
        "adapt": [0, 8],
        "resources": {"GPU": 2},
        "dashboard": "http://10.0.0.5:8787/status",
    }
    assert executor_text(slurm) == "Dask slurm · 2 workers, 4 threads, 3 jobs pending"
    lines = executor_lines(slurm)
    assert "2 workers, 4 threads, 3 jobs pending (adaptive 0–8)" in lines
    assert "resources: GPU 2" in lines
    assert (
        "dashboard: <a href='http://10.0.0.5:8787/status'>http://10.0.0.5:8787/status</a>" in lines
    )
    assert executor_text({**slurm, "ready": False}) == "Dask slurm · connecting"
    problem = {**slurm, "problem": "cannot start Dask (slurm): <sbatch> failed"}
    assert executor_text(problem) == "Dask slurm · problem"
    assert "&lt;sbatch&gt; failed" in executor_lines(problem)[-1]
    assert executor_text(None) == executor_text({"kind": "native", "workers": 2}) == "native"
