"""The window's layout from 1024x700 up: nothing clipped, nothing overlapping.

Asserted on widget geometry, with the window showing what a session shows (a server, a
running run with progress, a live frame, a status message): every toolbar action is
either fully visible or in the toolbar's » menu, every table header is readable and no
table scrolls sideways, no button or label is cut by its parent, the preview's two
status texts do not run into each other. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import numpy as np
import pytest
from gui_support import screenshot
from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime_gui.model import Endpoint, FollowBox, RunKey, ServerRow, ServerState
from zmqruntime_gui.widgets import overflow_button

SIZES = [(1024, 700), (1280, 800), (1920, 1080)]
EP = Endpoint("127.0.0.1", 55555)


def populate(window) -> None:
    """A session's worth of content, without a server (the timers are stopped)."""
    c = window.controller
    c.server_timer.stop()
    c.runs_timer.stop()
    c.servers[EP] = ServerRow(
        EP, "local", state=ServerState.ALIVE, ping_ms=1.2, workers=4, workers_busy=1,
        queued=0, uptime=3600.0,
    )  # fmt: skip
    c._registry_polled = True
    c.sigServersChanged.emit()
    c.runs.update_server(EP.key, [
        {"id": "0123456789abcdef", "name": "demo-acquisition", "state": "running",
         "created": 2.0, "started": 1.0e9, "progress": 0.3, "message": "frame 95"},
        {"id": "fedcba9876543210", "name": "plate-screen-with-a-rather-long-name",
         "state": "completed", "created": 1.0, "started": 1.0e9, "finished": 1.0e9 + 75,
         "progress": 1.0},
    ])  # fmt: skip
    box = FollowBox(RunKey(EP.key, "0123456789abcdef"))
    window.preview.set_source(box, "demo-acquisition")
    frame = (np.random.default_rng(0).random((512, 512)) * 4000).astype(np.uint16)
    box.put_frame("camera", frame, 0, None)
    window.statusBar().showMessage("submitted demo-acquisition (0123456789abcdef) to " + EP.key)


def settle(qtbot, window) -> None:
    qtbot.waitUntil(lambda: window.preview.frame is not None)
    window.runs_panel.model.flush()
    QtWidgets.QApplication.processEvents()
    qtbot.wait(50)


def on_screen(widget: QtWidgets.QWidget) -> bool:
    """Shown and not parked out of sight (a dock behind another dock's tab)."""
    return widget.isVisible() and not widget.visibleRegion().isEmpty()


def check_toolbars(window) -> list[str]:
    problems = []
    for bar in window.findChildren(QtWidgets.QToolBar):
        if not on_screen(bar):
            continue
        more = overflow_button(bar)
        more_shown = more is not None and more.isVisible()
        for act in bar.actions():
            widget = bar.widgetForAction(act)
            if widget is None or act.isSeparator():
                continue
            name = act.text() or type(widget).__name__
            if widget.isVisible():
                geometry = widget.geometry()
                if not bar.rect().contains(geometry):
                    problems.append(f"{name} is cut by its toolbar ({geometry} in {bar.rect()})")
                if more_shown and geometry.intersects(more.geometry()):
                    problems.append(f"{name} is under the » button")
            elif not more_shown:
                problems.append(f"{name} is hidden and the toolbar has no » menu")
        if more_shown and not bar.rect().contains(more.geometry()):
            problems.append("the » button itself is cut")
    return problems


def check_tables(window) -> list[str]:
    problems = []
    for table in window.findChildren(QtWidgets.QTableView):
        if not on_screen(table) or table.objectName() == "resultsTable":
            continue  # the results table has a column per field: it may scroll sideways
        header = table.horizontalHeader()
        metrics = QtGui.QFontMetrics(header.font())
        shown = [c for c in range(header.count()) if not header.isSectionHidden(c)]
        total = sum(header.sectionSize(c) for c in shown)
        if total > table.viewport().width() + 1:
            problems.append(f"{table.parent().objectName()}: columns {total} px in a "
                            f"{table.viewport().width()} px table")  # fmt: skip
        for c in shown:
            text = table.model().headerData(c, QtCore.Qt.Orientation.Horizontal)
            if header.sectionSize(c) < metrics.horizontalAdvance(str(text)) + 8:
                problems.append(f"header {text!r} cut to {header.sectionSize(c)} px")
    return problems


