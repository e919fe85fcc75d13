"""The runs panel: every run of the selected servers, live, with cancel and details."""

from __future__ import annotations

import time

from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime.formatting import fmt_duration, fmt_time

from .controller import Controller
from .model import CONNECTION_LOST, STATE_COLOURS, RunKey, RunRow
from .widgets import (
    AnyIndex,
    Column,
    ColumnFitter,
    KeyedTableModel,
    confirm,
    make_action,
    make_toolbar,
    named,
    setup_table,
    state_dot,
)

COLUMNS = ("Name", "ID", "Server", "State", "Progress", "Elapsed")
COL_NAME, COL_ID, COL_SERVER, COL_STATE, COL_PROGRESS, COL_ELAPSED = range(len(COLUMNS))
REDRAW_MS = 33  # table and progress redraws are coalesced to at most ~30 per second
ProgressRole = QtCore.Qt.ItemDataRole.UserRole + 1


class RunsModel(KeyedTableModel[RunKey]):
    """Rows of the controller's RunTable, redrawn on a ~30 Hz clock when it changed."""

    columns = COLUMNS
    sigFlushed = QtCore.Signal()

    def __init__(self, controller: Controller, parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.table = controller.runs
        self.servers: set[str] | None = None
        self.redraws = 0  # how many times the view was told to repaint (for tests, benches)
        self._last_elapsed = 0.0
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(REDRAW_MS)
        self.timer.timeout.connect(self.flush)
        self.timer.start()

    def set_servers(self, servers: set[str] | None) -> None:
        """Show only runs of these server keys (None or empty: every server)."""
        self.servers = servers or None
        self.table.structure_changed = self.table.dirty = True

    def flush(self) -> None:
        """Apply what changed since the last tick in one repaint."""
        dirty, structure = self.table.take_dirty()
        now = time.monotonic()
        tick_elapsed = now - self._last_elapsed >= 1.0 and any(
            self.table.rows[k].is_live for k in self.keys if k in self.table.rows
        )
        if not (dirty or structure or tick_elapsed):
            return
        self._last_elapsed = now
        self.redraws += 1
        if structure:
            self.set_keys(self.table.ordered(self.servers))
        else:
            self.repaint_all()
        self.sigFlushed.emit()

    def cell(self, key: RunKey, col: int, role: int):
        row = self.table.rows.get(key)
        if row is None:
            return None
        Role = QtCore.Qt.ItemDataRole
        if role == Role.DisplayRole:
            if col == COL_NAME:
                return row.name
            if col == COL_ID:
                return key.exec_id
            if col == COL_SERVER:
                return key.server
            if col == COL_STATE:
                return row.display_state
            if col == COL_PROGRESS:
                return row.message
            if col == COL_ELAPSED:
                return fmt_duration(row.elapsed())
        elif role == ProgressRole:
            return (row.progress, progress_label(row), row.display_state)
        elif role == Role.DecorationRole and col == COL_STATE:
            return state_dot(STATE_COLOURS.get(row.display_state, "#888888"))
        elif role == Role.ForegroundRole and col == COL_STATE:
            return QtGui.QBrush(QtGui.QColor(STATE_COLOURS.get(row.display_state, "#cccccc")))
        elif role == Role.FontRole and col == COL_STATE:
            font = QtGui.QFont()
            font.setBold(True)
            return font
        elif role == Role.FontRole and col == COL_ID:
            return QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.SystemFont.FixedFont)
        elif role == Role.TextAlignmentRole and col == COL_ELAPSED:
            return int(QtCore.Qt.AlignmentFlag.AlignRight | QtCore.Qt.AlignmentFlag.AlignVCenter)
        elif role == Role.ToolTipRole:
            tip = f"{row.name} ({key.exec_id}) on {key.server}: {row.display_state}"
            if row.contact == "lost":
                tip += (
                    f"\nthe server stopped answering at {fmt_time(row.lost_at)}; "
                    f"last known: {row.state} {row.progress_text}".rstrip()
                )
            elif row.contact == "gone":
                tip += "\nthe server answered again but no longer knows this run"
            if row.status.get("error"):
                tip += f"\n{row.status['error']}"
            elif row.message:
                tip += f"\n{row.message}"
            return tip
        return None


def progress_label(row: RunRow) -> str:
    """The text on a run's progress bar: counts or percent, and the pipeline's message."""
    if row.contact == "lost" and not row.is_final:
        known = row.progress_text or "no progress reported"
        return f"last known: {known}" + (f"  {row.message}" if row.message else "")
    if row.contact == "gone":
        return "the server no longer knows this run"
    if row.state == "completed":
        return "100%"
    text = row.progress_text
    eta = row.eta()
    if eta is not None:
        text = f"{text}, {fmt_duration(eta)} left"
    if row.message:
        text = f"{text}  {row.message}" if text else row.message
    return text


