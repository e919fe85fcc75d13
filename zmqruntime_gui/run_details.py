"""A run's details: overview, config and code, the whole log, the error, the results."""

from __future__ import annotations

from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime.formatting import fmt_duration, fmt_time

from .controller import Controller
from .logs_panel import LogView
from .model import STATE_COLOURS, RunKey, log_line, short_repr
from .results_panel import ResultsView
from .widgets import mono_font, named, on_activated


class RunDetailsDialog(QtWidgets.QDialog):
    """Everything the server knows about one run, fetched off the GUI thread."""

    sigShowArray = QtCore.Signal(object, str, object)  # array, title, image metadata or None

    def __init__(
        self, controller: Controller, key: RunKey, parent: QtWidgets.QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self.key = key
        self.status: dict[str, Any] | None = None
        self.source: dict[str, Any] | None = None
        self.setWindowTitle(f"Run {key.exec_id} on {key.server}")
        self.resize(860, 640)

        self.header = named(QtWidgets.QLabel(), "detailsHeader")
        self.header.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.tabs = QtWidgets.QTabWidget()

        self.overview = QtWidgets.QWidget()
        self.form = QtWidgets.QFormLayout(self.overview)
        self.form.setLabelAlignment(QtCore.Qt.AlignmentFlag.AlignRight)
        self.fields: dict[str, QtWidgets.QLabel] = {}
        for name in (
            "name", "id", "server", "state", "progress", "message", "created", "started",
            "finished", "elapsed", "results", "log entries", "attempts",
        ):  # fmt: skip
            label = QtWidgets.QLabel("…")
            label.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            self.fields[name] = label
            self.form.addRow("ID" if name == "id" else name.capitalize(), label)
        self.tabs.addTab(self.overview, "Overview")

        self.config_text = self._code_view()
        self.tabs.addTab(self.config_text, "Config")
        self.pipeline_text = self._code_view()
        self.tabs.addTab(self.pipeline_text, "Pipeline")
        self.logs = LogView()
        self.logs.follow.setChecked(False)
        self.tabs.addTab(self.logs, "Logs")
        self.error_text = self._code_view()
        self.error_tab = self.tabs.addTab(self.error_text, "Error")
        self.results = ResultsView(controller)
        self.results.sigShowArray.connect(self.sigShowArray)
        self.tabs.addTab(self.results, "Results")

        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        self.refresh_button = buttons.addButton(
            "Refresh", QtWidgets.QDialogButtonBox.ButtonRole.ActionRole
        )
        self.refresh_button.setObjectName("details_refresh")
        on_activated(self.refresh_button.clicked, self.refresh)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(buttons)
        self.refresh()

    @staticmethod
    def _code_view() -> QtWidgets.QPlainTextEdit:
        view = QtWidgets.QPlainTextEdit(readOnly=True)
        view.setFont(mono_font())
        view.setLineWrapMode(QtWidgets.QPlainTextEdit.LineWrapMode.NoWrap)
        return view

    def refresh(self) -> None:
        key = self.key
        eid = key.exec_id
        self.controller.fetch(
            key, lambda c: c.get_status(eid), self._show_status, self._failed, owner=self
        )
        self.controller.fetch(
            key, lambda c: c.get_source(eid), self._show_source, self._failed, owner=self
        )
        self.controller.fetch(
            key, lambda c: c.get_logs(eid), self._show_logs, self._failed, owner=self
        )
        self.results.set_run(key)

    def _failed(self, exc: BaseException) -> None:
        self.header.setText(f"<span style='color:#e06c75'>{exc}</span>")

    def _show_status(self, status: dict[str, Any]) -> None:
        self.status = status
        state = status.get("state", "?")
        colour = STATE_COLOURS.get(state, "#cccccc")
        self.header.setText(
            f"<span style='font-size:15pt'><b>{status.get('name') or self.key.exec_id}</b></span>"
            f"&nbsp;&nbsp;<span style='color:{colour};font-weight:bold'>{state}</span>"
        )
        progress = status.get("progress")
        values = {
            "name": status.get("name") or "–",
            "id": status.get("id"),
            "server": self.key.server,
            "state": state,
            "progress": "–" if progress is None else f"{progress:.0%}",
            "message": status.get("message") or "–",
            "created": fmt_time(status.get("created")),
            "started": fmt_time(status.get("started")),
            "finished": fmt_time(status.get("finished")),
            "elapsed": fmt_duration(
                (status.get("finished") or 0) - status["started"]
                if status.get("started") and status.get("finished")
                else None
            ),
            "results": str(status.get("n_results", 0)),
            "log entries": str(status.get("n_logs", 0)),
            "attempts": str(status.get("attempts", 0)),
        }
        for name, text in values.items():
            self.fields[name].setText(str(text))
        self.fields["state"].setStyleSheet(f"color: {colour}; font-weight: bold")
        error = status.get("error")
        tb = status.get("traceback")
        if error or tb:
            self.error_text.setPlainText(f"{error or ''}\n\n{tb or ''}".strip())
            self.tabs.setTabText(self.error_tab, "Error ●")
            self.tabs.tabBar().setTabTextColor(self.error_tab, QtGui.QColor("#e06c75"))
            if state == "failed":
                self.tabs.setCurrentIndex(self.error_tab)
        else:
            self.error_text.setPlainText("No error.")

    def _show_source(self, source: dict[str, Any]) -> None:
        self.source = source
        parts = []
        if source.get("config_code"):
            parts.append(source["config_code"].rstrip())
        if source.get("config"):
            overrides = "\n".join(f"{k} = {short_repr(v)}" for k, v in source["config"].items())
            parts.append(f"# values passed with the run (override the code above)\n{overrides}")
        self.config_text.setPlainText("\n\n".join(parts) or "# no config")
        self.pipeline_text.setPlainText(source.get("pipeline_code") or "")

    def _show_logs(self, entries: list[dict[str, Any]]) -> None:
        self.logs.clear(f"{len(entries)} log entries")
        self.logs.append([log_line(e["text"], e.get("t")) for e in entries])
