"""Small Qt pieces shared by the panels: icons, state dots, a keyed table model."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime.resources import resources_dir

log = logging.getLogger("zmqruntime_gui")

K = TypeVar("K", bound=Hashable)
W = TypeVar("W", bound=QtCore.QObject)
# A model index as Qt's virtual methods receive it (PySide6 passes either kind).
AnyIndex = QtCore.QModelIndex | QtCore.QPersistentModelIndex


def level_field(
    name: str,
    tip: str,
    on_typed: Callable[[], None],
    *,
    decimals: int = 2,
    widths: tuple[int, int] = (64, 96),
) -> QtWidgets.QDoubleSpinBox:
    """A Min or Max level field: no spin buttons, applied when typing ends, and a tip
    that says typing turns Continuous off (the preview's levels and each channel's)."""
    field = named(QtWidgets.QDoubleSpinBox(), name)
    field.setRange(-1e12, 1e12)
    field.setDecimals(decimals)
    field.setKeyboardTracking(False)
    field.setButtonSymbols(QtWidgets.QAbstractSpinBox.ButtonSymbols.NoButtons)
    field.setMinimumWidth(widths[0])
    field.setMaximumWidth(widths[1])
    field.setToolTip(tip + " (typing a value turns Continuous off)")
    field.editingFinished.connect(on_typed)
    return field


def named(obj: W, name: str) -> W:
    """``obj`` with its objectName set (the name the stylesheet and the tests find it by).

    PySide6 takes ``objectName=`` as a constructor keyword too, but its type stubs list
    only each class's own properties, so type checkers reject it: this says the same."""
    obj.setObjectName(name)
    return obj


def guard_none_refcount() -> bool:
    """Survive a Qt binding that returns None without a reference (PySide6 6.12.0 on 3.11).

    Such a binding takes one reference from None on every void call; a live preview
    makes hundreds per second and the interpreter soon aborts ("none_dealloc"). When
    the loss is measured here, None is given a huge reference count, which is what
    CPython 3.12 does for every interpreter (immortal None). Returns whether it did.
    """
    if sys.version_info >= (3, 12):
        return False
    timer = QtCore.QTimer()
    before = sys.getrefcount(None)
    for _ in range(64):
        timer.stop()
    lost = before - sys.getrefcount(None)
    if lost < 32:
        return False
    ctypes.c_ssize_t.from_address(id(None)).value += 1 << 40
    log.warning(
        "this Qt binding drops a reference to None on every call (PySide6 %s); "
        "None was made immortal to keep the app alive: install another PySide6 version",
        getattr(QtCore, "__version__", "?"),
    )
    return True


class AppStyle(QtWidgets.QProxyStyle):
    """Fusion, with a toolbar » button wide enough to see (Fusion's is 12 px)."""

    def pixelMetric(self, metric, option=None, widget=None):  # noqa: N802 - Qt's name
        if metric == QtWidgets.QStyle.PixelMetric.PM_ToolBarExtensionExtent:
            return 24
        return super().pixelMetric(metric, option, widget)


def gui_dir() -> Path:
    """Icons and the stylesheet, shipped in the wheel under zmqruntime/resources/gui."""
    return resources_dir() / "gui"


@functools.cache
def icon(name: str) -> QtGui.QIcon:
    """An icon from resources/gui/icons/<name>.svg (empty if missing: never fatal)."""
    path = gui_dir() / "icons" / f"{name}.svg"
    return QtGui.QIcon(str(path)) if path.exists() else QtGui.QIcon()


@functools.cache
def state_dot(colour: str, size: int = 12) -> QtGui.QIcon:
    """A filled circle in ``colour``: the state lamp in the tables."""
    pix = QtGui.QPixmap(size, size)
    pix.fill(QtCore.Qt.GlobalColor.transparent)
    painter = QtGui.QPainter(pix)
    painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
    painter.setPen(QtCore.Qt.PenStyle.NoPen)
    painter.setBrush(QtGui.QColor(colour))
    painter.drawEllipse(1, 1, size - 2, size - 2)
    painter.end()
    return QtGui.QIcon(pix)


def on_activated(signal: QtCore.SignalInstance, slot: Callable[[], object]) -> None:
    """Connect ``triggered``/``clicked``/``toggled`` to ``slot``, called with no argument.

    These signals carry Qt's ``checked`` bool, which a slot with an optional first
    parameter takes as a value: a port of False, a confirmation skipped. Every action
    and button of the window is connected through here (a test checks it), so the bool
    never reaches a slot. A slot that needs the check state reads ``isChecked()``.
    """
    signal.connect(lambda *_checked: slot())


