"""The servers panel: local and remote servers, their health, spawn / stop / kill."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from . import net
from .controller import Controller
from .model import SERVER_STATE_COLOURS, Endpoint, ServerRow, ServerState
from .widgets import (
    Column,
    ColumnFitter,
    KeyedTableModel,
    confirm,
    icon,
    make_action,
    make_button,
    make_toolbar,
    named,
    setup_table,
    state_dot,
)

COLUMNS = ("Server", "Status", "Ping", "Workers", "Queued", "Uptime", "Executor")
COL_EXECUTOR = 6
ALARM_BACKGROUNDS = {
    ServerState.DOWN: "#3b2428",
    ServerState.EXITED: "#3b2428",
    ServerState.AUTH_FAILED: "#33263b",
}


class ServersModel(KeyedTableModel[Endpoint]):
    """A table over the controller's server rows (re-read on each change)."""

    columns = COLUMNS

    def __init__(self, controller: Controller, parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.refresh()
        controller.sigServersChanged.connect(self.refresh)

    @property
    def rows(self) -> list[ServerRow]:
        return [self.controller.servers[ep] for ep in self.keys if ep in self.controller.servers]

    def refresh(self) -> None:
        self.set_keys([row.endpoint for row in self.controller.server_rows()])

    def cell(self, ep: Endpoint, col: int, role: int):
        row = self.controller.servers.get(ep)
        if row is None:
            return None
        Role = QtCore.Qt.ItemDataRole
        if role == Role.DisplayRole:
            if col == 0:
                return row.key
            if col == 1:
                return row.state.value
            if col == 2:
                return row.ping_text
            if col == 3:
                return row.workers_text
            if col == 4:
                return row.queued_text
            if col == 5:
                return row.uptime_text
            if col == COL_EXECUTOR:
                return executor_text(row.executor) if row.state == ServerState.ALIVE else "–"
        elif role == Role.DecorationRole and col == 1:
            return state_dot(SERVER_STATE_COLOURS[row.state])
        elif role == Role.DecorationRole and col == 0:
            return icon("computer" if row.origin == "local" else "globe")
        elif role == Role.ForegroundRole and col == 1:
            return QtGui.QBrush(QtGui.QColor(SERVER_STATE_COLOURS[row.state]))
        elif role == Role.BackgroundRole and row.state in ALARM_BACKGROUNDS:
            # a server that died or refuses our keys stands out; one we stopped does not
            return QtGui.QBrush(QtGui.QColor(ALARM_BACKGROUNDS[row.state]))
        elif role == Role.FontRole and col == 1:
            font = QtGui.QFont()
            font.setBold(True)
            return font
        elif role == Role.ToolTipRole:
            return self._tooltip(row)
        elif role == Role.TextAlignmentRole and col >= 2:
            return int(QtCore.Qt.AlignmentFlag.AlignRight | QtCore.Qt.AlignmentFlag.AlignVCenter)
        elif role == Role.UserRole:
            return row.endpoint
        return None

    def _tooltip(self, row: ServerRow) -> str:
        lines = [f"<b>{row.key}</b> ({row.origin}): {row.state.value}"]
        if row.state == ServerState.ALIVE:  # also what the columns too narrow to show say
            lines.append(
                f"ping {row.ping_text} · workers {row.workers_text} · queued "
                f"{row.queued_text} · up {row.uptime_text}"
            )
            lines += executor_lines(row.executor)
        keys = self.controller.key_dir(row.endpoint)
        if keys:
            lines.append(f"keys: {keys}")
        if row.pid:
            lines.append(f"pid {row.pid}")
        if row.log_file:
            lines.append(f"log: {row.log_file}")
        if row.error:
            lines.append(f"<span style='color:#e06c75'>{row.error}</span>")
        return "<br>".join(lines)


def executor_text(executor: dict[str, Any] | None) -> str:
    """The Executor cell: ``native``, or ``Dask local · 2 workers, 2 threads`` (jobs pending
    on a batch queue; ``connecting`` or ``problem`` while the cluster is not there)."""
    if not executor or executor.get("kind") != "dask":
        return "native"
    text = f"Dask {executor.get('cluster') or executor.get('spec')}"
    if executor.get("problem"):
        return f"{text} · problem"
    if not executor.get("ready"):
        return f"{text} · connecting"
    workers, threads = executor.get("workers", 0), executor.get("threads", 0)
    text += f" · {workers} worker{'s' * (workers != 1)}, {threads} thread{'s' * (threads != 1)}"
    if executor.get("pending_jobs"):
        text += f", {executor['pending_jobs']} jobs pending"
    return text


def executor_lines(executor: dict[str, Any] | None) -> list[str]:
    """The tooltip's lines about the executor: the cluster's figures and its dashboard."""
    if not executor or executor.get("kind") != "dask":
        return ["executor: native worker processes"]
    lines = [f"executor: Dask ({html.escape(str(executor.get('spec')))})"]
    if executor.get("scheduler"):
        lines.append(f"scheduler: {html.escape(executor['scheduler'])}")
    if executor.get("ready"):
        figures = f"{executor.get('workers', 0)} workers, {executor.get('threads', 0)} threads"
        if executor.get("pending_jobs") is not None:
            figures += f", {executor['pending_jobs']} jobs pending"
        if executor.get("adapt"):
            figures += " (adaptive {}–{})".format(*executor["adapt"])
        lines.append(figures)
        if executor.get("resources"):
            lines.append(
                "resources: "
                + ", ".join(
                    f"{html.escape(str(k))} {v:g}" for k, v in executor["resources"].items()
                )
            )
    if executor.get("dashboard"):
        url = html.escape(executor["dashboard"])
        lines.append(f"dashboard: <a href='{url}'>{url}</a>")
    if executor.get("problem"):
        lines.append(f"<span style='color:#e06c75'>{html.escape(executor['problem'])}</span>")
    return lines


class SpawnDialog(QtWidgets.QDialog):
    """Port and worker count for a new local server."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Spawn a local server")
        form = QtWidgets.QFormLayout(self)
        self.port = named(QtWidgets.QSpinBox(), "spawn_port")
        self.port.setRange(1024, 65534)
        self.port.setValue(net.suggest_port())
        self.workers = named(QtWidgets.QSpinBox(), "spawn_workers")
        self.workers.setRange(1, 256)
        self.workers.setValue(os.cpu_count() or 2)
        note = QtWidgets.QLabel(
            "The server runs in the background and keeps running when this window closes.\n"
            "It listens on 127.0.0.1 (control port, and port + 1 for data)."
        )
        note.setObjectName("hint")
        note.setWordWrap(True)
        form.addRow("Port", self.port)
        form.addRow("Workers", self.workers)
        form.addRow(note)
        buttons = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok
            | QtWidgets.QDialogButtonBox.StandardButton.Cancel
        )
        ok = buttons.button(QtWidgets.QDialogButtonBox.StandardButton.Ok)
        ok.setText("Spawn")
        ok.setObjectName("spawn_ok")
        buttons.button(QtWidgets.QDialogButtonBox.StandardButton.Cancel).setObjectName(
            "spawn_cancel"
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)


class AddRemoteDialog(QtWidgets.QDialog):
    """A server's address and the key directory to reach it with (CURVE)."""

    def __init__(self, parent: QtWidgets.QWidget | None = None, keys: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add a server")
        self.endpoint: Endpoint | None = None
        self.key_dir: str | None = None
        form = QtWidgets.QFormLayout(self)
        self.address = named(QtWidgets.QLineEdit(), "remote_address")
        self.address.setPlaceholderText("myscope.lab:5555")
        self.keys = named(QtWidgets.QLineEdit(), "remote_keys")
        self.keys.setPlaceholderText("a folder with client.key_secret and server.key")
        self.keys.setText(keys or "")
        browse = make_button(
            "remote_keys_browse", "Browse…", self._browse, icon_name="folder",
            tip="Choose the key directory",
        )  # fmt: skip
        keys_row = QtWidgets.QHBoxLayout()
        keys_row.addWidget(self.keys, 1)
        keys_row.addWidget(browse)
        note = QtWidgets.QLabel(
            "A server reachable from the network runs with CURVE keys: give the folder that "
            "holds this machine's client key pair and the server's public key (made with "
            "'zmqruntime keys generate', its client.key listed in the server's "
            "authorized_clients). Leave it empty for a server started with --insecure.",
        )
        note.setObjectName("hint")
        note.setWordWrap(True)
        self.error = named(QtWidgets.QLabel(), "error")
        self.error.setWordWrap(True)
        form.addRow("Address", self.address)
        form.addRow("Key directory", keys_row)
        form.addRow(note)
        form.addRow(self.error)
        buttons = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok
            | QtWidgets.QDialogButtonBox.StandardButton.Cancel
        )
        ok = buttons.button(QtWidgets.QDialogButtonBox.StandardButton.Ok)
        ok.setText("Add")
        ok.setObjectName("remote_ok")
        buttons.button(QtWidgets.QDialogButtonBox.StandardButton.Cancel).setObjectName(
            "remote_cancel"
        )
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.resize(560, self.sizeHint().height())

    def _browse(self) -> None:
        path = QtWidgets.QFileDialog.getExistingDirectory(
            self, "Key directory", self.keys.text() or str(Path.home())
        )
        if path:
            self.keys.setText(path)

    def _accept(self) -> None:
        try:
            self.endpoint = Endpoint.parse(self.address.text())
        except ValueError as exc:
            self.error.setText(str(exc))
            return
        keys = self.keys.text().strip()
        if keys:
            problem = net.check_key_dir(keys)
            if problem:
                self.error.setText(problem)
                return
            keys = str(Path(keys).expanduser())
        self.key_dir = keys or None
        self.accept()


class LogDialog(QtWidgets.QDialog):
    """The tail of a local server's log file, re-read every second while open."""

    def __init__(self, path: str, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = path
        self.setWindowTitle(f"Server log — {path}")
        self.resize(900, 560)
        layout = QtWidgets.QVBoxLayout(self)
        self.text = QtWidgets.QPlainTextEdit(readOnly=True)
        self.text.setObjectName("mono")
        self.text.setLineWrapMode(QtWidgets.QPlainTextEdit.LineWrapMode.NoWrap)
        layout.addWidget(self.text)
        row = QtWidgets.QHBoxLayout()
        self.follow = named(QtWidgets.QCheckBox("Follow"), "server_log_follow")
        self.follow.setChecked(True)
        row.addWidget(named(QtWidgets.QLabel(path), "hint"), 1)
        row.addWidget(self.follow)
        self.external = make_button(
            "log_open_externally", "Open externally", self.open_externally,
            tip="Open the log file in the desktop's text viewer",
        )  # fmt: skip
        row.addWidget(self.external)
        self.close_button = make_button("log_close", "Close", self.close)
        row.addWidget(self.close_button)
        layout.addLayout(row)
        self._last: str | None = None
        self.timer = QtCore.QTimer(self, interval=1000)
        self.timer.timeout.connect(self.reload)
        self.timer.start()
        self.reload()

    def open_externally(self) -> bool:
        return QtGui.QDesktopServices.openUrl(QtCore.QUrl.fromLocalFile(self.path))

    def reload(self) -> None:
        try:
            text = net.read_tail(self.path)
        except OSError as exc:
            text = f"cannot read {self.path}: {exc}"
        if text == self._last:
            return
        self._last = text
        bar = self.text.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 2
        self.text.setPlainText(text)
        if self.follow.isChecked() or at_end:
            bar.setValue(bar.maximum())


class ServersPanel(QtWidgets.QWidget):
    """Servers this window knows; the selection filters the runs panel."""

    sigSelectionChanged = QtCore.Signal(object)  # set of server keys

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.model = ServersModel(controller, self)
        self.log_dialogs: list[LogDialog] = []

        self.table = QtWidgets.QTableView()
        self.table.setModel(self.model)
        setup_table(self.table)
        self.table.setContextMenuPolicy(QtCore.Qt.ContextMenuPolicy.ActionsContextMenu)
        metrics = QtGui.QFontMetrics(self.table.font())
        bold = QtGui.QFont(self.table.font())
        bold.setBold(True)
        self.fitter = ColumnFitter(
            self.table,
            [
                Column("Server", metrics.horizontalAdvance("127.0.0.1:55555") + 44,
                       priority=9, stretch=True),
                Column("Status", QtGui.QFontMetrics(bold).horizontalAdvance("stopping") + 44,
                       priority=8, fit_content=True),
                Column("Ping", 64, priority=5, fit_content=True),
                Column("Workers", 64, priority=4),
                Column("Queued", 60, priority=3),
                Column("Uptime", 64, priority=2),
                Column("Executor", metrics.horizontalAdvance("Dask local · 2 workers, 2 threads")
                       + 12, priority=1),
            ],
        )  # fmt: skip
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)

        self.act_spawn = make_action(
            self, "spawn", "Spawn…", self.spawn, icon_name="server-add",
            shortcuts=["Ctrl+Shift+N"], tip="Spawn a local server (Ctrl+Shift+N)",
        )  # fmt: skip
        self.act_add = make_action(
            self, "add_remote", "Add remote…", self.add_remote, icon_name="link",
            shortcuts=["Ctrl+Shift+A"], tip="Watch a server on another machine (Ctrl+Shift+A)",
        )  # fmt: skip
        self.act_stop = make_action(
            self, "stop", "Stop", self.stop_selected, icon_name="stop",
            tip="Ask the selected server(s) to shut down gracefully",
        )  # fmt: skip
        self.act_kill = make_action(
            self, "force_kill", "Force kill", self.kill_selected, icon_name="kill",
            tip="Kill the selected local server and its workers at once (asks first)",
        )  # fmt: skip
        self.act_log = make_action(
            self, "server_log", "Log", self.open_log, icon_name="log",
            tip="Open the selected local server's log",
        )  # fmt: skip
        self.act_remove = make_action(
            self, "remove_server", "Remove", self.remove_selected, icon_name="remove",
            tip="Take the selected server off this list",
        )  # fmt: skip
        for act in (self.act_stop, self.act_kill, self.act_log, self.act_remove):
            self.table.addAction(act)

        bar = make_toolbar()
        for act in (self.act_spawn, self.act_add):
            bar.addAction(act)
        bar.addSeparator()
        for act in (self.act_stop, self.act_kill, self.act_log):
            bar.addAction(act)
        self.toolbar = bar

        # shown instead of the table while no server is known: the offer to spawn one
        self.empty = named(QtWidgets.QFrame(), "emptyState")
        empty_layout = QtWidgets.QVBoxLayout(self.empty)
        empty_layout.addStretch(1)
        title = named(QtWidgets.QLabel("No server running"), "emptyTitle")
        title.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        text = QtWidgets.QLabel(
            "Runs execute on a zmqruntime server. Start one on this machine, "
            "or add a server that runs elsewhere.",
        )
        text.setObjectName("hint")
        text.setWordWrap(True)
        text.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.empty_spawn = make_button(
            "empty_spawn", "Spawn a local server", self.spawn, icon_name="server-add",
            primary=True,
        )  # fmt: skip
        self.empty_add = make_button(
            "empty_add_remote", "Add a remote server…", self.add_remote, icon_name="link"
        )
        empty_add = self.empty_add
        buttons = QtWidgets.QVBoxLayout()  # one above the other: fits a narrow dock
        buttons.addWidget(self.empty_spawn, 0, QtCore.Qt.AlignmentFlag.AlignHCenter)
        buttons.addWidget(empty_add, 0, QtCore.Qt.AlignmentFlag.AlignHCenter)
        empty_layout.addWidget(title)
        empty_layout.addWidget(text)
        empty_layout.addSpacing(8)
        empty_layout.addLayout(buttons)
        empty_layout.addStretch(1)

        self.stack = QtWidgets.QStackedWidget()
        self.stack.addWidget(self.table)
        self.stack.addWidget(self.empty)

        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(4, 2, 4, 4)
        layout.setSpacing(2)
        layout.addWidget(bar)
        layout.addWidget(self.stack)
        controller.sigServersChanged.connect(self._update_empty)
        self._update_empty()
        self._update_actions()

    # ------------------------------------------------------------------ selection
    def selected(self) -> list[Endpoint]:
        rows = sorted({i.row() for i in self.table.selectionModel().selectedRows()})
        return [k for k in (self.model.key_at(r) for r in rows) if k is not None]

    def select(self, ep: Endpoint) -> None:
        row = self.model.row_of(ep)
        if row >= 0:
            self.table.selectRow(row)

    def _selection_changed(self, *args) -> None:
        self._update_actions()
        self.sigSelectionChanged.emit({ep.key for ep in self.selected()})

    def _update_actions(self) -> None:
        sel = self.selected()
        rows = [self.controller.servers.get(ep) for ep in sel]
        alive = [r for r in rows if r is not None and r.state == ServerState.ALIVE]
        self.act_stop.setEnabled(bool(alive))
        self.act_kill.setEnabled(any(self.controller.local_entry(ep) for ep in sel))
        self.act_log.setEnabled(
            len(sel) == 1 and rows[0] is not None and bool(rows[0].log_file) and sel[0].is_local
        )
        self.act_remove.setEnabled(bool(sel))

    def _update_empty(self) -> None:
        empty = not self.controller.servers and self.controller._registry_polled
        self.stack.setCurrentWidget(self.empty if empty else self.table)
        self._update_actions()

    # ------------------------------------------------------------------ actions
    def spawn(self) -> None:
        """Ask for a port and a worker count, then spawn a local server there."""
        dialog = SpawnDialog(self)
        self.spawn_dialog: SpawnDialog | None = dialog
        try:
            if dialog.exec() != QtWidgets.QDialog.DialogCode.Accepted:
                return
            port, workers = dialog.port.value(), dialog.workers.value()
        finally:
            self.spawn_dialog = None
            dialog.deleteLater()
        self.controller.spawn_server(port, workers)

    def add_remote(self) -> Endpoint | None:
        """Ask for a server's address and key directory; add it (both remembered)."""
        sel = self.selected()
        dialog = AddRemoteDialog(self, self.controller.key_dir(sel[0] if sel else None))
        if sel and not sel[0].is_local:
            dialog.address.setText(sel[0].key)  # the selected server: change its keys
        self.add_dialog: AddRemoteDialog | None = dialog
        try:
            if dialog.exec() != QtWidgets.QDialog.DialogCode.Accepted:
                return None
            ep, keys = dialog.endpoint, dialog.key_dir
        finally:
            self.add_dialog = None
            dialog.deleteLater()
        if ep is None:
            return None
        self.controller.add_remote(ep, keys or "")
        return ep

    def stop_selected(self) -> None:
        for ep in self.selected():
            self.controller.stop_server(ep)

    def kill_selected(self) -> None:
        """Kill the selected local servers, after a confirmation that defaults to No."""
        targets = [ep for ep in self.selected() if self.controller.local_entry(ep)]
        if not targets:
            return
        names = ", ".join(ep.key for ep in targets)
        if not confirm(
            self,
            "Force kill",
            f"Kill the server {names} and its workers now?",
            "Its running runs are lost (they end as failed). Stop, the graceful way, is "
            "usually better.",
            yes="&Kill",
            no="&Keep it running",
        ):
            return
        for ep in targets:
            self.controller.kill_server(ep)

    def open_log(self) -> LogDialog | None:
        sel = self.selected()
        if len(sel) != 1:
            return None
        row = self.controller.servers.get(sel[0])
        if row is None or not row.log_file:
            return None
        dialog = LogDialog(row.log_file, self)
        dialog.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.destroyed.connect(
            lambda *_: self.log_dialogs.remove(dialog) if dialog in self.log_dialogs else None
        )
        self.log_dialogs.append(dialog)
        dialog.show()
        return dialog

    def remove_selected(self) -> None:
        for ep in self.selected():
            self.controller.remove_server(ep)
