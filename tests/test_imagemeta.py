"""Image metadata (axes, scale, units, channels, kind): checked at the call, stored with
the result, carried on events and listings (docs/protocol.md §4.2)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ServerProcess, start_server

from zmqruntime import ExecutionFailed
from zmqruntime.imagemeta import ImageMeta, default_axes, meta_for


# ---------------------------------------------------------------------- the checks
def test_defaults_and_normalisation():
    meta = ImageMeta.build((3, 64, 32), np.uint16, axes="CYX", scale={"y": 0.65, "x": 0.5})
    assert meta.axes == "cyx" and meta.calibrated
    assert meta.units == {"y": "micrometer", "x": "micrometer"}
    assert meta.scale_of("x") == 0.5 and meta.scale_of("c") == 1.0
    assert meta.channel_names(3) == ["c0", "c1", "c2"]
    assert [default_axes(n) for n in (2, 3, 4, 5)] == ["yx", "zyx", "czyx", "tczyx"]
    tuple_scale = ImageMeta.build((2, 4, 4), axes="zyx", scale=(2.0, 0.1, 0.1), units="µm")
    assert tuple_scale.scale == {"z": 2.0, "y": 0.1, "x": 0.1}
    assert tuple_scale.unit_of("z") == "micrometer"
    timed = ImageMeta.build((5, 8, 8), axes="tyx", scale={"t": 2}, units={"t": "ms", "x": "nm"})
    assert timed.units == {"t": "millisecond", "y": "micrometer", "x": "nanometer"}
    assert not timed.calibrated
    channels = ImageMeta.build(
        (8, 8, 2), axes="yxc", channels=["DAPI", {"name": "GFP", "color": "#00ff00"}]
    )
    assert channels.channels[1].color == "00FF00" and channels.channels[0].color is None
    assert channels.canonical() == ("cyx", (2, 0, 1))
    labels = ImageMeta.build((8, 8), np.int32, kind="labels")
    assert labels.kind == "labels" and not labels.calibrated


def test_to_dict_round_trips_through_json():
    meta = ImageMeta.build(
        (2, 3, 16, 16),
        np.uint8,
        axes="czyx",
        scale={"z": 1.5, "y": 0.325, "x": 0.325},
        channels=[{"name": "a", "color": "red"}, "b"],
    )
    plain = json.loads(json.dumps(meta.to_dict()))
    assert ImageMeta.from_dict(plain, (2, 3, 16, 16)) == meta
    assert plain == {
        "axes": "czyx",
        "scale": {"z": 1.5, "y": 0.325, "x": 0.325},
        "units": {"z": "micrometer", "y": "micrometer", "x": "micrometer"},
        "channels": [{"name": "a", "color": "FF0000"}, {"name": "b"}],
    }


@pytest.mark.parametrize(
    ("shape", "keywords", "says"),
    [
        ((8, 8), {"axes": "zyx"}, "name 3 axes, but the array has 2"),
        ((8, 8), {"axes": "yy"}, "twice"),
        ((8, 8), {"axes": "ab"}, "not one of"),
        ((8,), {"scale": {"x": 1}}, "2 to 5 dimensions"),
        ((2, 8), {"axes": "tc"}, "no space axis"),
        ((8, 8), {"scale": {"x": -0.5}}, "positive"),
        ((8, 8), {"scale": {"x": 0}}, "positive"),
        ((8, 8), {"scale": {"x": math.nan}}, "finite"),
        ((8, 8), {"scale": {"x": math.inf}}, "finite"),
        ((8, 8), {"scale": {"x": "1"}}, "number"),
        ((8, 8), {"scale": {"z": 1.0}}, "not in axes"),
        ((8, 8), {"scale": (1.0,)}, "1 values"),
        ((2, 8, 8), {"axes": "cyx", "scale": (2.0, 1.0, 1.0)}, "channel axis"),
        ((8, 8), {"units": "parsec-ish"}, "not an OME-NGFF space unit"),
        ((3, 8, 8), {"axes": "tyx", "units": {"t": "micrometer"}}, "time unit"),
        ((8, 8), {"channels": ["a"]}, "no channel axis"),
        ((2, 8, 8), {"axes": "cyx", "channels": ["a"]}, "1 channel names for 2"),
        ((1, 8, 8), {"axes": "cyx", "channels": [{"name": "a", "color": "teal-ish"}]}, "colour"),
        ((1, 8, 8), {"axes": "cyx", "channels": [{"name": "a", "lut": 1}]}, "unknown keys"),
        ((8, 8), {"kind": "mask"}, "kind must be"),
        ((8, 8), {"scale": {"t": -1.0}}, "positive"),
        ((8, 8), {"units": {"t": "s"}}, "no frame interval"),
        ((8, 8), {"scale": {"t": 1.0}, "units": {"t": "micrometer"}}, "time unit"),
    ],
)
def test_bad_metadata_is_a_value_error_saying_why(shape, keywords, says):
    with pytest.raises(ValueError, match=says):
        meta_for(np.zeros(shape, np.uint8), **keywords)


def test_a_frame_interval_on_results_without_a_t_axis():
    """scale["t"] on a result without t: the time between the name's results (seconds)."""
    meta = meta_for(np.zeros((8, 8), np.uint16), scale={"t": 2.5, "y": 0.5, "x": 0.5})
    assert meta == {
        "axes": "yx",
        "scale": {"y": 0.5, "x": 0.5, "t": 2.5},
        "units": {"y": "micrometer", "x": "micrometer", "t": "second"},
    }
    assert ImageMeta.from_dict(meta, (8, 8)).scale_of("t") == 2.5
    ms = meta_for(np.zeros((8, 8)), scale={"t": 40}, units={"t": "ms"})
    assert ms["units"]["t"] == "millisecond" and ms["scale"] == {"t": 40.0}


