"""zmqruntime in a real napari: a run's results as layers, the "zmqruntime live" dock
widget streaming previews while the viewer stays responsive, the npe2 plugin.

napari is the optional extra ``zmqruntime[napari]``, part of the test extra; without it (an
environment installed before it was) these tests skip.
Tests that draw (``make_napari_viewer``) need OpenGL, which Qt's offscreen platform lacks:
they run under a display (``QT_QPA_PLATFORM=xcb xvfb-run python -m pytest ...``) and skip
offscreen; the others use napari's Qt-free ``ViewerModel`` and run everywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ServerProcess, start_server

napari = pytest.importorskip(
    "napari", reason="napari is not installed (pip install 'zmqruntime[napari]')"
)

from napari.components import ViewerModel  # noqa: E402
from test_napari import LIVE, PIPELINE, check_specs  # noqa: E402

from zmqruntime_napari import add_layers, open_in_napari  # noqa: E402
from zmqruntime_napari.layers import run_layers  # noqa: E402
from zmqruntime_napari.widget import LiveWidget  # noqa: E402

DRAWS = os.environ.get("QT_QPA_PLATFORM") != "offscreen"
needs_display = pytest.mark.skipif(
    not DRAWS,
    reason="napari's canvas needs OpenGL, which QT_QPA_PLATFORM=offscreen lacks: "
    "run under Xvfb with QT_QPA_PLATFORM=xcb",
)


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("napari-viewer") / "server", workers=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_id(viewer_server) -> str:
    client = viewer_server.client()
    exec_id = client.execute(PIPELINE)
    assert client.wait(exec_id, timeout=60)["state"] == "completed"
    return exec_id


def check_layers(viewer) -> None:
    layers = {layer.name: layer for layer in viewer.layers}
    assert sorted(layers) == ["cells DAPI", "cells GFP", "masks", "volume"]
    dapi, gfp = layers["cells DAPI"], layers["cells GFP"]
    assert type(dapi).__name__ == "Image" and dapi.data.shape == (3, 24, 32)
    assert list(dapi.scale) == [1.0, 0.5, 0.25]
    assert dapi.colormap.name == "blue" and dapi.blending == "additive"
    assert np.allclose(gfp.colormap.colors[-1][:3], [0x12 / 255, 0xAB / 255, 0x34 / 255])
    masks = layers["masks"]
    assert type(masks).__name__ == "Labels" and list(masks.scale) == [0.5, 0.25]
    volume = layers["volume"]
    assert list(volume.scale) == [2.0, 1.0, 1.0]
    if hasattr(volume, "units"):  # napari >= 0.6
        assert [str(u) for u in volume.units] == ["nanometer"] * 3
    assert dapi.metadata["zmqruntime"]["indices"] == [0, 1, 2]


def test_open_in_napari_gives_layers_with_scale_channels_and_labels(viewer_server, run_id):
    viewer = ViewerModel()
    client = viewer_server.client()
    assert open_in_napari(run_id, client=client, viewer=viewer) is viewer
    check_layers(viewer)
    check_specs(run_layers(client, run_id))


def test_the_reader_through_napari(viewer_server, run_id, tmp_path):
    from zmqruntime_napari.reader import read

    viewer_server.client().get_results(run_id, directory=tmp_path, format="ome-zarr")
    viewer = ViewerModel()
    add_layers(viewer, read(str(tmp_path)))
    check_layers(viewer)


def test_the_plugin_is_registered_with_npe2():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert "zmqruntime" in pm._manifests, "the napari.manifest entry point is not installed"
    widgets = [w.display_name for w in pm.get_manifest("zmqruntime").contributions.widgets]
    assert widgets == ["zmqruntime live"]


def follow_live(qtbot, viewer, server: ServerProcess) -> dict:
    """Start LIVE, follow it with the dock widget; measure a 10 ms timer's lateness."""
    from qtpy import QtCore

    widget = LiveWidget(viewer, address=f"127.0.0.1:{server.port}")
    qtbot.addWidget(widget)
    client = server.client()
    exec_id = client.execute(LIVE)
    lateness: list[float] = []
    last = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        lateness.append(max(0.0, now - last[0] - 0.010))
        last[0] = now

    timer = QtCore.QTimer()
    timer.setTimerType(QtCore.Qt.PreciseTimer)
    timer.setInterval(10)
    timer.timeout.connect(beat)
    try:
        widget.start()
        qtbot.waitUntil(
            lambda: "live camera" in [layer.name for layer in viewer.layers], timeout=30_000
        )
        layer = viewer.layers["live camera"]
        first = int(layer.data[0, 0])
        last[0] = time.perf_counter()
        timer.start()
        qtbot.waitUntil(lambda: widget.shown >= 30, timeout=30_000)
        timer.stop()
        assert int(layer.data[0, 0]) > first  # newer frames replaced the data
        assert list(layer.scale) == [0.65, 0.65]
        assert widget.follower is not None and widget.follower.exec_id == exec_id
        assert widget.run_id.text() == exec_id
    finally:
        timer.stop()
        client.cancel(exec_id)
    qtbot.waitUntil(lambda: widget.follower is None, timeout=30_000)  # ends with the run
    assert "cancelled" in widget.status.text()
    lateness.sort()
    return {"p99_ms": 1000 * lateness[int(0.99 * (len(lateness) - 1))], "beats": len(lateness)}


