"""A run's results as a table: sort it, export it as CSV, plot a column, view an array.

The table has one row per stored result (index, name, what it is) and a column for each
scalar field of dict results, so a pipeline that emits ``{"image": ..., "count": 12}``
per image shows its counts. A result that is itself a table (a dict of equal-length
lists, such as the demo's counts per frame) can be picked in the Table box and is then
shown row by row. Listings come without the data; an array or a large value is fetched
from the server only when asked for, off the GUI thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PySide6 import QtCore, QtWidgets

from .controller import Controller
from .live_plot import RESULT_ORDER, NumericColumns, PlotDialog
from .model import (
    LOST,
    RunKey,
    column_table,
    results_table,
    table_csv,
)
from .napari_bridge import NapariOpener
from .widgets import AnyIndex, labelled, make_action, make_toolbar, named, setup_table

SORT_ROLE = QtCore.Qt.ItemDataRole.UserRole + 2
ALL_RESULTS = "All results"
__all__ = ["RESULT_ORDER", "PlotDialog", "ResultsPanel", "ResultsView", "TableModel"]
CATCH_UP_MS = 2000  # a live run's listing is refreshed this often (results.refresh)


class TableModel(QtCore.QAbstractTableModel):
    """Rows of dicts under named columns; numbers sort as numbers (SORT_ROLE)."""

    def __init__(self, parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []

    def set_table(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        if columns == self.columns and rows[: len(self.rows)] == self.rows:
            if len(rows) > len(self.rows):  # more rows of the same table: no reset
                self.beginInsertRows(QtCore.QModelIndex(), len(self.rows), len(rows) - 1)
                self.rows = list(rows)
                self.endInsertRows()
            return
        self.beginResetModel()
        self.columns, self.rows = list(columns), list(rows)
        self.endResetModel()

    def rowCount(self, parent: AnyIndex = QtCore.QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: AnyIndex = QtCore.QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section, orientation, role=QtCore.Qt.ItemDataRole.DisplayRole):
        if (
            orientation == QtCore.Qt.Orientation.Horizontal
            and role == QtCore.Qt.ItemDataRole.DisplayRole
            and 0 <= section < len(self.columns)
        ):
            return self.columns[section]
        return None

    def data(self, index: AnyIndex, role: int = QtCore.Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        value = self.rows[index.row()].get(self.columns[index.column()])
        Role = QtCore.Qt.ItemDataRole
        if role in (Role.DisplayRole, Role.ToolTipRole):
            if value is None:
                return ""
            return f"{value:.6g}" if isinstance(value, float) else str(value)
        if role == SORT_ROLE:
            if isinstance(value, bool):
                return int(value)
            return (
                value if isinstance(value, (int, float)) else ("" if value is None else str(value))
            )
        if role == Role.TextAlignmentRole and isinstance(value, (int, float)):
            return int(QtCore.Qt.AlignmentFlag.AlignRight | QtCore.Qt.AlignmentFlag.AlignVCenter)
        return None


class ResultsView(QtWidgets.QWidget):
    """A run's stored results as a sortable table, with CSV export, a plot, view and save."""

    sigShowArray = QtCore.Signal(object, str, object)  # array, title, image metadata or None
    sigStatus = QtCore.Signal(str)
    sigTableChanged = QtCore.Signal()

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.key: RunKey | None = None
        self.summaries: list[dict[str, Any]] = []
        self.values: dict[int, Any] = {}  # fetched values of table results, by index
        self.plots: list[PlotDialog] = []
        self._refetch = False
        # the "All results" table so far: rows of results listed before are not rebuilt
        self._all: tuple[list[dict[str, Any]], int, list[str], list[dict[str, Any]]]
        self._all = ([], 0, [], [])
        self.numeric = NumericColumns()  # which columns can be plotted, kept row by row

        self.model = TableModel(self)
        self.model.modelReset.connect(lambda: self.numeric.reset([], []))
        self.proxy = QtCore.QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = named(QtWidgets.QTableView(), "resultsTable")
        self.table.setModel(self.proxy)
        setup_table(self.table)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(-1, QtCore.Qt.SortOrder.AscendingOrder)  # emit order at first
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setTextElideMode(QtCore.Qt.TextElideMode.ElideMiddle)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QtWidgets.QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        header.setSortIndicatorShown(True)
        self.table.doubleClicked.connect(lambda *_: self.show_selected())
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._update_actions())

        self.choice = named(QtWidgets.QComboBox(), "results_table")
        self.choice.setToolTip(
            "What the table shows: every result, or the rows of a result that is a table"
        )
        self.choice.setSizeAdjustPolicy(
            QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.choice.setMinimumContentsLength(10)
        self.choice.currentIndexChanged.connect(lambda *_: self._choice_changed())
        self.act_show = make_action(
            self, "result_show", "Show the result as an image", self.show_selected,
            icon_name="image",
            tip="Show the selected array in the image view (or double-click it)",
        )  # fmt: skip
        self.act_save = make_action(
            self, "result_save", "Save the result…", self.save_selected, icon_name="save",
            tip="Save the selected result (.tif/.npy for arrays, .json otherwise)",
        )  # fmt: skip
        self.act_csv = make_action(
            self, "results_csv", "Export the results table as CSV…", self.export_csv,
            icon_name="table",
            tip="Export the whole table, as sorted, to a CSV file",
        )  # fmt: skip
        self.act_plot = make_action(
            self, "results_plot", "Plot a column of the results…", self.open_plot, icon_name="plot",
            tip="Plot a numeric column against the row order or another column",
        )  # fmt: skip
        self.napari = NapariOpener(controller, self)
        self.napari.sigStatus.connect(self.sigStatus)
        self.act_napari = make_action(
            self, "result_napari", "Open the run's images in napari", self.open_in_napari,
            icon_name="link", shortcuts=["Ctrl+Shift+O"],
            tip="Open the run's array results in napari: physical scale, a coloured layer per "
            'channel, labels as Labels layers (Ctrl+Shift+O; needs pip install '
            '"zmqruntime[napari]")',
        )  # fmt: skip
        # short words on the toolbar, the whole sentence in menus
        for act, short in (
            (self.act_show, "Show"), (self.act_save, "Save…"),
            (self.act_csv, "CSV…"), (self.act_plot, "Plot…"), (self.act_napari, "napari"),
        ):  # fmt: skip
            act.setIconText(short)
        bar = make_toolbar()
        bar.addWidget(labelled("Table", self.choice))
        for act in (self.act_show, self.act_save, self.act_csv, self.act_plot, self.act_napari):
            bar.addAction(act)
        self.toolbar = bar
        self.table.setContextMenuPolicy(QtCore.Qt.ContextMenuPolicy.ActionsContextMenu)
        for act in (self.act_show, self.act_save, self.act_csv, self.act_plot, self.act_napari):
            self.table.addAction(act)

        self.label = named(QtWidgets.QLabel(), "hint")
        self.label.setWordWrap(True)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(bar)
        layout.addWidget(self.label)
        layout.addWidget(self.table, 1)
        self.set_run(None)

    # ------------------------------------------------------------------ listing
    def set_run(self, key: RunKey | None) -> None:
        self.key = key
        self.summaries = []
        self.values = {}
        self.label.setText("Select a run to see its results." if key is None else "")
        self._fill_choice()
        self._rebuild()
        if key is not None:
            self.refresh()

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
            self.summaries += [s for s in listing if s["index"] not in known]
            self.label.setText(f"{len(self.summaries)} result(s) of {key.exec_id}")
            self._fill_choice()
            self._rebuild()
            if self._refetch:
                self._refetch = False
                self.refresh()

        if not self.controller.fetch(
            key,
            lambda c: c.list_results(key.exec_id, start),
            done,
            task_key=f"results:{key}",
            owner=self,
        ):
            self._refetch = True

    def _table_results(self) -> list[dict[str, Any]]:
        """Results whose value is a table (known from the listing's inline value or from a
        dict too large to inline: those are offered, and checked once fetched)."""
        out = []
        for s in self.summaries:
            value = s.get("value", self.values.get(s["index"]))
            if s.get("kind") == "value" and (
                column_table(value) is not None
                or ("value" not in s and s["index"] not in self.values)
            ):
                out.append(s)
        return out

    def _fill_choice(self) -> None:
        current = self.choice.currentData()
        self.choice.blockSignals(True)
        self.choice.clear()
        self.choice.addItem(ALL_RESULTS, None)
        for s in self._table_results():
            self.choice.addItem(f"{s['name']} [{s['index']}]", s["index"])
        found = self.choice.findData(current)
        self.choice.setCurrentIndex(max(found, 0))
        self.choice.blockSignals(False)

    def _choice_changed(self) -> None:
        index = self.choice.currentData()
        if index is not None and index not in self.values:
            summary = self.summary_of(index)
            if summary is not None and "value" in summary:
                self.values[index] = summary["value"]
            elif summary is not None:
                self._fetch_value(summary, lambda value: self._table_fetched(index, value))
                return
        self._rebuild()

    def _table_fetched(self, index: int, value: Any) -> None:
        self.values[index] = value
        self.sigStatus.emit(f"result {index} fetched")
        if column_table(value) is None:  # not a table after all
            self.sigStatus.emit(f"result {index} is not a table of columns")
            self._fill_choice()
        self._rebuild()

    def current_table(self) -> tuple[list[str], list[dict[str, Any]]]:
        """(columns, rows) of what the table shows, in the stored order."""
        index = self.choice.currentData()
        if index is not None:
            table = column_table(self.values.get(index))
            if table is not None:
                return table
            return [], []
        return self._all_results()

    def _all_results(self) -> tuple[list[str], list[dict[str, Any]]]:
        """One row per result; only the results listed since the last call are read."""
        listed, n, columns, rows = self._all
        if listed is not self.summaries or n > len(self.summaries):  # another run
            listed, n, columns, rows = self.summaries, 0, [], []
        if n < len(self.summaries):
            more_columns, more_rows = results_table(self.summaries[n:])
            columns = columns + [c for c in more_columns if c not in columns]
            rows = rows + more_rows
            self._all = (listed, len(self.summaries), columns, rows)
        return (columns, rows) if rows else ([], [])

    def _rebuild(self) -> None:
        columns, rows = self.current_table()
        new_columns = self.model.columns != columns
        if new_columns:  # another table: its own order until a header is clicked
            self.table.horizontalHeader().setSortIndicator(-1, QtCore.Qt.SortOrder.AscendingOrder)
            self.proxy.sort(-1)
        self.model.set_table(columns, rows)
        if new_columns:
            self.table.resizeColumnsToContents()
            for c in range(len(columns)):
                self.table.setColumnWidth(c, min(self.table.columnWidth(c), 220))
        self._update_actions()
        self.sigTableChanged.emit()

    # ------------------------------------------------------------------ selection
    def summary_of(self, index: int) -> dict[str, Any] | None:
        return next((s for s in self.summaries if s["index"] == index), None)

    def selected_summary(self) -> dict[str, Any] | None:
        """The selected result; with a table result shown, that result itself."""
        if self.choice.currentData() is not None:
            return self.summary_of(self.choice.currentData())
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        row = self.proxy.mapToSource(rows[0]).row()
        if row >= len(self.model.rows):
            return None
        return self.summary_of(self.model.rows[row]["#"])

    def select_index(self, index: int) -> None:
        for row, data in enumerate(self.model.rows):
            if data.get("#") == index:
                self.table.selectRow(self.proxy.mapFromSource(self.model.index(row, 0)).row())

    def _update_actions(self) -> None:
        summary = self.selected_summary()
        self.act_show.setEnabled(
            summary is not None
            and summary.get("kind") == "array"
            and len(summary.get("shape", [])) >= 2
        )
        self.act_save.setEnabled(summary is not None)
        columns, rows = self.model.columns, self.model.rows
        self.act_csv.setEnabled(bool(rows))
        self.numeric.extend(columns, rows)
        self.act_plot.setEnabled(bool(self.numeric.columns))
        self.act_napari.setEnabled(any(s.get("kind") == "array" for s in self.summaries))

    # ------------------------------------------------------------------ actions
    def _fetch_value(self, summary: dict[str, Any], then) -> None:
        key = self.key
        if key is None:
            return
        if "value" in summary and summary.get("kind") == "value":
            then(summary["value"])
            return
        what = f"result {summary['index']} ({summary['name']})"
        self.sigStatus.emit(f"fetching {what}…")

        def failed(exc: BaseException) -> None:
            self.sigStatus.emit(f"cannot fetch {what}: {exc}")

        self.controller.fetch(
            key, lambda c: c.get_result(key.exec_id, summary["index"]), then, failed, owner=self
        )

    def show_selected(self) -> None:
        summary = self.selected_summary()
        if summary is None or summary.get("kind") != "array" or self.key is None:
            return
        title = f"{summary['name']} [{summary['index']}] of {self.key.exec_id}"

        def show(value: Any) -> None:
            self.sigShowArray.emit(np.asarray(value), title, summary.get("meta"))
            self.sigStatus.emit(f"showing {title}")  # replaces "fetching …"

        self._fetch_value(summary, show)

    def open_in_napari(self) -> bool:
        """The run's array results as napari layers (says how to install napari if not)."""
        if self.key is None:
            return False
        return self.napari.open_run(self.key)

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

    def shown_rows(self) -> list[dict[str, Any]]:
        """The rows in the order the table shows them (as sorted)."""
        return [
            self.model.rows[self.proxy.mapToSource(self.proxy.index(r, 0)).row()]
            for r in range(self.proxy.rowCount())
        ]

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """The whole table, as sorted on screen, to CSV."""
        if not self.model.rows or self.key is None:
            return None
        if path is None:
            what = self.choice.currentText() if self.choice.currentData() is not None else ""
            stem = f"{self.key.exec_id}-{what.split(' ')[0] or 'results'}"
            path, _ = QtWidgets.QFileDialog.getSaveFileName(
                self, "Export the table as CSV", f"{stem}.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        target = Path(path)
        try:
            target.write_text(table_csv(self.model.columns, self.shown_rows()))
        except OSError as exc:
            QtWidgets.QMessageBox.warning(self, "Cannot save", f"{target}: {exc}")
            return None
        self.sigStatus.emit(f"{len(self.model.rows)} rows saved to {target}")
        return target

    def open_plot(self) -> PlotDialog | None:
        """A plot of a numeric column that follows the table (see live_plot)."""
        self.numeric.extend(self.model.columns, self.model.rows)
        if not self.numeric.columns:
            return None
        dialog = PlotDialog(self)
        dialog.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        self.plots.append(dialog)
        dialog.destroyed.connect(
            lambda *_: self.plots.remove(dialog) if dialog in self.plots else None
        )
        dialog.show()
        return dialog


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
        # the dock's toolbar has no room for napari at full HD: it is in the Runs menu
        # (Ctrl+Shift+O) and the table's context menu; the run details' toolbar has it
        self.toolbar.removeAction(self.act_napari)
        # results stored before the follower subscribed come with no notice: while the run
        # is live, list what is new now and then (one small request; nothing if none)
        self.catch_up = QtCore.QTimer(self)
        self.catch_up.setInterval(CATCH_UP_MS)
        self.catch_up.timeout.connect(self._catch_up)
        self.catch_up.start()

    def _catch_up(self) -> None:
        row = self.controller.runs.rows.get(self.key) if self.key is not None else None
        if row is not None and row.is_live and self.isVisible():
            self.refresh()

    def _notice(self, key: RunKey, status: dict[str, Any] | None = None) -> None:
        if key == self.key and (status or {}).get("state") != LOST:
            self.refresh()
