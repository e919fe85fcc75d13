"""Exports that microscopy tools open: OME-Zarr (NGFF 0.4, Zarr v2) and OME-TIFF, read back
with zarr, tifffile and ome-types; values to CSV/JSON; memory bounded by a frame or two."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ServerProcess, start_server

from zmqruntime.export import plan_images

zarr = pytest.importorskip("zarr")
ome_types = pytest.importorskip("ome_types")
tifffile = pytest.importorskip("tifffile")

PIPELINE = """
import numpy as np

def frame(i, shape=(2, 32, 48)):
    return (np.arange(np.prod(shape), dtype=np.uint16).reshape(shape) * 7 + i * 1000)

def run(ctx, config):
    channels = [{"name": "DAPI", "color": "0000FF"}, {"name": "GFP", "color": "00FF00"}]
    for i in range(5):
        ctx.emit("nuclei", frame(i), axes="cyx", scale={"y": 0.325, "x": 0.325},
                 channels=channels)
        ctx.emit("well", {"well": f"A{i}", "count": i * 3, "area": 1.5 * i})
        ctx.emit("labels", (frame(i, (32, 48)) % 5).astype(np.int32), kind="labels",
                 scale=(0.325, 0.325))
    ctx.emit("nuclei", frame(9, (2, 16, 16)), axes="cyx", channels=channels)
    ctx.emit("stack", np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16),
             scale={"z": 2.0, "y": 0.5, "x": 0.5}, units="nm")
    ctx.emit("rgbish", frame(3, (16, 24, 3)).astype(np.uint8), axes="yxc")
    ctx.emit("vector", np.arange(10))
    ctx.emit("nested", {"a": [1, 2], "b": {"c": None}})
    ctx.emit("pair", (1, 2))
    return 42
"""


def frame(i: int, shape: tuple[int, ...] = (2, 32, 48)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.uint16).reshape(shape) * 7 + i * 1000


@pytest.fixture(scope="module")
def export_server(tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("export") / "server", workers=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_id(export_server) -> str:
    client = export_server.client()
    exec_id = client.execute(PIPELINE)
    assert client.wait(exec_id, timeout=60)["state"] == "completed"
    return exec_id


def test_the_plan_stacks_consecutive_results_of_a_name(export_server, run_id):
    listing = export_server.client().list_results(run_id)
    images, others = plan_images(listing, "ome-zarr")
    plans = {p.stem: p for p in images}
    assert sorted(plans) == ["labels", "nuclei", "nuclei-2", "rgbish", "stack"]
    assert plans["nuclei"].axes() == "tcyx" and plans["nuclei"].shape_out() == (5, 2, 32, 48)
    assert plans["nuclei-2"].axes() == "cyx"  # another shape: the name's next image
    assert plans["labels"].axes() == "tyx" and plans["rgbish"].axes() == "cyx"
    assert [e["name"] for e in others] == ["well"] * 5 + ["vector", "nested", "pair", "return"]


def test_ome_zarr_reads_back_with_its_metadata_and_bytes(export_server, run_id, tmp_path):
    client = export_server.client()
    out = client.get_results(run_id, directory=tmp_path, format="ome-zarr")
    assert out["nuclei"] == [tmp_path / "nuclei.ome.zarr", tmp_path / "nuclei-2.ome.zarr"]

    group = zarr.open_group(str(tmp_path / "nuclei.ome.zarr"), mode="r")
    assert json.loads((tmp_path / "nuclei.ome.zarr" / ".zgroup").read_text())["zarr_format"] == 2
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert ms["datasets"] == [
        {
            "path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 0.325, 0.325]}],
        }
    ]
    omero = group.attrs["omero"]["channels"]
    assert [(c["label"], c["color"]) for c in omero] == [("DAPI", "0000FF"), ("GFP", "00FF00")]
    expected = np.stack([frame(i) for i in range(5)])
    assert omero[0]["window"]["max"] == float(expected[:, 0].max())
    data = group["0"][...]
    assert data.dtype == np.uint16 and data.tobytes() == expected.tobytes()
    array_meta = json.loads((tmp_path / "nuclei.ome.zarr" / "0" / ".zarray").read_text())
    assert array_meta["dimension_separator"] == "/" and array_meta["chunks"] == [1, 1, 32, 48]

    stack = zarr.open_group(str(tmp_path / "stack.ome.zarr"), mode="r")
    axes = stack.attrs["multiscales"][0]["axes"]
    assert [a.get("unit") for a in axes] == ["nanometer"] * 3
    assert stack.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
        "scale"
    ] == [2.0, 0.5, 0.5]
    assert stack["0"].dtype == np.float32
    labels = zarr.open_group(str(tmp_path / "labels.ome.zarr"), mode="r")
    assert labels.attrs["zmqruntime"]["kind"] == "labels" and "omero" not in labels.attrs
    assert labels["0"].dtype == np.int32 and labels["0"].shape == (5, 32, 48)
    rgb = zarr.open_group(str(tmp_path / "rgbish.ome.zarr"), mode="r")["0"][...]
    assert np.array_equal(rgb, np.moveaxis(frame(3, (16, 24, 3)).astype(np.uint8), 2, 0))

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["execution"] == run_id and manifest["format"] == "ome-zarr"
    assert [i["path"] for i in manifest["images"]][:2] == ["nuclei.ome.zarr", "labels.ome.zarr"]
    assert manifest["images"][0]["channels"] == ["DAPI", "GFP"]
    _check_values(tmp_path, manifest)


#: a time-lapse that states its frame interval: 250 ms between results, as scale "t"
INTERVAL_PIPELINE = """
import numpy as np