def stays_responsive(follow, tries: int = 3) -> list[dict]:
    """Follow a live run until one whole follow keeps the timer's p99 lateness under 50 ms.

    A viewer that blocks on frames is late in every try; a single try can also be late
    because another process took the machine's cores for a moment, which is not napari's
    fault, so it gets up to ``tries`` runs. Returns every try's figures."""
    tries_seen: list[dict] = []
    for _ in range(tries):
        tries_seen.append(follow())
        if tries_seen[-1]["p99_ms"] < 50:
            break
    return tries_seen


def test_the_dock_widget_streams_previews_into_a_layer(qtbot, viewer_server):
    tries = stays_responsive(lambda: follow_live(qtbot, ViewerModel(), viewer_server))
    assert tries[-1]["p99_ms"] < 50, tries


@needs_display
def test_in_a_real_viewer_the_widget_streams_and_napari_stays_responsive(
    make_napari_viewer, qtbot, viewer_server, run_id
):
    viewer = make_napari_viewer()
    open_in_napari(run_id, client=viewer_server.client(), viewer=viewer)
    check_layers(viewer)
    viewer.layers.clear()
    tries = stays_responsive(lambda: follow_live(qtbot, viewer, viewer_server))
    late = ", ".join(f"{t['p99_ms']:.1f}" for t in tries)
    print(f"\n10 ms timer lateness while streaming: p99 {late} ms")
    assert tries[-1]["p99_ms"] < 50, tries


def test_the_windows_open_in_napari_gives_the_same_layers(
    make_window, qtbot, viewer_server, run_id, request
):
    """Runs > Open the run's images in napari (Ctrl+Shift+O) in the desktop window: the
    run's results as layers, through zmqruntime_napari. Offscreen, napari's Qt-free
    ViewerModel stands in for the window (napari.Viewer needs OpenGL); under a display the
    real napari.Viewer (make_napari_viewer) is opened."""
    from gui_support import press
    from test_gui_actions import watch_server

    from zmqruntime_gui.model import RunKey

    window = make_window()
    ep = watch_server(qtbot, window, viewer_server.port)
    key = RunKey(ep.key, run_id)
    window.controller.follow(key)
    results = window.results_panel
    qtbot.waitUntil(lambda: results.key == key and results.act_napari.isEnabled(), timeout=10_000)
    opened = []
    results.napari.sigOpened.connect(opened.append)
    said: list[str] = []
    results.sigStatus.connect(said.append)
    if DRAWS:
        results.napari.viewer_factory = request.getfixturevalue("make_napari_viewer")
    else:
        results.napari.viewer_factory = ViewerModel
    press(qtbot, window, "Ctrl+Shift+O")
    qtbot.waitUntil(lambda: bool(opened), timeout=20_000)
    (viewer,) = opened
    assert viewer.title == f"zmqruntime run {run_id}"
    check_layers(viewer)
    assert f"{run_id} opened in napari (4 layers)" in said
    if DRAWS:  # File > Quit closes the viewers this window opened (they share its process)
        press(qtbot, window, "Ctrl+Q")
        import napari

        open_viewers = napari.Viewer._instances  # napari's own registry of open viewers
        qtbot.waitUntil(lambda: all(r() is not viewer for r in open_viewers), timeout=10_000)


@pytest.mark.skipif(DRAWS, reason="this run has a display: the drawing tests ran themselves")
@pytest.mark.timeout(300)
def test_the_drawing_tests_pass_in_a_real_napari_under_xvfb():
    """Offscreen (the suite's default) napari cannot draw, so the tests that open a real
    napari.Viewer run here in a pytest of their own on an Xvfb display; they must run
    (not skip) and pass."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("Xvfb"):
        pytest.skip("needs Xvfb (.ci/system-deps installs it; Debian/Ubuntu: xvfb)")
    from test_gui_xvfb import Display

    display = Display()
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                __file__,
                "-k",
                "real_viewer or windows_open",
            ],
            env=display.env,
            capture_output=True,
            text=True,
            timeout=280,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    finally:
        display.stop()
    print(out.stdout[-1500:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