def test_labels_must_be_integers_and_metadata_needs_an_array():
    with pytest.raises(ValueError, match="integer"):
        meta_for(np.zeros((4, 4), np.float32), kind="labels")
    with pytest.raises(ValueError, match="numpy arrays"):
        meta_for([1, 2], axes="yx")
    assert meta_for(np.zeros((4, 4))) is None  # no keywords: no metadata at all


# ---------------------------------------------------------------------- through a server
@pytest.fixture(scope="module")
def meta_server(tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("meta") / "server", workers=1)
    yield server
    server.stop()


PIPELINE = """
import numpy as np

def run(ctx, config):
    frame = np.arange(2 * 48 * 64, dtype=np.uint16).reshape(2, 48, 64)
    ctx.preview("live", frame, axes="cyx", scale={"y": 0.65, "x": 0.65},
                channels=["DAPI", "GFP"])
    ctx.emit("nuclei", frame, axes="cyx", scale={"y": 0.65, "x": 0.65}, units="um",
             channels=[{"name": "DAPI", "color": "0000FF"}, {"name": "GFP", "color": "green"}])
    ctx.emit("labels", np.zeros((48, 64), np.int32), kind="labels", scale=(0.65, 0.65))
    ctx.emit("plain", np.ones((4, 4)))
    ctx.emit("count", 3)
"""

NUCLEI_META = {
    "axes": "cyx",
    "scale": {"y": 0.65, "x": 0.65},
    "units": {"y": "micrometer", "x": "micrometer"},
    "channels": [{"name": "DAPI", "color": "0000FF"}, {"name": "GFP", "color": "00FF00"}],
}
LABELS_META = {
    "axes": "yx",
    "scale": {"y": 0.65, "x": 0.65},
    "units": {"y": "micrometer", "x": "micrometer"},
    "kind": "labels",
}


def test_metadata_is_stored_listed_and_streamed(meta_server, tmp_path):
    client = meta_server.client()
    exec_id = client.execute(PIPELINE)
    events = list(client.stream(exec_id))
    assert events[-1]["status"]["state"] == "completed", events[-1]
    results = {e["name"]: e for e in events if e["kind"] == "result"}
    assert results["nuclei"]["meta"] == NUCLEI_META
    assert results["labels"]["meta"] == LABELS_META
    assert "meta" not in results["plain"] and "meta" not in results["count"]

    listing = client.list_results(exec_id)
    assert [e.get("meta") for e in listing] == [NUCLEI_META, LABELS_META, None, None]
    assert client.get_result_meta(exec_id, 0) == NUCLEI_META
    assert client.get_result_meta(exec_id, 3) is None
    with pytest.raises(IndexError):
        client.get_result_meta(exec_id, 4)

    # fetched from the store (a late watcher) the events carry it too
    late = [e for e in client.stream(exec_id) if e["kind"] == "result"]
    assert late[0]["meta"] == NUCLEI_META and late[0].get("fetched")

    # the .npy export keeps it in index.json
    client.get_results(exec_id, directory=tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e.get("meta") for e in index["results"]] == [NUCLEI_META, LABELS_META, None, None]


def test_previews_carry_their_metadata(meta_server):
    client = meta_server.client()
    code = """
import numpy as np

def run(ctx, config):
    while not ctx.wait(0.02):
        ctx.preview("live", np.zeros((2, 16, 16), np.uint8), axes="cyx",
                    scale={"y": 0.5, "x": 0.5}, channels=["a", "b"])
"""
    exec_id = client.execute(code)
    try:
        for event in client.stream(exec_id):
            if event["kind"] == "preview":
                assert event["meta"]["axes"] == "cyx"
                assert event["meta"]["scale"] == {"y": 0.5, "x": 0.5}
                assert event["meta"]["channels"] == [{"name": "a"}, {"name": "b"}]
                break
    finally:
        client.cancel(exec_id)
    client.wait(exec_id, timeout=30)


def test_bad_metadata_fails_the_emit_call_and_stores_nothing(meta_server):
    client = meta_server.client()
    code = """
import numpy as np

def run(ctx, config):
    ctx.emit("ok", 1)
    try:
        ctx.emit("frame", np.zeros((8, 8)), scale={"x": -1})
    except ValueError as exc:
        ctx.emit("caught", str(exc))
    ctx.emit("frame", np.zeros((8, 8)), axes="zyx")
"""
    exec_id = client.execute(code)
    with pytest.raises(ExecutionFailed) as failed:
        client.get_results(exec_id, timeout=30)
    assert "ValueError" in str(failed.value) and "zyx" in str(failed.value)
    listing = client.list_results(exec_id)
    assert [e["name"] for e in listing] == ["ok", "caught"]
    assert "positive" in listing[1]["value"]
