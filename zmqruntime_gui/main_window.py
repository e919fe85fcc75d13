"""The main window: the preview in the middle, docks for servers, runs, logs, results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime import __version__
from zmqruntime.formatting import fmt_duration, fmt_time
from zmqruntime.resources import example, list_examples

from . import net
from .controller import Controller
from .logs_panel import LogsPanel
from .model import (
    CONNECTION_LOST,
    DEFAULT_PORT,
    Endpoint,
    RunKey,
    ServerState,
)
from .preview_panel import PreviewPanel
from .results_panel import ResultsPanel
from .run_details import RunDetailsDialog
from .runs_panel import RunsPanel
from .servers_panel import ServersPanel
from .submit_dialog import SubmitDialog
from .tasks import TaskRunner
from .widgets import guard_none_refcount, icon, make_action, named

ORGANIZATION = "zmqruntime"
APPLICATION = "zmqruntime-gui"
SETTINGS_ENV = "ZMQRUNTIME_GUI_SETTINGS"
STATE_VERSION = 1
DEMO_FRAMES = 600  # 30 s of the simulated camera at 20 fps


def default_settings() -> QtCore.QSettings:
    """The user's settings, or the INI file named by $ZMQRUNTIME_GUI_SETTINGS (tests)."""
    path = os.environ.get(SETTINGS_ENV)
    if path:
        return QtCore.QSettings(path, QtCore.QSettings.Format.IniFormat)
    return QtCore.QSettings(ORGANIZATION, APPLICATION)


SHORTCUTS = (
    ("Ctrl+N", "Submit a run"),
    ("Ctrl+Shift+N", "Spawn a local server"),
    ("Ctrl+Shift+A", "Add a remote server"),
    ("Ctrl+K / Delete", "Cancel the selected runs"),
    ("Ctrl+I / double-click", "Run details"),
    ("Space", "Pause / resume the preview"),
    ("Ctrl+L", "Auto levels (once)"),
    ("Ctrl+S", "Snapshot the frame to TIFF"),
    ("Ctrl+Shift+S", "Save the view as PNG"),
    ("Ctrl+Shift+O", "Open the run's images in napari"),
    ("F5", "Refresh now"),
    ("Ctrl+Q", "Quit"),
)


