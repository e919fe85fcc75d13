"""The Submit dialog: a pipeline and config from files or a bundled example, a target."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from PySide6 import QtGui, QtWidgets

from zmqruntime.resources import example, list_examples

from .model import SERVER_STATE_COLOURS, Endpoint, ServerRow, ServerState
from .widgets import icon, make_button, mono_font, named, on_activated, state_dot

#: the bundled pipeline that "Follow an acquisition folder…" runs (unless one that follows
#: folders is chosen already)
FOLLOW_EXAMPLE = "acquisition_folder"


@dataclass
class Submission:
    endpoint: Endpoint
    pipeline_code: str
    config_code: str | None
    name: str


def describe_example(pipeline_code: str) -> str:
    """The first paragraph of an example pipeline's docstring."""
    try:
        doc = ast.get_docstring(ast.parse(pipeline_code)) or ""
    except SyntaxError:
        return ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


class SubmitDialog(QtWidgets.QDialog):
    """Pick what to run and where; the config is shown and may be edited before sending."""

    def __init__(
        self,
        servers: list[ServerRow],
        parent: QtWidgets.QWidget | None = None,
        preferred: Endpoint | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Submit a run")
        self.resize(760, 620)
        self._pipeline_code = ""

        # -- what
        self.use_example = named(QtWidgets.QRadioButton("Bundled example"), "use_example")
        self.use_files = named(QtWidgets.QRadioButton("Pipeline file"), "use_files")
        self.use_example.setChecked(True)
        self.example_combo = QtWidgets.QComboBox()
        self.example_combo.addItems(list_examples())
        self.example_about = named(QtWidgets.QLabel(), "hint")
        self.example_about.setWordWrap(True)
        self.pipeline_path = QtWidgets.QLineEdit(
            placeholderText="my_pipeline.py (defines run(ctx, config))"
        )
        self.config_path = QtWidgets.QLineEdit(placeholderText="optional: my_config.py")
        browse_pipeline = make_button(
            "browse_pipeline", "Browse…", self._browse_pipeline, icon_name="folder"
        )
        browse_config = make_button(
            "browse_config", "Browse…", self._browse_config, icon_name="folder"
        )

        what = QtWidgets.QGroupBox("What to run")
        grid = QtWidgets.QGridLayout(what)
        grid.addWidget(self.use_example, 0, 0)
        grid.addWidget(self.example_combo, 0, 1, 1, 2)
        grid.addWidget(self.example_about, 1, 1, 1, 2)
        grid.addWidget(self.use_files, 2, 0)
        grid.addWidget(self.pipeline_path, 2, 1)
        grid.addWidget(browse_pipeline, 2, 2)
        grid.addWidget(QtWidgets.QLabel("Config file"), 3, 0)
        grid.addWidget(self.config_path, 3, 1)
        grid.addWidget(browse_config, 3, 2)
        follow = make_button(
            "follow_folder",
            "Follow an acquisition folder…",
            self._pick_acquisition_folder,
            icon_name="folder",
            tip="Pick the folder the microscope writes into: each image is processed as it lands",
        )
        grid.addWidget(follow, 4, 1, 1, 2)
        grid.setColumnStretch(1, 1)

        # -- code
        self.config_edit = QtWidgets.QPlainTextEdit()
        self.config_edit.setFont(mono_font())
        self.config_edit.setPlaceholderText("# config: every public name is a config value\n")
        self.pipeline_view = QtWidgets.QPlainTextEdit(readOnly=True)
        self.pipeline_view.setFont(mono_font())
        tabs = QtWidgets.QTabWidget()
        tabs.addTab(self.config_edit, "Config (editable)")
        tabs.addTab(self.pipeline_view, "Pipeline")

        # -- where
        self.server_combo = QtWidgets.QComboBox()
        for row in servers:
            self.server_combo.addItem(
                state_dot(SERVER_STATE_COLOURS[row.state]),
                f"{row.key}  ({row.state.value})",
                row.endpoint,
            )
            index = self.server_combo.count() - 1
            if row.state != ServerState.ALIVE:
                # a QComboBox's own model is a QStandardItemModel (typed as its base class)
                model = cast(QtGui.QStandardItemModel, self.server_combo.model())
                model.item(index).setEnabled(False)
        self._select_server(servers, preferred)
        self.name_edit = QtWidgets.QLineEdit()
        where = QtWidgets.QFormLayout()
        where.addRow("Server", self.server_combo)
        where.addRow("Run name", self.name_edit)

        self.buttons = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok
            | QtWidgets.QDialogButtonBox.StandardButton.Cancel
        )
        ok = self.buttons.button(QtWidgets.QDialogButtonBox.StandardButton.Ok)
        ok.setText("Submit")
        ok.setIcon(icon("submit"))
        ok.setObjectName("submit_ok")
        ok.setProperty("primary", True)
        self.buttons.accepted.connect(self._accept)
        self.buttons.rejected.connect(self.reject)
        self.error = named(QtWidgets.QLabel(), "error")
        self.error.setWordWrap(True)

        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(what)
        layout.addWidget(tabs, 1)
        layout.addLayout(where)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)

        self.example_combo.currentTextChanged.connect(self._load_example)
        on_activated(self.use_example.toggled, self._mode_changed)
        self.pipeline_path.editingFinished.connect(self._load_files)
        self.config_path.editingFinished.connect(self._load_files)
        if self.example_combo.count():
            preferred_example = "acquisition" if "acquisition" in list_examples() else None
            if preferred_example:
                self.example_combo.setCurrentText(preferred_example)
            self._load_example(self.example_combo.currentText())
        else:
            self.use_files.setChecked(True)
        self._mode_changed()

    def _select_server(self, servers: list[ServerRow], preferred: Endpoint | None) -> None:
        alive = [r.endpoint for r in servers if r.state == ServerState.ALIVE]
        target = preferred if preferred in alive else (alive[0] if alive else None)
        for i in range(self.server_combo.count()):
            if self.server_combo.itemData(i) == target:
                self.server_combo.setCurrentIndex(i)

    # ------------------------------------------------------------------ sources
    def _mode_changed(self) -> None:
        example_mode = self.use_example.isChecked()
        self.example_combo.setEnabled(example_mode)
        self.pipeline_path.setEnabled(not example_mode)
        self.config_path.setEnabled(not example_mode)
        if example_mode:
            self._load_example(self.example_combo.currentText())
        else:
            self._load_files()

    def _load_example(self, name: str) -> None:
        if not name or not self.use_example.isChecked():
            return
        pipeline, config = example(name)
        self._pipeline_code = pipeline
        self.pipeline_view.setPlainText(pipeline)
        self.config_edit.setPlainText(config or "")
        self.example_about.setText(describe_example(pipeline))
        self.name_edit.setText(name)
        self.error.clear()

    def _load_files(self) -> None:
        if self.use_example.isChecked():
            return
        self.error.clear()
        path = self.pipeline_path.text().strip()
        if path:
            try:
                self._pipeline_code = Path(path).expanduser().read_text()
            except OSError as exc:
                self._pipeline_code = ""
                self.error.setText(f"cannot read the pipeline: {exc}")
            self.pipeline_view.setPlainText(self._pipeline_code)
            self.name_edit.setText(Path(path).stem.removesuffix("_pipeline"))
        config = self.config_path.text().strip()
        if config:
            try:
                self.config_edit.setPlainText(Path(config).expanduser().read_text())
            except OSError as exc:
                self.error.setText(f"cannot read the config: {exc}")

    def _browse_pipeline(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, "Pipeline file", "", "Python files (*.py)"
        )
        if path:
            self.use_files.setChecked(True)
            self.set_files(path, self.config_path.text() or None)

    def _browse_config(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Config file", "", "Python (*.py)")
        if path:
            self.use_files.setChecked(True)
            self.set_files(self.pipeline_path.text(), path)

    def _pick_acquisition_folder(self) -> None:
        dialog = QtWidgets.QFileDialog(self, "Folder the microscope writes into")
        dialog.setObjectName("acquisition_folder_dialog")
        dialog.setFileMode(QtWidgets.QFileDialog.FileMode.Directory)
        dialog.setOption(QtWidgets.QFileDialog.Option.ShowDirsOnly, True)
        chosen = dialog.selectedFiles() if dialog.exec() else []
        dialog.deleteLater()
        if chosen:
            self.follow_folder(chosen[0])

    def follow_folder(self, folder: str | Path) -> None:
        """Follow ``folder`` (what the button does): the chosen pipeline if it follows
        folders, else the acquisition_folder example, with ``folder`` set in the config."""
        if "follow_folder" not in self._pipeline_code and FOLLOW_EXAMPLE in list_examples():
            self.use_example.setChecked(True)
            self.example_combo.setCurrentText(FOLLOW_EXAMPLE)
        line = f"folder = {str(folder)!r}"
        text = self.config_edit.toPlainText()
        config, n = re.subn(r"^folder\s*=.*$", lambda _: line, text, flags=re.M)
        self.config_edit.setPlainText(config if n else f"{config.rstrip()}\n{line}\n".lstrip())
        self.name_edit.setText(f"follow {Path(folder).name}")

    def set_files(self, pipeline: str | Path, config: str | Path | None = None) -> None:
        """Choose files (what Browse does), for scripting and tests."""
        self.use_files.setChecked(True)
        self.pipeline_path.setText(str(pipeline))
        self.config_path.setText(str(config) if config else "")
        self._load_files()

    # ------------------------------------------------------------------ result
    def submission(self) -> Submission | None:
        """What to send, or None with the reason shown in the dialog."""
        ep = self.server_combo.currentData()
        if ep is None:
            self.error.setText("No server answers: spawn or add one first.")
            return None
        if not self._pipeline_code.strip():
            self.error.setText("Choose a pipeline file (it must define run(ctx, config)).")
            return None
        try:
            compile(self._pipeline_code, "<pipeline>", "exec")
            compile(self.config_edit.toPlainText(), "<config>", "exec")
        except SyntaxError as exc:
            self.error.setText(f"syntax error: {exc}")
            return None
        config = self.config_edit.toPlainText()
        name = self.name_edit.text().strip() or "run"
        return Submission(ep, self._pipeline_code, config if config.strip() else None, name)

    def _accept(self) -> None:
        if self.submission() is not None:
            self.accept()
