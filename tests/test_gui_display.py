"""When Qt cannot open a window, the app says what to install (the README says it too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from zmqruntime_gui import display

REPO = Path(__file__).resolve().parents[1]


def test_a_plugin_that_does_not_load_gets_the_apt_line(tmp_path, monkeypatch):
    broken = tmp_path / "libqxcb.so"
    broken.write_bytes(b"not a shared library")  # fails to load, as with a library missing
    monkeypatch.setattr(display, "xcb_plugin", lambda: broken)
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    advice = display.check_xcb()
    assert advice is not None and str(broken) in advice
    assert display.APT_LINE in advice and "libxcb-cursor0" in advice


def test_the_real_plugin_loads_here_or_is_explained(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    plugin = display.xcb_plugin()
    assert plugin is not None  # PySide6 ships it
    problem = display.load_problem(plugin)
    assert problem is None or display.check_xcb() == display.advice(problem)


def test_which_platform_qt_picks():
    assert display.uses_xcb({"QT_QPA_PLATFORM": "xcb"})
    assert not display.uses_xcb({"QT_QPA_PLATFORM": "offscreen", "DISPLAY": ":0"})
    assert display.uses_xcb({"DISPLAY": ":0"})
    assert not display.uses_xcb({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"})
    assert not display.uses_xcb({})


def test_no_display_prints_what_to_do(tmp_path):
    """Qt's own failure (here: no X server at DISPLAY) comes with the advice, once."""
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "DISPLAY": ":4242", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "zmqruntime_gui", "--settings", str(tmp_path / "s.ini"),
         "--quit-after", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "could not connect to display :4242" in proc.stderr
    assert proc.stderr.count(display.APT_LINE) == 1, proc.stderr


def test_readme_and_ci_install_the_same_libraries():
    readme = (REPO / "README.md").read_text()
    assert display.APT_LINE in readme
    system_deps = (REPO / ".ci" / "system-deps").read_text()
    assert all(package in system_deps for package in display.XCB_PACKAGES)
