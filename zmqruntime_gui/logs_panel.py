"""The followed run's log.

The log view shows what the server stored, then follows the live stream; a gap in
the live entries' indexes (dropped on a busy data channel) is filled from the server,
so the view is complete and in order. Each entry carries the time the server got it.
(The results view is in ``results_panel``.)
"""

from __future__ import annotations

from typing import Any

from PySide6 import QtGui, QtWidgets

from .controller import Controller
from .model import LogBuffer, RunKey
from .widgets import mono_font, named, on_activated

MAX_LOG_BLOCKS = 50_000


class LogView(QtWidgets.QWidget):
    """A read-only log with a follow switch; also used inside the run details dialog."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = QtWidgets.QPlainTextEdit(readOnly=True)
        self.text.setFont(mono_font())
        self.text.setMaximumBlockCount(MAX_LOG_BLOCKS)
        self.text.setPlaceholderText("No log lines yet.")
        self.wrap = named(QtWidgets.QCheckBox("Wrap"), "log_wrap")
        self.wrap.setToolTip("Wrap long lines at the panel's edge (off: scroll sideways)")
        self.wrap.setChecked(True)
        on_activated(self.wrap.toggled, self._wrap_toggled)
        self._wrap_toggled()
        self.follow = named(QtWidgets.QCheckBox("Follow"), "log_follow")
        self.follow.setChecked(True)
        self.follow.setToolTip("Keep the newest line in view")
        self.label = named(QtWidgets.QLabel(), "hint")
        row = QtWidgets.QHBoxLayout()
        row.setContentsMargins(4, 0, 4, 0)
        row.addWidget(self.label, 1)
        row.addWidget(self.wrap)
        row.addWidget(self.follow)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(row)
        layout.addWidget(self.text)

    def _wrap_toggled(self) -> None:
        Mode = QtWidgets.QPlainTextEdit.LineWrapMode
        self.text.setLineWrapMode(Mode.WidgetWidth if self.wrap.isChecked() else Mode.NoWrap)

    def clear(self, label: str = "") -> None:
        self.text.clear()
        self.label.setText(label)

    def append(self, entries: list[str]) -> None:
        if not entries:
            return
        bar = self.text.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 2
        cursor = QtGui.QTextCursor(self.text.document())
        cursor.movePosition(QtGui.QTextCursor.MoveOperation.End)
        block = "\n".join(entries)
        if not self.text.document().isEmpty():
            block = "\n" + block
        cursor.insertText(block)
        if self.follow.isChecked() or at_end:
            bar.setValue(bar.maximum())

    def plain_text(self) -> str:
        return self.text.toPlainText()


class LogsPanel(LogView):
    """The followed run's log: stored entries first, then the live ones, gap-free."""

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.buffer = LogBuffer()
        self._refetch = False
        controller.sigFollowChanged.connect(self._follow_changed)
        controller.sigLogLines.connect(self._live_lines)
        controller.sigRunFinished.connect(self._run_finished)
        self.clear("Select a run to see its log.")

    def _follow_changed(self, box) -> None:
        key = box.key if box is not None else None
        self.buffer = LogBuffer(key)
        self.clear(
            f"log of {key.exec_id} on {key.server}" if key else "Select a run to see its log."
        )
        if key is not None:
            self._fetch(key)

    def _fetch(self, key: RunKey) -> None:
        start = self.buffer.next_index

        def done(entries: list[dict[str, Any]]) -> None:
            if self.buffer.key != key:
                return
            self.append(self.buffer.extend(entries))
            if self._refetch or (entries and len(entries) >= 10_000):
                self._refetch = False
                self._fetch(key)

        started = self.controller.fetch(
            key,
            lambda c: c.get_logs(key.exec_id, start),
            done,
            task_key=f"logs:{key}",
            owner=self,
        )
        if not started:
            self._refetch = True  # one is in flight: fetch again when it returns

    def _live_lines(self, key: RunKey, lines: list[tuple[int | None, str, float | None]]) -> None:
        if key != self.buffer.key:
            return
        new = []
        for index, text, t in lines:
            new += self.buffer.add(index, text, t)
        self.append(new)
        if self.buffer.has_gap:
            self._fetch(key)

    def _run_finished(self, key: RunKey, status: dict[str, Any]) -> None:
        if key == self.buffer.key and self.buffer.next_index < (status.get("n_logs") or 0):
            self._fetch(key)
