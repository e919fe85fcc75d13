"""Following an acquisition folder: ``ctx.follow_folder`` on a real server, fed by a writer.

The writer is ``zmqruntime simulate-acquisition`` in its own process: it plays the pages
of the real time-lapse into a temporary folder at 10 frames/s, half renamed into place and
half written in place in chunks with pauses, and logs when each file was complete. The
run emits one result per file with the hash of its pixels, so every frame is checked
against the source; latency is measured from the writer's "complete" to the result event
arriving here. The follower's own rules (order, skipping, remote filesystems) are also
tested in-process, without a server.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import SHARED_DATA, ServerProcess, start_server

from zmqruntime import acquisition, resources
from zmqruntime.acquisition import FolderFollower, is_remote_filesystem
from zmqruntime.simulate import iter_records

TIMELAPSE = "cell_migration_timelapse/cancer_cell_migration_crop.tif"  # the full 48 frames
N_FRAMES = 24  # 2.4 s of acquisition at 10 frames/s
LATENCY_BOUND = 0.5  # what the issue asks of each frame, on an idle machine
LATENCY_ASSERTED = 2.0  # what is asserted: generous, CI machines are loaded

FOLLOW = """
import hashlib, time
import tifffile

def run(ctx, config):
    options = dict(config.get("options", {}))
    for path in ctx.follow_folder(config.folder, config.get("pattern", "*.tif*"), **options):
        pixels = tifffile.imread(path)
        ctx.emit("frame", {
            "name": path.name,
            "sha": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "shape": list(pixels.shape),
        })
        if config.get("slow"):
            time.sleep(config.slow)
    return "ended"
"""


@pytest.fixture(scope="module")
def acq_server(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("acq") / "server", workers=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def timelapse(example_data: Path) -> Path:
    """The time-lapse the writer plays: the full 48 frames where the full data is present
    (ZMQRUNTIME_EXAMPLE_DATA or ../shared/data), else the 10 frames committed in tests/data."""
    env = os.environ.get("ZMQRUNTIME_EXAMPLE_DATA")
    full = (Path(env) if env else SHARED_DATA) / TIMELAPSE
    if full.is_file():
        return full
    return next((example_data / "cell_migration_timelapse").glob("*.tif"))


@pytest.fixture(scope="module")
def source_pages(timelapse: Path) -> list[np.ndarray]:
    return list(tifffile.imread(timelapse))


def pixel_hash(frame: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest()


class Watcher:
    """Follows one run's events in a thread, stamping each with its arrival time."""

    def __init__(self, server: ServerProcess, exec_id: str, previews: bool = False) -> None:
        self.client = server.client()
        self.exec_id = exec_id
        self.previews = previews
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.following = threading.Event()  # the follower's first progress arrived
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.client.stream(self.exec_id, previews=self.previews):
                self.events.append((time.time(), event))
                if event["kind"] == "progress" and "acquisition" in event:
                    self.following.set()
        except BaseException as exc:  # re-raised by join()
            self.errors.append(exc)

    def join(self, timeout: float = 60.0) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end"
        if self.errors:
            raise self.errors[0]
        last = self.events[-1][1]
        assert last["kind"] == "state"
        return last["status"]

    def results(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e["kind"] == "result"]


