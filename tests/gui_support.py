"""Helpers of the GUI tests: screenshots and event-loop timing (fixtures: conftest.py)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import shiboken6  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def screenshot(widget: QtWidgets.QWidget, name: str) -> Path:
    """Save a PNG of ``widget`` under test-artifacts/ (looked at by people, kept by CI)."""
    QtWidgets.QApplication.processEvents()
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"gui-{name}.png"
    assert widget.grab().save(str(path), "PNG"), f"could not write {path}"
    return path


def measure_timer_lateness(qtbot, seconds: float, interval_ms: int = 10) -> list[float]:
    """Lateness (ms) of each tick of a ``interval_ms`` timer while the event loop runs."""
    timer = QtCore.QTimer()
    timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
    timer.setInterval(interval_ms)
    lateness: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lateness.append(max(0.0, (now - last[0]) * 1000 - interval_ms))
        last[0] = now

    timer.timeout.connect(tick)
    timer.start()
    qtbot.wait(int(seconds * 1000))
    timer.stop()
    return lateness


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# --------------------------------------------------------------------------- a person's hands


def click(qtbot, widget: QtWidgets.QWidget) -> None:
    """A left click in the middle of ``widget`` (it must be visible and enabled)."""
    assert widget.isVisible(), f"{widget.objectName() or widget} is not visible"
    assert widget.isEnabled(), f"{widget.objectName() or widget} is disabled"
    qtbot.mouseClick(widget, QtCore.Qt.MouseButton.LeftButton)


def toolbar_button(toolbar: QtWidgets.QToolBar, action) -> QtWidgets.QToolButton:
    """The button a toolbar shows for ``action``."""
    button = toolbar.widgetForAction(action)
    assert isinstance(button, QtWidgets.QToolButton), f"{action.text()} is not on the toolbar"
    return button


def press(qtbot, window: QtWidgets.QWidget, keys: str) -> None:
    """Type a shortcut (e.g. "Ctrl+Shift+N") into the active window, as a person would."""
    from PySide6 import QtGui

    window.activateWindow()
    qtbot.waitUntil(lambda: QtWidgets.QApplication.activeWindow() is window, timeout=5000)
    combo = QtGui.QKeySequence(keys)[0]
    target = QtWidgets.QApplication.focusWidget() or window
    qtbot.keyClick(target, combo.key(), combo.keyboardModifiers())


class ModalAnswer:
    """Answers the next modal dialog from a timer, while the code under test waits in exec()."""

    def __init__(self, handler, timeout: float = 20.0) -> None:
        self.handler = handler
        self.dialog: QtWidgets.QWidget | None = None
        self.title = self.text = ""
        self._already_open = QtWidgets.QApplication.activeModalWidget()  # not this one
        self.error: BaseException | None = None
        self._deadline = time.monotonic() + timeout
        self._timer = QtCore.QTimer()
        self._timer.setInterval(20)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self) -> None:
        dialog = QtWidgets.QApplication.activeModalWidget()
        if dialog is not None and dialog.isVisible() and dialog is not self._already_open:
            self._timer.stop()
            self.dialog = dialog
            # what it said (a static message box is deleted once answered)
            self.title = dialog.windowTitle()
            self.text = dialog.text() if isinstance(dialog, QtWidgets.QMessageBox) else ""
            try:
                self.handler(dialog)
            except BaseException as exc:  # reported by check(); close the dialog anyway
                self.error = exc
                dialog.close()
        elif time.monotonic() > self._deadline:
            self._timer.stop()

    def check(self) -> QtWidgets.QWidget:
        """The dialog that was answered (fails if none opened or the handler failed)."""
        self._timer.stop()
        if self.error is not None:
            raise self.error
        assert self.dialog is not None, "no modal dialog opened"
        return self.dialog


def answer_modal(handler, timeout: float = 20.0) -> ModalAnswer:
    """Call ``handler(dialog)`` on the next modal dialog that opens (a timer polls for it)."""
    return ModalAnswer(handler, timeout)


def button_named(dialog: QtWidgets.QWidget, name: str) -> QtWidgets.QAbstractButton:
    button = dialog.findChild(QtWidgets.QAbstractButton, name)
    assert button is not None, f"{dialog.windowTitle()} has no button {name!r}"
    return button


class Fired:
    """Records which named actions and buttons of a window emitted their real signal."""

    def __init__(self, *roots: QtWidgets.QWidget) -> None:
        from PySide6 import QtGui

        self.names: list[str] = []
        for root in roots:
            for act in root.findChildren(QtGui.QAction):
                if act.objectName():
                    act.triggered.connect(lambda *_, n=act.objectName(): self.names.append(n))
            for button in root.findChildren(QtWidgets.QAbstractButton):
                if button.objectName() and not isinstance(button, QtWidgets.QToolButton):
                    button.clicked.connect(lambda *_, n=button.objectName(): self.names.append(n))

    def __contains__(self, name: str) -> bool:
        return name in self.names


def fill_spawn_dialog(port: int, workers: int = 1):
    """A handler for the Spawn dialog: type the port and workers, click Spawn."""

    def handler(dialog: QtWidgets.QWidget) -> None:
        assert dialog.windowTitle() == "Spawn a local server"
        dialog.findChild(QtWidgets.QSpinBox, "spawn_port").setValue(port)
        dialog.findChild(QtWidgets.QSpinBox, "spawn_workers").setValue(workers)
        real_click(button_named(dialog, "spawn_ok"))

    return handler


def real_click(button: QtWidgets.QAbstractButton) -> None:
    """A real mouse click (press + release) on a button inside a modal dialog."""
    from PySide6.QtTest import QTest

    QTest.mouseClick(button, QtCore.Qt.MouseButton.LeftButton)


def answer_confirm(yes: bool):
    def handler(box: QtWidgets.QWidget) -> None:
        assert box.objectName() == "confirm", box
        no = button_named(box, "confirm_no")
        assert box.defaultButton() is no  # Enter keeps things as they are
        real_click(button_named(box, "confirm_yes") if yes else no)

    return handler


def answer_file_dialog(path) -> Callable:
    """A handler for a file dialog: type ``path`` into its name field and press Enter."""
    from PySide6.QtTest import QTest

    def handler(dialog: QtWidgets.QWidget) -> None:
        assert isinstance(dialog, QtWidgets.QFileDialog), dialog
        edit = dialog.findChild(QtWidgets.QLineEdit, "fileNameEdit")
        if dialog.fileMode() == QtWidgets.QFileDialog.FileMode.Directory:
            edit.clear()
            # go to the folder, then Choose (with the name field empty it takes the folder)
            dialog.setDirectory(str(path))
            box = dialog.findChild(QtWidgets.QDialogButtonBox, "buttonBox")
            real_click(box.button(QtWidgets.QDialogButtonBox.StandardButton.Open))
            return
        edit.setText(str(path))  # pasted: typed letters would open the completer's popup
        QTest.keyClick(edit, QtCore.Qt.Key.Key_Return)
        taken = not (shiboken6.isValid(dialog) and dialog.isVisible())  # static ones are deleted
        assert taken, f"the file dialog did not take {path}"

    return handler


def answer_message(button_text: str = "OK") -> Callable:
    """A handler for a message box: click the button that reads ``button_text``."""

    def handler(box: QtWidgets.QWidget) -> None:
        assert isinstance(box, QtWidgets.QMessageBox), box
        for button in box.buttons():
            if button.text().replace("&", "") == button_text:
                real_click(button)
                return
        raise AssertionError(f"no {button_text!r} in {[b.text() for b in box.buttons()]}")

    return handler


#: a run that previews a 64x64 frame and reports progress every 20 ms until cancelled
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
