"""Logs and results of the followed run.

The log view shows what the server stored, then follows the live stream; a gap in
the live entries' indexes (dropped on a busy data channel) is filled from the server,
so the view is complete and in order. The results view lists what the run stored
(without downloading it) and fetches one array on demand to view or save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PySide6 import QtCore, QtGui, QtWidgets

from .controller import Controller
from .model import LOST, LogBuffer, RunKey, describe_result
from .widgets import make_button, mono_font, setup_table

MAX_LOG_BLOCKS = 50_000


class LogView(QtWidgets.QWidget):
    """A read-only log with a follow switch; also used inside the run details dialog."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = QtWidgets.QPlainTextEdit(readOnly=True)
        self.text.setFont(mono_font())
        self.text.setMaximumBlockCount(MAX_LOG_BLOCKS)
        self.text.setLineWrapMode(QtWidgets.QPlainTextEdit.LineWrapMode.NoWrap)
        self.text.setPlaceholderText("No log lines yet.")
        self.follow = QtWidgets.QCheckBox("Follow", objectName="log_follow")
        self.follow.setChecked(True)
        self.follow.setToolTip("Keep the newest line in view")
        self.label = QtWidgets.QLabel(objectName="hint")
        row = QtWidgets.QHBoxLayout()
        row.setContentsMargins(4, 0, 4, 0)
        row.addWidget(self.label, 1)
        row.addWidget(self.follow)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(row)
        layout.addWidget(self.text)

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
            key, lambda c: c.get_logs(key.exec_id, start), done, task_key=f"logs:{key}"
        )
        if not started:
            self._refetch = True  # one is in flight: fetch again when it returns

    def _live_lines(self, key: RunKey, lines: list[tuple[int | None, str]]) -> None:
        if key != self.buffer.key:
            return
        new = []
        for index, text in lines:
            new += self.buffer.add(index, text)
        self.append(new)
        if self.buffer.has_gap:
            self._fetch(key)

    def _run_finished(self, key: RunKey, status: dict[str, Any]) -> None:
        if key == self.buffer.key and self.buffer.next_index < (status.get("n_logs") or 0):
            self._fetch(key)


