"""The live plot of a per-frame number while an acquisition run goes, through the real window.

A real server runs the bundled ``acquisition_folder`` example on a temporary folder that
``zmqruntime simulate-acquisition`` (its own process) fills at a camera's pace; the
window follows the run as it does after a submit. A person opens the results plot from
the Results toolbar, picks what to plot with the keyboard, and watches the curve grow
while the writer is still writing (so the run cannot have ended: it ends on the done
marker the writer leaves last). The plotted points are checked against the rows the run
stored, and the redraws against the throttle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from gui_support import click, screenshot, toolbar_button
from PySide6 import QtWidgets

from zmqruntime import ExecutionClient, resources
from zmqruntime_gui.live_plot import REDRAW_INTERVAL_S
from zmqruntime_gui.model import Endpoint, RunKey, ServerState

FPS = 3
N_FRAMES = 20  # the committed time-lapse's 10 frames, played twice: about 7 s of acquisition
SCREENSHOTS = Path("/tmp")


def follow_config(folder: Path) -> tuple[str, str]:
    """The example's pipeline and its config, pointed at ``folder``."""
    pipeline, config = resources.example("acquisition_folder")
    assert config is not None and 'folder = "acquisition"' in config
    config = config.replace('folder = "acquisition"', f"folder = {str(folder)!r}")
    return pipeline, config


def plotted(plot) -> tuple[list[float], list[float]]:
    """The points the plot widget draws now (not what it would compute)."""
    xs, ys = plot.curve.getData()
    if xs is None or ys is None:
        return [], []
    return [float(x) for x in xs], [float(y) for y in ys]


def pick(qtbot, combo: QtWidgets.QComboBox, text: str) -> None:
    """Choose ``text`` in a combo box with the keyboard, as a person typing its name."""
    combo.setFocus()
    QtWidgets.QApplication.processEvents()
    qtbot.keyClicks(combo, text)
    assert combo.currentText() == text, (combo.currentText(), text)
    time.sleep(QtWidgets.QApplication.keyboardInputInterval() / 1000 + 0.05)  # new search


