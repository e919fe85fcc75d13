"""Physical units in the image views: a scale bar, the cursor in micrometres, and
snapshots as OME-TIFF with the frame's pixel size and where it came from.

A frame's image metadata (``zmqruntime.imagemeta``, sent by ``ctx.preview(...,
scale=...)``) says how large a pixel is; without it the view stays in pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg

from zmqruntime.export import ome_tiff_metadata
from zmqruntime.imagemeta import ImageMeta, default_axes

#: short unit symbols for the readout and the scale bar
SYMBOLS = {
    "micrometer": "µm",
    "nanometer": "nm",
    "millimeter": "mm",
    "centimeter": "cm",
    "meter": "m",
    "angstrom": "Å",
}


def meta_of(meta: dict[str, Any] | None, shape: tuple[int, ...]) -> ImageMeta | None:
    """The ImageMeta of a frame's ``meta`` dict, or None (absent or not fitting)."""
    if not meta:
        return None
    try:
        return ImageMeta.from_dict(meta, shape)
    except ValueError:
        return None


def symbol(unit: str | None) -> str:
    return SYMBOLS.get(unit or "", unit or "")


def physical_text(meta: ImageMeta | None, col: int, row: int) -> str:
    """The pixel's centre in physical units, e.g. ``(12.35 µm, 3.25 µm)``; "" if unknown."""
    if meta is None or not meta.calibrated:
        return ""
    x = (col + 0.5) * meta.scale_of("x")
    y = (row + 0.5) * meta.scale_of("y")
    return f"({x:.4g} {symbol(meta.unit_of('x'))}, {y:.4g} {symbol(meta.unit_of('y'))})"


def nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is at most ``limit`` (> 0)."""
    power = 10 ** math.floor(math.log10(limit))
    for step in (5, 2, 1):
        if step * power <= limit:
            return step * power
    return power


class ScaleBar:
    """A scale bar in the view's bottom right corner, shown while frames are calibrated."""

    def __init__(self, view: pg.ViewBox) -> None:
        self.view = view
        self.item: pg.ScaleBar | None = None
        self.key: tuple | None = None
        self.text = ""

    def update(self, meta: ImageMeta | None, width_px: int) -> None:
        """Show a bar about a fifth of the image wide, or hide it when not calibrated."""
        if meta is None or not meta.calibrated or width_px <= 0:
            key = None
        else:
            key = (meta.scale_of("x"), meta.unit_of("x"), width_px)
        if key == self.key:
            return
        self.key = key
        if key is None:
            self.text = ""
            if self.item is not None:
                self.item.hide()
            return
        pixel, unit, width = key
        length = nice_length(width * pixel / 5)
        self.text = f"{length:g} {symbol(unit)}"
        if self.item is None:
            self.item = pg.ScaleBar(size=length / pixel, suffix="")
            self.item.setParentItem(self.view)
            self.item.anchor((1, 1), (1, 1), offset=(-20, -20))
        self.item.size = length / pixel  # in view (pixel) coordinates
        self.item.text.setText(self.text)
        self.item.updateBar()
        self.item.show()


def write_ome_snapshot(
    path: str | Path,
    array: np.ndarray,
    meta: ImageMeta | None,
    *,
    run_id: str | None,
    stream: str,
    frame: int | None,
) -> Path:
    """``array`` as an OME-TIFF: raw dtype and shape, the pixel size and units when known,
    and the run id, stream name and frame number in a MapAnnotation (and the Description)."""
    import tifffile

    path = Path(path)
    array = np.ascontiguousarray(array)
    rgb = meta is None and array.ndim == 3 and array.shape[-1] in (3, 4)
    if meta is None and not rgb:
        meta = ImageMeta.build(array.shape, array.dtype, axes=default_axes(array.ndim))
    info = {"execution": run_id or "", "stream": stream, "frame": frame if frame else 0}
    description = f"zmqruntime run {run_id or '-'}, {stream}, frame {frame}"
    if rgb:
        tifffile.imwrite(
            path,
            array,
            photometric="rgb",
            ome=True,
            metadata={"axes": "YXS", "Name": stream, "Description": description},
        )
        return path
    assert meta is not None
    axes, order = meta.canonical()
    data = np.ascontiguousarray(np.transpose(array, order))
    metadata = ome_tiff_metadata(meta, axes, data.shape, name=stream, annotations=info)
    metadata["Description"] = description
    tifffile.imwrite(path, data, photometric="minisblack", ome=True, metadata=metadata)
    return path
