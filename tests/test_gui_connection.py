"""A server that stops answering: its runs read "connection lost", never "running".

The window keeps the last known progress, stops the elapsed clock, disables what cannot
work (Cancel, Details), shows a banner over the preview, and resolves each run to its
true state when the server answers again: still running (a server that hung), failed (a
server restarted on the same store) or "lost" (one that came back without the run).
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from gui_support import screenshot

from zmqruntime import ExecutionClient
from zmqruntime_gui.model import CONNECTION_LOST, LOST, Endpoint, RunKey, RunTable, ServerState
from zmqruntime_gui.runs_panel import COL_STATE, ProgressRole

SLOW_PIPELINE = """
import time
import numpy as np

def run(ctx, config):
    frame = np.zeros((64, 64), np.uint16)
    for i in range(100000):
        if ctx.cancelled:
            return i
        frame[:] = i % 1000
        ctx.preview("camera", frame)
        ctx.progress(i % 300, 300, f"frame {i}")
        time.sleep(0.02)
"""

SERVER = "127.0.0.1:5555"


# --------------------------------------------------------------------------- the model


def running(exec_id: str, progress: float = 0.25) -> dict:
    return {"id": exec_id, "state": "running", "created": 1.0, "started": 100.0,
            "progress": progress, "message": "frame 75"}  # fmt: skip


def test_model_marks_unfinished_runs_lost_and_resolves_them():
    table = RunTable()
    table.update_server(SERVER, [running("a"), {"id": "b", "state": "completed", "created": 0.5}])
    a, b = RunKey(SERVER, "a"), RunKey(SERVER, "b")
    table.apply_progress(a, 0.25, "frame 75", 75, 300)
    assert table.rows[a].progress_text == "75 of 300 (25%)"

    assert table.mark_lost(SERVER, at=130.0) == [a]  # the completed run is not affected
    row = table.rows[a]
    assert row.display_state == CONNECTION_LOST and row.state == "running"
    assert not row.cancellable and not row.is_live
    assert row.elapsed(now=10_000.0) == pytest.approx(30.0)  # the clock stopped at contact loss
    assert row.progress_text == "75 of 300 (25%)"  # the last known progress stays
    assert table.rows[b].display_state == "completed"

    # a list from the server that does not name the run does not drop it: only resolve() does
    table.update_server(SERVER, [{"id": "b", "state": "completed", "created": 0.5}])
    assert a in table.rows and table.rows[a].contact == "lost"
    table.resolve(a, None)
    assert table.rows[a].display_state == LOST and not table.rows[a].cancellable

    # a run the server still knows comes back with its true state
    table.update_server(SERVER, [running("c")])
    c = RunKey(SERVER, "c")
    table.mark_lost(SERVER, at=150.0)
    table.resolve(c, {**running("c", 0.5), "state": "failed", "finished": 160.0})
    assert table.rows[c].display_state == "failed" and table.rows[c].contact == "ok"


def test_model_polled_status_keeps_the_streams_counts():
    table = RunTable()
    table.update_server(SERVER, [running("a", 0.1)])
    key = RunKey(SERVER, "a")
    table.apply_progress(key, 0.1, "frame 30", 30, 300)
    table.update_server(SERVER, [running("a", 0.5)])  # polled: a fraction, no counts
    assert table.rows[key].progress_text == "150 of 300 (50%)"


# --------------------------------------------------------------------------- the window


def server_tree(server) -> list[psutil.Process]:
    parent = psutil.Process(server.proc.pid)
    return [parent, *parent.children(recursive=True)]


def follow_a_run(qtbot, window, server) -> tuple[Endpoint, RunKey]:
    ep = Endpoint("127.0.0.1", server.port)
    window.controller.watch(ep)
    qtbot.waitUntil(
        lambda: window.controller.servers[ep].state == ServerState.ALIVE, timeout=20_000
    )
    before = set(window.controller.runs.rows)
    window.controller.submit_run(ep, SLOW_PIPELINE, None, name="acquire")
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    rows = window.controller.runs.rows
    qtbot.waitUntil(lambda: rows[key].status.get("total") == 300, timeout=20_000)
    qtbot.waitUntil(lambda: window.preview.frame is not None, timeout=20_000)
    assert window.runs_panel.current() == key
    return ep, key


def shown_state(window, key: RunKey) -> str:
    model = window.runs_panel.model
    model.flush()
    return model.data(model.index(model.row_of(key), COL_STATE))


def wait_lost(qtbot, window, key: RunKey) -> None:
    qtbot.waitUntil(lambda: shown_state(window, key) == CONNECTION_LOST, timeout=15_000)


def assert_lost_on_screen(qtbot, window, key: RunKey) -> None:
    row = window.controller.runs.rows[key]
    model = window.runs_panel.model
    progress, label, state = model.data(model.index(model.row_of(key), 4), ProgressRole)
    assert state == CONNECTION_LOST and progress == row.progress and progress > 0
    assert label.startswith("last known: ") and " of 300 (" in label
    assert not window.runs_panel.act_cancel.isEnabled()
    assert not window.runs_panel.act_details.isEnabled()
    banner = window.preview.banner
    assert banner.isVisible() and "Connection lost" in window.preview.banner_text.text()
    assert "running at" in window.preview.banner_text.text()
    assert CONNECTION_LOST in window.windowTitle()
    assert CONNECTION_LOST in window.summary.text()
    elapsed = row.elapsed()
    qtbot.wait(1200)
    assert row.elapsed() == elapsed  # no ticking clock for a run nobody can see


def test_a_hung_server_marks_its_run_lost_then_running_again(window, qtbot, server):
    ep, key = follow_a_run(qtbot, window, server)
    tree = server_tree(server)
    os.kill(server.proc.pid, signal.SIGSTOP)  # the server hangs; its workers go on
    try:
        wait_lost(qtbot, window, key)
        assert_lost_on_screen(qtbot, window, key)
        screenshot(window, "conn-01-connection-lost")
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    qtbot.waitUntil(lambda: shown_state(window, key) == "running", timeout=20_000)
    assert not window.preview.banner.isVisible()
    assert window.runs_panel.act_cancel.isEnabled()
    # the preview follows the run again (a new subscription after the outage)
    shown = window.preview.frame.number
    qtbot.waitUntil(lambda: window.preview.frame.number > shown + 5, timeout=20_000)
    assert all(p.is_running() for p in tree)


def test_a_killed_server_restarted_on_its_store_resolves_the_run(window, qtbot, make_server):
    server = make_server("store")
    ep, key = follow_a_run(qtbot, window, server)
    for proc in server_tree(server):
        proc.kill()  # kill -9, server and workers
    server.proc.wait()
    wait_lost(qtbot, window, key)
    assert_lost_on_screen(qtbot, window, key)
    # its process is gone (the registry knows): "exited", not "stopped" (nobody asked)
    qtbot.waitUntil(
        lambda: window.controller.servers[ep].state == ServerState.EXITED, timeout=10_000
    )

    # the same server again (same port, same store): the run was interrupted
    make_server("store", port=server.port)
    qtbot.waitUntil(lambda: shown_state(window, key) == "failed", timeout=30_000)
    assert not window.preview.banner.isVisible()
    with ExecutionClient(port=server.port, auto_spawn=False) as client:
        assert client.get_status(key.exec_id)["state"] == "failed"
    screenshot(window, "conn-02-resolved-failed")


def test_a_server_that_comes_back_without_the_run_shows_it_lost(window, qtbot, make_server):
    server = make_server("first")
    ep, key = follow_a_run(qtbot, window, server)
    for proc in server_tree(server):
        proc.kill()
    server.proc.wait()
    wait_lost(qtbot, window, key)
    make_server("another-store", port=server.port)  # another data dir: it never saw the run
    qtbot.waitUntil(lambda: shown_state(window, key) == LOST, timeout=30_000)
    assert "no longer knows" in window.preview.banner_text.text()
    assert not window.runs_panel.act_cancel.isEnabled()
    screenshot(window, "conn-03-lost")
