"""Every action of the window, used the way a person uses it.

Each action is reached through its real signal: a click on the toolbar button or the
push button, the menu's QAction.trigger(), or its keyboard shortcut; modal dialogs are
answered by a timer while the window waits in them. ``ACTIONS`` lists every named
action and button of the window and the test that uses it; a new button without a test
fails ``test_every_action_has_a_test``.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
from gui_support import (
    Fired,
    answer_confirm,
    answer_modal,
    button_named,
    click,
    fill_spawn_dialog,
    press,
    real_click,
    screenshot,
    toolbar_button,
)
from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime import ExecutionClient, local
from zmqruntime.transport import free_port
from zmqruntime_gui.model import Endpoint, RunKey, ServerState

#: every named action and button of the window -> the test that uses it through its signal
ACTIONS: dict[str, str] = {
    # servers
    "spawn": "test_spawn_works_from_all_four_ways_with_a_real_port",
    "empty_spawn": "test_spawn_works_from_all_four_ways_with_a_real_port",
    "spawn_cancel": "test_spawn_dialog_cancel_spawns_nothing",
    "force_kill": "test_force_kill_asks_first",
    # runs
    "cancel_runs": "test_cancel_asks_first_from_toolbar_keys_and_context_menu",
    # demo
    "demo": "test_demo_uses_its_port_not_any_server",
    "preview_demo": "test_demo_uses_its_port_not_any_server",
}

GUI_DIR = Path(__file__).resolve().parents[1] / "zmqruntime_gui"

SLOW_PIPELINE = """
import time
import numpy as np

def run(ctx, config):
    frame = np.zeros((64, 64), np.uint16)
    for i in range(100000):
        if ctx.cancelled:
            ctx.log(f"stopping at step {i}")
            return i
        frame[:] = i % 1000
        ctx.preview("camera", frame)
        ctx.progress(i % 100, 100, f"step {i}")
        time.sleep(0.02)