def test_live_plot_grows_while_the_acquisition_runs(
    qtbot, window, make_server, example_data: Path, tmp_path: Path
) -> None:
    server = make_server("live", workers=1)
    ep = Endpoint("127.0.0.1", server.port)
    window.controller.watch(ep)
    qtbot.waitUntil(
        lambda: (
            (row := window.controller.servers.get(ep)) is not None
            and row.state == ServerState.ALIVE
        ),
        timeout=30_000,
    )
    folder = tmp_path / "scope"
    folder.mkdir()
    pipeline, config = follow_config(folder)
    before = set(window.controller.runs.rows)
    window.controller.submit_run(ep, pipeline, config, name="follow scope")
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    assert isinstance(key, RunKey)
    qtbot.waitUntil(lambda: window.controller.box is not None, timeout=5000)
    assert window.controller.box.key == key  # the window follows what it submitted
    # the run is following the folder (its log says so) before the writer starts
    qtbot.waitUntil(lambda: "following " in window.logs_panel.plain_text(), timeout=60_000)

    timelapse = next((example_data / "cell_migration_timelapse").glob("*.tif"))
    pages = tifffile.imread(timelapse)
    # a first frame, renamed into the folder as a camera would: its row shows the plot
    # can be opened, and the run has imported what it needs before the timed acquisition
    tifffile.imwrite(folder / ".first.tif.part", pages[0])
    (folder / ".first.tif.part").rename(folder / "first.tif")
    results = window.results_panel
    window.results_dock.raise_()
    qtbot.waitUntil(lambda: results.act_plot.isEnabled(), timeout=60_000)  # Plot... offered
    button = toolbar_button(results.toolbar, results.act_plot)
    if button.isVisible():
        click(qtbot, button)
    else:  # the toolbar has no room for it: it is in the » menu, which triggers it
        results.act_plot.trigger()
    (plot,) = results.plots
    qtbot.waitExposed(plot)
    assert plot.y.currentText() == "nuclei"  # the first per-frame number, not an index
    # the person plots the mean intensity against the frame number, by keyboard
    pick(qtbot, plot.x, "frame")
    pick(qtbot, plot.y, "mean_intensity")
    assert plot.plot.getPlotItem().getAxis("left").labelText == "mean_intensity"
    assert plotted(plot) == ([0.0], [float(pages[0].mean())])

    source = tmp_path / "source"
    source.mkdir()
    for i in range(N_FRAMES):
        tifffile.imwrite(source / f"t{i:03d}.tif", pages[i % len(pages)])
    writer = subprocess.Popen(
        [
            sys.executable, "-m", "zmqruntime", "simulate-acquisition", str(folder),
            "--from", str(source), "--fps", str(FPS), "--quiet",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # sampled while the done marker is absent: the run cannot have ended then
        marker = folder / "acquisition_done"
        seen: list[tuple[list[float], list[float]]] = []
        switched = False
        redraws, started = plot.redraws, time.monotonic()
        while not marker.exists():
            xs, ys = plotted(plot)
            if not seen or len(xs) != len(seen[-1][0]):
                seen.append((xs, ys))
            if not switched and len(xs) >= 4:
                screenshot(plot, "live-plot-dialog")
                shutil.copy(screenshot(window, "live-plot-window"), SCREENSHOTS)
                pick(qtbot, plot.y, "nuclei")  # and back to the nuclei count, mid-run
                switched = True
                seen.append(plotted(plot))
            qtbot.wait(20)
            assert writer.poll() is None or marker.exists(), "the writer failed"
        sizes = [len(xs) for xs, _ in seen]
        redrawn = plot.redraws - redraws
        elapsed = time.monotonic() - started
        print(f"points plotted while the acquisition went on: {sizes}; {redrawn} redraws in "
              f"{elapsed:.1f} s")  # fmt: skip
        # redraws are throttled (one pick by the person redraws at once)
        assert redrawn <= elapsed / REDRAW_INTERVAL_S + 3, (redrawn, elapsed)
        assert plot.count.text().startswith(f"{len(plotted(plot)[0])} points")
        growing = sorted({n for n in sizes if n > 0})
        assert len(growing) >= 3, f"the plot did not grow while the run went: {sizes}"
        assert writer.wait(30) == 0

        rows = window.controller.runs.rows
        qtbot.waitUntil(lambda: rows[key].state == "completed", timeout=60_000)
        with ExecutionClient(port=ep.port, auto_spawn=False) as client:
            frames = client.get_results(key.exec_id)["frames"]
        assert [r["frame"] for r in frames] == list(range(N_FRAMES + 1))
        assert [r["file"] for r in frames[:2]] == ["first.tif", "t000.tif"]
        qtbot.waitUntil(lambda: len(plotted(plot)[0]) == N_FRAMES + 1, timeout=10_000)
        xs, ys = plotted(plot)
        assert xs == [float(r["frame"]) for r in frames]
        assert ys == [float(r["nuclei"]) for r in frames]
        # what was drawn during the run was each time the start of what the run stored
        for (sx, sy), label in zip(seen, ["mean_intensity"] * len(seen)):
            n = len(sx)
            assert sx == xs[:n]
            candidates = (
                [float(r["nuclei"]) for r in frames[:n]],
                [float(r["mean_intensity"]) for r in frames[:n]],
            )
            assert sy in candidates, (label, sy)
        assert np.isfinite(ys).all()
        screenshot(plot, "live-plot-dialog-done")
        window.resize(1024, 700)
        plot.move(window.geometry().center() - plot.rect().center())
        qtbot.wait(200)
        shutil.copy(screenshot(window, "live-plot-window-1024x700"), SCREENSHOTS)
        shutil.copy(screenshot(plot, "live-plot-dialog-done"), SCREENSHOTS)
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(10)


#: a run that stores a per-frame row 100 times a second: faster than the plot redraws
FAST_ROWS = """
import time

def run(ctx, config):
    for i in range(config.n):
        ctx.emit("frames", {"frame": i, "nuclei": i % 7})
        time.sleep(0.01)
"""


def test_live_plot_redraws_are_throttled_while_rows_pour_in(qtbot, window, make_server) -> None:
    n = 400
    server = make_server("fast", workers=1)
    ep = Endpoint("127.0.0.1", server.port)
    window.controller.watch(ep)
    qtbot.waitUntil(
        lambda: (
            (row := window.controller.servers.get(ep)) is not None
            and row.state == ServerState.ALIVE
        ),
        timeout=30_000,
    )
    before = set(window.controller.runs.rows)
    window.controller.submit_run(ep, FAST_ROWS, None, config={"n": n}, name="fast rows")
    qtbot.waitUntil(lambda: bool(set(window.controller.runs.rows) - before), timeout=20_000)
    (key,) = set(window.controller.runs.rows) - before
    results = window.results_panel
    window.results_dock.raise_()
    qtbot.waitUntil(lambda: results.act_plot.isEnabled(), timeout=30_000)
    results.act_plot.trigger()  # as the Runs menu does
    (plot,) = results.plots
    changes = []
    results.sigTableChanged.connect(lambda: changes.append(len(results.model.rows)))
    redraws, started = plot.redraws, time.monotonic()
    rows = window.controller.runs.rows
    qtbot.waitUntil(lambda: rows[key].state == "completed", timeout=60_000)
    qtbot.waitUntil(lambda: len(plotted(plot)[0]) == n, timeout=10_000)
    elapsed = time.monotonic() - started
    redrawn = plot.redraws - redraws
    print(f"{len(changes)} table changes, {redrawn} redraws in {elapsed:.1f} s")
    assert redrawn <= elapsed / REDRAW_INTERVAL_S + 2, (redrawn, elapsed)
    assert redrawn < len(changes), (redrawn, len(changes))  # the throttle took effect
    xs, ys = plotted(plot)
    assert xs == [float(i) for i in range(n)] and ys == [float(i % 7) for i in range(n)]
    # the table holds every row once, read incrementally (not rebuilt per result)
    assert [r["frame"] for r in results.model.rows] == list(range(n))
