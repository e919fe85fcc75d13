"""zmqruntime_napari without napari: layer specs from a run's metadata, the reader of
OME-Zarr exports and the preview follower thread (tests/test_napari_viewer.py puts them
in a real napari, where napari is installed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerProcess, start_server

from zmqruntime_napari.follower import PreviewFollower
from zmqruntime_napari.layers import colormap_for, run_layers

pytest.importorskip("zarr")

PIPELINE = """
import numpy as np

def run(ctx, config):
    channels = [{"name": "DAPI", "color": "0000FF"}, {"name": "GFP", "color": "12AB34"}]
    for i in range(3):
        ctx.emit("cells", np.full((2, 24, 32), i, np.uint16), axes="cyx",
                 scale={"y": 0.5, "x": 0.25}, channels=channels)
    ctx.emit("masks", np.arange(24 * 32, dtype=np.int32).reshape(24, 32) % 4, kind="labels",
             scale=(0.5, 0.25))
    ctx.emit("volume", np.ones((4, 8, 8), np.float32), scale={"z": 2, "y": 1, "x": 1},
             units="nm")
    ctx.emit("count", 7)
"""

LIVE = """
import numpy as np

def run(ctx, config):
    i = 0
    while not ctx.wait(0.01):
        ctx.preview("camera", np.full((64, 48), i % 60000, np.uint16),
                    scale={"y": 0.65, "x": 0.65})
        i += 1
"""


@pytest.fixture(scope="module")
def napari_server(tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("napari") / "server", workers=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_id(napari_server) -> str:
    client = napari_server.client()
    exec_id = client.execute(PIPELINE)
    assert client.wait(exec_id, timeout=60)["state"] == "completed"
    return exec_id


def check_specs(specs) -> None:
    """What a run's results become as layers (shared with the napari tests)."""
    by_name = {}
    for data, kwargs, kind in specs:
        name = kwargs["name"][0] if isinstance(kwargs["name"], list) else kwargs["name"]
        by_name[name.split(" ")[0]] = (data, kwargs, kind)
    data, kwargs, kind = by_name["cells"]
    assert kind == "image" and np.shape(data) == (3, 2, 24, 32)  # t-stacked, c kept
    assert kwargs["channel_axis"] == 1
    assert kwargs["name"] == ["cells DAPI", "cells GFP"]
    assert kwargs["colormap"][0] == "blue"
    assert kwargs["colormap"][1]["colors"][1][:3] == pytest.approx(
        [0x12 / 255, 0xAB / 255, 0x34 / 255]
    )
    assert kwargs["scale"] == [[1.0, 0.5, 0.25]] * 2
    assert "units" not in kwargs  # the stacked t has none: napari's default for all
    data, kwargs, kind = by_name["masks"]
    assert kind == "labels" and kwargs["scale"] == [0.5, 0.25] and data.dtype == np.int32
    data, kwargs, kind = by_name["volume"]
    assert kind == "image" and kwargs["scale"] == [2.0, 1.0, 1.0]
    assert kwargs["units"] == ["nanometer"] * 3
    assert "count" not in by_name


def test_a_runs_arrays_become_layer_specs(napari_server, run_id):
    specs = run_layers(napari_server.client(), run_id)
    assert len(specs) == 3
    check_specs(specs)


def test_colormaps_from_channel_colours():
    assert colormap_for("FF0000", 0, 2) == "red"
    assert colormap_for(None, 0, 1) == "gray"
    assert colormap_for(None, 1, 2) == "green"
    custom = colormap_for("804020", 0, 1)
    assert custom["colors"][0] == [0, 0, 0, 1] and custom["name"] == "#804020"


@pytest.mark.parametrize("fmt", ["ome-zarr", "ome-zarr-0.5"])
def test_the_reader_opens_an_ome_zarr_export(napari_server, run_id, tmp_path, fmt):
    import zarr

    from zmqruntime_napari.reader import get_reader, read

    if fmt == "ome-zarr-0.5" and int(zarr.__version__.split(".")[0]) < 3:
        pytest.skip("OME-Zarr 0.5 (Zarr v3) needs zarr >= 3: Python >= 3.11")
    out = tmp_path / "export"
    napari_server.client().get_results(run_id, directory=out, format=fmt)
    assert get_reader(str(out)) is read
    assert get_reader(str(out / "cells.ome.zarr")) is read
    assert get_reader(str(tmp_path)) is None  # not an export
    (tmp_path / "npy").mkdir()
    napari_server.client().get_results(run_id, directory=tmp_path / "npy")
    assert get_reader(str(tmp_path / "npy")) is None  # the .npy layout is not ours to read
    specs = read(str(out))
    check_specs(specs)
    data = specs[0][0]
    assert not isinstance(data, np.ndarray)  # read lazily (a zarr array)
    assert np.asarray(data[2, 1]).max() == 2


def test_the_manifest_is_a_valid_npe2_manifest():
    npe2 = pytest.importorskip("npe2", reason="npe2 comes with zmqruntime[napari]")
    path = Path(__file__).resolve().parents[1] / "zmqruntime_napari" / "napari.yaml"
    manifest = npe2.PluginManifest.from_file(path)
    assert manifest.name == "zmqruntime"
    assert [w.display_name for w in manifest.contributions.widgets] == ["zmqruntime live"]
    assert manifest.contributions.readers[0].accepts_directories


def test_the_follower_finds_the_newest_run_and_keeps_its_newest_frame(napari_server):
    client = napari_server.client()
    follower = PreviewFollower("127.0.0.1", napari_server.port)  # no run yet: it waits
    follower.start()
    exec_id = client.execute(LIVE)
    try:
        deadline = time.monotonic() + 30
        frames = []
        while len(frames) < 5 and time.monotonic() < deadline:
            frames += follower.take()
            time.sleep(0.05)
        assert follower.exec_id == exec_id and follower.error is None
        assert len(frames) >= 5, f"{len(frames)} frames in 30 s"
        assert all(f.name == "camera" for f in frames)
        assert frames[-1].meta["scale"] == {"y": 0.65, "x": 0.65}
        assert frames[-1].value.shape == (64, 48)
        values = [int(f.value[0, 0]) for f in frames]
        assert values == sorted(values)  # newer frames only, newest wins
    finally:
        client.cancel(exec_id)
    deadline = time.monotonic() + 30
    while not follower.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert follower.state == "cancelled"
    follower.stop()
    assert not follower.is_alive()
