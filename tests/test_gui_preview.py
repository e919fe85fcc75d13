"""The preview panel's controls, fed through the follower's one-slot box (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from gui_support import screenshot
from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime_gui.model import FollowBox, RunKey
from zmqruntime_gui.preview_panel import PreviewPanel


@pytest.fixture
def panel(qtbot, themed_app):
    p = PreviewPanel()
    qtbot.addWidget(p)
    p.resize(900, 700)
    p.show()
    qtbot.waitExposed(p)
    return p


def gradient(value: int, shape=(300, 400)) -> np.ndarray:
    image = np.add.outer(np.arange(shape[0]), np.arange(shape[1])).astype(np.uint16)
    return image + np.uint16(value)


def test_newest_frame_only_and_stats(panel, qtbot):
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    panel.set_source(box, "camera run")
    for i in range(50):  # arrives faster than drawn: only the last one may be shown
        box.put_frame("camera", gradient(i), seq=i, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None)
    assert panel.frame.number == 50
    assert panel.image.image[0, 0] == 49
    assert panel.image.image.shape == (300, 400)
    qtbot.waitUntil(lambda: panel.image.painted == 1)  # one frame drawn, not 50
    qtbot.wait(100)
    assert panel.image.painted == 1  # nothing new: nothing redrawn
    for i in range(20):
        box.put_frame("camera", gradient(100 + i), seq=100 + i, t=None)
        qtbot.wait(20)
    qtbot.waitUntil(lambda: panel.received_fps > 0 and panel.displayed_fps > 0, timeout=3000)
    assert "received, <b>" in panel.info.text() and "displayed" in panel.info.text()


def test_levels_colour_map_cursor_pause_and_snapshots(panel, qtbot, tmp_path):
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    panel.set_source(box, "levels")
    frame = gradient(1000)
    box.put_frame("camera", frame, seq=0, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None)
    lo, hi = panel.levels  # autolevels once on the first frame (percentiles of a subsample)
    assert 1000 <= lo < 1030 and 1670 < hi <= 1698

    # continuous: every new frame sets the range; once: only when asked
    panel.continuous.setChecked(True)
    box.put_frame("camera", gradient(5000), seq=1, t=None)
    qtbot.waitUntil(lambda: panel.levels[0] >= 5000)
    panel.continuous.setChecked(False)
    box.put_frame("camera", gradient(9000), seq=2, t=None)
    qtbot.waitUntil(lambda: panel.frame.number == 3)
    assert panel.levels[0] < 9000
    panel.autolevel_once()
    assert panel.levels[0] >= 9000

    # manual levels through the histogram/LUT item turn continuous off
    panel.continuous.setChecked(True)
    panel.set_levels(9100.0, 9300.0)
    assert not panel.continuous.isChecked()
    assert panel.image.levels == pytest.approx([9100.0, 9300.0])
    qtbot.wait(300)  # the histogram redraw keeps the manual range
    assert tuple(panel.hist.getLevels()) == pytest.approx((9100.0, 9300.0))

    panel.set_colour_map("viridis")
    assert panel.image.lut is not None
    panel.set_colour_map("grey")

    # pixel under the cursor: coordinates and the raw value
    assert panel.pixel_at(12.4, 7.9) == (12, 7, 9000 + 7 + 12)
    assert panel.pixel_at(-1, 5) is None and panel.pixel_at(400, 5) is None
    scene_pos = panel.view.mapViewToScene(QtCore.QPointF(20.5, 10.5))
    panel._mouse_moved(scene_pos)
    assert "x 20" in panel.cursor_label.text() and "y 10" in panel.cursor_label.text()
    assert str(9000 + 30) in panel.cursor_label.text()

    # pause: frames keep arriving (received count grows) but the view stays
    panel.act_pause.setChecked(True)
    shown = panel.frame.number
    for i in range(5):
        box.put_frame("camera", gradient(20000 + i), seq=10 + i, t=None)
    qtbot.wait(100)
    assert panel.frame.number == shown and box.received_count("camera") == shown + 5
    panel.act_pause.setChecked(False)
    qtbot.waitUntil(lambda: panel.frame.number == shown + 5)

    # snapshots: the raw frame to TIFF, the view to PNG
    tif = panel.snapshot_tiff(tmp_path / "frame.tif")
    np.testing.assert_array_equal(tifffile.imread(tif), gradient(20004))
    png = panel.save_view_png(tmp_path / "view.png")
    image = QtGui.QImage(str(png))
    assert image.width() > 200 and image.height() > 200


def test_choice_among_preview_streams(panel, qtbot):
    """The first stream by name until the user picks one, whichever stream the watcher
    received first (CI once saw a run's second stream first and the composite never came);
    a stream picked with the keyboard stays picked when another one appears."""
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    panel.set_source(box, "two cameras")
    box.put_frame("fluorescence", np.full((64, 64), 9, np.uint16), seq=0, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None)
    assert panel.frame.name == "fluorescence" and panel.current_stream() == "fluorescence"
    box.put_frame("brightfield", np.full((32, 48), 7, np.uint16), seq=1, t=None)
    qtbot.waitUntil(lambda: panel.stream_combo.count() == 2)
    qtbot.waitUntil(lambda: panel.frame.name == "brightfield")
    assert panel.current_stream() == "brightfield" and panel.image.image[0, 0] == 7
    combo = panel.stream_combo
    combo.setFocus()
    qtbot.keyClick(combo, QtCore.Qt.Key.Key_Down)
    assert panel.current_stream() == "fluorescence"
    box.put_frame("fluorescence", np.full((64, 64), 11, np.uint16), seq=2, t=None)
    qtbot.waitUntil(lambda: panel.frame.name == "fluorescence")
    assert panel.image.image.shape == (64, 64) and panel.image.image[0, 0] == 11
    box.put_frame("a-overview", np.full((8, 8), 1, np.uint16), seq=3, t=None)
    qtbot.waitUntil(lambda: panel.stream_combo.count() == 3)
    box.put_frame("fluorescence", np.full((64, 64), 12, np.uint16), seq=4, t=None)
    qtbot.waitUntil(lambda: panel.image.image[0, 0] == 12)
    assert panel.current_stream() == "fluorescence" and panel.frame.name == "fluorescence"
    # another run: nothing is chosen there yet
    box = FollowBox(RunKey("127.0.0.1:1", "def"))
    panel.set_source(box, "next")
    box.put_frame("zeta", np.full((8, 8), 2, np.uint16), seq=0, t=None)
    box.put_frame("beta", np.full((8, 8), 3, np.uint16), seq=1, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None and panel.frame.name == "beta")


def test_empty_states(panel):
    panel.set_source(None)
    assert panel.stack.currentWidget() is panel.empty_page and panel.demo_button.isVisible()
    assert not panel.act_tiff.isEnabled()
    assert "No run selected" in panel.placeholder.text()
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    box.finished = True
    panel.set_source(box, "old run", "completed")
    assert "ended" in panel.placeholder.text()
    assert panel.snapshot_tiff("/nonexistent/x.tif") is None  # nothing shown: nothing saved


def test_real_time_lapse_through_the_box(panel, qtbot, example_data):
    """A real fluorescence time-lapse streamed frame by frame, shown with a colour map."""
    stack = tifffile.imread(next((example_data / "cell_migration_timelapse").glob("*.tif")))
    box = FollowBox(RunKey("127.0.0.1:1", "timelapse"))
    panel.set_source(box, "cell migration")
    panel.set_colour_map("inferno")
    for i, plane in enumerate(stack):
        box.put_frame("nuclei", plane, seq=i, t=None)
        qtbot.wait(15)
    qtbot.waitUntil(lambda: panel.frame is not None and panel.frame.number == len(stack))
    np.testing.assert_array_equal(panel.image.image, stack[-1])
    lo, hi = panel.levels
    assert stack.min() <= lo < hi <= stack.max()  # set once, from the first frame shown
    qtbot.wait(300)  # one histogram refresh
    screenshot(panel, "10-preview-real-frames")


def test_large_frames_are_drawn_at_screen_resolution(panel, qtbot):
    box = FollowBox(RunKey("127.0.0.1:1", "big"))
    panel.set_source(box, "2048")
    frame = np.arange(2048 * 2048, dtype=np.uint32).reshape(2048, 2048).astype(np.uint16)
    box.put_frame("camera", frame, seq=0, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None)
    step = panel._shown_step
    assert step >= 2  # a 2048² frame in a ~600 px view
    assert panel.image.image.shape == (2048 // step, 2048 // step)
    rect = panel.image.mapRectToView(panel.image.boundingRect())
    assert rect.width() == pytest.approx(2048 // step * step)  # full-frame coordinates
    assert panel.pixel_at(1000.5, 3.2) == (1000, 3, frame[3, 1000])  # raw value, not the mean
    # zoomed in to a 100-pixel region: drawn at full resolution again
    panel.view.setRange(QtCore.QRectF(500, 500, 100, 100), padding=0)
    qtbot.waitUntil(lambda: panel._shown_step == 1)
    assert panel.image.image.shape == (2048, 2048)


def test_pixel_readout_never_outlives_its_frame(panel, qtbot):
    """The readout follows the frame under the mouse; a new stream, source or a mouse
    that left the image clears it (it once kept 'value 121' from another stream)."""
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    panel.set_source(box, "readout")
    box.put_frame("big", np.full((500, 500), 121, np.uint16), seq=0, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None)
    panel._mouse_moved(panel.view.mapViewToScene(QtCore.QPointF(250.5, 236.5)))
    assert "x 250" in panel.cursor_label.text() and "121" in panel.cursor_label.text()
    # the next frame under a still mouse: the readout says the new value
    box.put_frame("big", np.full((500, 500), 7, np.uint16), seq=1, t=None)
    qtbot.waitUntil(lambda: "<b>7</b>" in panel.cursor_label.text())
    # another stream: its frame is 130x130, the old point is outside it
    box.put_frame("small", np.full((130, 130), 3, np.uint16), seq=2, t=None)
    qtbot.waitUntil(lambda: panel.stream_combo.count() == 2)
    panel.stream_combo.setCurrentText("small")
    assert panel.cursor_label.text() == ""
    qtbot.waitUntil(lambda: panel.frame.name == "small")
    assert "x 250" not in panel.cursor_label.text()  # outside the 130x130 frame: no readout
    # the mouse leaves the image
    panel._mouse_moved(panel.view.mapViewToScene(QtCore.QPointF(20.5, 20.5)))
    assert "x 20" in panel.cursor_label.text()
    QtWidgets.QApplication.sendEvent(panel.graphics, QtCore.QEvent(QtCore.QEvent.Type.Leave))
    assert panel.cursor_label.text() == ""
    # another source
    panel._mouse_moved(panel.view.mapViewToScene(QtCore.QPointF(20.5, 20.5)))
    panel.set_source(None)
    assert panel.cursor_label.text() == ""


def test_continuous_percentile_levels_manual_fields_and_gamma(panel, qtbot):
    """Continuous by default (0.1-99.9 percentiles, so one hot pixel does not blow the
    range); typed min/max win and turn it off; gamma bends the colour table."""
    assert panel.continuous.isChecked()
    box = FollowBox(RunKey("127.0.0.1:1", "abc"))
    panel.set_source(box, "levels")
    rng = np.random.default_rng(1)
    first = rng.integers(37, 255, (256, 256)).astype(np.uint16)  # a blown-out first field
    box.put_frame("camera", first, seq=0, t=None)
    qtbot.waitUntil(lambda: panel.frame is not None)
    dim = rng.integers(100, 140, (256, 256)).astype(np.uint16)
    dim[0, 0] = 60000  # one hot pixel
    box.put_frame("camera", dim, seq=1, t=None)
    qtbot.waitUntil(lambda: panel.levels[1] < 200, timeout=3000)  # follows, past the hot one
    assert 100 <= panel.levels[0] < panel.levels[1] <= 140
    qtbot.waitUntil(lambda: panel.level_max.value() == pytest.approx(panel.levels[1]))

    # typed: Max 120, Enter -> manual, Continuous off, the image uses it
    panel.level_max.setFocus()
    panel.level_max.lineEdit().selectAll()
    qtbot.keyClicks(panel.level_max.lineEdit(), "120")
    qtbot.keyClick(panel.level_max.lineEdit(), QtCore.Qt.Key.Key_Return)
    assert not panel.continuous.isChecked()
    assert panel.levels[1] == 120.0 and panel.image.levels[1] == pytest.approx(120.0)
    box.put_frame("camera", dim + 500, seq=2, t=None)
    qtbot.waitUntil(lambda: panel.frame.number == 3)
    assert panel.levels[1] == 120.0  # manual levels stay

    # gamma below 1 brightens the middle of the range
    assert panel.image.lut is None  # grey, gamma 1: no table
    panel.gamma.setValue(0.5)
    lut = panel.image.lut
    assert lut is not None and lut[len(lut) // 4][0] > 0.4 * 255
    panel.gamma.setValue(1.0)
    assert panel.image.lut is None
