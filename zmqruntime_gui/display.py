"""Whether Qt can open a window here, and what to install when it cannot.

On a stock Debian/Ubuntu desktop or server, PySide6's xcb platform plugin fails to load
for want of a few system libraries, and Qt then aborts with "Could not load the Qt
platform plugin xcb" and no hint of the fix. The app checks first and prints the one
``apt-get install`` line that fixes it (the README gives the same line).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: the system libraries PySide6's xcb platform plugin loads (Debian/Ubuntu package names)
XCB_PACKAGES = (
    "libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 "
    "libxcb-shape0 libxcb-randr0 libxcb-xkb1 libxkbcommon-x11-0 libegl1 libgl1 "
    "libfontconfig1 libdbus-1-3"
).split()
APT_LINE = "sudo apt-get install -y " + " ".join(XCB_PACKAGES)


def advice(reason: str) -> str:
    """What to tell the user when Qt cannot open a window on the X display."""
    return (
        f"zmqruntime-gui: Qt cannot open a window on this display (xcb): {reason}\n"
        "On Debian/Ubuntu, install the libraries Qt's xcb plugin needs:\n"
        f"    {APT_LINE}\n"
        "Without a display (a server, CI), run it under xvfb-run, or set "
        "QT_QPA_PLATFORM=offscreen."
    )


def uses_xcb(env: Mapping[str, str] | None = None) -> bool:
    """Whether Qt will pick its xcb (X11) plugin in this environment."""
    if env is None:
        env = os.environ
    if not sys.platform.startswith("linux"):
        return False
    platform = env.get("QT_QPA_PLATFORM", "")
    if platform:
        return platform.split(":")[0] == "xcb"
    wayland = env.get("WAYLAND_DISPLAY") or env.get("XDG_SESSION_TYPE") == "wayland"
    return bool(env.get("DISPLAY")) and not wayland


def xcb_plugin() -> Path | None:
    try:
        import PySide6
    except ImportError:
        return None
    path = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    return path if path.exists() else None


def load_problem(plugin: Path) -> str | None:
    """Why ``plugin`` cannot be loaded (usually a missing library), or None if it loads."""
    try:
        ctypes.CDLL(str(plugin))
    except OSError as exc:
        return str(exc)
    return None


def check_xcb() -> str | None:
    """The advice to print when Qt would fail to load its xcb plugin here, else None."""
    if not uses_xcb():
        return None
    plugin = xcb_plugin()
    problem = load_problem(plugin) if plugin is not None else None
    return advice(problem) if problem else None


_messages: list[str] = []  # Qt's messages so far (start-up only)


def on_qt_message(mode, context, message: str) -> None:
    """Qt's messages during start-up, passed through; when the platform plugin fails (no
    display, or a library missing), the advice follows, once, with the first reason."""
    sys.stderr.write(message + "\n")
    first_failure = "platform plugin" in message and not any(
        "platform plugin" in m for m in _messages
    )
    _messages.append(message)
    if first_failure and uses_xcb():
        display = [m for m in _messages if "could not connect to display" in m]
        sys.stderr.write(advice((display or [message])[0].splitlines()[0]) + "\n")
    sys.stderr.flush()
