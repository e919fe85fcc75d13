"""The preview in physical units: a scale bar and the cursor in micrometres when frames say
their pixel size; Snapshot writes an OME-TIFF that ome-types reads (size, run, frame)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PySide6 import QtCore

from zmqruntime_gui.calibration import nice_length, physical_text
from zmqruntime_gui.model import FollowBox, RunKey
from zmqruntime_gui.preview_panel import PreviewPanel

ome_types = pytest.importorskip("ome_types")

META = {
    "axes": "yx",
    "scale": {"y": 0.65, "x": 0.65},
    "units": {"y": "micrometer", "x": "micrometer"},
}


@pytest.fixture
def panel(qtbot, themed_app):
    p = PreviewPanel()
    qtbot.addWidget(p)
    p.resize(900, 700)
    p.show()
    qtbot.waitExposed(p)
    return p


def test_nice_lengths_and_readout():
    assert [nice_length(v) for v in (83.2, 9.9, 0.31, 1.0, 250)] == [50, 5, 0.2, 1, 200]
    from zmqruntime.imagemeta import ImageMeta

    meta = ImageMeta.from_dict(META, (10, 10))
    assert physical_text(meta, 0, 9) == "(0.325 µm, 6.175 µm)"
    assert physical_text(None, 0, 9) == ""


def test_calibrated_frames_get_a_scale_bar_readout_and_ome_snapshot(panel, qtbot, tmp_path):
    box = FollowBox(RunKey("127.0.0.1:1", "0123456789abcdef"))
    panel.set_source(box, "calibrated")
    frame = np.arange(300 * 400, dtype=np.uint16).reshape(300, 400)
    box.put_frame("camera", frame, seq=0, t=None, meta=META)
    qtbot.waitUntil(lambda: panel.frame is not None)
    # 400 px of 0.65 µm = 260 µm wide: a bar of 50 µm (a fifth or less, 1-2-5)
    assert panel.scale_bar.text == "50 µm" and panel.scale_bar.item is not None
    assert panel.scale_bar.item.isVisible()

    scene_pos = panel.view.mapViewToScene(QtCore.QPointF(20.5, 10.5))
    panel._mouse_moved(scene_pos)
    readout = panel.cursor_label.text()
    assert "(13.33 µm, 6.825 µm)" in readout and "x 20" in readout

    path = panel.snapshot_tiff(tmp_path / "frame.ome.tif")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        np.testing.assert_array_equal(tif.asarray(), frame)
        ome = ome_types.from_xml(tif.ome_metadata)
    image = ome.images[0]
    assert image.name == "camera"
    assert image.pixels.physical_size_x == pytest.approx(0.65)
    assert image.pixels.physical_size_y == pytest.approx(0.65)
    assert image.pixels.physical_size_x_unit.value == "µm"
    pairs = {m.k: m.value for m in ome.structured_annotations.map_annotations[0].value.ms}
    assert pairs["execution"] == "0123456789abcdef" and pairs["stream"] == "camera"
    assert json.loads(pairs["frame"]) == 1
    assert "0123456789abcdef" in image.description

    # an uncalibrated frame: no bar, pixels only, and still an OME-TIFF
    box.put_frame("camera", frame + 1, seq=1, t=None)
    qtbot.waitUntil(lambda: panel.frame.number == 2)
    assert panel.scale_bar.text == "" and not panel.scale_bar.item.isVisible()
    panel._mouse_moved(scene_pos)
    assert "µm" not in panel.cursor_label.text()
    plain = panel.snapshot_tiff(tmp_path / "plain.ome.tif")
    with tifffile.TiffFile(plain) as tif:
        pixels = ome_types.from_xml(tif.ome_metadata).images[0].pixels
    assert pixels.physical_size_x is None and (pixels.size_y, pixels.size_x) == (300, 400)
