"""Multi-channel and stacked images in the window, from a real server: a composite with a
colour, a check box and levels per channel, a slider per z/t axis; 'Open in napari'.

Everything is used through its real signal: mouse clicks on the channel boxes, keys typed
into the level fields and on the slider, the results toolbar's buttons.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from gui_support import answer_message, answer_modal, click, press, screenshot, toolbar_button
from PySide6 import QtCore, QtWidgets

from zmqruntime_gui.channels import composite, layout_of, plane_of
from zmqruntime_gui.model import Endpoint
from zmqruntime_gui.napari_bridge import INSTALL

#: three channels: DAPI (blue) left half, GFP (green) top half, a mask (magenta) corner;
#: a 5-plane z stack whose plane z holds 100 * z; results: the channels, a 4-plane czyx
#: volume of them and labels; previews until cancelled
CHANNELS_PIPELINE = """
import time
import numpy as np

CHANNELS = [{"name": "DAPI", "color": "0000FF"}, {"name": "GFP", "color": "00FF00"},
            {"name": "mask", "color": "FF00FF"}]

def run(ctx, config):
    y, x = np.mgrid[0:96, 0:128]
    dapi = np.where(x < 64, 1000, 0).astype(np.uint16)
    gfp = np.where(y < 48, 2000, 0).astype(np.uint16)
    mask = np.where((x >= 96) & (y >= 72), 5, 0).astype(np.uint16)
    cells = np.stack([dapi, gfp, mask])
    zstack = np.stack([100 * z + x // 16 for z in range(5)]).astype(np.uint16)
    scale = {"y": 0.5, "x": 0.5}
    ctx.emit("cells", cells, axes="cyx", scale=scale, channels=CHANNELS)
    volume = np.stack([cells * (z + 1) for z in range(4)], axis=1)
    ctx.emit("volume", volume, axes="czyx", scale={"z": 2.0, **scale}, channels=CHANNELS)
    ctx.emit("nuclei", (x // 32 + 1).astype(np.uint16) * (y < 48), kind="labels", scale=scale)
    for i in range(100000):
        if ctx.cancelled:
            return i
        ctx.preview("cells", cells, axes="cyx", scale=scale, channels=CHANNELS)
        ctx.preview("stack", zstack, axes="zyx", scale={"z": 2.0, **scale})
        time.sleep(0.03)
"""


def test_layout_plane_and_composite_without_a_window():
    from zmqruntime.imagemeta import ImageMeta

    meta = ImageMeta.build((4, 2, 3, 5), axes="zcyx", channels=["a", {"name": "b", "color": "red"}])
    layout = layout_of((4, 2, 3, 5), meta)
    assert layout.channel == 1 and layout.sliders == (("z", 0),) and layout.plane == (2, 3)
    assert layout.names == ("a", "b") and layout.colours == ("FF00FF", "FF0000")
    array = np.arange(4 * 2 * 3 * 5).reshape(4, 2, 3, 5)
    np.testing.assert_array_equal(plane_of(array, layout, {"z": 3}), array[3])
    # axes in any order: the plane comes out (c, rows, cols)
    meta = ImageMeta.build((3, 5, 2), axes="yxc")
    yxc = layout_of((3, 5, 2), meta)
    np.testing.assert_array_equal(plane_of(array[0].transpose(1, 2, 0), yxc, {}), array[0])
    assert layout_of((10, 12), None) is not None and layout_of((10, 12), None).plain
    assert layout_of((10, 12, 3), None) is None  # RGB
    assert layout_of((7, 10, 12), None).sliders == (("z", 0),)  # a stack by default axes
    rgb = composite(
        [np.array([[0, 50, 100]]), np.array([[10, 10, 10]])],
        [(0, 100), (0, 10)], ["0000FF", "FF0000"], [True, True],
    )  # fmt: skip
    assert rgb.tolist() == [[[255, 0, 0], [255, 0, 128], [255, 0, 255]]]
    hidden = composite([np.array([[100]]), np.array([[10]])], [(0, 100), (0, 10)],
                       ["0000FF", "FF0000"], [False, True])  # fmt: skip
    assert hidden.tolist() == [[[255, 0, 0]]]
    # 8/16-bit channels go through tables: the same picture as the float arithmetic
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 4000, (64, 64), dtype=np.uint16) for _ in range(3)]
    setting = ([(100, 3000), (0, 4000), (500, 2500)], ["FF0000", "12AB34", "0000FF"])
    for gamma in (1.0, 0.5):
        by_table = composite(planes, *setting, [True, False, True], gamma)
        by_float = composite([p.astype(np.float32) for p in planes], *setting, [True, False, True],
                             gamma)  # fmt: skip
        assert np.abs(by_table.astype(int) - by_float).max() <= 1
        assert by_table.std() > 10  # a picture, not a constant


def colour_at(window, x: float, y: float) -> tuple[int, int, int]:
    """The colour on screen at image coordinates (x, y) of the preview (a grab)."""
    preview = window.preview
    scene = preview.view.mapViewToScene(QtCore.QPointF(x, y))
    point = preview.graphics.mapFromScene(scene)
    image = preview.graphics.grab().toImage()
    ratio = image.devicePixelRatio()
    c = image.pixelColor(int(point.x() * ratio), int(point.y() * ratio))
    return c.red(), c.green(), c.blue()


def shown(window, x: int, y: int) -> tuple[int, ...]:
    """The composite's drawn colour at full-resolution pixel (x, y)."""
    preview = window.preview
    step = preview._shown_step
    return tuple(int(v) for v in preview.image.image[y // step, x // step])


def type_into(qtbot, field: QtWidgets.QAbstractSpinBox, text: str) -> None:
    qtbot.mouseClick(field, QtCore.Qt.MouseButton.LeftButton)
    field.selectAll()
    qtbot.keyClicks(field, text)
    qtbot.keyClick(field, QtCore.Qt.Key.Key_Return)


def test_live_composite_channels_levels_and_z_slider_from_a_server(
    make_window, qtbot, server, tmp_path, monkeypatch
):
    from test_gui_actions import submit, wait_run_state, watch_server

    window = make_window()
    ep: Endpoint = watch_server(qtbot, window, server.port)
    key = submit(qtbot, window, ep, CHANNELS_PIPELINE, name="channels")
    wait_run_state(qtbot, window, key, {"running"})
    preview = window.preview
    qtbot.waitUntil(lambda: window.controller.box is not None and window.controller.box.key == key)
    qtbot.waitUntil(lambda: preview.channels.composite, timeout=20_000)
    assert preview.current_stream() == "cells"
    boxes = [preview.findChild(QtWidgets.QCheckBox, f"channel_{i}") for i in range(3)]
    assert [b.text() for b in boxes] == ["DAPI", "GFP", "mask"]
    assert all(b.isVisible() and b.isChecked() for b in boxes)
    assert not preview.hist.isVisible() and not preview.level_min.isEnabled()
    # the one Min/Max leave the toolbar (when it lays itself out again)
    qtbot.waitUntil(lambda: not preview.level_min.isVisible() and not preview.level_max.isVisible())
    # top left: DAPI + GFP = cyan; bottom left: DAPI = blue; top right: GFP; corner: mask
    qtbot.waitUntil(lambda: shown(window, 10, 10) == (0, 255, 255))
    assert shown(window, 10, 80) == (0, 0, 255)
    assert shown(window, 100, 10) == (0, 255, 0)
    assert shown(window, 120, 90) == (255, 0, 255)
    assert colour_at(window, 10.5, 10.5) == (0, 255, 255)  # what the screen shows
    assert colour_at(window, 120.5, 90.5) == (255, 0, 255)
    # the scale bar and the readout in micrometres, a value per channel
    assert preview.scale_bar.text == "10 µm"
    preview._mouse_moved(preview.view.mapViewToScene(QtCore.QPointF(10.5, 80.5)))
    text = preview.cursor_label.text()
    assert "(5.25 µm, 40.25 µm)" in text
    assert "DAPI</span> <b>1000</b>" in text and "GFP</span> <b>0</b>" in text
    screenshot(window, "channels-composite")
    window.grab().save("/tmp/gui-channels-composite.png")

    # GFP off (a click on its box): the top left is DAPI's blue alone
    click(qtbot, boxes[1])
    assert not boxes[1].isChecked()
    qtbot.waitUntil(lambda: shown(window, 10, 10) == (0, 0, 255))
    assert shown(window, 100, 10) == (0, 0, 0)
    click(qtbot, boxes[1])
    qtbot.waitUntil(lambda: shown(window, 100, 10) == (0, 255, 0))

    # GFP's Max typed: 2000 of 4000 is half green; typing turns Continuous off
    assert preview.continuous.isChecked()
    high = preview.findChild(QtWidgets.QDoubleSpinBox, "channel_1_max")
    type_into(qtbot, high, "4000")
    assert not preview.continuous.isChecked()
    assert preview.channels.levels[1] == (0.0, 4000.0)
    qtbot.waitUntil(lambda: shown(window, 100, 10) == (0, 128, 0))
    # Ctrl+L: each channel's levels from its own values again
    preview.act_autolevel.trigger()
    assert preview.channels.levels[1][1] == pytest.approx(2000)
    qtbot.waitUntil(lambda: shown(window, 100, 10) == (0, 255, 0))

    # a composite snapshot is an OME-TIFF of the whole frame, with its channel names
    import tifffile

    path = preview.snapshot_tiff(tmp_path / "cells.ome.tif")
    with tifffile.TiffFile(path) as tif:
        assert tif.asarray().shape == (3, 96, 128)
        assert 'Name="GFP"' in tif.ome_metadata and 'PhysicalSizeX="0.5"' in tif.ome_metadata

    click(qtbot, preview.continuous)  # levels follow the planes again
    assert preview.continuous.isChecked()

    # the z stack: the stream box by keyboard, then the slider by keys
    combo = preview.stream_combo
    combo.setFocus()
    qtbot.keyClick(combo, QtCore.Qt.Key.Key_Down)
    assert preview.current_stream() == "stack"
    qtbot.waitUntil(lambda: "z" in preview.channels.sliders, timeout=10_000)
    assert not preview.channels.composite and preview.hist.isVisible()
    qtbot.waitUntil(lambda: preview.level_min.isVisible() and preview.level_min.isEnabled())
    assert preview.findChild(QtWidgets.QCheckBox, "channel_0") is None
    slider = preview.findChild(QtWidgets.QSlider, "plane_z")
    assert slider.isVisible() and slider.maximum() == 4
    qtbot.waitUntil(lambda: preview.image.image is not None and preview.image.image.ndim == 2)
    assert int(preview.image.image.min()) == 0  # plane 0: 0 + x // 16
    slider.setFocus()
    qtbot.keyClick(slider, QtCore.Qt.Key.Key_Right)
    qtbot.keyClick(slider, QtCore.Qt.Key.Key_Right)
    assert preview.channels.index["z"] == 2
    assert preview.findChild(QtWidgets.QLabel, "plane_z_label").text() == "3 / 5"
    qtbot.waitUntil(lambda: int(preview.image.image.min()) == 200)
    preview._mouse_moved(preview.view.mapViewToScene(QtCore.QPointF(40.5, 3.5)))
    assert "value <b>202</b>" in preview.cursor_label.text()
    screenshot(window, "channels-zstack")
    window.resize(1024, 700)
    qtbot.wait(300)
    window.grab().save("/tmp/gui-channels-zstack-1024.png")
    combo.setFocus()
    qtbot.keyClick(combo, QtCore.Qt.Key.Key_Up)
    qtbot.waitUntil(lambda: preview.channels.composite, timeout=10_000)
    qtbot.wait(300)
    window.grab().save("/tmp/gui-channels-composite-1024.png")

    # results: the czyx volume as a composite with a z slider; labels too
    results = window.results_panel
    window.results_dock.raise_()
    try:
        qtbot.waitUntil(lambda: len(results.summaries) >= 3, timeout=10_000)
    except Exception:
        raise AssertionError(f"{results.label.text()} {results.key} {key}") from None
    assert results.summary_of(1)["meta"]["axes"] == "czyx"
    results.select_index(1)
    click(qtbot, toolbar_button(results.toolbar, results.act_show)) if toolbar_button(
        results.toolbar, results.act_show
    ).isVisible() else results.act_show.trigger()
    qtbot.waitUntil(lambda: preview.static is not None, timeout=10_000)
    assert preview.static.shape == (3, 4, 96, 128) and preview.channels.composite
    boxes = [preview.findChild(QtWidgets.QCheckBox, f"channel_{i}") for i in range(3)]
    assert all(b.isVisible() and b.isChecked() for b in boxes)
    assert len(preview.findChildren(QtWidgets.QCheckBox, "channel_0")) == 1  # the old ones gone
    slider = preview.findChild(QtWidgets.QSlider, "plane_z")
    assert slider.maximum() == 3
    qtbot.waitUntil(lambda: shown(window, 10, 80) == (0, 0, 255))
    slider.setFocus()
    qtbot.keyClick(slider, QtCore.Qt.Key.Key_End)
    assert preview.channels.index["z"] == 3
    assert preview.channels.levels[0] == pytest.approx((0, 4000))  # continuous: this plane's
    preview._mouse_moved(preview.view.mapViewToScene(QtCore.QPointF(10.5, 80.5)))
    assert "DAPI</span> <b>4000</b>" in preview.cursor_label.text()  # plane 4 of 4: 1000 * 4
    assert "µm" in preview.cursor_label.text()
    window.grab().save("/tmp/gui-channels-result-1024.png")

    # Open in napari without napari (made unimportable here, as where it is not installed):
    # it says how to install it; tests/test_napari_viewer.py opens a run in napari with it
    monkeypatch.setitem(sys.modules, "napari", None)
    act = results.act_napari
    assert act.objectName() == "result_napari"
    assert act.isEnabled()
    answer = answer_modal(answer_message("OK"))
    press(qtbot, window, "Ctrl+Shift+O")  # Runs > Open the run's images in napari
    answer.check()
    assert answer.title == "napari is not installed" and INSTALL in answer.text
    assert INSTALL in window.statusBar().currentMessage()
    # the run details' Results tab has it on its toolbar
    window.runs_panel.act_details.trigger()
    qtbot.waitUntil(lambda: len(window.details) == 1)
    details = window.details[0]
    view = details.results
    qtbot.waitUntil(lambda: view.act_napari.isEnabled(), timeout=10_000)
    details.tabs.setCurrentWidget(view)
    answer = answer_modal(answer_message("OK"))
    click(qtbot, toolbar_button(view.toolbar, view.act_napari))
    answer.check()
    assert INSTALL in answer.text
    details.close()
    window.controller.conns.client(ep).cancel(key.exec_id)