def make_action(
    parent: QtCore.QObject,
    name: str,
    text: str,
    slot: Callable[[], object],
    *,
    icon_name: str | None = None,
    shortcuts: Iterable[str | QtGui.QKeySequence] = (),
    tip: str | None = None,
    checkable: bool = False,
) -> QtGui.QAction:
    """A named action whose ``triggered`` (or ``toggled`` if checkable) calls ``slot()``.

    ``name`` is the objectName the tests use to find every action of the window.
    """
    act = QtGui.QAction(text, parent)
    act.setObjectName(name)
    if icon_name:
        act.setIcon(icon(icon_name))
    keys = [k if isinstance(k, QtGui.QKeySequence) else QtGui.QKeySequence(k) for k in shortcuts]
    if keys:
        act.setShortcuts(keys)
    if tip:
        act.setToolTip(tip)
    if checkable:
        act.setCheckable(True)
        on_activated(act.toggled, slot)
    else:
        on_activated(act.triggered, slot)
    return act


def make_button(
    name: str,
    text: str,
    slot: Callable[[], object],
    *,
    icon_name: str | None = None,
    tip: str | None = None,
    primary: bool = False,
) -> QtWidgets.QPushButton:
    """A named push button whose ``clicked`` calls ``slot()``."""
    button = QtWidgets.QPushButton(text)
    button.setObjectName(name)
    if icon_name:
        button.setIcon(icon(icon_name))
    if tip:
        button.setToolTip(tip)
    if primary:
        button.setProperty("primary", True)
    on_activated(button.clicked, slot)
    return button


def confirm(
    parent: QtWidgets.QWidget,
    title: str,
    text: str,
    informative: str = "",
    *,
    yes: str,
    no: str,
) -> bool:
    """Ask before something that cannot be undone; Enter and Escape both mean ``no``."""
    box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Icon.Warning, title, text, parent=parent)
    box.setObjectName("confirm")
    if informative:
        box.setInformativeText(informative)
    yes_button = box.addButton(yes, QtWidgets.QMessageBox.ButtonRole.DestructiveRole)
    yes_button.setObjectName("confirm_yes")
    no_button = box.addButton(no, QtWidgets.QMessageBox.ButtonRole.RejectRole)
    no_button.setObjectName("confirm_no")
    box.setDefaultButton(no_button)
    box.setEscapeButton(no_button)
    try:
        box.exec()
        return box.clickedButton() is yes_button
    finally:
        box.deleteLater()


def stylesheet() -> str:
    path = gui_dir() / "style.qss"
    return path.read_text() if path.exists() else ""


