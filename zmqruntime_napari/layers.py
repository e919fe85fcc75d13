"""A run's array results as napari layer specs: ``(data, kwargs, layer_type)`` tuples.

napari-free and Qt-free (napari's own "LayerData" tuple form), so that the mapping from
zmqruntime's image metadata to layers is tested without a viewer: scale per axis, the
channel axis split into one layer per channel with its name and colour, labels as Labels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from zmqruntime.export import ImagePlan, plan_images
from zmqruntime.imagemeta import ImageMeta

LayerData = tuple[Any, dict[str, Any], str]
#: napari's built-in colormaps for the colours pipelines name most
NAMED_COLORMAPS = {
    "FF0000": "red",
    "00FF00": "green",
    "0000FF": "blue",
    "00FFFF": "cyan",
    "FF00FF": "magenta",
    "FFFF00": "yellow",
    "FFFFFF": "gray",
}
#: colours of channels that stated none, in order (napari's own defaults for channel_axis)
DEFAULT_COLORMAPS = ("magenta", "green", "cyan", "yellow", "red", "blue")


def colormap_for(color: str | None, index: int, n: int) -> Any:
    """A napari colormap for a channel colour ``RRGGBB``: a built-in name where one fits,
    else ``{"name", "colors"}`` (black to the colour), which napari's ``colormap=`` takes."""
    if color is None:
        return "gray" if n == 1 else DEFAULT_COLORMAPS[index % len(DEFAULT_COLORMAPS)]
    if color in NAMED_COLORMAPS:
        return NAMED_COLORMAPS[color]
    rgb = [int(color[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    return {"name": f"#{color}", "colors": [[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]]}


def layer_data(
    data: Any, meta: ImageMeta, axes: str, name: str, extra: dict[str, Any] | None = None
) -> LayerData:
    """One array (axes in OME order, e.g. ``tcyx``) as a layer spec."""
    kwargs: dict[str, Any] = {"name": name, "metadata": {"zmqruntime": dict(extra or {})}}
    spatial = [a for a in axes if a != "c"]
    kwargs["scale"] = [meta.scale_of(a) for a in spatial]
    kwargs["axis_labels"] = spatial
    # a t whose interval nobody stated (a stack of results) has no unit: then none at all
    units = [meta.unit_of(a) if a in "zyx" or a in meta.scale else None for a in spatial]
    if all(units):
        kwargs["units"] = units
    if meta.kind == "labels":
        if "c" in axes:  # labels per channel: keep c as a plain axis
            kwargs["scale"] = [meta.scale_of(a) for a in axes]
            kwargs["axis_labels"] = list(axes)
            kwargs.pop("units", None)
        return data, kwargs, "labels"
    if "c" in axes:
        c = axes.index("c")
        n = np.shape(data)[c]
        names = meta.channel_names(n)
        colors = [ch.color for ch in meta.channels] if meta.channels else [None] * n
        kwargs["channel_axis"] = c
        # napari splits list-valued keywords per channel: give each channel its own
        for key in ("scale", "axis_labels", "units", "metadata"):
            if key in kwargs:
                kwargs[key] = [kwargs[key]] * n
        kwargs["name"] = [f"{name} {names[i]}" for i in range(n)]
        kwargs["colormap"] = [colormap_for(colors[i], i, n) for i in range(n)]
        kwargs["blending"] = "additive"
    return data, kwargs, "image"


def run_layers(
    client: Any, exec_id: str, *, timeout: float | None = None, wait: bool = True
) -> list[LayerData]:
    """Every array result of a run as layer specs (one per image, as the OME-Zarr export
    groups them: a name's same-shaped results stacked along t). ``wait``: for the run to
    finish first (up to ``timeout`` s); otherwise what a running run stored so far."""
    status = client.wait(exec_id, timeout) if wait else client.get_status(exec_id)
    listing = client._listing(exec_id, status["n_results"])
    images, _ = plan_images(listing, "ome-zarr")
    return [
        plan_layer(plan, (client.get_result(exec_id, i) for i in plan.indices), exec_id)
        for plan in images
    ]


def plan_layer(plan: ImagePlan, values: Iterable[np.ndarray], exec_id: str) -> LayerData:
    """One planned image, its results read into one array (axes in OME order)."""
    frames = [plan.frame(np.asarray(v)) for v in values]
    data = np.stack(frames) if plan.stacked else np.ascontiguousarray(frames[0])
    extra = {"execution": exec_id, "result": plan.name, "indices": plan.indices}
    return layer_data(data, plan.meta, plan.axes(), plan.stem, extra)