class ResultsView(QtWidgets.QWidget):
    """A run's stored results: name, index, what it is; view an array or save any."""

    sigShowArray = QtCore.Signal(object, str)  # array, title
    sigStatus = QtCore.Signal(str)

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.key: RunKey | None = None
        self.summaries: list[dict[str, Any]] = []
        self._refetch = False

        self.table = QtWidgets.QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["#", "Name", "Value"])
        setup_table(self.table)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setColumnWidth(0, 40)
        self.table.setColumnWidth(1, 130)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.doubleClicked.connect(lambda *_: self.show_selected())
        self.table.itemSelectionChanged.connect(self._update_actions)

        self.btn_show = make_button(
            "result_show", "Show image", self.show_selected, icon_name="image",
            tip="Show the selected array in the image view",
        )  # fmt: skip
        self.btn_save = make_button(
            "result_save", "Save…", self.save_selected, icon_name="save",
            tip="Save the selected result (.tif/.npy for arrays, .json otherwise)",
        )  # fmt: skip
        self.label = QtWidgets.QLabel(objectName="hint")
        row = QtWidgets.QHBoxLayout()
        row.setContentsMargins(4, 0, 4, 0)
        row.addWidget(self.label, 1)
        row.addWidget(self.btn_show)
        row.addWidget(self.btn_save)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(row)
        layout.addWidget(self.table)
        self.set_run(None)

    def set_run(self, key: RunKey | None) -> None:
        self.key = key
        self.summaries = []
        self.table.setRowCount(0)
        self.label.setText("Select a run to see its results." if key is None else "")
        if key is not None:
            self.refresh()
        self._update_actions()

    def refresh(self) -> None:
        """Fetch the listing of results not listed yet."""
        key = self.key
        if key is None:
            return
        start = len(self.summaries)

        def done(listing: list[dict[str, Any]]) -> None:
            if key != self.key:
                return
            known = {s["index"] for s in self.summaries}
            for summary in listing:
                if summary["index"] not in known:
                    self._add_row(summary)
            self.label.setText(f"{len(self.summaries)} result(s) of {key.exec_id}")
            if self._refetch:
                self._refetch = False
                self.refresh()

        if not self.controller.fetch(
            key, lambda c: c.list_results(key.exec_id, start), done, task_key=f"results:{key}"
        ):
            self._refetch = True

    def _add_row(self, summary: dict[str, Any]) -> None:
        self.summaries.append(summary)
        row = self.table.rowCount()
        self.table.insertRow(row)
        values = (str(summary["index"]), summary["name"], describe_result(summary))
        for col, text in enumerate(values):
            item = QtWidgets.QTableWidgetItem(text)
            item.setToolTip(text)
            self.table.setItem(row, col, item)
        self._update_actions()

    def selected_summary(self) -> dict[str, Any] | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or rows[0].row() >= len(self.summaries):
            return None
        return self.summaries[rows[0].row()]

    def select_index(self, index: int) -> None:
        for row, summary in enumerate(self.summaries):
            if summary["index"] == index:
                self.table.selectRow(row)

    def _update_actions(self) -> None:
        summary = self.selected_summary()
        self.btn_show.setEnabled(
            summary is not None
            and summary.get("kind") == "array"
            and len(summary.get("shape", [])) >= 2
        )
        self.btn_save.setEnabled(summary is not None)

    def _fetch_value(self, summary: dict[str, Any], then) -> None:
        key = self.key
        if key is None:
            return
        if "value" in summary and summary.get("kind") == "value":
            then(summary["value"])
            return
        self.sigStatus.emit(f"fetching result {summary['index']} ({summary['name']})…")
        self.controller.fetch(key, lambda c: c.get_result(key.exec_id, summary["index"]), then)

    def show_selected(self) -> None:
        summary = self.selected_summary()
        if summary is None or summary.get("kind") != "array":
            return
        title = f"{summary['name']} [{summary['index']}] of {self.key.exec_id}"
        self._fetch_value(summary, lambda value: self.sigShowArray.emit(np.asarray(value), title))

    def save_selected(self, path: str | Path | None = None) -> None:
        summary = self.selected_summary()
        if summary is None:
            return
        is_array = summary.get("kind") == "array"
        if path is None:
            filters = "TIFF (*.tif);;NumPy (*.npy)" if is_array else "JSON (*.json);;Raw (*.bin)"
            suffix = ".tif" if is_array else ".json"
            path, _ = QtWidgets.QFileDialog.getSaveFileName(
                self, "Save result", f"{summary['name']}-{summary['index']}{suffix}", filters
            )
            if not path:
                return
        target = Path(path)
        self._fetch_value(summary, lambda value: self._write(target, value))

    def _write(self, path: Path, value: Any) -> None:
        try:
            save_value(path, value)
        except (OSError, TypeError, ValueError) as exc:
            QtWidgets.QMessageBox.warning(self, "Cannot save", f"{path}: {exc}")
            return
        self.sigStatus.emit(f"saved to {path}")


def save_value(path: Path, value: Any) -> None:
    """Arrays to .tif (tifffile) or .npy by suffix; bytes raw; other values as JSON."""
    if isinstance(value, np.ndarray):
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(path, np.ascontiguousarray(value))
        else:
            np.save(path, value, allow_pickle=False)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        path.write_bytes(bytes(value))
    else:
        path.write_text(json.dumps(value, indent=2, default=str))


class ResultsPanel(ResultsView):
    """The followed run's results, refreshed when the stream announces a new one."""

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(controller, parent)
        controller.sigFollowChanged.connect(
            lambda box: self.set_run(box.key if box is not None else None)
        )
        controller.sigResultNotice.connect(self._notice)
        controller.sigRunFinished.connect(self._notice)

    def _notice(self, key: RunKey, status: dict[str, Any] | None = None) -> None:
        if key == self.key and (status or {}).get("state") != LOST:
            self.refresh()
