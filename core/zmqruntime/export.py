"""A run's results as files that microscopy tools open: OME-Zarr, OME-TIFF, CSV.

``export_run`` plans from the server's listing (shapes, dtypes, image metadata; no bytes)
which results form which image, then fetches them one at a time and writes each frame
where it belongs, so at most about one frame is in memory whatever the run's size:

* each array result name becomes one image; consecutive array results of a name with the
  same shape, dtype and metadata are stacked along a new ``t`` axis (a time-lapse emitted
  frame by frame becomes one time series), unless their axes already contain ``t``;
  a result that breaks the run starts the name's next image (``NAME-2``, ...);
* ``ome-zarr``: one ``NAME.ome.zarr`` per image, OME-NGFF 0.4 on Zarr v2 (axes with units,
  scale in ``multiscales``, channel names/colours/windows in ``omero``); ``ome-zarr-0.5``:
  the same as OME-NGFF 0.5 on Zarr v3 (the attributes under ``ome``, axis names as the
  array's ``dimension_names``; needs zarr >= 3, so Python >= 3.11);
* a stacked ``t`` gets the frame interval the pipeline stated (``scale={"t": seconds}`` on
  results without a t axis), in every format;
* ``ome-tiff``: one ``NAME.ome.tif`` per image (tifffile; OME-XML with PhysicalSize*,
  units, channel names and colours, and the run's id in a MapAnnotation);
* scalars and flat dicts of scalars go to ``values.csv`` (one row per result); other
  values to ``values.json`` (JSON-exact ones inline, the rest as ``.zmqv`` files); arrays
  that are no image (1-D, > 5-D, complex, structured...) and large bytes to their own
  ``.npy``/``.bin`` files; ``manifest.json`` lists everything.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol
from .imagemeta import AXES, OME_XML_UNITS, ImageMeta, default_axes
from .resultfile import VALUE_FILE_SUFFIX, write_npy
from .stream import _json_exact, safe_file_stem

FORMATS = ("npy", "ome-zarr", "ome-zarr-0.5", "ome-tiff")
SUFFIX = {"ome-zarr": ".ome.zarr", "ome-zarr-0.5": ".ome.zarr", "ome-tiff": ".ome.tif"}
#: the OME-NGFF version each OME-Zarr format writes (0.4: Zarr v2, 0.5: Zarr v3)
NGFF_VERSION = {"ome-zarr": "0.4", "ome-zarr-0.5": "0.5"}
#: dtypes an image may have in each format (others are written as .npy)
IMAGE_DTYPES = {
    "ome-zarr": frozenset("|b1 |u1 <u2 <u4 <u8 |i1 <i2 <i4 <i8 <f4 <f8".split()),
    "ome-zarr-0.5": frozenset("|b1 |u1 <u2 <u4 <u8 |i1 <i2 <i4 <i8 <f4 <f8".split()),
    "ome-tiff": frozenset("|u1 <u2 <u4 |i1 <i2 <i4 <f4 <f8".split()),
}
#: zarr chunks hold one plane, cut into tiles of at most this many pixels a side
CHUNK_SIDE = 1024
#: a TIFF bigger than this is written as BigTIFF
BIGTIFF_BYTES = 2**32 - 2**25
MANIFEST = "manifest.json"

ListResults = Callable[[], Iterable[dict[str, Any]]]
FetchValue = Callable[[int], Any]


@dataclass
class ImagePlan:
    """One image of the export: which results, in which order, and what they mean."""

    name: str
    stem: str
    shape: tuple[int, ...]  # of one result
    dtype: str  # numpy type string with byte order, as listed
    meta: ImageMeta
    indices: list[int] = field(default_factory=list)

    @property
    def stacked(self) -> bool:
        """Whether the results stack along a ``t`` the pipeline did not state."""
        return len(self.indices) > 1

    def axes(self) -> str:
        """The written image's axes, in OME order (a subsequence of ``tczyx``)."""
        axes, _ = self.meta.canonical()
        return "t" + axes if self.stacked else axes

    def shape_out(self) -> tuple[int, ...]:
        _, order = self.meta.canonical()
        plane = tuple(self.shape[i] for i in order)
        return (len(self.indices), *plane) if self.stacked else plane

    def frame(self, value: np.ndarray) -> np.ndarray:
        """One result, its axes put in OME order (a view)."""
        _, order = self.meta.canonical()
        return np.transpose(value, order)

    def describe(self, path: str) -> dict[str, Any]:
        axes = self.axes()
        return {
            "name": self.name,
            "path": path,
            "indices": self.indices,
            "axes": axes,
            "shape": list(self.shape_out()),
            "dtype": self.dtype,
            "scale": [self.meta.scale_of(a) for a in axes],
            "units": {a: u for a, u in self.meta.units.items()},
            "channels": self.meta.channel_names(self._n_channels()) if "c" in axes else None,
            "kind": self.meta.kind or "image",
        }

    def _n_channels(self) -> int:
        axes = self.axes()
        return self.shape_out()[axes.index("c")] if "c" in axes else 0