def start_writer(folder: Path, log: Path, source: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "zmqruntime", "simulate-acquisition", str(folder),
        "--from", str(source), "--fps", "10", "--quiet",
        "--log", str(log), *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def follow_run(server: ServerProcess, folder: Path, **options: Any) -> tuple[str, Watcher]:
    """Start a run that follows ``folder``; return once its follower is running."""
    client = server.client()
    exec_id = client.execute(FOLLOW, config={"folder": str(folder), "options": options})
    watcher = Watcher(server, exec_id)
    assert watcher.following.wait(20), "the follower never reported progress"
    return exec_id, watcher


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@pytest.mark.parametrize("poll", [None, 0.1], ids=["inotify", "polling"])
def test_each_frame_once_in_order_complete_and_soon(
    acq_server: ServerProcess,
    timelapse: Path,
    source_pages: list[np.ndarray],
    tmp_path: Path,
    poll: float | None,
) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    log = tmp_path / "writer.jsonl"
    exec_id, watcher = follow_run(acq_server, folder, done_marker="acquisition_done", poll=poll)
    n_frames = min(N_FRAMES, len(source_pages))
    writer = start_writer(folder, log, timelapse, "--partial-writes", "--frames", str(n_frames))
    _, errors = writer.communicate(timeout=60)
    assert writer.returncode == 0, errors.decode()
    status = watcher.join()
    assert status["state"] == "completed", status

    written = list(iter_records(log))
    assert len(written) == n_frames
    assert {r["mode"] for r in written} == {"renamed", "in place"}
    got = watcher.results()
    frames = [e["value"] for _, e in got if e["name"] == "frame"]
    # every frame exactly once, in the order written, each with the source's pixels
    assert [f["name"] for f in frames] == [r["name"] for r in written]
    for frame, source in zip(frames, source_pages):
        assert frame["sha"] == pixel_hash(source), f"{frame['name']} differs from the source"
    assert got[-1][1]["value"] == "ended"  # the follower ended on the done marker

    finished = {r["name"]: (r["finished"], r["mode"]) for r in written}
    latency = {"renamed": [], "in place": []}
    for arrived, e in got:
        if e["name"] == "frame":
            done, mode = finished[e["value"]["name"]]
            latency[mode].append(arrived - done)
    every = latency["renamed"] + latency["in place"]
    p99 = percentile(every, 99)
    mode = "polling every 0.1 s" if poll else "inotify"
    print(
        f"\n{mode}: file complete -> result event, {len(every)} frames at 10 frames/s: "
        f"p50 {percentile(every, 50) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
        f"(renamed p99 {percentile(latency['renamed'], 99) * 1000:.0f} ms, "
        f"in place p99 {percentile(latency['in place'], 99) * 1000:.0f} ms; "
        f"asked: <= {LATENCY_BOUND * 1000:.0f} ms)"
    )
    assert p99 <= LATENCY_ASSERTED, f"p99 {p99:.3f} s from a file complete to its result"
    logs = "\n".join(e["text"] for e in acq_server.client().get_logs(exec_id))
    assert "done marker 'acquisition_done' found" in logs
    assert ("polling every 0.1 s" in logs) == (poll is not None)


def test_idle_timeout_ends_the_run_cleanly(acq_server: ServerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    frame = np.arange(64, dtype=np.uint16).reshape(8, 8)
    tifffile.imwrite(folder / "before.tif", frame)
    client = acq_server.client()
    t0 = time.monotonic()
    exec_id = client.execute(
        FOLLOW, config={"folder": str(folder), "options": {"idle_timeout": 0.5}}
    )
    results = client.get_results(exec_id, timeout=30)
    took = time.monotonic() - t0
    assert [v["name"] for v in results["frame"]] == ["before.tif"]
    assert results["return"] == ["ended"]
    assert took < 10, took
    logs = "\n".join(e["text"] for e in client.get_logs(exec_id))
    assert "no new file for 0.5 s" in logs


def test_cancel_mid_acquisition_ends_within_a_second_and_keeps_results(
    acq_server: ServerProcess, timelapse: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    exec_id, watcher = follow_run(acq_server, folder, done_marker="acquisition_done")
    # 4 frames/s: even the 10 frames of the subset last well past the cancel below
    writer = start_writer(
        folder, tmp_path / "writer.jsonl", timelapse, "--partial-writes", "--fps", "4"
    )
    client = acq_server.client()
    try:
        deadline = time.monotonic() + 30
        while len(watcher.results()) < 6:
            assert time.monotonic() < deadline, "frames did not arrive"
            time.sleep(0.02)
        t0 = time.monotonic()
        client.cancel(exec_id)
        final = client.wait(exec_id, timeout=10)
        took = time.monotonic() - t0
    finally:
        writer.kill()
        writer.communicate()
    assert final["state"] == "cancelled", final
    print(f"\ncancel -> final state: {took * 1000:.0f} ms")
    assert took < 1.0, f"the run took {took:.2f} s to end after the cancel"
    kept = client.list_results(exec_id)
    assert len(kept) >= 6
    assert [r["name"] for r in kept].count("frame") >= 6
    watcher.join()


def test_a_truncated_tiff_is_logged_and_skipped(acq_server: ServerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    frames = [np.full((16, 16), i, np.uint16) for i in range(3)]
    for i, frame in enumerate(frames):
        tifffile.imwrite(folder / f"f{i}.tif", frame)
    whole = io.BytesIO()
    tifffile.imwrite(whole, np.ones((64, 64), np.uint16))
    (folder / "f1.tif").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (folder / "done").touch()
    client = acq_server.client()
    t0 = time.monotonic()
    exec_id = client.execute(
        FOLLOW, config={"folder": str(folder), "options": {"done_marker": "done", "give_up": 1.0}}
    )
    results = client.get_results(exec_id, timeout=30)
    took = time.monotonic() - t0
    assert [v["name"] for v in results["frame"]] == ["f0.tif", "f2.tif"]
    assert took < 10, took
    logs = "\n".join(e["text"] for e in client.get_logs(exec_id))
    assert "skipped f1.tif: still not readable 1 s after it stopped changing" in logs


def test_the_bundled_example_follows_a_simulated_acquisition(
    acq_server: ServerProcess, timelapse: Path, source_pages: list[np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "acq"
    folder.mkdir()
    pipeline, config_code = resources.example("acquisition_folder")
    client = acq_server.client()
    exec_id = client.execute(pipeline, config_code, config={"folder": str(folder)})
    cmd = [
        sys.executable, "-m", "zmqruntime", "simulate-acquisition", str(folder),
        "--from", str(timelapse), "--fps", "20", "--frames", "6",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "wrote 6 files" in out.stdout
    results = client.get_results(exec_id, timeout=60)
    rows = results["frames"]
    assert [r["frame"] for r in rows] == list(range(6))
    assert all(r["nuclei"] > 0 for r in rows)
    expected = np.max(np.stack(source_pages[:6]), axis=0)
    np.testing.assert_array_equal(results["max_projection"][0], expected)
    assert results["return"][0]["frames"] == 6


def run_example(
    server: ServerProcess, folder: Path, source: Path, fps: float, frames: int, **config: Any
) -> tuple[str, Watcher]:
    """The bundled example following ``folder`` (and followed, previews included) while the
    writer plays ``frames`` frames of ``source`` into it at ``fps``; returns once it ended."""
    pipeline, config_code = resources.example("acquisition_folder")
    exec_id = server.client().execute(
        pipeline, config_code, config={"folder": str(folder), **config}
    )
    watcher = Watcher(server, exec_id, previews=True)
    assert watcher.following.wait(30), "the example never started following the folder"
    cmd = [
        sys.executable, "-m", "zmqruntime", "simulate-acquisition", str(folder),
        "--from", str(source), "--fps", str(fps), "--frames", str(frames), "--quiet",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = watcher.join(timeout=120)
    assert status["state"] == "completed", status
    return exec_id, watcher


def test_the_bundled_example_with_binning_counts_as_without_and_scales_the_outlines(
    acq_server: ServerProcess, timelapse: Path, source_pages: list[np.ndarray], tmp_path: Path
) -> None:
    """binning = 2 on the real frames: per-frame counts and mean areas (in the camera's
    pixels) as the full frames give, the outlines preview binned at twice the pixel size,
    the camera preview and the max projection at full size. At 2 frames/s (binned, a frame
    takes some 50 ms here) the run keeps pace and says nothing of falling behind."""
    n = 4
    exec_id, watcher = run_example(
        acq_server, tmp_path / "acq", timelapse, fps=2, frames=n, binning=2, pixel_size=0.65
    )
    client = acq_server.client()
    results = client.get_results(exec_id, timeout=30)
    rows = results["frames"]
    assert [r["frame"] for r in rows] == list(range(n))
    support = resources.load_example_module("example_support")
    for row, page in zip(rows, source_pages):  # what the full frame gives, here
        labels = support.segment_nuclei(page.astype(np.float32), {})
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        assert len(areas) > 0
        assert abs(row["nuclei"] - len(areas)) <= max(2, 0.25 * len(areas)), (row, len(areas))
        assert row["mean_area"] == pytest.approx(float(areas.mean()), rel=0.25), row
    height, width = source_pages[0].shape
    np.testing.assert_array_equal(
        results["max_projection"][0], np.max(np.stack(source_pages[:n]), axis=0)
    )

    previews = [e for _, e in watcher.events if e["kind"] == "preview"]
    camera = [e for e in previews if e["name"] == "camera"]
    outlines = [e for e in previews if e["name"] == "outlines"]
    assert camera and outlines, sorted({e["name"] for e in previews})
    for event in camera:
        assert event["value"].shape == (height, width)
        assert event["meta"]["scale"] == pytest.approx({"y": 0.65, "x": 0.65})
    binned = [np.rint(support.bin_frame(p, 2)).astype(p.dtype) for p in source_pages[:n]]
    for event in outlines:
        assert event["value"].shape == (height // 2, width // 2)
        assert event["meta"]["scale"] == pytest.approx({"y": 1.3, "x": 1.3})
        # the binned frame, but for the outlines drawn on it
        assert max(np.mean(event["value"] == b) for b in binned) > 0.7
    logs = "\n".join(e["text"] for e in client.get_logs(exec_id))
    assert "falling behind" not in logs, logs


def test_the_bundled_example_says_once_when_it_falls_behind(
    acq_server: ServerProcess, timelapse: Path, tmp_path: Path
) -> None:
    """Frames written as fast as the writer can (asked: 1000/s): each takes the run longer
    (10-100 ms), files pile up, and the run says so once, with what to do; none is lost."""
    n = 10  # all the frames of the subset
    exec_id, _ = run_example(acq_server, tmp_path / "acq", timelapse, fps=1000, frames=n)
    client = acq_server.client()
    assert [r["frame"] for r in client.get_results(exec_id, timeout=30)["frames"]] == list(range(n))
    logs = [e["text"] for e in client.get_logs(exec_id)]
    behind = [line for line in logs if "falling behind the acquisition" in line]
    assert len(behind) == 1, logs
    waiting = re.search(r"(\d+) files waiting", behind[0])
    assert waiting is not None and 2 <= int(waiting.group(1)) <= n - 3, behind[0]
    assert "s per frame" in behind[0] and "set binning = 2 or 4 in the config" in behind[0]
    print(f"\n{behind[0]}")


# --------------------------------------------------------------------------- in-process


def write_tiff(path: Path, value: int) -> None:
    tifffile.imwrite(path, np.full((8, 8), value, np.uint16))


def test_files_present_at_start_come_first_in_mtime_then_natural_name_order(
    tmp_path: Path,
) -> None:
    for name in ["frame_10.tif", "frame_2.tif", "frame_1.TIF"]:
        write_tiff(tmp_path / name, 1)
        os.utime(tmp_path / name, ns=(10**18, 10**18))  # the same mtime: names decide
    write_tiff(tmp_path / "a_last.tif", 1)
    os.utime(tmp_path / "a_last.tif", ns=(2 * 10**18, 2 * 10**18))
    for name in [".frame_3.tif.part", "frame_4.tif.tmp", "notes.txt", "done"]:
        (tmp_path / name).write_bytes(b"x")
    got = [p.name for p in FolderFollower(tmp_path, done_marker="done")]
    assert got == ["frame_1.TIF", "frame_2.tif", "frame_10.tif", "a_last.tif"]


def test_skip_existing_and_recursive(tmp_path: Path) -> None:
    write_tiff(tmp_path / "old.tif", 1)
    (tmp_path / "pos1").mkdir()
    stop = threading.Event()
    seen: list[str] = []
    follower = FolderFollower(
        tmp_path, recursive=True, skip_existing=True, idle_timeout=5, stop=stop
    )

    def write_later() -> None:
        time.sleep(0.3)
        write_tiff(tmp_path / "pos1" / "new.tif", 2)
        (tmp_path / "pos2").mkdir()
        write_tiff(tmp_path / "pos2" / "newer.tif", 3)

    threading.Thread(target=write_later, daemon=True).start()
    for path in follower:
        seen.append(str(path.relative_to(tmp_path)))
        if len(seen) == 2:
            stop.set()
    assert seen == [os.path.join("pos1", "new.tif"), os.path.join("pos2", "newer.tif")]
    assert follower.end_reason is not None and "cancelled" in follower.end_reason


def test_remote_filesystems_are_polled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_remote_filesystem("nfs4") and is_remote_filesystem("cifs")
    assert is_remote_filesystem("fuse.sshfs") and is_remote_filesystem("smb3")
    assert not is_remote_filesystem("ext4") and not is_remote_filesystem("tmpfs")
    assert FolderFollower(tmp_path).mode == "watch"
    monkeypatch.setattr(acquisition, "filesystem_of", lambda path: ("nfs4", "rw"))
    follower = FolderFollower(tmp_path)
    assert follower.mode == "poll" and "nfs4" in follower.mode_reason
    assert FolderFollower(tmp_path, poll=0.05).poll == 0.05


def test_progress_reports_files_seen_and_processed(tmp_path: Path) -> None:
    for i in range(3):
        write_tiff(tmp_path / f"f{i}.tif", i)
    reports: list[dict[str, Any]] = []
    follower = FolderFollower(
        tmp_path, idle_timeout=0.3, progress=lambda s: reports.append(s.as_dict())
    )
    assert len(list(follower)) == 3
    assert reports[-1]["seen"] == 3 and reports[-1]["processed"] == 3
    assert "3 files seen, 3 processed" in follower.stats.message()


def test_a_tiff_cut_short_is_never_taken_for_complete(timelapse: Path, tmp_path: Path) -> None:
    """What a reader sees of a TIFF written in place passes only once its pixels are all there
    (bytes that no reader needs, such as unused padding at the very end, may still lack)."""
    real = timelapse.read_bytes()
    cuts = set()
    with tifffile.TiffFile(timelapse) as tif:
        pages = list(tif.pages)
        for page in pages[:2] + pages[-1:]:  # around the IFDs and data of some pages
            for edge in (page.offset, *page.dataoffsets, page.dataoffsets[-1] + page.nbytes):
                cuts.update(edge + d for d in (-1, 0, 1) if 0 <= edge + d < len(real))
    single, stack = io.BytesIO(), io.BytesIO()
    tifffile.imwrite(single, np.arange(4096, dtype=np.uint16).reshape(64, 64))
    data = np.arange(3072, dtype=np.uint16).reshape(3, 32, 32)
    tifffile.imwrite(stack, data, photometric="minisblack")  # its IFDs come after the data
    path = tmp_path / "x.tif"
    for raw, lengths in [
        (real, sorted(cuts)),
        (single.getvalue(), range(0, len(single.getvalue()), 5)),
        (stack.getvalue(), [*range(0, 6390, 11), *range(6390, len(stack.getvalue()))]),
    ]:
        path.write_bytes(raw)
        assert acquisition.tiff_problem(path)[0] is None
        whole = tifffile.imread(path)
        passed = []
        for n in lengths:
            path.write_bytes(raw[:n])
            if acquisition.tiff_problem(path)[0] is None:
                passed.append(n)
                np.testing.assert_array_equal(tifffile.imread(path), whole, f"{n} bytes")
        assert len(passed) <= 16, passed  # at most the unused tail


def test_binning_is_a_camera_binning_and_bad_values_fail() -> None:
    support = resources.load_example_module("example_support")
    frame = np.arange(7 * 9, dtype=np.uint16).reshape(7, 9)
    binned = support.bin_frame(frame, 2)  # the 7th row and 9th column are cropped
    assert binned.shape == (3, 4) and binned.dtype == np.float32
    assert binned[0, 0] == frame[:2, :2].mean() and binned[2, 3] == frame[4:6, 6:8].mean()
    np.testing.assert_array_equal(support.bin_frame(frame, 1), frame.astype(np.float32))
    assert support.binning_factor({}) == 1 and support.binning_factor({"binning": 4.0}) == 4
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match="binning"):
            support.binning_factor({"binning": bad})
    with pytest.raises(ValueError, match="larger than the 9x7 frame"):
        support.bin_frame(frame, 8)


def test_bad_arguments_fail_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no folder"):
        FolderFollower(tmp_path / "missing")
    with pytest.raises(ValueError, match="poll"):
        FolderFollower(tmp_path, poll=0)
