"""The window on a real X display, driven by the keyboard as a person drives it.

Under Xvfb (its own free display number), ``zmqruntime-gui`` runs as a process; xdotool
types the shortcuts: spawn a server through Ctrl+Shift+N and its dialog, run the bundled
demo from the File menu, cancel it with Ctrl+K and the confirmation, run it again, kill
the server with SIGKILL and see "connection lost", spawn it again and see the run
resolved. Every step leaves a screenshot in test-artifacts/xvfb/ (ImageMagick's
``import``); look at them when the window changes. Every process is ended by its pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from gui_support import ARTIFACTS

from zmqruntime import ExecutionClient, local
from zmqruntime.transport import free_port

XVFB, XDOTOOL, IMPORT = (shutil.which(n) for n in ("Xvfb", "xdotool", "import"))
pytestmark = pytest.mark.skipif(
    not (XVFB and XDOTOOL),
    reason="needs Xvfb and xdotool (.ci/system-deps installs them; on Debian/Ubuntu: "
    "apt-get install xvfb xdotool imagemagick)",
)
SHOTS = ARTIFACTS / "xvfb"
SCREEN = "1280x800x24"


class Display:
    """An Xvfb server on a display number it picks itself (-displayfd): never a clash."""

    def __init__(self) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [XVFB, "-displayfd", str(write), "-screen", "0", SCREEN, "-nolisten", "tcp"],
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        number = b""
        deadline = time.monotonic() + 20
        try:
            while not number.endswith(b"\n"):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Xvfb did not start")
                chunk = os.read(read, 16)
                if not chunk:
                    raise RuntimeError("Xvfb exited before naming its display")
                number += chunk
        finally:
            os.close(read)
        self.name = f":{number.decode().strip()}"
        self.env = {**os.environ, "DISPLAY": self.name, "QT_QPA_PLATFORM": "xcb"}

    def xdotool(self, *args: str) -> str:
        out = subprocess.run(
            [XDOTOOL, *args], env=self.env, capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip()

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> object:
    """Poll ``check`` until it returns something true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def display() -> Iterator[Display]:
    d = Display()
    yield d
    d.stop()


def gui_command() -> list[str]:
    exe = Path(sys.executable).with_name("zmqruntime-gui")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zmqruntime_gui"]


def test_spawn_demo_cancel_kill_and_spawn_again_on_a_real_display(display, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    port = free_port()
    log = open(tmp_path / "gui.log", "wb")  # noqa: SIM115 - closed in finally
    gui = subprocess.Popen(
        [*gui_command(), "--settings", str(tmp_path / "settings.ini"), "--port", str(port),
         "--demo-frames", "3000"],
        env=display.env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    shots: list[Path] = []

    def shot(name: str) -> None:
        if IMPORT is None:
            return  # no ImageMagick: the steps still run, without pictures
        path = SHOTS / f"{len(shots) + 1:02d}-{name}.png"
        subprocess.run([IMPORT, "-window", "root", str(path)], env=display.env, timeout=30)
        shots.append(path)

    def title() -> str:
        return display.xdotool("getwindowname", window)

    def keys(*combo: str) -> None:
        display.xdotool("windowfocus", "--sync", focus_target())
        for k in combo:
            display.xdotool("key", "--clearmodifiers", k)
            time.sleep(0.15)

    def windows() -> dict[str, str]:
        """Title -> id of the app's visible windows (found by pid: titles are not ASCII)."""
        ids = display.xdotool("search", "--onlyvisible", "--pid", str(gui.pid)).split()
        return {display.xdotool("getwindowname", w): w for w in ids}

    def find_window(prefix: str) -> str | None:
        return next((w for t, w in windows().items() if t.startswith(prefix)), None)

    def focus_target() -> str:
        # a modal dialog, if one is open, else the main window
        for name in ("Spawn a local server", "Cancel runs"):
            found = find_window(name)
            if found:
                return found
        return window

    def wait_dialog(name: str) -> str:
        return str(wait_for(f"the {name!r} dialog", lambda: find_window(name), 20))

    def runs() -> list[dict]:
        with ExecutionClient(port=port, auto_spawn=False, timeout=2) as client:
            return client.list_executions()

    def demo_running(count: int) -> dict | None:
        with contextlib.suppress(Exception):
            listed = runs()
            if len(listed) == count and listed[0]["state"] == "running":
                if (listed[0]["progress"] or 0) > 0:
                    return listed[0]
        return None

    def spawn_through_the_dialog() -> None:
        keys("ctrl+shift+n")
        wait_dialog("Spawn a local server")
        shot("spawn-dialog")
        keys("ctrl+a")
        display.xdotool("type", "--delay", "40", str(port))
        keys("Return")
        wait_for("the spawned server", lambda: local.find_server(port), 60)
        wait_for("the window to see it", lambda: "1 server up" in title(), 30)

    try:
        window = str(
            wait_for(
                "the main window",
                lambda: next((w for t, w in windows().items() if " up, " in t), None),
                60,
            )
        )
        wait_for("the first summary", lambda: "0 servers up" in title(), 30)
        shot("start")

        # -- spawn a local server: Ctrl+Shift+N, type the port, Enter
        spawn_through_the_dialog()
        shot("server-alive")

        # -- the bundled demo from the File menu (Alt+F, D), live on that server
        keys("alt+f", "d")
        first = wait_for("the demo to run", lambda: demo_running(1), 60)
        assert first["name"] == "demo-acquisition"
        wait_for("the window to show it running", lambda: "1 running" in title(), 20)
        time.sleep(1.5)  # a few frames on screen
        shot("demo-running")

        # -- Ctrl+K asks first; the answer (Alt+C: "Cancel the run") cancels it
        keys("ctrl+k")
        wait_dialog("Cancel runs")
        shot("cancel-confirmation")
        keys("alt+c")
        wait_for(
            "the demo to be cancelled",
            lambda: runs()[0]["state"] == "cancelled",
            30,
        )
        wait_for("the window to show it", lambda: "0 running" in title(), 20)
        shot("demo-cancelled")

        # -- again, then the server is killed (SIGKILL, with its workers)
        keys("alt+f", "d")
        second = wait_for("the second demo to run", lambda: demo_running(2), 60)
        wait_for("the window to show it running", lambda: "1 running" in title(), 20)
        entry = local.find_server(port)
        server = psutil.Process(entry.pid)
        tree = [server, *server.children(recursive=True)]
        for proc in tree:
            proc.kill()
        psutil.wait_procs(tree, timeout=10)
        wait_for("connection lost", lambda: "1 connection lost" in title(), 30)
        assert "running" in title() and "1 running" not in title()
        time.sleep(0.5)
        shot("connection-lost")

        # -- spawn it again (same port, same store): the run is resolved, not running
        spawn_through_the_dialog()
        wait_for("the run resolved", lambda: "connection lost" not in title(), 30)
        final = {r["id"]: r for r in runs()}
        assert final[second["id"]]["state"] == "failed"  # interrupted by the kill
        assert final[first["id"]]["state"] == "cancelled"
        time.sleep(1.0)
        shot("spawned-again")
    except BaseException:
        shot("failure")
        raise
    finally:
        stop_process(gui)
        log.close()
        entry = local.find_server(port)
        if entry is not None:
            local.kill_server(entry)
        output = (tmp_path / "gui.log").read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    assert gui.returncode in (0, -15), output[-3000:]
    if IMPORT is not None:
        assert len(shots) == 9 and all(p.stat().st_size > 10_000 for p in shots), shots
