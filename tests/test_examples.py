"""The bundled example pipelines, end to end on real microscopy images.

Two copies of the images: the small subset committed in ``tests/data`` (always
there, so a bare clone runs every test here) and the full sets (53 nucleus images,
a 24-well plate row, 48 frames) in ``$ZMQRUNTIME_EXAMPLE_DATA`` or ``../shared/data``
beside the checkout. The three end-to-end tests run on both; without the full sets
their ``[full]`` cases skip with a reason naming the variable.

Each example runs on a real server. ``watch`` runs it while a watcher follows the
run from its first event: a one-worker server is kept busy by a gate run until the
watcher has subscribed, so no early preview is missed. Previews are not stored, so
this is the only way to count them.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from scipy import stats

from zmqruntime import ExecutionClient, local, resources
from zmqruntime.transport import free_port

REPO = Path(__file__).resolve().parents[1]
NUCLEI = "dsb2018_stage1_fluo_nuclei"
PLATE = "bbbc016_transfluor_plate"
TIMELAPSE = "cell_migration_timelapse"
FOLDERS = {"nuclei": NUCLEI + "/images", "plate": PLATE, "timelapse": TIMELAPSE}
ENV = "ZMQRUNTIME_EXAMPLE_DATA"

GATE = """
import os, time

def run(ctx, config):
    while not os.path.exists(config.release) and not ctx.cancelled:
        time.sleep(0.01)
