"""A CURVE-secured server through the window: added with its key directory it shows
alive and runs; with keys it does not accept, "authentication failed" (not "down"), with
the client's advice; ``zmqruntime-gui --keys DIR`` sets the default key directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from gui_support import answer_modal, button_named, click, real_click, screenshot, toolbar_button
from PySide6 import QtWidgets
from PySide6.QtTest import QTest

from zmqruntime.transport import generate_keys
from zmqruntime_gui import net
from zmqruntime_gui.model import Endpoint, ServerState

PIPELINE = "def run(ctx, config):\n    ctx.log('secret work')\n    return 6 * 7\n"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A key dir made by the CLI, as a user would."""
    out = subprocess.run(
        [sys.executable, "-m", "zmqruntime", "keys", "generate", str(tmp_path / "keys")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return tmp_path / "keys"


@pytest.fixture
def secure_server(make_server, keys):
    return make_server("secure", keys=keys)


def add_through_the_dialog(qtbot, window, address: str, keys: Path | str) -> None:
    def fill(dialog):
        address_field = dialog.findChild(QtWidgets.QLineEdit, "remote_address")
        address_field.clear()
        QTest.keyClicks(address_field, address)
        keys_field = dialog.findChild(QtWidgets.QLineEdit, "remote_keys")
        keys_field.clear()
        QTest.keyClicks(keys_field, str(keys))
        real_click(button_named(dialog, "remote_ok"))

    answer = answer_modal(fill)
    panel = window.servers_panel
    click(qtbot, toolbar_button(panel.toolbar, panel.act_add))
    answer.check()


def state_of(window, ep: Endpoint) -> ServerState | None:
    row = window.controller.servers.get(ep)
    return row.state if row is not None else None


def test_secured_server_with_its_keys_then_with_wrong_ones(window, qtbot, secure_server, keys):
    ep = Endpoint("127.0.0.1", secure_server.port)
    # the registry lists it, but without keys the window cannot talk to it
    window.controller.watch(ep)
    qtbot.waitUntil(lambda: state_of(window, ep) == ServerState.AUTH_FAILED, timeout=20_000)
    row = window.controller.servers[ep]
    assert "requires keys" in row.error and row.ping_text == "keys refused"

    # Add remote with the key directory: alive, and it runs what we submit
    add_through_the_dialog(qtbot, window, ep.key, keys)
    qtbot.waitUntil(lambda: state_of(window, ep) == ServerState.ALIVE, timeout=20_000)
    assert window.controller.key_dir(ep) == str(keys)
    before = set(window.controller.runs.rows)
    window.controller.submit_run(ep, PIPELINE, None, name="secured")
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    qtbot.waitUntil(lambda: window.controller.runs.rows[key].state == "completed", timeout=30_000)
    qtbot.waitUntil(lambda: "secret work" in window.logs_panel.plain_text(), timeout=10_000)
    screenshot(window, "keys-01-secured-alive")

    # someone else's keys: "authentication failed", with the advice, never "down"
    stranger = keys.parent / "stranger"
    generate_keys(stranger)
    window.servers_panel.select(ep)
    add_through_the_dialog(qtbot, window, ep.key, stranger)
    qtbot.waitUntil(lambda: state_of(window, ep) == ServerState.AUTH_FAILED, timeout=20_000)
    row = window.controller.servers[ep]
    assert "authorized_clients" in row.error  # the client's advice
    model = window.servers_panel.model
    index = model.index(model.row_of(ep), 1)
    assert model.data(index) == "authentication failed"
    assert "authorized_clients" in model.data(index, role=3)  # the tooltip (ToolTipRole)
    screenshot(window, "keys-02-authentication-failed")

    # the right keys again, remembered in the settings for the next start
    add_through_the_dialog(qtbot, window, ep.key, keys)
    qtbot.waitUntil(lambda: state_of(window, ep) == ServerState.ALIVE, timeout=20_000)
    assert str(keys) in window.settings.value("servers/key_dirs")


def test_default_keys_from_the_command_line(
    qtbot, themed_app, gui_settings, secure_server, keys, tmp_path
):
    """What ``zmqruntime-gui --keys DIR`` builds: every server without keys of its own is
    reached with DIR, so the secured local server answers at once."""
    from zmqruntime_gui.main_window import MainWindow

    window = MainWindow(gui_settings, net.Connections(keys=keys))
    qtbot.addWidget(window)
    window.show()
    try:
        ep = Endpoint("127.0.0.1", secure_server.port)
        qtbot.waitUntil(lambda: state_of(window, ep) == ServerState.ALIVE, timeout=20_000)
        assert window.controller.key_dir(ep) == str(keys)
    finally:
        window.close()
    # and a bad --keys is refused before any window opens
    out = subprocess.run(
        [sys.executable, "-m", "zmqruntime_gui", "--keys", str(tmp_path), "--settings",
         str(tmp_path / "s.ini")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "--keys" in out.stderr and "client.key_secret" in out.stderr
