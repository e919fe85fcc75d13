"""``zmqruntime-gui``: build the QApplication, open the window, maybe start the demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zmqruntime import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zmqruntime-gui",
        description="Desktop monitor and launcher for zmqruntime: servers, runs, live preview.",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="spawn a local server if none answers and start the acquisition example "
        "with its live preview",
    )
    p.add_argument(
        "--demo-frames",
        type=int,
        default=None,
        help="frames the demo acquires (default 600, 30 s at 20 fps)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=5555,
        help="the local port of the demo's server, spawned there if nothing answers "
        "(default: 5555)",
    )
    p.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="the CURVE key directory for servers that have none of their own "
        "(see 'zmqruntime keys generate'); a server's own one is set in Add remote",
    )
    p.add_argument(
        "--settings",
        type=Path,
        help="an INI file to keep the window's settings in (default: the user's settings)",
    )
    p.add_argument(
        "--screenshot",
        type=Path,
        help="save a PNG of the window just before quitting (with --quit-after)",
    )
    p.add_argument(
        "--quit-after",
        type=float,
        metavar="SECONDS",
        help="close the window after this many seconds (for smoke tests and screenshots)",
    )
    p.add_argument("--version", action="version", version=f"zmqruntime-gui {__version__}")
    return p


def make_app(argv: list[str] | None = None):
    """The QApplication with the app's names and theme (one per process)."""
    from PySide6 import QtWidgets

    app = QtWidgets.QApplication.instance()
    if app is None:
        app = QtWidgets.QApplication([sys.argv[0], *(argv or [])])
    apply_theme(app)
    return app


def apply_theme(app) -> None:
    """Names, Fusion style, the dark palette and the stylesheet from resources/gui."""
    import pyqtgraph as pg
    from PySide6 import QtGui

    from .main_window import APPLICATION, ORGANIZATION
    from .widgets import AppStyle, guard_none_refcount, icon, stylesheet

    guard_none_refcount()
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("zmqruntime")
    app.setApplicationVersion(__version__)
    app.setStyle(AppStyle("Fusion"))
    app.setWindowIcon(icon("app"))
    palette = QtGui.QPalette()
    for role, colour in (
        (QtGui.QPalette.ColorRole.Window, "#262930"),
        (QtGui.QPalette.ColorRole.WindowText, "#e6e6e6"),
        (QtGui.QPalette.ColorRole.Base, "#1f2126"),
        (QtGui.QPalette.ColorRole.AlternateBase, "#24272d"),
        (QtGui.QPalette.ColorRole.Text, "#e6e6e6"),
        (QtGui.QPalette.ColorRole.Button, "#31353d"),
        (QtGui.QPalette.ColorRole.ButtonText, "#e6e6e6"),
        (QtGui.QPalette.ColorRole.Highlight, "#3d6fa8"),
        (QtGui.QPalette.ColorRole.HighlightedText, "#ffffff"),
        (QtGui.QPalette.ColorRole.ToolTipBase, "#31353d"),
        (QtGui.QPalette.ColorRole.ToolTipText, "#e6e6e6"),
        (QtGui.QPalette.ColorRole.PlaceholderText, "#7f848e"),
    ):
        palette.setColor(role, QtGui.QColor(colour))
    app.setPalette(palette)
    app.setStyleSheet(stylesheet())
    pg.setConfigOptions(antialias=False)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.settings:
        os.environ["ZMQRUNTIME_GUI_SETTINGS"] = str(args.settings)
    try:
        import pyqtgraph  # noqa: F401
        from PySide6 import QtCore
    except ImportError as exc:  # a headless install (requirements-headless.txt)
        raise SystemExit(
            f"zmqruntime-gui: {exc.name} is not installed (a headless install?); "
            "`pip install .` installs the desktop app with the rest"
        ) from None

    from . import display

    problem = display.check_xcb()
    if problem:  # Qt would abort with a message that does not say what to install
        sys.exit(problem)
    previous = QtCore.qInstallMessageHandler(display.on_qt_message)
    app = make_app([])
    QtCore.qInstallMessageHandler(previous)
    from .main_window import DEMO_FRAMES, MainWindow

    connections = None
    if args.keys is not None:
        from . import net

        problem = net.check_key_dir(args.keys)
        if problem:
            sys.exit(f"zmqruntime-gui: --keys: {problem}")
        connections = net.Connections(keys=args.keys.expanduser())
    window = MainWindow(connections=connections)
    window.demo_port = args.port
    window.demo_frames = args.demo_frames or DEMO_FRAMES
    window.show()
    if args.demo:
        QtCore.QTimer.singleShot(0, window.start_demo)
    if args.quit_after is not None:

        def finish() -> None:
            if args.screenshot:
                window.grab().save(str(args.screenshot), "PNG")
            window.close()

        QtCore.QTimer.singleShot(int(args.quit_after * 1000), finish)
    sys.exit(app.exec())


if __name__ == "__main__":
    main()
