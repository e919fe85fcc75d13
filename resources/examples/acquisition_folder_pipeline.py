"""Process each image as the microscope writes it: follow a folder, count nuclei as they land.

The run follows ``folder`` with ``ctx.follow_folder``: each image file is taken once,
in acquisition order, as soon as it is complete (renamed into the folder, or written in
place and settled). Each frame is previewed live (``camera``, and ``outlines`` with the
nuclei outlined), its nuclei are counted as in the nuclei example, and one ``frames`` row
is stored per frame; at the end the run stores the maximum projection (``max_projection``).
It ends when the acquisition writes ``done_marker``, after ``idle_timeout`` seconds
without a new file, or when cancelled (what was processed is kept). Try it without a
microscope: ``zmqruntime simulate-acquisition DIR --from FOLDER_OR_TIFF --fps 10``.
Needs the ``examples`` extra: scikit-image, scipy, tifffile.
"""

import time
from pathlib import Path

import numpy as np

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


def run(ctx, config):
    folder = Path(str(config.get("folder", "acquisition"))).expanduser()
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    if not folder.exists():
        folder.mkdir(parents=True)
        ctx.log(f"created {folder}: waiting for the acquisition to write into it")

    projection = None
    counts = []
    calibrated = _support.calibration(config)  # the pixel size, if the config gives one
    start = time.monotonic()
    files = ctx.follow_folder(
        folder,
        config.get("pattern", "*.tif*"),
        done_marker=config.get("done_marker"),
        idle_timeout=config.get("idle_timeout"),
        recursive=bool(config.get("recursive", False)),
        poll=config.get("poll"),
        skip_existing=bool(config.get("skip_existing", False)),
    )
    for path in files:
        for frame in read_frames(path):
            labels = segment_nuclei(frame.astype(np.float32), config)
            areas = np.bincount(labels.ravel())[1:]
            areas = areas[areas > 0]
            ctx.preview("camera", frame, **calibrated)
            ctx.preview("outlines", outlined(frame, labels), **calibrated)
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

    if projection is not None:
        ctx.emit("max_projection", projection, **calibrated)
    print(f"{len(counts)} frames, {min(counts or [0])} to {max(counts or [0])} nuclei per frame")
    return {"frames": len(counts), "mean_nuclei": float(np.mean(counts)) if counts else 0.0}