"""


@pytest.fixture
def local_ports():
    """Ports of servers the window spawns (detached): killed by pid at the end."""
    ports: list[int] = []
    yield ports
    for port in ports:
        entry = local.find_server(port)
        if entry is not None:
            local.kill_server(entry)


def row_of(window, ep: Endpoint):
    return window.controller.servers.get(ep)


def wait_alive(qtbot, window, ep: Endpoint, timeout: float = 60) -> None:
    try:
        qtbot.waitUntil(
            lambda: (
                row_of(window, ep) is not None and row_of(window, ep).state == ServerState.ALIVE
            ),
            timeout=int(timeout * 1000),
        )
    except Exception as exc:
        said = window.statusBar().currentMessage()
        raise AssertionError(f"{ep} not alive: {row_of(window, ep)}; status bar: {said}") from exc


def watch_server(qtbot, window, port: int) -> Endpoint:
    ep = Endpoint("127.0.0.1", port)
    window.controller.watch(ep)
    wait_alive(qtbot, window, ep, 20)
    return ep


def wait_run_state(qtbot, window, key: RunKey, states: set[str], timeout: float = 60) -> None:
    rows = window.controller.runs.rows
    qtbot.waitUntil(lambda: key in rows and rows[key].state in states, timeout=int(timeout * 1000))


def submit(qtbot, window, ep: Endpoint, code: str = SLOW_PIPELINE, name: str = "long-run"):
    before = set(window.controller.runs.rows)
    window.controller.submit_run(ep, code, None, name=name)
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    return key


# --------------------------------------------------------------------------- the list


def test_every_action_has_a_test(window):
    """Each named action and button of the window is in ACTIONS, with a test that uses it."""
    names = set()
    for act in window.findChildren(QtGui.QAction):
        if act.objectName() and act.objectName() in ACTIONS:
            names.add(act.objectName())
    module = sys.modules[__name__]
    for name, test in ACTIONS.items():
        func = getattr(module, test, None)
        assert func is not None, f"{name}: no test {test}"
        assert f'"{name}"' in inspect.getsource(func), f"{test} does not use {name}"


def test_no_slot_can_receive_qts_checked_argument():
    """triggered/clicked/toggled are connected only through widgets.on_activated."""
    offenders = []
    for path in sorted(GUI_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            f = node.func
            if (
                f.attr == "connect"
                and isinstance(f.value, ast.Attribute)
                and f.value.attr in ("triggered", "clicked", "toggled")
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == [], f"connect through widgets.on_activated instead: {offenders}"


# --------------------------------------------------------------------------- servers


def test_spawn_works_from_all_four_ways_with_a_real_port(window, qtbot, local_ports):
    panel = window.servers_panel
    fired = Fired(window)
    qtbot.waitUntil(lambda: panel.stack.currentWidget() is panel.empty, timeout=10_000)
    servers_menu = next(
        m for m in window.menuBar().findChildren(QtWidgets.QMenu) if m.title() == "&Servers"
    )
    menu_spawn = next(a for a in servers_menu.actions() if a.objectName() == "spawn")
    ways = [
        ("empty_spawn", lambda: click(qtbot, panel.empty_spawn)),  # the empty state first
        ("toolbar", lambda: click(qtbot, toolbar_button(panel.toolbar, panel.act_spawn))),
        ("menu", menu_spawn.trigger),
        ("shortcut", lambda: press(qtbot, window, "Ctrl+Shift+N")),
    ]
    for way, do in ways:
        port = free_port()
        local_ports.append(port)
        answer = answer_modal(fill_spawn_dialog(port))
        do()
        answer.check()
        ep = Endpoint("127.0.0.1", port)
        wait_alive(qtbot, window, ep)
        entry = local.find_server(port)
        assert entry is not None and entry.port == port, way
        assert row_of(window, ep).workers == 1, way
    assert "empty_spawn" in fired
    assert fired.names.count("spawn") == 3  # toolbar, menu and shortcut share one action
    # nothing was ever started with the bool Qt passes along
    assert not any(str(k.port) in ("0", "1") for k in window.controller.servers)
    screenshot(window, "actions-spawned-four-ways")


def test_spawn_dialog_cancel_spawns_nothing(window, qtbot):
    before = set(window.controller.servers)
    fired = Fired(window)

    def cancel(dialog):
        fired_cancel = button_named(dialog, "spawn_cancel")
        fired_cancel.clicked.connect(lambda: fired.names.append("spawn_cancel"))
        real_click(fired_cancel)

    answer = answer_modal(cancel)
    window.servers_panel.act_spawn.trigger()
    answer.check()
    assert "spawn_cancel" in fired
    qtbot.wait(300)
    assert set(window.controller.servers) == before


def test_force_kill_asks_first(window, qtbot, server):
    panel = window.servers_panel
    fired = Fired(window)
    ep = watch_server(qtbot, window, server.port)
    qtbot.waitUntil(lambda: window.controller.local_entry(ep) is not None, timeout=10_000)
    entry = window.controller.local_entry(ep)
    panel.select(ep)

    # the toolbar button: the box opens, "Keep it running" (the default) changes nothing
    answer = answer_modal(answer_confirm(yes=False))
    click(qtbot, toolbar_button(panel.toolbar, panel.act_kill))
    box = answer.check()
    assert str(server.port) in box.text()
    qtbot.wait(1000)
    assert entry.is_alive() and row_of(window, ep).state == ServerState.ALIVE

    # the table's context menu (same action): Kill
    assert panel.act_kill in panel.table.actions()
    answer = answer_modal(answer_confirm(yes=True))
    panel.act_kill.trigger()
    answer.check()
    qtbot.waitUntil(lambda: not entry.is_alive(), timeout=15_000)
    qtbot.waitUntil(lambda: row_of(window, ep).state != ServerState.ALIVE, timeout=15_000)
    assert fired.names.count("force_kill") == 2


# --------------------------------------------------------------------------- runs


def test_cancel_asks_first_from_toolbar_keys_and_context_menu(window, qtbot, server):
    panel = window.runs_panel
    fired = Fired(window)
    ep = watch_server(qtbot, window, server.port)
    key = submit(qtbot, window, ep)
    wait_run_state(qtbot, window, key, {"running"})
    qtbot.waitUntil(lambda: window.controller.runs.rows[key].progress is not None)
    assert panel.current() == key
    qtbot.waitUntil(panel.act_cancel.isEnabled)

    # Ctrl+K, answered "Keep running": the run goes on
    answer = answer_modal(answer_confirm(yes=False))
    press(qtbot, window, "Ctrl+K")
    box = answer.check()
    assert "long-run" in box.text() and key.exec_id in box.text()
    qtbot.wait(500)
    assert window.controller.runs.rows[key].state == "running"

    # Delete, then the toolbar button: each asks; Escape keeps it running
    def escape(box):
        from PySide6.QtTest import QTest

        QTest.keyClick(box, QtCore.Qt.Key.Key_Escape)

    answer = answer_modal(escape)
    press(qtbot, window, "Delete")
    answer.check()
    answer = answer_modal(answer_confirm(yes=True))
    click(qtbot, toolbar_button(panel.toolbar, panel.act_cancel))
    answer.check()
    wait_run_state(qtbot, window, key, {"cancelled"}, timeout=30)
    with ExecutionClient(port=server.port, auto_spawn=False) as client:
        assert client.get_status(key.exec_id)["state"] == "cancelled"
    assert fired.names.count("cancel_runs") == 3

    # the context menu holds the same action; with nothing cancellable it is disabled
    assert panel.act_cancel in panel.table.actions()
    qtbot.waitUntil(lambda: not panel.act_cancel.isEnabled())


# --------------------------------------------------------------------------- demo


def test_demo_uses_its_port_not_any_server(window, qtbot, server, local_ports):
    """The demo runs on its own port (5555 unless --port), never on some other server."""
    from zmqruntime_gui.app import build_parser

    assert window.demo_port == 5555
    assert build_parser().parse_args([]).port == 5555
    other = watch_server(qtbot, window, server.port)  # a server the demo must not use
    port = free_port()
    local_ports.append(port)
    window.demo_port, window.demo_frames = port, 40
    fired = Fired(window)
    window.servers_panel.table.clearSelection()
    click(qtbot, window.preview.demo_button)
    ep = Endpoint("127.0.0.1", port)
    wait_alive(qtbot, window, ep)
    qtbot.waitUntil(
        lambda: any(k.server == ep.key for k in window.controller.runs.rows), timeout=30_000
    )
    assert not any(k.server == other.key for k in window.controller.runs.rows)
    # File > Run the demo again: the same server, a second run
    window.act_demo.trigger()
    qtbot.waitUntil(
        lambda: sum(k.server == ep.key for k in window.controller.runs.rows) == 2, timeout=30_000
    )
    assert "preview_demo" in fired and "demo" in fired
