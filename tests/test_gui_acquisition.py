"""The Submit dialog's "Follow an acquisition folder…", through the real button, on a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gui_support import answer_modal, click, real_click, screenshot
from PySide6 import QtWidgets

from zmqruntime_gui.model import Endpoint, ServerRow, ServerState
from zmqruntime_gui.submit_dialog import FOLLOW_EXAMPLE, SubmitDialog


def choose_folder(folder: Path):
    """A handler for the folder dialog: go to ``folder`` and press its accept button."""

    def handler(dialog: QtWidgets.QWidget) -> None:
        assert isinstance(dialog, QtWidgets.QFileDialog), dialog
        assert dialog.objectName() == "acquisition_folder_dialog"
        dialog.setDirectory(str(folder))
        box = dialog.findChild(QtWidgets.QDialogButtonBox)
        accept = next(
            b
            for b in box.buttons()
            if box.buttonRole(b) == QtWidgets.QDialogButtonBox.ButtonRole.AcceptRole
        )
        real_click(accept)

    return handler


def test_follow_folder_button_sets_up_a_run_that_follows_it(
    qtbot, themed_app, make_server, example_data: Path, tmp_path: Path
) -> None:
    server = make_server("acq", workers=1)
    ep = Endpoint("127.0.0.1", server.port)
    row = ServerRow(ep, "local", state=ServerState.ALIVE)
    dialog = SubmitDialog([row], None, ep)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitExposed(dialog)
    dialog.example_combo.setCurrentText("nuclei")  # something that does not follow folders

    folder = tmp_path / "scope output"
    folder.mkdir()
    answer = answer_modal(choose_folder(folder))
    click(qtbot, dialog.findChild(QtWidgets.QPushButton, "follow_folder"))
    answer.check()

    assert dialog.use_example.isChecked()
    assert dialog.example_combo.currentText() == FOLLOW_EXAMPLE
    config = dialog.config_edit.toPlainText()
    assert f"folder = {str(folder)!r}" in config.splitlines()
    assert "done_marker = " in config  # the rest of the example's config is kept
    screenshot(dialog, "submit-follow-folder")
    submission = dialog.submission()
    assert submission is not None and submission.endpoint == ep
    assert submission.name == "follow scope output"

    client = server.client()
    exec_id = client.execute(submission.pipeline_code, submission.config_code)
    timelapse = next((example_data / "cell_migration_timelapse").glob("*.tif"))  # 10 frames
    cmd = [
        sys.executable, "-m", "zmqruntime", "simulate-acquisition", str(folder),
        "--from", str(timelapse), "--fps", "20", "--frames", "4", "--quiet",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    results = client.get_results(exec_id, timeout=60)
    assert [r["frame"] for r in results["frames"]] == [0, 1, 2, 3]
    assert len(results["max_projection"]) == 1