def run(ctx, config):
    for i in range(4):
        ctx.emit("timelapse", np.full((2, 8, 12), i, np.uint16), axes="cyx",
                 scale={"t": 250, "y": 0.5, "x": 0.5}, units={"t": "ms"},
                 channels=["DAPI", "GFP"])
"""


def test_a_stated_frame_interval_and_ome_zarr_0_5(export_server, tmp_path):
    """The interval between a name's results is the stacked t's scale and unit in OME-Zarr
    0.4 and 0.5 and OME-TIFF's TimeIncrement; 0.5 is Zarr v3 with the NGFF under "ome"."""
    client = export_server.client()
    exec_id = client.execute(INTERVAL_PIPELINE)
    assert client.wait(exec_id, timeout=60)["state"] == "completed"
    expected = np.stack([np.full((2, 8, 12), i, np.uint16) for i in range(4)])

    client.get_results(exec_id, directory=tmp_path / "v04", format="ome-zarr")
    ms = zarr.open_group(str(tmp_path / "v04" / "timelapse.ome.zarr"), mode="r").attrs[
        "multiscales"
    ][0]
    assert ms["axes"][0] == {"name": "t", "type": "time", "unit": "millisecond"}
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [250.0, 1.0, 0.5, 0.5]

    client.get_results(exec_id, directory=tmp_path / "tif", format="ome-tiff")
    with tifffile.TiffFile(tmp_path / "tif" / "timelapse.ome.tif") as tif:
        pixels = ome_types.from_xml(tif.ome_metadata).images[0].pixels
    assert pixels.time_increment == 250 and pixels.time_increment_unit.value == "ms"
    assert pixels.size_t == 4

    if int(zarr.__version__.split(".")[0]) < 3:
        with pytest.raises(ValueError, match="zarr >= 3"):
            client.get_results(exec_id, directory=tmp_path / "v05", format="ome-zarr-0.5")
        return
    out = client.get_results(exec_id, directory=tmp_path / "v05", format="ome-zarr-0.5")
    path = out["timelapse"][0]
    assert path == tmp_path / "v05" / "timelapse.ome.zarr"
    group_json = json.loads((path / "zarr.json").read_text())
    assert group_json["zarr_format"] == 3 and group_json["node_type"] == "group"
    ome = group_json["attributes"]["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    assert ome["multiscales"][0]["axes"][0]["unit"] == "millisecond"
    assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        250.0, 1.0, 0.5, 0.5,
    ]  # fmt: skip
    assert [c["label"] for c in ome["omero"]["channels"]] == ["DAPI", "GFP"]
    assert group_json["attributes"]["zmqruntime"]["execution"] == exec_id
    array_json = json.loads((path / "0" / "zarr.json").read_text())
    assert array_json["dimension_names"] == ["t", "c", "y", "x"]
    data = zarr.open_group(str(path), mode="r")["0"][...]
    assert data.dtype == np.uint16 and data.tobytes() == expected.tobytes()
    manifest = json.loads((tmp_path / "v05" / "manifest.json").read_text())
    assert manifest["format"] == "ome-zarr-0.5" and manifest["images"][0]["scale"][0] == 250.0


