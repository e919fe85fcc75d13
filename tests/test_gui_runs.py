"""The runs table redraws on its own ~30 Hz clock, however fast updates arrive."""

from __future__ import annotations

import time

import pytest

from zmqruntime_gui.controller import Controller
from zmqruntime_gui.model import RunKey
from zmqruntime_gui.runs_panel import COL_STATE, ProgressRole, RunsPanel


@pytest.fixture
def panel(qtbot, themed_app, gui_settings):
    controller = Controller(gui_settings)  # not started: no polling, no network
    p = RunsPanel(controller)
    qtbot.addWidget(p)
    p.resize(1000, 400)
    p.show()
    yield p
    controller.close()


def test_burst_of_updates_costs_at_most_30_redraws_a_second(panel, qtbot):
    table = panel.controller.runs
    keys = [RunKey("127.0.0.1:5555", f"{i:016x}") for i in range(50)]
    table.update_server(
        "127.0.0.1:5555",
        [{"id": k.exec_id, "state": "running", "created": float(i), "progress": 0.0}
         for i, k in enumerate(keys)],
    )  # fmt: skip
    qtbot.waitUntil(lambda: panel.model.rowCount() == 50)
    repaints = []
    panel.model.dataChanged.connect(lambda *a: repaints.append(time.monotonic()))
    start_redraws = panel.model.redraws
    updates = 0
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end:  # ~thousands of progress events per second
        for k in keys:
            table.apply_progress(k, (updates % 1000) / 1000, f"step {updates}")
        updates += len(keys)
        qtbot.wait(1)
    redraws = panel.model.redraws - start_redraws
    assert updates > 2000
    assert 5 <= redraws <= 36, f"{redraws} redraws for {updates} updates in 1 s"
    assert len(repaints) <= 36
    # and the table shows the latest values
    panel.model.flush()
    index = panel.model.index(panel.model.row_of(keys[0]), 4)
    assert panel.model.data(index, ProgressRole)[1].endswith(f"  step {updates - len(keys)}")


def test_selection_survives_reordering(panel, qtbot):
    table = panel.controller.runs
    server = "127.0.0.1:5555"
    table.update_server(server, [{"id": "a", "state": "running", "created": 1.0}])
    qtbot.waitUntil(lambda: panel.model.rowCount() == 1)
    assert panel.select(RunKey(server, "a"))
    newer = {"id": "b", "state": "queued", "created": 2.0}
    table.update_server(server, [newer, {"id": "a", "state": "running", "created": 1.0}])
    qtbot.waitUntil(lambda: panel.model.rowCount() == 2)
    assert panel.model.key_at(0) == RunKey(server, "b")  # newest first
    assert panel.current() == RunKey(server, "a") and panel.selected() == [RunKey(server, "a")]
    assert panel.model.data(panel.model.index(1, COL_STATE)) == "running"
    table.apply_status(RunKey(server, "a"), {"id": "a", "state": "failed", "created": 1.0})
    qtbot.waitUntil(lambda: panel.model.data(panel.model.index(1, COL_STATE)) == "failed")
    qtbot.waitUntil(lambda: not panel.act_cancel.isEnabled())  # nothing left to cancel