class MainWindow(QtWidgets.QMainWindow):
    """The monitor and launcher."""

    def __init__(
        self,
        settings: QtCore.QSettings | None = None,
        connections: net.Connections | None = None,
        parent: QtWidgets.QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        guard_none_refcount()
        self.settings = settings or default_settings()
        #: where File > Run the demo acquisition runs (``--port``, default 5555)
        self.demo_port = DEFAULT_PORT
        self.demo_frames = DEMO_FRAMES
        self.setWindowTitle("runs, servers and live preview")
        self.setWindowIcon(icon("app"))
        self.runner = TaskRunner(parent=self)
        self.controller = Controller(self.settings, self.runner, connections, self)
        self.details: list[RunDetailsDialog] = []
        self.message_boxes: list[QtWidgets.QMessageBox] = []

        self.preview = PreviewPanel()
        self.setCentralWidget(self.preview)
        self.servers_panel = ServersPanel(self.controller)
        self.runs_panel = RunsPanel(self.controller)
        self.logs_panel = LogsPanel(self.controller)
        self.results_panel = ResultsPanel(self.controller)

        Area = QtCore.Qt.DockWidgetArea
        self.setCorner(QtCore.Qt.Corner.BottomLeftCorner, Area.BottomDockWidgetArea)
        self.setCorner(QtCore.Qt.Corner.BottomRightCorner, Area.BottomDockWidgetArea)
        self.servers_dock = self._dock("Servers", "serversDock", self.servers_panel)
        self.runs_dock = self._dock("Runs", "runsDock", self.runs_panel)
        self.logs_dock = self._dock("Log", "logsDock", self.logs_panel)
        self.results_dock = self._dock("Results", "resultsDock", self.results_panel)
        self.addDockWidget(Area.BottomDockWidgetArea, self.servers_dock)
        self.splitDockWidget(self.servers_dock, self.runs_dock, QtCore.Qt.Orientation.Horizontal)
        self.addDockWidget(Area.RightDockWidgetArea, self.logs_dock)
        self.tabifyDockWidget(self.logs_dock, self.results_dock)
        self.logs_dock.raise_()

        self._build_menus()
        self._build_status_bar()
        self._connect()
        self._restore()
        self.controller.start()

    # ------------------------------------------------------------------ construction
    def _dock(self, title: str, name: str, widget: QtWidgets.QWidget) -> QtWidgets.QDockWidget:
        dock = QtWidgets.QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(
            QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetFloatable
            | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetClosable
        )
        return dock

    def _build_menus(self) -> None:
        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        file_menu.addAction(self.runs_panel.act_submit)
        self.act_demo = make_action(
            self, "demo", "Run the &demo acquisition", self.start_demo, icon_name="demo",
            tip="Simulated camera with live preview on a local server",
        )  # fmt: skip
        file_menu.addAction(self.act_demo)
        file_menu.addSeparator()
        file_menu.addAction(self.preview.act_tiff)
        file_menu.addAction(self.preview.act_png)
        file_menu.addSeparator()
        self.act_quit = make_action(self, "quit", "&Quit", self.close, shortcuts=["Ctrl+Q"])
        file_menu.addAction(self.act_quit)

        server_menu = menu.addMenu("&Servers")
        for act in (
            self.servers_panel.act_spawn,
            self.servers_panel.act_add,
            None,
            self.servers_panel.act_stop,
            self.servers_panel.act_kill,
            self.servers_panel.act_log,
            self.servers_panel.act_remove,
        ):
            server_menu.addSeparator() if act is None else server_menu.addAction(act)

        run_menu = menu.addMenu("&Runs")
        run_menu.addAction(self.runs_panel.act_cancel)
        run_menu.addAction(self.runs_panel.act_details)
        self.act_refresh = make_action(
            self, "refresh", "Refresh now", self.refresh, icon_name="refresh",
            shortcuts=[QtGui.QKeySequence(QtCore.Qt.Key.Key_F5)],
        )  # fmt: skip
        run_menu.addAction(self.act_refresh)
        run_menu.addSeparator()  # the followed run's results (the Results panel's toolbar)
        results = self.results_panel
        for act in (
            results.act_show, results.act_save, results.act_csv, results.act_plot,
            results.act_napari,
        ):  # fmt: skip
            run_menu.addAction(act)

        view_menu = menu.addMenu("&View")
        for act in (self.preview.act_pause, self.preview.act_autolevel):
            view_menu.addAction(act)
        view_menu.addSeparator()
        for dock in (self.servers_dock, self.runs_dock, self.logs_dock, self.results_dock):
            dock.toggleViewAction().setObjectName(f"show_{dock.objectName()}")
            view_menu.addAction(dock.toggleViewAction())
        self.act_reset = make_action(self, "reset_layout", "Reset layout", self.reset_layout)
        view_menu.addAction(self.act_reset)

        help_menu = menu.addMenu("&Help")
        self.act_keys = make_action(self, "shortcuts", "Keyboard shortcuts", self.show_shortcuts)
        help_menu.addAction(self.act_keys)
        self.act_about = make_action(self, "about", "About zmqruntime", self.show_about)
        help_menu.addAction(self.act_about)

        # window-wide shortcuts for actions that live in panels' toolbars
        for act in (
            self.runs_panel.act_submit,
            self.runs_panel.act_cancel,
            self.runs_panel.act_details,
            self.servers_panel.act_spawn,
            self.servers_panel.act_add,
            self.preview.act_pause,
            self.preview.act_autolevel,
            self.preview.act_tiff,
            self.preview.act_png,
            self.act_refresh,
        ):
            act.setShortcutContext(QtCore.Qt.ShortcutContext.WindowShortcut)
            self.addAction(act)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.summary = named(QtWidgets.QLabel(), "summary")
        bar.addPermanentWidget(self.summary)
        self._summary_timer = QtCore.QTimer(self, interval=1000)
        self._summary_timer.timeout.connect(self._update_summary)
        self._summary_timer.start()

    def _connect(self) -> None:
        c = self.controller
        self.servers_panel.sigSelectionChanged.connect(self.runs_panel.set_servers)
        self.runs_panel.sigCurrentRun.connect(self._run_selected)
        self.runs_panel.sigOpenDetails.connect(self.open_details)
        self.runs_panel.sigSubmitRequested.connect(self.open_submit)
        c.sigFollowChanged.connect(self._follow_changed)
        c.sigRunSubmitted.connect(self._run_submitted)
        c.sigMessage.connect(lambda text: self.statusBar().showMessage(text, 8000))
        c.sigError.connect(self.show_error)
        c.sigServersChanged.connect(self._update_summary)
        c.sigRunFinished.connect(self._run_finished)
        self.runs_panel.model.sigFlushed.connect(self._update_summary)
        self.runs_panel.model.sigFlushed.connect(self._update_banner)
        c.sigContactChanged.connect(lambda ep: self._update_banner())
        self.preview.sigStatus.connect(lambda text: self.statusBar().showMessage(text, 8000))
        self.results_panel.sigShowArray.connect(self.preview.show_array)
        self.preview.sigDemoRequested.connect(self.start_demo)
        self.results_panel.sigStatus.connect(lambda t: self.statusBar().showMessage(t, 8000))

    # ------------------------------------------------------------------ settings
    def _restore(self) -> None:
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if isinstance(geometry, QtCore.QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:  # first start: a comfortable size that fits the screen
            screen = self.screen().availableGeometry()
            self.resize(min(1500, screen.width()), min(940, screen.height()))
        if isinstance(state, QtCore.QByteArray) and not state.isEmpty():
            self.restoreState(state, STATE_VERSION)
        else:
            self._default_dock_sizes()

    def save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState(STATE_VERSION))
        self.settings.sync()

    def reset_layout(self) -> None:
        Area = QtCore.Qt.DockWidgetArea
        for dock in (self.servers_dock, self.runs_dock, self.logs_dock, self.results_dock):
            dock.setFloating(False)
            dock.show()
        self.addDockWidget(Area.BottomDockWidgetArea, self.servers_dock)
        self.splitDockWidget(self.servers_dock, self.runs_dock, QtCore.Qt.Orientation.Horizontal)
        self.addDockWidget(Area.RightDockWidgetArea, self.logs_dock)
        self.tabifyDockWidget(self.logs_dock, self.results_dock)
        self.logs_dock.raise_()
        self._default_dock_sizes()

    def _default_dock_sizes(self) -> None:
        """Docks in proportion to the window: the image keeps the most room at any size."""
        w, h = self.width(), self.height()
        Orientation = QtCore.Qt.Orientation
        self.resizeDocks([self.logs_dock], [int(w * 0.28)], Orientation.Horizontal)
        self.resizeDocks([self.servers_dock], [int(h * 0.34)], Orientation.Vertical)
        self.resizeDocks(
            [self.servers_dock, self.runs_dock],
            [int(w * 0.4), int(w * 0.6)],
            Orientation.Horizontal,
        )

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:
        self.save_settings()
        for dialog in [*self.details, *self.servers_panel.log_dialogs]:
            dialog.close()
        # napari viewers opened from here live in this process: they go with the window
        self.results_panel.napari.close_all()
        self.controller.close()
        super().closeEvent(event)

    # ------------------------------------------------------------------ runs
    def _run_selected(self, key: RunKey | None) -> None:
        self.controller.follow(key)

    def _follow_changed(self, box) -> None:
        self._update_banner()
        if box is None:
            self.preview.set_source(None)
            return
        row = self.controller.runs.rows.get(box.key)
        title = row.name if row is not None else box.key.exec_id
        self.preview.set_source(box, title, row.state if row is not None else None)

    def _run_submitted(self, key: RunKey) -> None:
        if self.runs_panel.model.servers and key.server not in self.runs_panel.model.servers:
            self.servers_panel.table.clearSelection()
        self.runs_panel.select(key)
        self.controller.follow(key)

    def _run_finished(self, key: RunKey, status: dict[str, Any]) -> None:
        row = self.controller.runs.rows.get(key)
        name = row.name if row is not None else key.exec_id
        self.statusBar().showMessage(f"{name} ({key.exec_id}) {status.get('state')}", 10000)
        box = self.controller.box
        if box is not None and box.key == key and self.preview.box is box:
            self.preview.run_ended(status.get("state", "finished"))

    def selected_server(self) -> Endpoint | None:
        sel = self.servers_panel.selected()
        return sel[0] if sel else None

    def open_submit(self) -> SubmitDialog | None:
        """The Submit dialog (modal); sends what it returns."""
        dialog = SubmitDialog(self.controller.server_rows(), self, self.selected_server())
        self._submit_dialog: SubmitDialog | None = dialog
        try:
            if dialog.exec() != QtWidgets.QDialog.DialogCode.Accepted:
                return dialog
            submission = dialog.submission()
        finally:
            self._submit_dialog = None
        if submission is not None:
            self.controller.submit_run(
                submission.endpoint,
                submission.pipeline_code,
                submission.config_code,
                name=submission.name,
            )
        return dialog

    def open_details(self, key: RunKey) -> RunDetailsDialog:
        dialog = RunDetailsDialog(self.controller, key, self)
        dialog.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.sigShowArray.connect(self.preview.show_array)
        self.details.append(dialog)
        dialog.destroyed.connect(
            lambda *_: self.details.remove(dialog) if dialog in self.details else None
        )
        dialog.show()
        return dialog

    def refresh(self) -> None:
        self.controller.poll_servers()
        self.controller.poll_runs()

    # ------------------------------------------------------------------ demo
    def start_demo(self) -> None:
        """Run the acquisition demo on the local server of ``demo_port`` (5555 unless
        ``--port`` said otherwise), spawning one there if nothing answers."""
        port, frames = self.demo_port, self.demo_frames
        ep = Endpoint("127.0.0.1", port)
        self.statusBar().showMessage(f"demo: looking for a server on port {port}…")

        def find() -> str:
            try:
                self.controller.conns.probe(ep)
                return "alive"
            except Exception:
                pass
            if net.port_is_free(port):
                return "free"
            return "starting" if net.registry().get(ep) is not None else "taken"

        def found(what: str) -> None:
            if what == "free":
                self.statusBar().showMessage(f"demo: starting a local server on port {port}…")
                self.controller.spawn_server(port, None, on_ready=submit)
            elif what == "taken":
                self.show_error(
                    "Demo",
                    f"Port {port} (or {port + 1}) is taken by a program that is not a "
                    "zmqruntime server of yours. Start the demo on another port, e.g. "
                    f"zmqruntime-gui --demo --port {net.free_port()}",
                )
            else:
                self.controller.watch(ep)
                self.controller.when_alive(ep, submit)

        def submit(ep: Endpoint) -> None:
            pipeline, config_code = example("acquisition")
            self.controller.submit_run(
                ep, pipeline, config_code, config={"frames": frames}, name="demo-acquisition"
            )

        self.runner.submit(find, found, lambda exc: self.show_error("Demo", str(exc)))

    # ------------------------------------------------------------------ messages
    def show_error(self, title: str, text: str) -> QtWidgets.QMessageBox:
        """A non-blocking warning box (the event loop keeps running behind it)."""
        box = QtWidgets.QMessageBox(
            QtWidgets.QMessageBox.Icon.Warning,
            title,
            text,
            QtWidgets.QMessageBox.StandardButton.Ok,
            self,
        )
        box.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        self.message_boxes.append(box)
        box.destroyed.connect(
            lambda *_: self.message_boxes.remove(box) if box in self.message_boxes else None
        )
        box.open()
        self.statusBar().showMessage(f"{title}: {text.splitlines()[0] if text else ''}", 10000)
        return box

    def show_shortcuts(self) -> None:
        rows = "".join(
            f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in SHORTCUTS
        )
        QtWidgets.QMessageBox.information(self, "Keyboard shortcuts", f"<table>{rows}</table>")

    def show_about(self) -> None:
        examples = ", ".join(list_examples()) or "none"
        QtWidgets.QMessageBox.about(
            self,
            "About zmqruntime",
            f"<h3>zmqruntime {__version__}</h3>"
            "<p>Run Python image pipelines on local or remote servers over ZeroMQ, and "
            "watch them live: progress, logs, results and camera frames.</p>"
            f"<p>Bundled examples: {examples}</p>"
            f"<p>Settings: {Path(self.settings.fileName())}</p>",
        )

    def _update_banner(self) -> None:
        """The preview's warning while the followed run's server does not answer, and
        where the run is by its own progress (frame 95 of 3000, time left)."""
        box = self.controller.box
        row = self.controller.runs.rows.get(box.key) if box is not None else None
        progress = ""
        if row is not None and row.progress_text and not row.is_final:
            progress = f"run at <b>{row.progress_text}</b>"
            eta = row.eta()
            if eta is not None:
                progress += f", {fmt_duration(eta)} left"
        self.preview.set_run_progress(progress)
        if row is None or row.contact == "ok" or (row.is_final and row.contact != "gone"):
            self.preview.set_banner(None)
        elif row.contact == "gone":
            self.preview.set_banner(
                f"{row.key.server} answers again but no longer knows {row.name} "
                f"({row.key.exec_id}): the run is lost."
            )
        else:
            known = row.progress_text or "no progress reported"
            self.preview.set_banner(
                f"Connection lost: {row.key.server} has not answered since "
                f"{fmt_time(row.lost_at)[11:]}. {row.name} was {row.state} at {known}. "
                "Its true state shows when the server answers again."
            )

    def _update_summary(self) -> None:
        rows = self.controller.servers.values()
        alive = sum(1 for r in rows if r.state == ServerState.ALIVE)
        down = sum(1 for r in rows if r.state == ServerState.DOWN)
        exited = sum(1 for r in rows if r.state == ServerState.EXITED)
        refused = sum(1 for r in rows if r.state == ServerState.AUTH_FAILED)
        states = [r.display_state for r in self.controller.runs.rows.values()]
        running, queued = states.count("running"), states.count("queued")
        lost = states.count(CONNECTION_LOST)
        parts = [f"{alive} server{'s' if alive != 1 else ''} up"]
        if down:
            parts.append(f"<span style='color:#e06c75'>{down} down</span>")
        if exited:
            parts.append(f"<span style='color:#be5046'>{exited} exited</span>")
        if refused:
            parts.append(f"<span style='color:#c678dd'>{refused} refused our keys</span>")
        parts.append(f"{running} running")
        if queued:
            parts.append(f"{queued} queued")
        if lost:
            parts.append(f"<span style='color:#d19a66'>{lost} {CONNECTION_LOST}</span>")
        self.summary.setText("  ·  ".join(parts) + "  ")
        # the title says it too (task bars, and tools that read window names); Qt adds
        # " — zmqruntime", the application's display name
        plain = [f"{alive} server{'s' if alive != 1 else ''} up", f"{running} running"]
        if lost:
            plain.append(f"{lost} {CONNECTION_LOST}")
        self.setWindowTitle(", ".join(plain))