def check_clipping(window) -> list[str]:
    """Buttons, labels and fields fully inside their parent, and texts not cut."""
    problems = []
    kinds = (QtWidgets.QAbstractButton, QtWidgets.QLabel, QtWidgets.QComboBox)
    for widget in window.findChildren(QtWidgets.QWidget):
        if not isinstance(widget, kinds) or not on_screen(widget):
            continue
        parent = widget.parentWidget()
        if isinstance(parent, QtWidgets.QToolBar) or isinstance(
            parent, (QtWidgets.QAbstractItemView, QtWidgets.QHeaderView, QtWidgets.QTabBar)
        ):
            continue  # toolbars and tables are checked above; tab bars scroll by design
        if parent is not None and not parent.rect().contains(widget.geometry()):
            name = widget.objectName() or type(widget).__name__
            problems.append(f"{name} {widget.geometry()} is cut by its parent {parent.rect()}")
        if isinstance(widget, QtWidgets.QLabel) and widget.text():
            if widget.wordWrap():
                needed = widget.heightForWidth(widget.width())
                if needed > widget.height() + 2:
                    problems.append(f"label {widget.text()[:30]!r} needs {needed} px high, "
                                    f"has {widget.height()}")  # fmt: skip
            elif widget.minimumSizeHint().width() > widget.width() + 1:
                problems.append(f"label {widget.text()[:30]!r} is cut")
    return problems


def check_preview_texts(window) -> list[str]:
    info, cursor = window.preview.info, window.preview.cursor_label
    if cursor.isVisible() and cursor.text() and info.geometry().intersects(cursor.geometry()):
        return ["the preview's status text runs into the pixel readout"]
    return []


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_nothing_is_clipped_or_overlapping(window, qtbot, size):
    populate(window)
    window.resize(*size)
    window.act_reset.trigger()  # View > Reset layout: the first-start proportions
    settle(qtbot, window)
    # the pixel readout shows a value, as when the mouse is over the image
    window.preview._mouse_moved(window.preview.view.mapViewToScene(QtCore.QPointF(20.5, 10.5)))
    QtWidgets.QApplication.processEvents()
    assert (window.width(), window.height()) == size, "the window cannot be this small"
    problems = (
        check_toolbars(window)
        + check_tables(window)
        + check_clipping(window)
        + check_preview_texts(window)
    )
    screenshot(window, f"layout-{size[0]}x{size[1]}")
    # the Results tab in front of the Log
    window.results_dock.raise_()
    settle(qtbot, window)
    results = check_toolbars(window) + check_clipping(window)
    screenshot(window, f"layout-{size[0]}x{size[1]}-results")
    assert not problems + results, "\n".join(problems + results)
    # the most important columns stay: the run's name, state and progress, the server
    runs = window.runs_panel.table
    for col in (0, 3, 4):
        assert not runs.isColumnHidden(col)
    assert not window.servers_panel.table.isColumnHidden(0)
    # at full HD everything is shown, nothing overflows
    if size == (1920, 1080):
        assert not any(runs.isColumnHidden(c) for c in range(6))
        for bar in window.findChildren(QtWidgets.QToolBar):
            more = overflow_button(bar)
            assert more is None or not on_screen(more), type(bar.parent()).__name__


def test_shrinking_a_big_window_keeps_it_usable(window, qtbot):
    """Dragged down from 1500x940 to 1024x700 (no reset): still nothing clipped."""
    populate(window)
    settle(qtbot, window)
    window.resize(1024, 700)
    settle(qtbot, window)
    assert (window.width(), window.height()) == (1024, 700)
    problems = check_toolbars(window) + check_tables(window) + check_clipping(window)
    assert not problems, "\n".join(problems)