class ProgressDelegate(QtWidgets.QStyledItemDelegate):
    """A flat progress bar, coloured by state, with the run's message on it."""

    def paint(self, painter: QtGui.QPainter, option, index: AnyIndex) -> None:
        value = index.data(ProgressRole)
        if value is None:
            return super().paint(painter, option, index)
        progress, message, state = value
        selected = bool(option.state & QtWidgets.QStyle.StateFlag.State_Selected)
        if selected:
            painter.fillRect(option.rect, option.palette.highlight())
        rect = option.rect.adjusted(4, 5, -4, -5)
        painter.save()
        painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        painter.setPen(QtCore.Qt.PenStyle.NoPen)
        painter.setBrush(QtGui.QColor("#1d1f24"))
        painter.drawRoundedRect(QtCore.QRectF(rect), 3, 3)
        fraction = 1.0 if state == "completed" else (progress or 0.0)
        if fraction > 0:
            fill = QtCore.QRectF(rect)
            fill.setWidth(max(4.0, rect.width() * min(1.0, fraction)))
            colour = QtGui.QColor(STATE_COLOURS.get(state, "#61afef"))
            colour.setAlpha(150 if state in ("running", "queued") else 110)
            painter.setBrush(colour)
            painter.drawRoundedRect(fill, 3, 3)
        text = message
        painter.setPen(QtGui.QColor("#f0f0f0"))
        metrics = QtGui.QFontMetrics(option.font)
        text = metrics.elidedText(text, QtCore.Qt.TextElideMode.ElideRight, rect.width() - 10)
        painter.drawText(
            rect.adjusted(6, 0, -4, 0),
            int(QtCore.Qt.AlignmentFlag.AlignVCenter | QtCore.Qt.AlignmentFlag.AlignLeft),
            text,
        )
        painter.restore()


