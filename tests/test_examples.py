"""The bundled example pipelines, end to end on the real images in ../shared/data.

Each example runs on a real server. ``watch`` runs it while a watcher follows the
run from its first event: a one-worker server is kept busy by a gate run until the
watcher has subscribed, so no early preview is missed. Previews are not stored, so
this is the only way to count them. Missing data makes the ``shared_data`` fixture
fail, not skip.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from scipy import stats

from zmqruntime import resources

REPO = Path(__file__).resolve().parents[1]
NUCLEI = "dsb2018_stage1_fluo_nuclei"
PLATE = "bbbc016_transfluor_plate"
TIMELAPSE = "cell_migration_timelapse"

GATE = """
import os, time

def run(ctx, config):
    while not os.path.exists(config.release) and not ctx.cancelled:
        time.sleep(0.01)
"""


def example_config(name: str) -> dict[str, Any]:
    """The config values that an example's config file defines."""
    _, config_code = resources.example(name)
    ns: dict[str, Any] = {}
    exec(config_code, ns)
    return {k: v for k, v in ns.items() if not k.startswith("_")}


def watch(
    server: Any, release: Path, name: str, config: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run example ``name`` on a one-worker server; return all its events and final status."""
    client = server.client()
    gate = client.execute(GATE, config={"release": str(release)})
    pipeline, config_code = resources.example(name)
    exec_id = client.execute(pipeline, config_code, config=config, name=name)
    assert client.get_status(exec_id)["state"] == "queued"  # the gate holds the only worker

    watcher = server.client()
    events: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            events.extend(watcher.stream(exec_id))
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(1.0)  # the watcher's subscription reaches the server (ms on loopback)
    release.touch()
    thread.join(timeout=120)
    assert not thread.is_alive(), f"{name}: the stream did not end within 120 s"
    if errors:
        raise errors[0]
    assert client.get_status(gate)["state"] == "completed"
    assert events and events[-1]["kind"] == "state"
    status = events[-1]["status"]
    assert status["state"] == "completed", (
        f"{name}: {status.get('error')}\n{status.get('traceback')}"
    )
    first = events[0]
    assert first["kind"] == "state" and first["status"]["state"] == "running", (
        f"the watcher missed the start of the run: first event {first['kind']}"
    )
    return events, status


def results_of(events: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for event in events:
        if event["kind"] == "result":
            out.setdefault(event["name"], []).append(event["value"])
    return out


def kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == kind]


def check_progress(events: list[dict[str, Any]], total: int) -> None:
    """Progress comes per item (rate-limited, so not every step): done rises to total."""
    steps = [e for e in kinds(events, "progress") if e.get("total") is not None]
    assert steps, "no progress event"
    assert all(e["total"] == total for e in steps)
    done = [e["done"] for e in steps]
    assert done == sorted(done) and done[-1] <= total and len(set(done)) == len(done)


# ---------------------------------------------------------------------- bundled files


def test_examples_are_bundled_with_configs() -> None:
    assert {"nuclei", "plate", "timelapse"} <= set(resources.list_examples())
    for name in ("nuclei", "plate", "timelapse"):
        pipeline, config_code = resources.example(name)
        assert "def run(ctx, config)" in pipeline
        assert config_code is not None and "input_dir" in config_code


@pytest.mark.parametrize(
    "name, folder", [("nuclei", NUCLEI + "/images"), ("plate", PLATE), ("timelapse", TIMELAPSE)]
)
def test_default_input_dir_is_the_shared_data_beside_the_checkout(
    name: str, folder: str, shared_data: Path
) -> None:
    default = example_config(name)["input_dir"]
    assert default == f"../shared/data/{folder}"
    assert (REPO / default).resolve() == (shared_data / folder).resolve()
    assert (REPO / default).is_dir()


# ---------------------------------------------------------------------- nuclei


def test_nuclei_counts_agree_with_ground_truth(
    make_server, shared_data: Path, tmp_path: Path
) -> None:
    folder = shared_data / NUCLEI
    with open(folder / "counts.csv", newline="") as f:
        truth = {row["image_id"]: int(row["n_nuclei"]) for row in csv.DictReader(f)}
    assert len(truth) == 53

    server = make_server(workers=1)
    events, status = watch(
        server, tmp_path / "release", "nuclei", {"input_dir": str(folder / "images")}
    )
    rows = results_of(events)["counts"]
    assert [r["image"] for r in rows] == sorted(truth)  # one row per image, in name order
    ours = np.array([r["count"] for r in rows])
    ref = np.array([truth[r["image"]] for r in rows])
    rho = stats.spearmanr(ours, ref).statistic
    rel = np.abs(ours - ref) / ref
    print(
        f"\nnuclei vs counts.csv over {len(rows)} images: Spearman {rho:.3f}, median relative "
        f"error {np.median(rel):.1%} (mean {rel.mean():.1%}), {ours.sum()} nuclei counted "
        f"vs {ref.sum()} annotated"
    )
    assert rho >= 0.85
    assert np.median(rel) <= 0.20
    for r in rows:
        assert (r["mean_area"] > 0) == (r["count"] > 0)

    previews = kinds(events, "preview")
    assert len(previews) == 53, f"{len(previews)} previews of 53 images"
    for event, row in zip(previews, rows):
        overlay = event["value"]
        assert event["name"] == "nuclei"
        assert overlay.dtype == np.uint8 and overlay.shape == (row["height"], row["width"], 3)
        outline = (overlay == (0, 255, 0)).all(axis=2)
        assert outline.any() == (row["count"] > 0)  # the mask is drawn on the image
    check_progress(events, 53)
    assert results_of(events)["return"][0]["images"] == 53


# ---------------------------------------------------------------------- plate


def test_plate_row_wells_fields_and_previews_in_order(
    make_server, shared_data: Path, tmp_path: Path
) -> None:
    folder = shared_data / PLATE
    files = sorted(folder.glob("*.TIF"))
    raw = np.stack([tifffile.imread(p) for p in files]).astype(np.float32)
    assert raw.shape == (72, 512, 512)

    server = make_server(workers=1)
    events, status = watch(
        server, tmp_path / "release", "plate", {"input_dir": str(folder), "field_interval": 0.03}
    )
    results = results_of(events)
    fields, wells = results["fields"], results["wells"]
    print(f"\nplate: {len(wells)} wells, {len(fields)} fields")
    for w in wells:
        print(
            f"  {w['well']}: intensity {w['mean_intensity']:5.1f}, "
            f"{w['spots_per_field']:5.1f} spots per field"
        )
    assert [w["well"] for w in wells] == [f"O{i:02d}" for i in range(1, 25)]
    assert len(fields) == 72 and all(w["fields"] == 3 for w in wells)
    assert [f["file"] for f in fields] == [p.name for p in files]  # acquisition order
    for i, f in enumerate(fields):
        assert f["index"] == i
        assert f["raw_mean_intensity"] == pytest.approx(float(raw[i].mean()), rel=1e-4)
    for w in wells:
        mine = [f for f in fields if f["well"] == w["well"]]
        assert w["spots"] == sum(f["spots"] for f in mine)
        assert w["mean_intensity"] == pytest.approx(np.mean([f["mean_intensity"] for f in mine]))

    flat = results["illumination"][0]
    assert flat.shape == (512, 512) and flat.mean() == pytest.approx(1.0, rel=1e-3)
    assert flat.min() < 0.7 < 1.2 < flat.max()  # the vignetting of these images

    # every field is previewed, in acquisition order: match each preview to its raw field
    previews = kinds(events, "preview")
    assert len(previews) == 72, f"{len(previews)} previews of 72 fields"
    small = raw.reshape(72, 64, 8, 64, 8).mean(axis=(2, 4)).reshape(72, -1)
    small = (small - small.mean(1, keepdims=True)) / small.std(1, keepdims=True)
    order = []
    for event in previews:
        rgb = event["value"]
        assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
        gray = rgb.astype(np.float32).mean(axis=2).reshape(64, 8, 64, 8).mean(axis=(1, 3))
        gray = (gray.ravel() - gray.mean()) / gray.std()
        order.append(int(np.argmax(small @ gray)))
    assert order == list(range(72))
    check_progress(events, 144)


# ---------------------------------------------------------------------- time-lapse


def test_timelapse_frames_previewed_counted_and_projected(
    make_server, shared_data: Path, tmp_path: Path
) -> None:
    folder = shared_data / TIMELAPSE
    movie = tifffile.imread(next(folder.glob("*.tif")))
    assert movie.shape == (48, 130, 130)
    rate = 20.0

    server = make_server(workers=1)
    events, status = watch(
        server,
        tmp_path / "release",
        "timelapse",
        {"input_dir": str(folder), "acquisition_rate": rate},
    )
    previews = kinds(events, "preview")
    assert len(previews) == 48, f"{len(previews)} previews of 48 frames"
    for i, event in enumerate(previews):
        assert event["name"] == "camera"
        np.testing.assert_array_equal(event["value"], movie[i])

    results = results_of(events)
    frames = results["frames"]
    counts = [f["nuclei"] for f in frames]
    print(f"\ntime-lapse: {len(frames)} frames, nuclei per frame {min(counts)}..{max(counts)}")
    assert [f["frame"] for f in frames] == list(range(48))
    assert all(c > 0 for c in counts)
    for f in frames:
        assert f["mean_intensity"] == pytest.approx(float(movie[f["frame"]].mean()))
    projection = results["max_projection"][0]
    assert projection.shape == (130, 130) and projection.dtype == movie.dtype
    np.testing.assert_array_equal(projection, movie.max(axis=0))
    # frames come at the acquisition rate: 47 intervals of 1/rate at least
    assert status["finished"] - status["started"] >= 47 / rate
    check_progress(events, 48)


# ---------------------------------------------------------------------- shared behaviour


SLOW = {
    "nuclei": (NUCLEI + "/images", {}),
    "plate": (PLATE, {"field_interval": 0.5}),
    "timelapse": (TIMELAPSE, {"acquisition_rate": 2.0}),
}


@pytest.mark.parametrize("name", sorted(SLOW))
def test_cancel_stops_the_example_cooperatively(name: str, client, shared_data: Path) -> None:
    folder, extra = SLOW[name]
    pipeline, config_code = resources.example(name)
    exec_id = client.execute(
        pipeline, config_code, config={"input_dir": str(shared_data / folder), **extra}
    )
    events = []
    for event in client.stream(exec_id):
        events.append(event)
        if event["kind"] == "progress" and len(kinds(events, "progress")) == 1:
            client.cancel(exec_id)
    status = events[-1]["status"]
    assert status["state"] == "cancelled"
    assert status["message"] == "cancelled by request"  # stopped by itself, not killed


def test_relative_input_dir_is_resolved_in_the_servers_working_directory(
    client, shared_data: Path
) -> None:
    # the test servers run in this process's working directory
    relative = os.path.relpath(shared_data / TIMELAPSE, Path.cwd())
    assert not Path(relative).is_absolute()
    pipeline, config_code = resources.example("timelapse")
    exec_id = client.execute(
        pipeline, config_code, config={"input_dir": relative, "acquisition_rate": 0}
    )
    assert client.get_results(exec_id, timeout=60)["return"][0]["frames"] == 48


@pytest.mark.parametrize("name", ["nuclei", "plate", "timelapse"])
def test_missing_input_dir_fails_with_a_message_naming_it(
    name: str, client, tmp_path: Path
) -> None:
    pipeline, config_code = resources.example(name)
    missing = tmp_path / "no-such-images"
    exec_id = client.execute(pipeline, config_code, config={"input_dir": str(missing)})
    status = client.wait(exec_id, timeout=60)
    assert status["state"] == "failed"
    assert "FileNotFoundError" in status["error"] and str(missing) in status["error"]

    exec_id = client.execute(pipeline, config_code, config={"input_dir": "not/here"})
    status = client.wait(exec_id, timeout=60)
    assert status["state"] == "failed"
    assert "'not/here'" in status["error"] and str(Path.cwd()) in status["error"]


def test_timelapse_from_the_command_line(server: Any, shared_data: Path, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "zmqruntime", *args, "--port", str(server.port)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    examples = resources.examples_dir()
    done = cli(
        "submit",
        str(examples / "timelapse_pipeline.py"),
        "--config",
        str(examples / "timelapse_config.py"),
        "--set",
        f"input_dir={shared_data / TIMELAPSE}",
        "--set",
        "acquisition_rate=0",
    )
    assert done.returncode == 0, done.stderr
    exec_id = done.stdout.strip()
    server.client().wait(exec_id, timeout=60)
    out = tmp_path / "results"
    fetched = cli("results", exec_id, "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert "frames: 48" in fetched.stdout and "max_projection: 1" in fetched.stdout
    projection = np.load(next(out.glob("*-max_projection.npy")))
    assert projection.shape == (130, 130)
