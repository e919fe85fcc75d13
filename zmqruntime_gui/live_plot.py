"""The plot of a results column that grows while the run goes (a per-frame count, say).

``PlotDialog`` plots a numeric column of the results table (``ResultsView``) against the
row order or another column. The table grows as the run stores results (the window
lists new ones when the stream announces them); the dialog follows it without redoing
the whole table each time:

- appended rows are read once: the points and which columns are numeric are kept and
  extended (``NumericColumns``, ``Points``), so a result costs the GUI thread the work of
  one row, not of all rows so far;
- redraws are throttled: at most one every ``REDRAW_INTERVAL_S`` while rows stream in
  (a camera at 30 frames/s gives 30 rows a second), at once when the person picks another
  column; large curves are drawn without symbols and downsampled to the view.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from .widgets import named

if TYPE_CHECKING:
    from .results_panel import ResultsView

RESULT_ORDER = "row order"
#: while rows stream in, the plot is redrawn at most this often (seconds)
REDRAW_INTERVAL_S = 0.25
#: above this many points the curve is drawn without a symbol per point
SYMBOLS_UP_TO = 500
#: columns that number the rows: not what a person wants plotted first
INDEX_LIKE = frozenset({"#", "frame", "index", "row"})


def is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class NumericColumns:
    """Which columns of a growing table hold only numbers (where they hold anything):
    the same answer as ``model.numeric_columns``, kept up to date row by row."""

    def __init__(self) -> None:
        self.columns: list[str] = []
        self._number: set[str] = set()  # columns with a number somewhere
        self._other: set[str] = set()  # columns with something else somewhere
        self.rows_seen = 0

    def reset(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self._number, self._other, self.rows_seen = set(), set(), 0
        self.extend(columns, rows)

    def extend(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Take the rows after the ones seen already (``rows`` is the whole table)."""
        for row in rows[self.rows_seen :]:
            for name, value in row.items():
                if value is None:
                    continue
                (self._number if is_number(value) else self._other).add(name)
        self.rows_seen = len(rows)
        self.columns = [c for c in columns if c in self._number and c not in self._other]


class Points:
    """The (x, y) points of two columns of a growing table, extended row by row."""

    def __init__(self, y: str = "", x: str = RESULT_ORDER) -> None:
        self.y, self.x = y, x
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.rows_seen = 0

    def extend(self, rows: list[dict[str, Any]]) -> None:
        y_name, x_name = self.y, self.x
        for i in range(self.rows_seen, len(rows)):
            row = rows[i]
            y = row.get(y_name)
            x = i if x_name == RESULT_ORDER else row.get(x_name)
            if is_number(y) and is_number(x):
                self.xs.append(float(x))
                self.ys.append(float(y))
        self.rows_seen = len(rows)


class PlotDialog(QtWidgets.QDialog):
    """A numeric column of the results table against the row order or another column;
    it follows the table as results arrive (see the module's docstring)."""

    # the column choices (QWidget's x() and y() positions are not used on a dialog)
    y: QtWidgets.QComboBox  # type: ignore[assignment]
    x: QtWidgets.QComboBox  # type: ignore[assignment]

    def __init__(self, view: ResultsView) -> None:
        super().__init__(view)
        self.view = view
        self.setObjectName("resultsPlot")
        self.setWindowTitle(f"Plot — results of {view.key.exec_id if view.key else ''}")
        self.resize(720, 460)
        self.y = named(QtWidgets.QComboBox(), "plot_y")
        self.x = named(QtWidgets.QComboBox(), "plot_x")
        for combo in (self.y, self.x):
            combo.setToolTip("Type the start of a column's name to pick it")
            combo.currentIndexChanged.connect(lambda *_: self.redraw())
        self.count = named(QtWidgets.QLabel(), "plot_count")
        # room for "12345 points, newest 1234.56" without the row shifting as it grows
        self.count.setMinimumWidth(
            self.fontMetrics().horizontalAdvance("00000 points, newest 0000.000")
        )
        self.plot = pg.PlotWidget(background="#15171b")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.curve = self.plot.plot(
            [], [], pen=pg.mkPen("#61afef", width=2), symbol="o", symbolSize=5,
            symbolBrush="#61afef", symbolPen=None,
        )  # fmt: skip
        self.curve.setDownsampling(auto=True, method="peak")
        self.curve.setClipToView(True)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Plot"))
        row.addWidget(self.y, 1)
        row.addWidget(QtWidgets.QLabel("against"))
        row.addWidget(self.x, 1)
        row.addWidget(self.count)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.plot, 1)

        self.numeric = NumericColumns()
        self.points = Points()
        self.redraws = 0  # how often the curve was redrawn (the throttle's test reads it)
        self._reset = True  # the table was replaced: read it again from its first row
        self._last_draw = 0.0
        self._timer = QtCore.QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._follow_table)
        view.model.modelReset.connect(self._model_reset)
        view.sigTableChanged.connect(self._table_changed)
        self._follow_table()

    # ------------------------------------------------------------------ following
    def _model_reset(self) -> None:
        self._reset = True  # rows were appended otherwise (rowsInserted): read the new ones

    def _table_changed(self) -> None:
        """The table changed: follow it now, or when the throttle allows."""
        if self._timer.isActive():
            return
        wait = self._last_draw + REDRAW_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._follow_table()
        else:
            self._timer.start(int(wait * 1000) + 1)

    def _follow_table(self) -> None:
        model = self.view.model
        columns, rows = model.columns, model.rows
        if self._reset or len(rows) < self.numeric.rows_seen:
            self._reset = False
            self.numeric.reset(columns, rows)  # another table: from its first row
            self.points = Points(self.points.y, self.points.x)
        else:
            self.numeric.extend(columns, rows)
        self._fill_choices()
        self.redraw()

    def _fill_choices(self) -> None:
        numeric = self.numeric.columns
        first = self.y.count() == 0
        for combo, items in ((self.y, numeric), (self.x, [RESULT_ORDER, *numeric])):
            current = combo.currentText()
            if [combo.itemText(i) for i in range(combo.count())] != items:
                combo.blockSignals(True)
                combo.clear()
                combo.addItems(items)
                if current in items:
                    combo.setCurrentText(current)
                combo.blockSignals(False)
        if first and numeric:
            # the first column that is not an index: "nuclei" rather than "frame"
            self.y.blockSignals(True)
            self.y.setCurrentText(next((c for c in numeric if c not in INDEX_LIKE), numeric[0]))
            self.y.blockSignals(False)

    # ------------------------------------------------------------------ drawing
    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) points plotted: rows with a number in both, in stored order."""
        y_name, x_name = self.y.currentText(), self.x.currentText()
        rows = self.view.model.rows
        if (y_name, x_name) != (self.points.y, self.points.x) or self._reset:
            self.points = Points(y_name, x_name)
        self.points.extend(rows)
        return np.asarray(self.points.xs), np.asarray(self.points.ys)

    def redraw(self) -> None:
        xs, ys = self.data()
        symbols = len(xs) <= SYMBOLS_UP_TO
        if symbols != (self.curve.opts.get("symbol") is not None):
            self.curve.setSymbol("o" if symbols else None)
        self.curve.setData(xs, ys)
        self.plot.setLabel("left", self.y.currentText())
        self.plot.setLabel("bottom", self.x.currentText())
        newest = f", newest {ys[-1]:.6g}" if len(ys) else ""
        self.count.setText(f"{len(xs)} points{newest}")
        self.redraws += 1
        self._last_draw = time.monotonic()