class RunsPanel(QtWidgets.QWidget):
    """The table of runs; selecting a run follows it in the preview, logs and results."""

    sigCurrentRun = QtCore.Signal(object)  # RunKey | None
    sigOpenDetails = QtCore.Signal(object)  # RunKey
    sigSubmitRequested = QtCore.Signal()

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.model = RunsModel(controller, self)

        self.table = QtWidgets.QTableView()
        self.table.setModel(self.model)
        setup_table(self.table)
        self.table.setItemDelegateForColumn(COL_PROGRESS, ProgressDelegate(self.table))
        metrics = QtGui.QFontMetrics(self.table.font())
        mono = QtGui.QFontMetrics(
            QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.SystemFont.FixedFont)
        )
        bold = QtGui.QFont(self.table.font())
        bold.setBold(True)
        self.fitter = ColumnFitter(
            self.table,
            [
                Column("Name", 170, priority=5),
                Column("ID", mono.horizontalAdvance("0123456789abcdef") + 28, priority=1),
                Column("Server", metrics.horizontalAdvance("127.0.0.1:55555") + 40, priority=2),
                Column("State", QtGui.QFontMetrics(bold).horizontalAdvance(CONNECTION_LOST) + 64,
                       priority=6),
                Column("Progress", 170, priority=4, stretch=True),
                Column("Elapsed", metrics.horizontalAdvance("59m 59s") + 28, priority=3),
            ],
        )  # fmt: skip
        self.table.doubleClicked.connect(self._double_clicked)
        self.table.selectionModel().currentRowChanged.connect(self._current_changed)
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._update_actions())
        self.table.setContextMenuPolicy(QtCore.Qt.ContextMenuPolicy.ActionsContextMenu)

        self.act_submit = make_action(
            self, "submit", "Submit…", self.sigSubmitRequested.emit, icon_name="submit",
            shortcuts=["Ctrl+N"], tip="Submit a pipeline, or a bundled example (Ctrl+N)",
        )  # fmt: skip
        self.act_cancel = make_action(
            self, "cancel_runs", "Cancel", self.cancel_selected, icon_name="cancel",
            shortcuts=["Ctrl+K", QtGui.QKeySequence(QtCore.Qt.Key.Key_Delete)],
            tip="Cancel the selected runs, after a confirmation (Ctrl+K / Delete)",
        )  # fmt: skip
        self.act_cancel.setShortcutContext(QtCore.Qt.ShortcutContext.WindowShortcut)
        self.act_details = make_action(
            self, "run_details", "Details", self.open_details, icon_name="details",
            shortcuts=["Ctrl+I"], tip="Config, logs, error and results of the run (Ctrl+I)",
        )  # fmt: skip
        for act in (self.act_cancel, self.act_details):
            self.table.addAction(act)

        bar = make_toolbar()
        bar.addAction(self.act_submit)
        bar.addSeparator()
        bar.addAction(self.act_cancel)
        bar.addAction(self.act_details)
        spacer = QtWidgets.QWidget()
        spacer.setSizePolicy(
            QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Preferred
        )
        bar.addWidget(spacer)
        self.scope = named(QtWidgets.QLabel("all servers"), "hint")
        bar.addWidget(self.scope)
        self.toolbar = bar

        self.empty = QtWidgets.QLabel(
            "No runs yet.  Submit a pipeline or a bundled example with Ctrl+N.",
        )
        self.empty.setObjectName("emptyHint")
        self.empty.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.empty.setWordWrap(True)
        self.stack = QtWidgets.QStackedWidget()
        self.stack.addWidget(self.table)
        self.stack.addWidget(self.empty)

        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(4, 2, 4, 4)
        layout.setSpacing(2)
        layout.addWidget(bar)
        layout.addWidget(self.stack)
        self.model.layoutChanged.connect(self._update_empty)
        self.model.modelReset.connect(self._update_empty)
        self.model.dataChanged.connect(lambda *_: self._update_actions())
        self._update_empty()
        self._update_actions()

    # ------------------------------------------------------------------ filter, selection
    def set_servers(self, servers: set[str]) -> None:
        self.model.set_servers(servers)
        if servers:
            self.scope.setText("runs of " + ", ".join(sorted(servers)))
        else:
            self.scope.setText("all servers")

    def selected(self) -> list[RunKey]:
        rows = sorted({i.row() for i in self.table.selectionModel().selectedRows()})
        return [k for k in (self.model.key_at(r) for r in rows) if k is not None]

    def current(self) -> RunKey | None:
        index = self.table.currentIndex()
        return self.model.key_at(index.row()) if index.isValid() else None

    def select(self, key: RunKey) -> bool:
        """Make ``key`` the current run (after the next flush if it is not shown yet)."""
        self.model.flush()
        row = self.model.row_of(key)
        if row < 0:
            return False
        self.table.selectRow(row)
        self.table.setCurrentIndex(self.model.index(row, 0))
        self.table.scrollTo(self.model.index(row, 0))
        return True

    def _current_changed(self, current: QtCore.QModelIndex, previous: QtCore.QModelIndex) -> None:
        key = self.model.key_at(current.row()) if current.isValid() else None
        prev = self.model.key_at(previous.row()) if previous.isValid() else None
        if key != prev:
            self.sigCurrentRun.emit(key)
        self._update_actions()

    def _double_clicked(self, index: QtCore.QModelIndex) -> None:
        key = self.model.key_at(index.row())
        if key is not None:
            self.sigOpenDetails.emit(key)

    def _update_empty(self) -> None:
        self.stack.setCurrentWidget(self.table if self.model.keys else self.empty)

    def _update_actions(self) -> None:
        rows = [self.controller.runs.rows.get(k) for k in self.selected()]
        self.act_cancel.setEnabled(any(r is not None and r.cancellable for r in rows))
        key = self.current()
        current = self.controller.runs.rows.get(key) if key is not None else None
        # the details come from the server: not while it does not answer
        self.act_details.setEnabled(current is not None and current.contact == "ok")

    # ------------------------------------------------------------------ actions
    def cancel_selected(self) -> list[RunKey]:
        """Cancel the selected unfinished runs once the user confirms; returns them."""
        rows = self.controller.runs.rows
        keys = [k for k in self.selected() if k in rows and rows[k].cancellable]
        if not keys:
            return []
        if len(keys) == 1:
            row = rows[keys[0]]
            where = f" at {row.progress_text}" if row.progress_text else ""
            text = f"Cancel {row.name} ({row.key.exec_id}) on {row.key.server}{where}?"
        else:
            text = f"Cancel these {len(keys)} runs?"
        if not confirm(
            self,
            "Cancel runs",
            text,
            "The pipeline stops at its next check (or its worker is killed after the grace "
            "period). Results it stored so far are kept.",
            yes="&Cancel the run" if len(keys) == 1 else "&Cancel the runs",
            no="&Keep running",
        ):
            return []
        self.controller.cancel_runs(keys)
        return keys

    def open_details(self) -> None:
        key = self.current()
        if key is not None:
            self.sigOpenDetails.emit(key)