def plan_images(
    listing: Iterable[dict[str, Any]], fmt: str
) -> tuple[list[ImagePlan], list[dict[str, Any]]]:
    """Group listed results into images; returns ``(images, other entries)`` in index order."""
    images: list[ImagePlan] = []
    others: list[dict[str, Any]] = []
    current: dict[str, ImagePlan] = {}  # name -> the image its next result may join
    stems: set[str] = set()
    for entry in listing:
        meta = _image_meta(entry, fmt)
        if meta is None:
            others.append(entry)
            continue
        name, shape = entry["name"], tuple(entry["shape"])
        plan = current.get(name)
        if (
            plan is not None
            and plan.shape == shape
            and plan.dtype == entry["dtype"]
            and plan.meta == meta
            and "t" not in meta.axes
        ):
            plan.indices.append(entry["index"])
            continue
        plan = ImagePlan(name, _unique_stem(name, stems), shape, entry["dtype"], meta)
        plan.indices.append(entry["index"])
        current[name] = plan
        images.append(plan)
    return images, others


def _image_meta(entry: dict[str, Any], fmt: str) -> ImageMeta | None:
    """The metadata an array result is written with as an image (None: not an image)."""
    if entry.get("kind") != "array" or entry.get("dtype") not in IMAGE_DTYPES[fmt]:
        return None
    shape = entry["shape"]
    if 0 in shape:
        return None
    stated = entry.get("meta")
    try:
        if stated:
            return ImageMeta.from_dict(stated, shape)
        return ImageMeta.build(shape, axes=default_axes(len(shape)))
    except ValueError:
        return None  # 1-D, more than 5-D...: a plain .npy


def _unique_stem(name: str, taken: set[str]) -> str:
    base = safe_file_stem(name)
    stem, k = base, 2
    while stem in taken:
        stem, k = f"{base}-{k}", k + 1
    taken.add(stem)
    return stem


# -------------------------------------------------------------------------- the export
def export_run(
    directory: str | Path,
    exec_id: str,
    listing: Iterable[dict[str, Any]],
    fetch: FetchValue,
    fmt: str,
) -> dict[str, list[Any]]:
    """Write a finished run's results to ``directory`` in ``fmt`` ("ome-zarr"/"ome-tiff").

    ``listing`` is the server's listing (``client.list_results``), ``fetch(index)`` one
    result's value. Returns ``{name: [path of each image]}`` for array names and
    ``{name: [value or path, ...]}`` for the others; ``manifest.json`` says the rest.
    """
    if fmt not in SUFFIX:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "ome-zarr-0.5":
        _zarr_v3()  # fails before anything is written where zarr cannot write Zarr v3
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, others = plan_images(listing, fmt)
    out: dict[str, list[Any]] = {}
    described = []
    for plan in images:
        path = directory / f"{plan.stem}{SUFFIX[fmt]}"
        frames = (fetch(i) for i in plan.indices)
        if fmt in NGFF_VERSION:
            write_ome_zarr(path, plan, frames, exec_id, NGFF_VERSION[fmt])
        else:
            write_ome_tiff(path, plan, frames, exec_id)
        described.append(plan.describe(path.name))
        out.setdefault(plan.name, []).append(path)
    table = _Values(directory)
    for entry in others:
        value = entry["value"] if "value" in entry else fetch(entry["index"])
        out.setdefault(entry["name"], []).append(table.add(entry["index"], entry["name"], value))
    manifest = {
        "execution": exec_id,
        "format": fmt,
        "images": described,
        **table.close(),
    }
    _write_json(directory / MANIFEST, manifest)
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