class KeyedTableModel(QtCore.QAbstractTableModel, Generic[K]):
    """A table whose rows are identified by keys; reordering keeps the view's selection.

    Subclasses set ``columns`` and implement ``cell(key, column, role)``. ``set_keys``
    moves persistent indexes (selection, current row) with their keys instead of
    resetting the model, so a live-updating table never loses what the user selected.
    """

    columns: Sequence[str] = ()

    def __init__(self, parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.keys: list[K] = []

    def rowCount(self, parent: AnyIndex = QtCore.QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.keys)

    def columnCount(self, parent: AnyIndex = QtCore.QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section, orientation, role=QtCore.Qt.ItemDataRole.DisplayRole):
        if (
            orientation == QtCore.Qt.Orientation.Horizontal
            and role == QtCore.Qt.ItemDataRole.DisplayRole
        ):
            return self.columns[section]
        return None

    def data(self, index: AnyIndex, role: int = QtCore.Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self.keys):
            return None
        return self.cell(self.keys[index.row()], index.column(), role)

    def cell(self, key: K, column: int, role: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def key_at(self, row: int) -> K | None:
        return self.keys[row] if 0 <= row < len(self.keys) else None

    def row_of(self, key: K) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            return -1

    def set_keys(self, new_keys: Sequence[K]) -> None:
        """Show ``new_keys`` in this order; unchanged order only repaints."""
        if new_keys == self.keys:
            self.repaint_all()
            return
        self.layoutAboutToBeChanged.emit()
        old_keys = self.keys
        old_indexes = self.persistentIndexList()
        self.keys = list(new_keys)
        position = {k: i for i, k in enumerate(self.keys)}
        new_indexes = []
        for idx in old_indexes:
            row = position.get(old_keys[idx.row()], -1) if idx.row() < len(old_keys) else -1
            new_indexes.append(self.index(row, idx.column()) if row >= 0 else QtCore.QModelIndex())
        self.changePersistentIndexList(old_indexes, new_indexes)
        self.layoutChanged.emit()

    def repaint_all(self) -> None:
        if self.keys:
            self.dataChanged.emit(
                self.index(0, 0), self.index(len(self.keys) - 1, len(self.columns) - 1)
            )


def setup_table(table: QtWidgets.QTableView, row_height: int = 26) -> None:
    """The look every table of the window shares."""
    table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.ExtendedSelection)
    table.verticalHeader().hide()
    table.verticalHeader().setDefaultSectionSize(row_height)
    table.setShowGrid(False)
    table.setAlternatingRowColors(True)
    table.setWordWrap(False)
    table.horizontalHeader().setHighlightSections(False)
    table.horizontalHeader().setDefaultAlignment(
        QtCore.Qt.AlignmentFlag.AlignLeft | QtCore.Qt.AlignmentFlag.AlignVCenter
    )


def make_toolbar() -> QtWidgets.QToolBar:
    """A panel's toolbar: what does not fit goes into its » menu, nothing is clipped."""
    bar = QtWidgets.QToolBar()
    bar.setIconSize(QtCore.QSize(16, 16))
    bar.setToolButtonStyle(QtCore.Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
    more = bar.findChild(QtWidgets.QToolButton, "qt_toolbar_ext_button")
    if more is not None:  # Qt's own arrow is invisible on the dark theme
        more.setIcon(icon("more"))
        more.setToolTip("More actions (those the toolbar has no room for)")
    return bar


def labelled(text: str, field: QtWidgets.QWidget) -> QtWidgets.QWidget:
    """A field with its label, as one toolbar item (they go into the » menu together)."""
    box = QtWidgets.QWidget()
    row = QtWidgets.QHBoxLayout(box)
    row.setContentsMargins(4, 0, 2, 0)
    row.setSpacing(4)
    label = QtWidgets.QLabel(text)
    label.setBuddy(field)
    row.addWidget(label)
    row.addWidget(field)
    return box


def overflow_button(bar: QtWidgets.QToolBar) -> QtWidgets.QToolButton | None:
    """The toolbar's » button (shown when some of its actions went into its menu)."""
    return bar.findChild(QtWidgets.QToolButton, "qt_toolbar_ext_button")


@dataclass(frozen=True)
class Column:
    """How a table column behaves as the table narrows."""

    header: str
    preferred: int  # width in pixels when there is room
    priority: int = 0  # columns of the lowest priority hide first when even minimums do not fit
    stretch: bool = False  # takes whatever width is left
    fit_content: bool = False  # wider than preferred when a cell needs it ("authentication
    # failed"), up to three times as wide


class ColumnFitter(QtCore.QObject):
    """Fits a table's columns to its width, so nothing is cut to a stub or pushed out.

    Each column wants its preferred width (at least its header's); when they do not all
    fit, the columns of lowest priority hide first (the row's tooltip still tells their
    values); the stretch column takes what is left, its cells eliding in the middle.
    No horizontal scrolling, at any width.
    """

    def __init__(self, table: QtWidgets.QTableView, columns: Sequence[Column]) -> None:
        super().__init__(table)
        self.table = table
        self.columns = list(columns)
        header = table.horizontalHeader()
        header.setSectionResizeMode(QtWidgets.QHeaderView.ResizeMode.Fixed)
        header.setMinimumSectionSize(24)
        table.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        table.setTextElideMode(QtCore.Qt.TextElideMode.ElideMiddle)
        bold = QtGui.QFont(header.font())
        bold.setBold(True)
        metrics = QtGui.QFontMetrics(bold)
        self.minimum = [metrics.horizontalAdvance(c.header) + 18 for c in self.columns]
        table.viewport().installEventFilter(self)
        self._refit = QtCore.QTimer(self, singleShot=True, interval=0)
        self._refit.timeout.connect(self.fit)
        if any(c.fit_content for c in self.columns):  # the content decides: refit on change
            model = table.model()
            for signal in (model.dataChanged, model.layoutChanged, model.modelReset):
                signal.connect(lambda *_: self._refit.start())
        self.fit()

    def wanted(self, i: int) -> int:
        column = self.columns[i]
        width = max(self.minimum[i], column.preferred)
        if column.fit_content:
            model = self.table.model()
            cells = [
                self.table.sizeHintForIndex(model.index(r, i)).width()
                for r in range(model.rowCount())
            ]
            width = max(width, min(max(cells, default=0) + 12, 3 * column.preferred))
        return width

    def eventFilter(self, watched: QtCore.QObject, event: QtCore.QEvent) -> bool:
        if event.type() == QtCore.QEvent.Type.Resize:
            self.fit()
        return False

    def shown(self, available: int) -> list[int]:
        """The columns that fit at their wanted widths, the most important kept."""
        wanted = [self.wanted(i) for i in range(len(self.columns))]
        shown = list(range(len(self.columns)))
        for i in sorted(shown, key=lambda i: self.columns[i].priority):
            if sum(wanted[j] for j in shown) <= available or len(shown) == 1:
                break
            shown.remove(i)
        return shown

    def fit(self) -> None:
        available = self.table.viewport().width()
        shown = self.shown(available)
        widths = {i: self.wanted(i) for i in shown}
        stretch = [i for i in shown if self.columns[i].stretch] or shown[-1:]
        left = available - sum(widths[i] for i in shown if i not in stretch)
        for i in stretch:
            widths[i] = max(self.minimum[i], left // len(stretch))
        for i in range(len(self.columns)):
            self.table.setColumnHidden(i, i not in shown)
            if i in shown:
                self.table.setColumnWidth(i, widths[i])


def mono_font() -> QtGui.QFont:
    font = QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.SystemFont.FixedFont)
    font.setPointSizeF(max(8.0, font.pointSizeF() * 0.95))
    return font
