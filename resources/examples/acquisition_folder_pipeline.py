"""Process each image as the microscope writes it: follow a folder, count nuclei as they land.

The run follows ``folder`` with ``ctx.follow_folder``: each image file is taken once,
in acquisition order, as soon as it is complete (renamed into the folder, or written in
place and settled). Each frame is previewed live (``camera``, and ``outlines`` with the
nuclei outlined), its nuclei are counted as in the nuclei example, and one ``frames`` row
is stored per frame; at the end the run stores the maximum projection (``max_projection``).
With ``binning`` n > 1 the nuclei are found on the frame binned n x n (far faster on large
frames); the counts are the same frame's and ``mean_area`` stays in the camera's pixels.
When files arrive faster than they are counted, the run logs it once, with how many wait.
It ends when the acquisition writes ``done_marker``, after ``idle_timeout`` seconds
without a new file, or when cancelled (what was processed is kept). Try it without a
microscope: ``zmqruntime simulate-acquisition DIR --from FOLDER_OR_TIFF --fps 10``.
Needs the ``examples`` extra: scikit-image, scipy, tifffile.
"""

import collections
import fnmatch
import os
import time
from pathlib import Path

import numpy as np

from zmqruntime.folderwatch import TEMPORARY_NAME
from zmqruntime.resources import load_example_module

_support = load_example_module("example_support")
segment_nuclei = _support.segment_nuclei


def outlined(frame, labels):
    """The frame with each nucleus' boundary drawn at the frame's maximum."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= labels > 0
    out = frame.copy()
    out[edge] = frame.max()
    return out


def read_frames(path):
    """The 2-D frames of an image file (a multi-page TIFF gives several)."""
    import tifffile

    data = tifffile.imread(path)
    if data.ndim == 2:
        return [data]
    if data.ndim == 3:
        return list(data)
    raise ValueError(f"{path.name}: expected 2-D frames, got shape {data.shape}")


def image_files(folder, pattern, recursive, done_marker):
    """The paths of the files the follower would take in ``folder`` now (as strings)."""
    pattern = pattern.lower()
    found = set()
    for root, _, names in os.walk(folder):
        for name in names:
            if name == done_marker or TEMPORARY_NAME.search(name):
                continue
            if fnmatch.fnmatchcase(name.lower(), pattern):
                found.add(os.path.join(root, name))
        if not recursive:
            break
    return found


class Pace:
    """Notices, once, that the files arrive faster than the run processes them.

    The camera's pace is the interval between the files' modification times (when the
    acquisition wrote them), over the last few files; files already in the folder at the
    start are a backlog and do not count. Behind: each of those files took the run longer
    than that interval (a single slow file, such as the first one, is caught up with), and
    at least two more files wait in the folder.
    """

    window = 3  # files over which the interval and the time per file are taken

    def __init__(self, folder, pattern, recursive, done_marker, binning):
        self.listing = (folder, pattern, recursive, done_marker)
        self.binning = binning
        self.existing = image_files(*self.listing)  # the backlog
        self.processed = set()
        self.recent = collections.deque(maxlen=self.window)  # (mtime, seconds, frames)
        self.warned = False

    def done(self, path, seconds, frames):
        """After a file: the line to log when the run has fallen behind (once), else None."""
        key = str(path)
        self.processed.add(key)
        if self.warned or key in self.existing:
            return None
        try:
            written = path.stat().st_mtime
        except OSError:
            return None
        self.recent.append((written, seconds, max(frames, 1)))
        if len(self.recent) < self.window:
            return None
        interval = (self.recent[-1][0] - self.recent[0][0]) / (len(self.recent) - 1)
        if min(r[1] for r in self.recent) <= interval:
            return None
        waiting = len(image_files(*self.listing) - self.existing - self.processed)
        if waiting < 2:
            return None
        self.warned = True
        per_frame = float(np.median([r[1] / r[2] for r in self.recent]))
        if self.binning == 1:
            advice = "set binning = 2 or 4 in the config to keep pace"
        else:
            advice = (
                f"binning = {self.binning} is not enough: set binning = {2 * self.binning} "
                "in the config if the nuclei stay a few pixels wide, or acquire more slowly"
            )
        return (
            f"falling behind the acquisition: {waiting} files waiting, ~{per_frame:.2g} s "
            f"per frame while a new file arrives every ~{interval:.2g} s; {advice}"
        )


def run(ctx, config):
    folder = Path(str(config.get("folder", "acquisition"))).expanduser()
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    if not folder.exists():
        folder.mkdir(parents=True)
        ctx.log(f"created {folder}: waiting for the acquisition to write into it")

    projection = None
    counts = []
    binning = _support.binning_factor(config)
    calibrated = _support.calibration(config)  # the pixel size, if the config gives one
    # the outlines are drawn on the binned frame: each of its pixels is binning camera pixels
    binned = (
        {"scale": {k: v * binning for k, v in calibrated["scale"].items()}} if calibrated else {}
    )
    pattern = config.get("pattern", "*.tif*")
    recursive = bool(config.get("recursive", False))
    pace = Pace(folder.resolve(), pattern, recursive, config.get("done_marker"), binning)
    start = time.monotonic()
    files = ctx.follow_folder(
        folder,
        pattern,
        done_marker=config.get("done_marker"),
        idle_timeout=config.get("idle_timeout"),
        recursive=recursive,
        poll=config.get("poll"),
        skip_existing=bool(config.get("skip_existing", False)),
    )
    for path in files:
        began = time.monotonic()
        frames = read_frames(path)
        for frame in frames:
            image = _support.bin_frame(frame, binning)
            labels = segment_nuclei(image, config)
            areas = np.bincount(labels.ravel())[1:]
            areas = areas[areas > 0] * binning**2  # in the camera's pixels
            ctx.preview("camera", frame, **calibrated)
            if binning == 1:
                ctx.preview("outlines", outlined(frame, labels), **calibrated)
            else:
                shown = np.rint(image) if frame.dtype.kind in "iu" else image
                ctx.preview("outlines", outlined(shown.astype(frame.dtype), labels), **binned)
            row = {
                "file": path.name,
                "frame": len(counts),
                "nuclei": int(len(areas)),
                "mean_area": float(areas.mean()) if len(areas) else 0.0,
                "mean_intensity": float(frame.mean()),
                "t": round(time.monotonic() - start, 3),
            }
            ctx.emit("frames", row)
            counts.append(row["nuclei"])
            projection = frame.copy() if projection is None else np.maximum(projection, frame)
        behind = pace.done(path, time.monotonic() - began, len(frames))
        if behind:
            ctx.log(behind)

    if projection is not None:
        ctx.emit("max_projection", projection, **calibrated)
    print(f"{len(counts)} frames, {min(counts or [0])} to {max(counts or [0])} nuclei per frame")
    return {"frames": len(counts), "mean_nuclei": float(np.mean(counts)) if counts else 0.0}