class _Values:
    """Non-image results: the CSV table, the JSON list, and files for the rest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rows: list[dict[str, Any]] = []
        self.columns: dict[str, None] = {"index": None, "name": None}
        self.values: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []

    def add(self, index: int, name: str, value: Any) -> Any:
        stem = f"{index:06d}-{safe_file_stem(name)}"
        if _scalar(value):
            self.columns["value"] = None
            self.rows.append({"index": index, "name": name, "value": value})
            return value
        if (
            type(value) is dict
            and value
            and all(isinstance(k, str) and _scalar(v) for k, v in value.items())
        ):
            self.columns.update(dict.fromkeys(value))
            self.rows.append({**value, "index": index, "name": name})
            return value
        if isinstance(value, np.ndarray):
            path = self.directory / f"{stem}.npy"
            write_npy(path, np.ascontiguousarray(value) if value.ndim else value)
            kind = "array"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            path = self.directory / f"{stem}.bin"
            path.write_bytes(value)
            kind = "bytes"
        elif _json_exact(value):
            self.values.append({"index": index, "name": name, "value": value})
            return value
        else:
            path = self.directory / f"{stem}{VALUE_FILE_SUFFIX}"
            path.write_bytes(protocol.dumps(value))
            kind = "value"
        self.files.append({"index": index, "name": name, "kind": kind, "file": path.name})
        return path

    def close(self) -> dict[str, Any]:
        out: dict[str, Any] = {"table": None, "values": None, "files": self.files}
        if self.rows:
            with open(self.directory / "values.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.columns), restval="")
                writer.writeheader()
                writer.writerows(self.rows)
            out["table"] = "values.csv"
        if self.values:
            _write_json(self.directory / "values.json", self.values)
            out["values"] = "values.json"
        return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) and _json_exact(value)


# -------------------------------------------------------------------------- OME-Zarr
def ngff_attrs(
    plan: ImagePlan,
    exec_id: str,
    windows: list[tuple[float, float]] | None,
    version: str = "0.4",
) -> dict:
    """The group attributes of an image: NGFF ``multiscales`` and ``omero`` (0.4: at the
    top; 0.5: under ``ome``, with the version said once there)."""
    axes = plan.axes()
    meta = plan.meta
    ngff_axes = []
    for a in axes:
        item: dict[str, Any] = {
            "name": a,
            "type": "time" if a == "t" else "channel" if a == "c" else "space",
        }
        if a != "c" and meta.unit_of(a):  # a stacked t without a stated unit has none
            item["unit"] = meta.unit_of(a)
        ngff_axes.append(item)
    attrs: dict[str, Any] = {
        "multiscales": [
            {
                "version": "0.4",
                "name": plan.name,
                "axes": ngff_axes,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [meta.scale_of(a) for a in axes]}
                        ],
                    }
                ],
            }
        ],
        "zmqruntime": {
            "execution": exec_id,
            "name": plan.name,
            "indices": plan.indices,
            "kind": meta.kind or "image",
            "stacked": plan.stacked,
        },
    }
    if "c" in axes and meta.kind != "labels":
        n = plan.shape_out()[axes.index("c")]
        colors = [c.color for c in meta.channels] if meta.channels else [None] * n
        channels = []
        for i, name in enumerate(meta.channel_names(n)):
            lo, hi = windows[i] if windows else (0.0, 1.0)
            channels.append(
                {
                    "label": name,
                    "color": colors[i] or ("FFFFFF" if n == 1 else _DEFAULT_COLORS[i % 6]),
                    "active": True,
                    "window": {"min": lo, "max": hi, "start": lo, "end": hi},
                }
            )
        attrs["omero"] = {"version": "0.4", "channels": channels, "rdefs": {"model": "color"}}
    if version == "0.5":
        ome: dict[str, Any] = {"version": "0.5", "multiscales": attrs.pop("multiscales")}
        del ome["multiscales"][0]["version"]
        if "omero" in attrs:
            ome["omero"] = attrs.pop("omero")
            del ome["omero"]["version"]
        attrs = {"ome": ome, **attrs}
    return attrs


_DEFAULT_COLORS = ("FF0000", "00FF00", "0000FF", "FF00FF", "00FFFF", "FFFF00")


def write_ome_zarr(
    path: Path,
    plan: ImagePlan,
    frames: Iterator[np.ndarray],
    exec_id: str,
    version: str = "0.4",
) -> None:
    """One image as OME-NGFF 0.4 on Zarr v2 (or 0.5 on Zarr v3), written frame by frame."""
    import zarr

    shape = plan.shape_out()
    chunks = tuple(1 for _ in shape[:-2]) + tuple(min(s, CHUNK_SIDE) for s in shape[-2:])
    dtype = np.dtype(plan.dtype)
    axes = plan.axes()
    if version == "0.5":
        group, array = _zarr_v3_image(path, shape, chunks, dtype, axes)
    else:
        group, array = _zarr_v2_image(zarr, path, shape, chunks, dtype)
    c_axis = axes.index("c") - (1 if plan.stacked else 0) if "c" in axes else None
    windows: list[list[float]] | None = None
    for t, value in enumerate(frames):
        frame = plan.frame(_checked(value, plan))
        if plan.stacked:
            array[t] = frame
        else:
            array[...] = frame
        if c_axis is not None and dtype.kind != "b":
            per = np.moveaxis(frame, c_axis, 0).reshape(frame.shape[c_axis], -1)
            lo, hi = per.min(axis=1), per.max(axis=1)
            if windows is None:
                windows = [[float(a), float(b)] for a, b in zip(lo, hi)]
            else:
                for w, a, b in zip(windows, lo, hi):
                    w[0], w[1] = min(w[0], float(a)), max(w[1], float(b))
        del value, frame
    group.attrs.update(
        ngff_attrs(plan, exec_id, [(w[0], w[1]) for w in windows] if windows else None, version)
    )


def _zarr_v3() -> Any:
    """zarr, if it writes Zarr v3 (zarr >= 3); ValueError saying what to do otherwise."""
    import zarr

    if int(zarr.__version__.split(".")[0]) < 3:
        raise ValueError(
            f"OME-Zarr 0.5 is written on Zarr v3, which needs zarr >= 3 (Python >= 3.11); "
            f"this zarr is {zarr.__version__}: export as ome-zarr (0.4) instead"
        )
    return zarr


def _zarr_v3_image(path: Path, shape: tuple, chunks: tuple, dtype: np.dtype, axes: str) -> tuple:
    """An empty Zarr v3 group with array "0" (blosc-lz4 chunks, the axes as its
    ``dimension_names``, as NGFF 0.5 asks)."""
    zarr = _zarr_v3()
    from zarr.codecs import BloscCodec

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = group.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        fill_value=0,
        dimension_names=list(axes),
    )
    return group, array


def _zarr_v2_image(zarr: Any, path: Path, shape: tuple, chunks: tuple, dtype: np.dtype) -> tuple:
    """An empty Zarr v2 group with array "0" ("/"-separated chunk keys, as NGFF 0.4 asks),
    through the API of zarr 2 or zarr 3."""
    from numcodecs import Blosc

    compressor = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    if int(zarr.__version__.split(".")[0]) >= 3:
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        array = group.create_array(
            "0",
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=compressor,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            fill_value=0,
        )
    else:  # pragma: no cover - zarr 2 (Python 3.10)
        group = zarr.open_group(str(path), mode="w")
        array = group.create_dataset(
            "0",
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressor=compressor,
            dimension_separator="/",
            fill_value=0,
        )
    return group, array


def _checked(value: Any, plan: ImagePlan) -> np.ndarray:
    """A fetched result, checked against the listing it was planned from."""
    if (
        not isinstance(value, np.ndarray)
        or value.shape != plan.shape
        or protocol.dtype_to_wire(value.dtype) != plan.dtype
    ):
        raise ValueError(f"result of {plan.name!r} changed since it was listed")
    return value


# -------------------------------------------------------------------------- OME-TIFF
def ome_tiff_metadata(
    meta: ImageMeta,
    axes: str,
    shape: tuple[int, ...],
    *,
    name: str,
    annotations: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """tifffile's ``metadata=`` for an image with ``axes`` (OME order) and ``shape``:
    physical sizes with OME-XML unit symbols, channel names and colours, and
    ``annotations`` as an OME MapAnnotation (key/value text)."""
    md: dict[str, Any] = {"axes": axes.upper(), "Name": name}
    for a in "zyx":
        if a in axes and a in meta.scale:
            md[f"PhysicalSize{a.upper()}"] = meta.scale[a]
            unit = meta.unit_of(a) or "micrometer"
            md[f"PhysicalSize{a.upper()}Unit"] = OME_XML_UNITS.get(unit, unit)
    if "t" in axes and "t" in meta.scale:
        md["TimeIncrement"] = meta.scale["t"]
        unit = meta.unit_of("t") or "second"
        md["TimeIncrementUnit"] = OME_XML_UNITS.get(unit, unit)
    if "c" in axes:
        n = shape[axes.index("c")]
        channel: dict[str, Any] = {"Name": meta.channel_names(n)}
        if meta.channels and all(c.color for c in meta.channels):
            channel["Color"] = [_ome_color(c.color) for c in meta.channels if c.color]
        md["Channel"] = channel
    if annotations:
        md["MapAnnotation"] = {
            "Namespace": "zmqruntime",
            "Value": {str(k): _annotation_text(v) for k, v in annotations.items()},
        }
    return md


def _annotation_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _ome_color(hex_rgb: str) -> int:
    """OME-XML's Color: RGBA packed in a signed 32-bit int."""
    rgba = (int(hex_rgb, 16) << 8) | 0xFF
    return rgba - (1 << 32) if rgba >= 1 << 31 else rgba