def _check_values(directory: Path, manifest: dict) -> None:
    assert manifest["table"] == "values.csv"
    with open(directory / "values.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["well"] * 5 + ["return"]
    assert rows[2]["well"] == "A2" and rows[2]["count"] == "6" and rows[2]["area"] == "3.0"
    assert rows[-1]["value"] == "42"
    values = json.loads((directory / manifest["values"]).read_text())
    assert values == [{"index": 19, "name": "nested", "value": {"a": [1, 2], "b": {"c": None}}}]
    files = {f["name"]: f for f in manifest["files"]}
    assert np.array_equal(np.load(directory / files["vector"]["file"]), np.arange(10))
    assert files["pair"]["file"].endswith(".zmqv")


def test_ome_tiff_reads_back_with_ome_types(export_server, run_id, tmp_path):
    client = export_server.client()
    out = client.get_results(run_id, directory=tmp_path, format="ome-tiff")
    path = out["nuclei"][0]
    assert path == tmp_path / "nuclei.ome.tif"
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == "TCYX"
        data = series.asarray()
        ome = ome_types.from_xml(tif.ome_metadata)
    expected = np.stack([frame(i) for i in range(5)])
    assert data.dtype == np.uint16 and data.tobytes() == expected.tobytes()
    pixels = ome.images[0].pixels
    assert ome.images[0].name == "nuclei"
    assert (pixels.size_t, pixels.size_c, pixels.size_y, pixels.size_x) == (5, 2, 32, 48)
    assert pixels.physical_size_x == pytest.approx(0.325)
    assert pixels.physical_size_y == pytest.approx(0.325)
    assert pixels.physical_size_x_unit.value == "µm"
    assert [c.name for c in pixels.channels] == ["DAPI", "GFP"]
    assert pixels.channels[0].color.as_rgb_tuple()[:3] == (0, 0, 255)
    annotation = ome.structured_annotations.map_annotations[0]
    pairs = {m.k: m.value for m in annotation.value.ms}
    assert pairs["execution"] == run_id and pairs["result"] == "nuclei"
    assert json.loads(pairs["indices"]) == [0, 3, 6, 9, 12]

    with tifffile.TiffFile(tmp_path / "stack.ome.tif") as tif:
        ome = ome_types.from_xml(tif.ome_metadata)
        assert tif.series[0].axes == "ZYX" and tif.series[0].dtype == np.float32
    pixels = ome.images[0].pixels
    assert pixels.physical_size_z == pytest.approx(2.0)
    assert pixels.physical_size_z_unit.value == "nm"
    _check_values(tmp_path, json.loads((tmp_path / "manifest.json").read_text()))


def test_cli_exports_each_format(export_server, run_id, tmp_path):
    for fmt, suffix in (("ome-zarr", ".ome.zarr"), ("ome-tiff", ".ome.tif"), ("npy", None)):
        out = tmp_path / fmt
        proc = subprocess.run(
            [sys.executable, "-m", "zmqruntime", "results", run_id, "--out", str(out)]
            + ["--format", fmt, "--port", str(export_server.port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "300"},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if suffix:
            assert (out / f"nuclei{suffix}").exists() and (out / "manifest.json").exists()
            assert "manifest.json" in proc.stdout
        else:
            assert (out / "index.json").exists()


BIG = """
import numpy as np

def run(ctx, config):
    plane = np.arange(2048, dtype=np.uint16)[None, :] + np.arange(2048, dtype=np.uint16)[:, None]
    for i in range(config["n"]):
        ctx.emit("frame", plane + i, scale={"y": 0.1, "x": 0.1})
"""


def test_export_memory_stays_bounded(export_server, tmp_path):
    """32 frames of 2048x2048 uint16 (256 MiB; ZMQRUNTIME_EXPORT_FRAMES=256 makes it the
    issue's 2 GiB): the client's RSS grows by far less."""
    client = export_server.client()
    n = int(os.environ.get("ZMQRUNTIME_EXPORT_FRAMES", "32"))
    exec_id = client.execute(BIG, config={"n": n})
    assert client.wait(exec_id, timeout=120)["state"] == "completed"
    me = psutil.Process(os.getpid())
    base = me.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], me.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = client.get_results(exec_id, directory=tmp_path / "big", format="ome-zarr")
    finally:
        done.set()
        sampler.join()
    growth = (peak[0] - base) / 2**20
    print(f"\nexporting {n * 8} MiB as OME-Zarr: client RSS grew by {growth:.1f} MiB at peak")
    assert growth < 100, f"RSS grew by {growth:.0f} MiB exporting {n * 8} MiB"
    array = zarr.open_group(str(out["frame"][0]), mode="r")["0"]
    assert array.shape == (n, 2048, 2048)
    assert int(array[n - 1, 2047, 2047]) == 2047 + 2047 + n - 1