"""


@dataclass(frozen=True)
class Images:
    """One copy of the example images and what the examples must find in it."""

    root: Path
    nuclei_images: int
    wells: list[str]
    frames: int
    # nuclei vs counts.csv: the subset measures rho 1.000 and a median error of 17.3 %,
    # the full set 0.982 and 14.3 %
    min_spearman: float
    max_median_error: float


SUBSET = dict(
    nuclei_images=6, wells=["O05", "O16"], frames=10, min_spearman=0.85, max_median_error=0.25
)
FULL = dict(
    nuclei_images=53,
    wells=[f"O{i:02d}" for i in range(1, 25)],
    frames=48,
    min_spearman=0.85,
    max_median_error=0.20,
)


@pytest.fixture(params=["subset", "full"])
def images(request: pytest.FixtureRequest) -> Images:
    """The subset (always) and the full sets (skipped where absent)."""
    if request.param == "subset":
        return Images(request.getfixturevalue("example_data"), **SUBSET)
    return Images(request.getfixturevalue("shared_data"), **FULL)


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


def shown_in_order(
    previews: list[dict[str, Any]], items: list[Any], same: Callable[[Any, Any], bool]
) -> None:
    """Assert the preview contract: each preview shows one of ``items``; a watcher
    that drains a burst keeps each stream's newest frame (newest wins), so under load
    some frames in between may not be shown, but none is shown out of order and the
    last one always is."""
    shown: list[int] = []
    for event in previews:
        start = shown[-1] + 1 if shown else 0
        match = next((i for i in range(start, len(items)) if same(event["value"], items[i])), None)
        assert match is not None, (
            f"preview {len(shown)} shows none of items {start}.. (after {shown})"
        )
        shown.append(match)
    assert shown and shown[-1] == len(items) - 1, f"the last item was not previewed: {shown}"
    print(f"\n{len(shown)} of {len(items)} items previewed")


def check_progress(events: list[dict[str, Any]], total: int) -> None:
    """Progress comes per item (rate-limited, so not every step): done rises to total."""
    steps = [e for e in kinds(events, "progress") if e.get("total") is not None]
    assert steps, "no progress event"
    assert all(e["total"] == total for e in steps)
    done = [e["done"] for e in steps]
    assert done == sorted(done) and done[-1] <= total and len(set(done)) == len(done)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "zmqruntime", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


# ---------------------------------------------------------------------- the data


def test_the_subset_is_small_and_matches_its_checksums(example_data: Path) -> None:
    listed = {}
    for line in (example_data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    on_disk = sorted(
        p.relative_to(example_data).as_posix()
        for p in example_data.rglob("*")
        if p.is_file() and p.name not in ("README.md", "SHA256SUMS")
    )
    assert sorted(listed) == on_disk
    for name, digest in listed.items():
        assert hashlib.sha256((example_data / name).read_bytes()).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in example_data.rglob("*") if p.is_file())
    assert total <= 3_000_000, f"tests/data holds {total / 1e6:.2f} MB, over 3 MB"
    readme = (example_data / "README.md").read_text()
    for credit in ("CC0", "BBBC038v1", "CC BY 3.0", "Ilya Ravkin", "CC BY 4.0", "5206107"):
        assert credit in readme


def test_the_installed_package_carries_the_subset(example_data: Path) -> None:
    support = resources.load_example_module("example_support")
    bundled = support.bundled_example_data()
    assert bundled is not None, "this install of zmqruntime lacks the example images"
    assert (bundled / "SHA256SUMS").read_text() == (example_data / "SHA256SUMS").read_text()
    assert (bundled / "README.md").is_file()  # the licences travel with the images


# ---------------------------------------------------------------------- bundled files


def test_examples_are_bundled_with_configs() -> None:
    assert {"nuclei", "plate", "timelapse"} <= set(resources.list_examples())
    for name in ("nuclei", "plate", "timelapse"):
        pipeline, config_code = resources.example(name)
        assert "def run(ctx, config)" in pipeline
        assert config_code is not None and "input_dir" in config_code
        assert example_config(name)["input_dir"] is None  # the example images, found below


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_default_input_dir_prefers_the_variable_then_shared_data_then_the_subset(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = resources.load_example_module("example_support")
    folder = FOLDERS[name]
    bundled = support.bundled_example_data()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(ENV, raising=False)
    assert support.resolve_input_dir(None, example=folder) == bundled / folder

    shared = tmp_path / "shared" / "data" / folder  # ../shared/data from the working dir
    shared.mkdir(parents=True)
    assert support.resolve_input_dir(None, example=folder) == shared

    chosen = tmp_path / "elsewhere"
    (chosen / folder).mkdir(parents=True)
    monkeypatch.setenv(ENV, str(chosen))
    assert support.resolve_input_dir(None, example=folder) == chosen / folder
    monkeypatch.setenv(ENV, "../elsewhere")  # relative: from the server's working dir
    assert support.resolve_input_dir(None, example=folder) == chosen / folder

    monkeypatch.setenv(ENV, str(tmp_path / "empty"))  # set: only there, never a fallback
    with pytest.raises(FileNotFoundError, match=ENV):
        support.resolve_input_dir(None, example=folder)
    # an explicit input_dir wins over all of them
    assert support.resolve_input_dir(str(shared)) == shared


def test_submit_from_a_bare_directory_runs_on_the_subset(tmp_path: Path) -> None:
    """The README's command from a clone with nothing beside it: the spawned server's
    ``../shared/data`` is absent, so the example runs on the subset it ships with."""
    bare = tmp_path / "clone"
    bare.mkdir()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    port = free_port()
    examples = resources.examples_dir()
    try:
        done = cli(
            "submit",
            str(examples / "nuclei_pipeline.py"),
            "--config",
            str(examples / "nuclei_config.py"),
            "--wait",
            "--port",
            str(port),
            cwd=bare,
            env=env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        exec_id = re.search(r"submitted (\S+) to", done.stdout).group(1)
        with ExecutionClient(port=port, auto_spawn=False) as client:
            results = client.get_results(exec_id, timeout=60)
            client.shutdown()
    finally:
        entry = local.read_entry(local.registry_path(port))
        if entry is not None:
            local.wait_until(lambda: not entry.is_alive(), timeout=10)
            local.kill_server(entry)  # only if a shutdown did not end it
    support = resources.load_example_module("example_support")
    assert results["return"][0]["folder"] == str(support.bundled_example_data() / FOLDERS["nuclei"])
    assert len(results["counts"]) == SUBSET["nuclei_images"]


# ---------------------------------------------------------------------- nuclei


def test_nuclei_counts_agree_with_ground_truth(make_server, images: Images, tmp_path: Path) -> None:
    folder = images.root / NUCLEI
    with open(folder / "counts.csv", newline="") as f:
        truth = {row["image_id"]: int(row["n_nuclei"]) for row in csv.DictReader(f)}
    n = images.nuclei_images
    assert len(truth) == n

    server = make_server(workers=1)
    events, status = watch(
        server,
        tmp_path / "release",
        "nuclei",
        {"input_dir": str(folder / "images"), "pixel_size": 0.5},
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
    assert rho >= images.min_spearman
    assert np.median(rel) <= images.max_median_error
    for r in rows:
        assert (r["mean_area"] > 0) == (r["count"] > 0)

    calibrated = {"y": 0.5, "x": 0.5}
    stored = kinds(events, "result")
    images_out = [e for e in stored if e["name"] == "image"]
    labels_out = [e for e in stored if e["name"] == "labels"]
    # each image is previewed raw, at the config's pixel size: no picture of it
    previews = kinds(events, "preview")
    shown_in_order(previews, [e["value"] for e in images_out], np.array_equal)
    for event in previews:
        assert event["name"] == "nuclei" and event["meta"]["scale"] == calibrated
    for image, labels, row in zip(images_out, labels_out, rows):
        # the raw image and its labels, each at the config's pixel size
        assert image["value"].shape == (row["height"], row["width"])
        assert image["meta"]["scale"] == calibrated
        assert labels["meta"] == {**image["meta"], "kind": "labels"}
        label = labels["value"]
        assert label.dtype == np.int32 and label.shape == image["value"].shape
        assert len(np.unique(label[label > 0])) == row["count"]
    assert len(images_out) == len(labels_out) == n
    check_progress(events, n)
    assert results_of(events)["return"][0]["images"] == n


# ---------------------------------------------------------------------- plate


def test_plate_row_wells_fields_and_previews_in_order(
    make_server, images: Images, tmp_path: Path
) -> None:
    folder = images.root / PLATE
    files = sorted(folder.glob("*.TIF"))
    n = 3 * len(images.wells)
    raw = np.stack([tifffile.imread(p) for p in files]).astype(np.float32)
    assert raw.shape == (n, 512, 512)

    server = make_server(workers=1)
    events, status = watch(
        server,
        tmp_path / "release",
        "plate",
        {"input_dir": str(folder), "field_interval": 0.03, "pixel_size": 0.3},
    )
    results = results_of(events)
    fields, wells = results["fields"], results["wells"]
    print(f"\nplate: {len(wells)} wells, {len(fields)} fields")
    for w in wells:
        print(
            f"  {w['well']}: intensity {w['mean_intensity']:5.1f}, "
            f"{w['spots_per_field']:5.1f} spots per field"
        )
    assert [w["well"] for w in wells] == images.wells
    assert len(fields) == n and all(w["fields"] == 3 for w in wells)
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

    # fields are previewed, in acquisition order, as the flat-field corrected field
    # itself (float32, at the config's pixel size): no picture rendered on the server
    previews = kinds(events, "preview")
    corrected = raw / flat
    shown_in_order(previews, list(corrected), lambda a, b: np.allclose(a, b, rtol=1e-5))
    for event in previews:
        field = event["value"]
        assert field.shape == (512, 512) and field.dtype == np.float32
        assert event["meta"]["scale"] == {"y": 0.3, "x": 0.3}
    assert results["illumination"][0].shape == (512, 512)

    # exported, the per-well table is one CSV (with the fields' rows, by result name)
    out = tmp_path / "export"
    server.client().get_results(status["id"], directory=out, format="ome-tiff")
    with open(out / "values.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["well"] for r in table if r["name"] == "wells"] == images.wells
    assert [int(r["spots"]) for r in table if r["name"] == "wells"] == [w["spots"] for w in wells]
    assert (out / "illumination.ome.tif").is_file()
    check_progress(events, 2 * n)


# ---------------------------------------------------------------------- time-lapse


def test_timelapse_frames_previewed_counted_and_projected(
    make_server, images: Images, tmp_path: Path
) -> None:
    folder = images.root / TIMELAPSE
    movie = tifffile.imread(next(folder.glob("*.tif")))
    n = images.frames
    assert movie.shape == (n, 130, 130)
    rate = 20.0

    server = make_server(workers=1)
    events, status = watch(
        server,
        tmp_path / "release",
        "timelapse",
        {"input_dir": str(folder), "acquisition_rate": rate, "pixel_size": 0.65},
    )
    previews = kinds(events, "preview")
    shown_in_order(previews, list(movie), np.array_equal)
    assert all(event["name"] == "camera" for event in previews)

    results = results_of(events)
    frames = results["frames"]
    counts = [f["nuclei"] for f in frames]
    print(f"\ntime-lapse: {len(frames)} frames, nuclei per frame {min(counts)}..{max(counts)}")
    assert [f["frame"] for f in frames] == list(range(n))
    assert all(c > 0 for c in counts)
    for f in frames:
        assert f["mean_intensity"] == pytest.approx(float(movie[f["frame"]].mean()))
    projection = results["max_projection"][0]
    assert projection.shape == (130, 130) and projection.dtype == movie.dtype
    np.testing.assert_array_equal(projection, movie.max(axis=0))
    # frames come at the acquisition rate: n - 1 intervals of 1/rate at least
    assert status["finished"] - status["started"] >= (n - 1) / rate
    check_progress(events, n)

    # exported as OME-Zarr, the frames are one time series at the config's pixel size,
    # and so are their labels
    out = tmp_path / "export"
    client = server.client()
    written = client.get_results(status["id"], directory=out, format="ome-zarr")
    assert written["movie"] == [out / "movie.ome.zarr"]
    movie_zarr = zarr.open_group(str(out / "movie.ome.zarr"), mode="r")
    multiscale = movie_zarr.attrs["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["t", "y", "x"]
    assert [a.get("unit") for a in multiscale["axes"]] == [None, "micrometer", "micrometer"]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.65, 0.65]
    np.testing.assert_array_equal(movie_zarr["0"][...], movie)
    labels = zarr.open_group(str(out / "nuclei.ome.zarr"), mode="r")
    assert labels["0"].shape == movie.shape and labels.attrs["zmqruntime"]["kind"] == "labels"
    manifest = (out / "manifest.json").read_text()
    assert '"table": "values.csv"' in manifest
    with open(out / "values.csv", newline="") as f:
        table = [r for r in csv.DictReader(f) if r["name"] == "frames"]
    assert [int(r["nuclei"]) for r in table] == counts


# ---------------------------------------------------------------------- shared behaviour


SLOW = {"nuclei": {}, "plate": {"field_interval": 0.5}, "timelapse": {"acquisition_rate": 2.0}}


@pytest.mark.parametrize("name", sorted(SLOW))
def test_cancel_stops_the_example_cooperatively(
    name: str, client, example_data: Path, tmp_path: Path
) -> None:
    folder = example_data / FOLDERS[name]
    if name == "nuclei":  # unpaced: ten times the subset's images, so the cancel lands mid-run
        folder = tmp_path / "many"
        folder.mkdir()
        for image in sorted((example_data / FOLDERS[name]).glob("*.png")):
            for k in range(10):
                (folder / f"{k}-{image.name}").symlink_to(image)
    pipeline, config_code = resources.example(name)
    exec_id = client.execute(pipeline, config_code, config={"input_dir": str(folder), **SLOW[name]})
    events = []
    for event in client.stream(exec_id):
        events.append(event)
        if event["kind"] == "progress" and len(kinds(events, "progress")) == 1:
            client.cancel(exec_id)
    status = events[-1]["status"]
    assert status["state"] == "cancelled"
    assert status["message"] == "cancelled by request"  # stopped by itself, not killed


def test_relative_input_dir_is_resolved_in_the_servers_working_directory(
    client, example_data: Path
) -> None:
    # the test servers run in this process's working directory
    relative = os.path.relpath(example_data / TIMELAPSE, Path.cwd())
    assert not Path(relative).is_absolute()
    pipeline, config_code = resources.example("timelapse")
    exec_id = client.execute(
        pipeline, config_code, config={"input_dir": relative, "acquisition_rate": 0}
    )
    result = client.get_results(exec_id, timeout=60)["return"][0]
    assert result["frames"] == SUBSET["frames"]


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


def test_timelapse_from_the_command_line(server: Any, example_data: Path, tmp_path):
    port = ("--port", str(server.port))
    examples = resources.examples_dir()
    done = cli(
        "submit",
        str(examples / "timelapse_pipeline.py"),
        "--config",
        str(examples / "timelapse_config.py"),
        "--set",
        f"input_dir={example_data / TIMELAPSE}",
        "--set",
        "acquisition_rate=0",
        *port,
    )
    assert done.returncode == 0, done.stderr
    exec_id = done.stdout.strip()
    server.client().wait(exec_id, timeout=60)
    out = tmp_path / "results"
    fetched = cli("results", exec_id, "--out", str(out), *port)
    assert fetched.returncode == 0, fetched.stderr
    frames = SUBSET["frames"]
    assert f"frames: {frames}" in fetched.stdout and "max_projection: 1" in fetched.stdout
    projection = np.load(next(out.glob("*-max_projection.npy")))
    assert projection.shape == (130, 130)