def write_ome_tiff(path: Path, plan: ImagePlan, frames: Iterator[np.ndarray], exec_id: str) -> None:
    """One image as an OME-TIFF, written plane by plane (tifffile pulls the planes)."""
    import tifffile

    axes = plan.axes()
    shape = plan.shape_out()
    dtype = np.dtype(plan.dtype)
    annotations = {
        "execution": exec_id,
        "result": plan.name,
        "indices": plan.indices,
        "kind": plan.meta.kind or "image",
    }
    metadata = ome_tiff_metadata(plan.meta, axes, shape, name=plan.name, annotations=annotations)

    def planes() -> Iterator[np.ndarray]:
        for value in frames:
            frame = plan.frame(_checked(value, plan))
            yield from frame.reshape(-1, *frame.shape[-2:])

    nbytes = int(np.prod(shape)) * dtype.itemsize
    with tifffile.TiffWriter(path, bigtiff=nbytes > BIGTIFF_BYTES, ome=True) as tif:
        tif.write(planes(), shape=shape, dtype=dtype, photometric="minisblack", metadata=metadata)


__all__ = [
    "AXES",
    "FORMATS",
    "ImagePlan",
    "export_run",
    "ngff_attrs",
    "ome_tiff_metadata",
    "plan_images",
    "write_ome_tiff",
    "write_ome_zarr",
]
