"""Watch a time-lapse as if it came from a camera, count nuclei frame by frame.

Frames are previewed live at ``acquisition_rate`` frames per second (the ``camera``
preview), each frame's nuclei are counted (smoothing, background subtraction, Otsu
threshold, labelling and a distance-transform watershed, as in the nuclei example),
and the run stores each frame (``movie``) and its segmentation (``nuclei``, kind
"labels"), one ``frames`` row per frame (frame, nuclei, mean area, mean intensity) and
the maximum projection over time (``max_projection``); exported as OME-Zarr or
OME-TIFF, ``movie`` and ``nuclei`` are one time series each, at ``pixel_size``. Needs the
``examples`` extra: scikit-image, scipy, tifffile.
"""

import time

import numpy as np

from zmqruntime.resources import load_example_module

_support = load_example_module("example_support")
resolve_input_dir = _support.resolve_input_dir
# the folder of the example images that input_dir = None (the default) stands for
EXAMPLE_DATA = "cell_migration_timelapse"
typical_area = _support.typical_area
segment_nuclei = _support.segment_nuclei


def read_movie(files):
    """Frames of the movie, axis 0 = time: multi-page files are stacked in name order."""
    import tifffile

    parts = []
    for path in files:
        data = tifffile.imread(path)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"{path.name}: expected frames of 2-D images, got shape {data.shape}")
        if parts and data.shape[1:] != parts[0].shape[1:]:
            raise ValueError(
                f"{path.name}: frames of {data.shape[1:]}, others {parts[0].shape[1:]}"
            )
        parts.append(data)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def run(ctx, config):
    folder = resolve_input_dir(config.get("input_dir"), example=EXAMPLE_DATA)
    pattern = str(config.get("pattern", "*.tif"))
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no file matches {pattern!r} in {folder}")
    movie = read_movie(files)
    n = len(movie)
    rate = float(config.get("acquisition_rate", 0.0))
    interval = 1.0 / rate if rate > 0 else 0.0
    pace = f"{rate:g} frames/s" if rate > 0 else "full speed"
    ctx.log(
        f"time-lapse: {n} frames of {movie.shape[1]}x{movie.shape[2]} {movie.dtype} "
        f"from {folder}, at {pace}"
    )

    projection = None
    counts = []
    calibrated = _support.calibration(config)  # the pixel size, if the config gives one
    t_next = time.monotonic()
    for i, frame in enumerate(movie):
        if ctx.cancelled:
            ctx.log(f"cancelled after {i} of {n} frames")
            break
        delay = t_next - time.monotonic()
        if delay > 0:
            ctx.wait(delay)  # the camera's next frame; returns at once on cancel
        t_next += interval
        ctx.preview("camera", frame, **calibrated)
        labels = segment_nuclei(frame.astype(np.float32), config)
        # each frame and its segmentation: exported, each name is one time series
        ctx.emit("movie", frame, **calibrated)
        ctx.emit("nuclei", labels.astype(np.int32), kind="labels", **calibrated)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        row = {
            "frame": i,
            "nuclei": int(len(areas)),
            "mean_area": float(areas.mean()) if len(areas) else 0.0,
            "mean_intensity": float(frame.mean()),
        }
        counts.append(row["nuclei"])
        ctx.emit("frames", row)
        projection = frame.copy() if projection is None else np.maximum(projection, frame)
        ctx.progress(i + 1, n, f"frame {i + 1}/{n}: {row['nuclei']} nuclei")

    if projection is not None:
        ctx.emit("max_projection", projection, **calibrated)
    print(f"{len(counts)} frames, {min(counts or [0])} to {max(counts or [0])} nuclei per frame")
    return {
        "frames": len(counts),
        "mean_nuclei": float(np.mean(counts)) if counts else 0.0,
        "shape": list(movie.shape),
    }
