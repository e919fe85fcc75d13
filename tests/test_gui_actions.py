"""Every action of the window, used the way a person uses it.

Each action is reached through its real signal: a click on the toolbar button or the
push button, the menu's QAction.trigger(), or its keyboard shortcut; modal dialogs are
answered by a timer while the window waits in them. ``ACTIONS`` lists every named
action and button of the window and the test that uses it; a new button without a test
fails ``test_every_action_has_a_test``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest
from gui_support import (
    SLOW_PIPELINE,
    Fired,
    answer_confirm,
    answer_file_dialog,
    answer_message,
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

#: every named action and button of the window and of its dialogs -> the test that uses
#: it through its real signal (the test, or a helper it calls, names it); "file::test"
#: for a test in another module
ACTIONS: dict[str, str] = {
    # servers
    "spawn": "test_spawn_works_from_all_four_ways_with_a_real_port",
    "empty_spawn": "test_spawn_works_from_all_four_ways_with_a_real_port",
    "spawn_ok": "test_spawn_works_from_all_four_ways_with_a_real_port",
    "spawn_cancel": "test_spawn_dialog_cancel_spawns_nothing",
    "add_remote": "test_add_remote_from_toolbar_and_empty_state",
    "empty_add_remote": "test_add_remote_from_toolbar_and_empty_state",
    "remote_ok": "test_add_remote_from_toolbar_and_empty_state",
    "remote_cancel": "test_add_remote_from_toolbar_and_empty_state",
    "remote_keys_browse": "test_add_remote_from_toolbar_and_empty_state",
    "stop": "test_log_stop_and_remove_a_server",
    "force_kill": "test_force_kill_asks_first",
    "server_log": "test_log_stop_and_remove_a_server",
    "server_log_follow": "test_log_stop_and_remove_a_server",
    "log_open_externally": "test_log_stop_and_remove_a_server",
    "log_close": "test_log_stop_and_remove_a_server",
    "remove_server": "test_log_stop_and_remove_a_server",
    # runs
    "submit": "test_submit_details_results_by_keyboard_and_mouse",
    "submit_ok": "test_submit_details_results_by_keyboard_and_mouse",
    "browse_pipeline": "test_submit_a_pipeline_file_through_browse",
    "use_files": "test_submit_a_pipeline_file_through_browse",
    "use_example": "test_submit_details_results_by_keyboard_and_mouse",
    "follow_folder": (
        "test_gui_acquisition.py::test_follow_folder_button_sets_up_a_run_that_follows_it"
    ),
    "browse_config": "test_submit_a_pipeline_file_through_browse",
    "cancel_runs": "test_cancel_asks_first_from_toolbar_keys_and_context_menu",
    "run_details": "test_submit_details_results_by_keyboard_and_mouse",
    "details_refresh": "test_submit_details_results_by_keyboard_and_mouse",
    "refresh": "test_submit_details_results_by_keyboard_and_mouse",
    "log_follow": "test_submit_details_results_by_keyboard_and_mouse",
    "result_show": "test_submit_details_results_by_keyboard_and_mouse",
    "result_save": "test_submit_details_results_by_keyboard_and_mouse",
    "results_csv": "test_submit_details_results_by_keyboard_and_mouse",
    "results_plot": "test_submit_details_results_by_keyboard_and_mouse",
    "log_wrap": "test_submit_details_results_by_keyboard_and_mouse",
    "result_napari": (
        "test_gui_channels.py::test_live_composite_channels_levels_and_z_slider_from_a_server"
    ),
    # preview
    "pause": "test_preview_actions_by_keyboard",
    "auto_levels": "test_preview_actions_by_keyboard",
    "continuous_levels": "test_preview_actions_by_keyboard",
    "snapshot_tiff": "test_preview_actions_by_keyboard",
    "save_view_png": "test_preview_actions_by_keyboard",
    # demo
    "demo": "test_demo_uses_its_port_not_any_server",
    "preview_demo": "test_demo_uses_its_port_not_any_server",
    # window
    "quit": "test_window_menu_actions",
    "reset_layout": "test_window_menu_actions",
    "show_serversDock": "test_window_menu_actions",
    "show_runsDock": "test_window_menu_actions",
    "show_logsDock": "test_window_menu_actions",
    "show_resultsDock": "test_window_menu_actions",
    "shortcuts": "test_window_menu_actions",
    "about": "test_window_menu_actions",
}

GUI_DIR = Path(__file__).resolve().parents[1] / "zmqruntime_gui"


@pytest.fixture
def local_ports():
    """Ports of servers the window spawns (detached): killed by pid at the end."""
    ports: list[int] = []
    yield ports
    for port in ports:
        entry = local.find_server(port)
        if entry is not None:
            local.kill_server(entry)


def use(qtbot, toolbar: QtWidgets.QToolBar, action: QtGui.QAction) -> None:
    """Click the action's toolbar button; if the toolbar has no room for it (it is in
    the » menu), trigger it as that menu would."""
    button = toolbar_button(toolbar, action)
    if button.isVisible():
        click(qtbot, button)
    else:
        assert action.isEnabled()
        action.trigger()


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


def controls(root: QtWidgets.QWidget) -> dict[str, QtCore.QObject]:
    """The named actions and buttons a person can use in ``root`` (Qt's own ones aside)."""
    found: dict[str, QtCore.QObject] = {}
    unnamed = []
    for act in root.findChildren(QtGui.QAction):
        parent = act.parent()
        if not act.text() or act.isSeparator() or act.menu() is not None:
            continue
        if isinstance(parent, (QtWidgets.QMenu, QtWidgets.QToolBar)):
            continue  # a menu's own action or a toolbar's toggle
        if type(parent).__module__.startswith("pyqtgraph"):
            continue  # pyqtgraph's scene menu (switched off in the view)
        (found.__setitem__(act.objectName(), act) if act.objectName() else unnamed.append(act))
    for button in root.findChildren(QtWidgets.QAbstractButton):
        name = button.objectName()
        if name.startswith(("qt_", "Scroll")):
            continue  # dock title buttons, toolbar overflow, tab scrolling
        if isinstance(button, QtWidgets.QToolButton) and button.defaultAction() is not None:
            continue  # a toolbar's button for one of the actions above
        if isinstance(button.parent(), QtWidgets.QDialogButtonBox) and not name:
            continue  # a standard dialog button that only closes (named if it does more)
        (found.__setitem__(name, button) if name else unnamed.append(button))
    assert not unnamed, f"give these an objectName and a test: {[u.text() for u in unnamed]}"
    return found


def dialogs_of(window) -> list[QtWidgets.QWidget]:
    """One of each dialog the window opens (their buttons are actions too)."""
    from zmqruntime_gui.run_details import RunDetailsDialog
    from zmqruntime_gui.servers_panel import AddRemoteDialog, LogDialog, SpawnDialog
    from zmqruntime_gui.submit_dialog import SubmitDialog

    key = RunKey("127.0.0.1:1", "0123456789abcdef")
    return [
        SpawnDialog(window),
        AddRemoteDialog(window),
        SubmitDialog([], window),
        RunDetailsDialog(window.controller, key, window),
        LogDialog(__file__, window),
    ]


def test_every_action_has_a_test(window):
    """Each named action and button of the window and its dialogs is in ACTIONS, and the
    test named there (or a helper it calls) uses it."""
    names = set(controls(window))
    for dialog in dialogs_of(window):
        names |= set(controls(dialog))
        dialog.deleteLater()
    assert names == set(ACTIONS), (
        f"without a test: {sorted(names - set(ACTIONS))}; "
        f"gone from the window: {sorted(set(ACTIONS) - names)}"
    )
    for name, test in ACTIONS.items():
        module = sys.modules[__name__]
        if "::" in test:
            filename, test = test.split("::")
            module = importlib.import_module(Path(filename).stem)
        func = getattr(module, test, None)
        assert func is not None, f"{name}: no test {test}"
        sources = [inspect.getsource(func)]
        for used in func.__code__.co_names:  # and the helpers it calls
            helper = getattr(module, used, None)
            if inspect.isfunction(helper):
                sources.append(inspect.getsource(helper))
        assert any(f'"{name}"' in src for src in sources), f"{test} does not use {name}"


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


# --------------------------------------------------------------------------- more servers


def test_add_remote_from_toolbar_and_empty_state(window, qtbot, tmp_path):
    from PySide6.QtTest import QTest

    from zmqruntime.transport import generate_keys

    panel = window.servers_panel
    fired = Fired(window)
    keys = tmp_path / "scope-keys"
    generate_keys(keys)
    ep = Endpoint("192.0.2.1", 6000)  # TEST-NET-1: routes nowhere
    qtbot.waitUntil(lambda: panel.stack.currentWidget() is panel.empty, timeout=10_000)

    def fill(dialog):
        assert dialog.windowTitle() == "Add a server"
        QTest.keyClicks(dialog.findChild(QtWidgets.QLineEdit, "remote_address"), ep.key)
        # a folder that holds no keys is refused with the reason
        dialog.findChild(QtWidgets.QLineEdit, "remote_keys").setText(str(tmp_path))
        real_click(button_named(dialog, "remote_ok"))
        assert dialog.isVisible() and "lacks client.key_secret" in dialog.error.text()
        # Browse... for the real one
        browse = answer_modal(answer_file_dialog(keys))
        real_click(button_named(dialog, "remote_keys_browse"))
        browse.check()
        assert dialog.findChild(QtWidgets.QLineEdit, "remote_keys").text() == str(keys)
        real_click(button_named(dialog, "remote_ok"))

    answer = answer_modal(fill)
    click(qtbot, panel.empty_add)
    answer.check()
    qtbot.waitUntil(lambda: ep in window.controller.servers)
    assert window.controller.key_dir(ep) == str(keys)
    assert str(keys) in window.settings.value("servers/key_dirs")  # remembered per server
    qtbot.waitUntil(lambda: window.controller.servers[ep].state == ServerState.DOWN, timeout=10_000)

    # the toolbar's Add remote..., cancelled: nothing changes
    answer = answer_modal(lambda d: real_click(button_named(d, "remote_cancel")))
    click(qtbot, toolbar_button(panel.toolbar, panel.act_add))
    answer.check()
    assert list(window.controller.servers) == [ep]
    assert fired.names == ["empty_add_remote", "add_remote"]


def test_log_stop_and_remove_a_server(window, qtbot, server):
    panel = window.servers_panel
    fired = Fired(window)
    ep = watch_server(qtbot, window, server.port)
    qtbot.waitUntil(lambda: window.controller.servers[ep].log_file is not None)
    panel.select(ep)

    # Log: the server's log file, followed; "Open externally" hands it to the desktop
    click(qtbot, toolbar_button(panel.toolbar, panel.act_log))
    assert len(panel.log_dialogs) == 1
    dialog = panel.log_dialogs[0]
    qtbot.waitUntil(lambda: "serving on" in dialog.text.toPlainText(), timeout=10_000)
    follow = dialog.findChild(QtWidgets.QCheckBox, "server_log_follow")
    click(qtbot, follow)
    assert not follow.isChecked()
    opened = []

    class Desktop(QtCore.QObject):
        @QtCore.Slot(QtCore.QUrl)
        def open(self, url: QtCore.QUrl) -> None:
            opened.append(url.toLocalFile())

    desktop = Desktop()
    QtGui.QDesktopServices.setUrlHandler("file", desktop, "open")
    try:
        click(qtbot, button_named(dialog, "log_open_externally"))
    finally:
        QtGui.QDesktopServices.unsetUrlHandler("file")
    assert opened == [window.controller.servers[ep].log_file]
    click(qtbot, button_named(dialog, "log_close"))
    qtbot.waitUntil(lambda: not panel.log_dialogs)

    # Stop (toolbar): graceful, the row reads "stopped"
    click(qtbot, toolbar_button(panel.toolbar, panel.act_stop))
    qtbot.waitUntil(lambda: row_of(window, ep).state == ServerState.STOPPED, timeout=30_000)
    server.proc.wait(timeout=30)

    # Remove (the table's context menu): off the list
    panel.select(ep)
    assert panel.act_remove in panel.table.actions() and panel.act_remove.isEnabled()
    panel.act_remove.trigger()
    assert ep not in window.controller.servers
    assert {"server_log", "stop", "remove_server"} <= set(fired.names)


# --------------------------------------------------------------------------- more runs

SMALL_DEMO = "size = 64\nframes = 12\nn_cells = 5\nframe_interval = 0.01\nseed = 1\n"


def test_submit_details_results_by_keyboard_and_mouse(window, qtbot, server, tmp_path):
    from PySide6.QtTest import QTest

    fired = Fired(window)
    ep = watch_server(qtbot, window, server.port)
    before = set(window.controller.runs.rows)

    # Ctrl+N: the Submit dialog, the bundled example, its config edited, Submit
    def fill(dialog):
        assert dialog.example_combo.currentText() == "acquisition"
        assert dialog.server_combo.currentData() == ep
        real_click(button_named(dialog, "use_files"))
        assert not dialog.example_combo.isEnabled()
        real_click(button_named(dialog, "use_example"))
        assert dialog.example_combo.isEnabled() and "frames" in dialog.config_edit.toPlainText()
        dialog.config_edit.selectAll()
        for line in SMALL_DEMO.splitlines():  # typed, a line at a time
            QTest.keyClicks(dialog.config_edit, line)
            QTest.keyClick(dialog.config_edit, QtCore.Qt.Key.Key_Return)
        real_click(button_named(dialog, "submit_ok"))

    answer = answer_modal(fill)
    press(qtbot, window, "Ctrl+N")
    answer.check()
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    wait_run_state(qtbot, window, key, {"completed"})
    assert window.runs_panel.current() == key

    # the log's Follow switch
    follow = window.logs_panel.findChild(QtWidgets.QCheckBox, "log_follow")
    click(qtbot, follow)
    assert not follow.isChecked()

    # Ctrl+I: details; its Refresh asks the server again
    press(qtbot, window, "Ctrl+I")
    qtbot.waitUntil(lambda: len(window.details) == 1)
    details = window.details[0]
    qtbot.waitUntil(lambda: details.status is not None)
    details.status = None
    click(qtbot, button_named(details, "details_refresh"))
    qtbot.waitUntil(lambda: details.status is not None and details.status["state"] == "completed")
    details.close()
    qtbot.waitUntil(lambda: not window.details)

    # a double click on the run opens them too
    table = window.runs_panel.table
    rect = table.visualRect(window.runs_panel.model.index(window.runs_panel.model.row_of(key), 0))
    qtbot.mouseClick(table.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.mouseDClick(table.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: len(window.details) == 1)
    window.details[0].close()

    # F5: a poll right now (the timers are stopped to tell it apart)
    window.controller.server_timer.stop()
    window.controller.runs_timer.stop()
    seen = window.controller.servers[ep].last_ok
    press(qtbot, window, "F5")
    qtbot.waitUntil(lambda: window.controller.servers[ep].last_ok != seen, timeout=5000)

    # Results: a table, one row per result, the return dict's fields as columns
    results = window.results_panel
    window.results_dock.raise_()
    qtbot.waitUntil(lambda: len(results.summaries) == 3, timeout=10_000)
    with ExecutionClient(port=ep.port, auto_spawn=False) as client:
        stored = client.get_results(key.exec_id)
    model = results.model
    assert model.columns[:3] == ["#", "name", "value"] and "mean_cells" in model.columns
    assert [r["name"] for r in model.rows] == ["max_projection", "counts", "return"]
    assert model.rows[2]["frames"] == 12  # a number in its own column, not a cut dict string
    # sorted by a click on the "name" header
    header = results.table.horizontalHeader()
    qtbot.mouseClick(
        header.viewport(), QtCore.Qt.MouseButton.LeftButton,
        pos=QtCore.QPoint(header.sectionViewportPosition(1) + 10, header.height() // 2),
    )  # fmt: skip
    assert [r["name"] for r in results.shown_rows()] == ["counts", "max_projection", "return"]

    # click the array's row, Show image; Save... to a file
    row = next(r for r in range(results.proxy.rowCount())
               if results.proxy.index(r, 1).data() == "max_projection")  # fmt: skip
    rect = results.table.visualRect(results.proxy.index(row, 1))
    qtbot.mouseClick(results.table.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=rect.center())
    use(qtbot, results.toolbar, results.act_show)
    qtbot.waitUntil(lambda: window.preview.static is not None, timeout=10_000)
    assert window.preview.static.shape == (64, 64)
    qtbot.waitUntil(lambda: "showing max_projection" in window.statusBar().currentMessage())
    target = tmp_path / "max.tif"
    answer = answer_modal(answer_file_dialog(target))
    use(qtbot, results.toolbar, results.act_save)
    answer.check()
    qtbot.waitUntil(target.exists, timeout=10_000)

    # the counts result is a table itself: pick it, export it whole, plot cells per frame
    choice = results.findChild(QtWidgets.QComboBox, "results_table")
    choice.setCurrentIndex(choice.findText("counts [1]"))
    qtbot.waitUntil(lambda: len(model.rows) == 12, timeout=10_000)
    counts = stored["counts"][0]
    assert [r["cells"] for r in model.rows] == list(counts["cells"])
    csv_path = tmp_path / "counts.csv"
    answer = answer_modal(answer_file_dialog(csv_path))
    use(qtbot, results.toolbar, results.act_csv)
    answer.check()
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == list(counts) and len(lines) == 13
    assert [int(line.split(",")[1]) for line in lines[1:]] == list(counts["cells"])
    use(qtbot, results.toolbar, results.act_plot)
    (plot,) = results.plots
    assert plot.y.currentText() == "cells"
    plot.x.setCurrentText("frame")
    xs, ys = plot.data()
    assert list(xs) == list(counts["frame"]) and list(ys) == list(counts["cells"])
    plot.close()

    # the log: each line stamped with its time; Wrap off scrolls sideways instead
    log_text = window.logs_panel.plain_text()
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3}  acquiring 12 frames", log_text), log_text[:80]
    wrap = window.logs_panel.findChild(QtWidgets.QCheckBox, "log_wrap")
    assert wrap.isChecked()
    click(qtbot, wrap)
    assert window.logs_panel.text.lineWrapMode() == QtWidgets.QPlainTextEdit.LineWrapMode.NoWrap
    assert {
        "submit", "run_details", "refresh", "result_show", "result_save", "results_csv",
        "results_plot",
    } <= set(fired.names)  # fmt: skip


def test_submit_a_pipeline_file_through_browse(window, qtbot, server, tmp_path):
    pipeline = tmp_path / "gain_pipeline.py"
    pipeline.write_text("def run(ctx, config):\n    return config.gain * 2\n")
    config = tmp_path / "gain_config.py"
    config.write_text("gain = 21\n")
    ep = watch_server(qtbot, window, server.port)
    before = set(window.controller.runs.rows)

    def fill(dialog):
        real_click(button_named(dialog, "use_files"))
        assert dialog.pipeline_path.isEnabled()
        for name, path in (("browse_pipeline", pipeline), ("browse_config", config)):
            answer = answer_modal(answer_file_dialog(path))
            real_click(button_named(dialog, name))
            answer.check()
        assert dialog.use_files.isChecked() and dialog.name_edit.text() == "gain"
        assert "gain = 21" in dialog.config_edit.toPlainText()
        real_click(button_named(dialog, "submit_ok"))

    answer = answer_modal(fill)
    click(qtbot, toolbar_button(window.runs_panel.toolbar, window.runs_panel.act_submit))
    answer.check()
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    wait_run_state(qtbot, window, key, {"completed"})
    with ExecutionClient(port=ep.port, auto_spawn=False) as client:
        assert client.get_results(key.exec_id)["return"] == [42]


# --------------------------------------------------------------------------- preview


def test_preview_actions_by_keyboard(window, qtbot, tmp_path):
    import numpy as np
    import tifffile

    from zmqruntime_gui.model import FollowBox

    preview = window.preview
    fired = Fired(window)
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    preview.set_source(box, "keys")
    frame = np.add.outer(np.arange(100), np.arange(120)).astype(np.uint16)
    box.put_frame("camera", frame, seq=0, t=None)
    qtbot.waitUntil(lambda: preview.frame is not None)

    press(qtbot, window, "Space")
    assert preview.act_pause.isChecked()
    box.put_frame("camera", frame + 1000, seq=1, t=None)
    qtbot.wait(100)
    assert preview.frame.number == 1  # paused: the new frame waits
    press(qtbot, window, "Space")
    qtbot.waitUntil(lambda: preview.frame.number == 2)

    # the continuous switch off, then Ctrl+L sets the levels from the frame once
    continuous = preview.findChild(QtWidgets.QCheckBox, "continuous_levels")
    if continuous.isChecked():
        click(qtbot, continuous)
    assert not continuous.isChecked()
    preview.levels = (0.0, 1.0)
    press(qtbot, window, "Ctrl+L")
    assert preview.levels[0] >= 1000
    click(qtbot, continuous)
    assert continuous.isChecked()

    tif, png = tmp_path / "frame.tif", tmp_path / "view.png"
    answer = answer_modal(answer_file_dialog(tif))
    press(qtbot, window, "Ctrl+S")
    answer.check()
    np.testing.assert_array_equal(tifffile.imread(tif), frame + 1000)
    answer = answer_modal(answer_file_dialog(png))
    press(qtbot, window, "Ctrl+Shift+S")
    answer.check()
    assert QtGui.QImage(str(png)).width() > 100
    assert ["pause", "pause", "auto_levels", "snapshot_tiff", "save_view_png"] == [
        n for n in fired.names if n in ("pause", "auto_levels", "snapshot_tiff", "save_view_png")
    ]


# --------------------------------------------------------------------------- window


def menu_action(window, title: str, name: str) -> QtGui.QAction:
    menu = next(m for m in window.menuBar().findChildren(QtWidgets.QMenu) if m.title() == title)
    return next(a for a in menu.actions() if a.objectName() == name)


def test_window_menu_actions(window, qtbot):
    Area = QtCore.Qt.DockWidgetArea
    fired = Fired(window)
    docks = {
        "show_serversDock": window.servers_dock,
        "show_runsDock": window.runs_dock,
        "show_logsDock": window.logs_dock,
        "show_resultsDock": window.results_dock,
    }
    for name, dock in docks.items():  # View > (dock): hide, then show again
        act = menu_action(window, "&View", name)
        act.trigger()
        assert not dock.isVisible(), name
        act.trigger()
        assert dock.isVisible(), name

    # View > Reset layout puts a moved dock back
    window.addDockWidget(Area.LeftDockWidgetArea, window.logs_dock)
    menu_action(window, "&View", "reset_layout").trigger()
    assert window.dockWidgetArea(window.logs_dock) == Area.RightDockWidgetArea

    # Help: shortcuts and about, each answered OK
    answer = answer_modal(answer_message("OK"))
    menu_action(window, "&Help", "shortcuts").trigger()
    answer.check()
    assert "Ctrl+Shift+N" in answer.text
    answer = answer_modal(answer_message("OK"))
    menu_action(window, "&Help", "about").trigger()
    answer.check()
    assert "zmqruntime" in answer.text

    # Ctrl+Q: the window closes
    press(qtbot, window, "Ctrl+Q")
    qtbot.waitUntil(lambda: not window.isVisible())
    assert fired.names[-4:] == ["reset_layout", "shortcuts", "about", "quit"]
