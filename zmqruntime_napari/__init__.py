"""zmqruntime in napari: a run's results as layers, live previews in a dock widget, and a
reader for exported OME-Zarr (``pip install "zmqruntime[napari]"``).

* :func:`open_in_napari` opens a run's array results as layers: scale per axis, one layer
  per channel with its name and colour, labels (``kind="labels"``) as Labels layers;
* the npe2 plugin (``napari.yaml``) contributes the dock widget "zmqruntime live" (a
  server and a run, or the newest; its previews stream into Image layers, newest frame
  wins, the network on a thread of its own) and a reader for a results directory
  exported with ``--format ome-zarr`` (or one ``.ome.zarr`` image of it).

``layers``, ``follower`` and ``reader`` import neither napari nor Qt: they are tested
where napari is not installed.
"""

from __future__ import annotations

from typing import Any

from .layers import LayerData, layer_data, run_layers

__all__ = ["LayerData", "add_layers", "layer_data", "open_in_napari", "run_layers"]


def add_layers(viewer: Any, specs: list[LayerData]) -> list[Any]:
    """Add layer specs to a napari viewer (keywords this napari lacks are left out)."""
    import inspect

    added = []
    for data, kwargs, layer_type in specs:
        add = getattr(viewer, f"add_{layer_type}")
        accepted = inspect.signature(add).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if "colormap" in kwargs:
            kwargs["colormap"] = _colormaps(kwargs["colormap"])
        layers = add(data, **kwargs)
        added.extend(layers if isinstance(layers, list) else [layers])
    return added


def _colormaps(value: Any) -> Any:
    """``{"name", "colors"}`` specs (layers.colormap_for) as napari Colormap objects."""
    from napari.utils.colormaps import Colormap

    def one(item: Any) -> Any:
        if isinstance(item, dict):
            return Colormap(colors=item["colors"], name=item["name"])
        return item

    return [one(v) for v in value] if isinstance(value, list) else one(value)


def open_in_napari(
    exec_id: str,
    *,
    client: Any = None,
    port: int = 5555,
    host: str = "127.0.0.1",
    viewer: Any = None,
    timeout: float | None = 60.0,
) -> Any:
    """Open run ``exec_id``'s array results in napari (a new viewer unless one is given)
    and return the viewer. Waits for the run to finish (up to ``timeout`` s)."""
    import napari

    from zmqruntime import ExecutionClient

    own = client is None
    if own:
        client = ExecutionClient(port=port, host=host, auto_spawn=False)
    try:
        specs = run_layers(client, exec_id, timeout=timeout)
    finally:
        if own:
            client.close()
    if viewer is None:
        viewer = napari.Viewer(title=f"zmqruntime run {exec_id}")
    add_layers(viewer, specs)
    return viewer
