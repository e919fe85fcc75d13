"""napari reader for results exported with ``--format ome-zarr`` (or ``ome-zarr-0.5``): a
results directory (its ``manifest.json``) or one ``.ome.zarr`` image, as lazily read layers.

It reads OME-NGFF 0.4 attributes (``multiscales`` axes, units and scale of the first
dataset, ``omero`` channel labels and colours; 0.5's are the same under ``ome`` in
``zarr.json``) plus zmqruntime's own ``kind``, so it also opens other single-scale NGFF
images. napari-ome-zarr reads these files too; this reader needs nothing but zarr, and
knows labels results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zmqruntime.imagemeta import ImageMeta

from .layers import LayerData, layer_data

ReaderFunction = Callable[[Any], list[LayerData]]


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    """npe2 ``get_reader``: a function for paths this reader opens, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if paths and all(_readable(Path(p)) for p in paths):
        return read
    return None


def _readable(path: Path) -> bool:
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("format") in ("ome-zarr", "ome-zarr-0.5")
        except (OSError, ValueError):
            return False
    return "multiscales" in _attrs(path)


def _attrs(path: Path) -> dict[str, Any]:
    """The image's NGFF attributes: 0.4's ``.zattrs``, or 0.5's ``zarr.json`` attributes
    with what is under ``ome`` lifted to the top (as 0.4 has it)."""
    try:
        if (path / "zarr.json").is_file():
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
            return {**attrs.pop("ome", {}), **attrs}
        return json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError, AttributeError):
        return {}


def read(path: str | list[str]) -> list[LayerData]:
    """Layers of each path: every image a results directory lists, or one image."""
    out: list[LayerData] = []
    for item in [path] if isinstance(path, (str, Path)) else path:
        p = Path(item)
        manifest = p / "manifest.json"
        if manifest.is_file():
            for image in json.loads(manifest.read_text())["images"]:
                out.append(read_image(p / image["path"]))
        else:
            out.append(read_image(p))
    return out


def read_image(path: Path) -> LayerData:
    """One NGFF 0.4 image (its first, full-resolution dataset), opened lazily with zarr."""
    import zarr

    attrs = _attrs(path)
    multiscale = attrs["multiscales"][0]
    axes = "".join(a["name"] for a in multiscale["axes"])
    dataset = multiscale["datasets"][0]
    scale = next(
        (t["scale"] for t in dataset.get("coordinateTransformations", []) if t["type"] == "scale"),
        [1.0] * len(axes),
    )
    units = {a["name"]: a["unit"] for a in multiscale["axes"] if a.get("unit")}
    array = zarr.open_array(str(path / dataset["path"]), mode="r")
    omero = attrs.get("omero", {}).get("channels")
    channels = [{"name": c["label"], "color": c.get("color")} for c in omero] if omero else None
    ours = attrs.get("zmqruntime", {})
    kind = ours.get("kind") if ours.get("kind") in ("image", "labels") else None
    meta = ImageMeta.build(
        array.shape,
        array.dtype,
        axes=axes,
        # a t without a unit is a stack of results, not a stated interval
        scale={a: s for a, s in zip(axes, scale) if a in "zyx" or a in units},
        units=units or None,
        channels=channels,
        kind=kind,
    )
    name = multiscale.get("name") or path.name.removesuffix(".ome.zarr")
    extra = {k: ours[k] for k in ("execution", "name", "indices") if k in ours}
    return layer_data(array, meta, meta.axes, name, extra)
