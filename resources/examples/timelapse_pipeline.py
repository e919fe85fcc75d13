"""Watch a time-lapse as if it came from a camera, count nuclei frame by frame.

Frames are previewed live at ``acquisition_rate`` frames per second (the ``camera``
preview), each frame's nuclei are counted (smoothing, background subtraction, Otsu
threshold, labelling and a distance-transform watershed, as in the nuclei example),
and the run stores one ``frames`` row per frame (frame, nuclei, mean area, mean
intensity) plus the maximum projection over time (``max_projection``). Needs the
``examples`` extra: scikit-image, scipy, tifffile.
"""

import os
import time
from pathlib import Path

import numpy as np


def resolve_input_dir(value):
    """The input folder; a relative path is taken from the server's working directory."""
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_dir():
        where = "" if Path(str(value)).is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"input_dir {str(value)!r} not found: no folder {path}{where}")
    return path.resolve()


def typical_area(labels):
    """Median object area, ignoring specks of a few pixels (noise)."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 8]
    return float(np.median(areas)) if len(areas) else 0.0


def segment_nuclei(image, config):
    """Label image of the nuclei (0 = background, 1..N = nuclei)."""
    from scipy import ndimage as ndi
    from skimage import feature, filters, segmentation

    sigma = float(config.get("smoothing_sigma", 1.0))
    smooth = filters.gaussian(image, sigma=sigma, preserve_range=True) if sigma > 0 else image
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros(image.shape, np.int32)

    # 1. a first Otsu pass measures the nucleus size, which scales all that follows
    first, _ = ndi.label(ndi.binary_fill_holes(smooth > filters.threshold_otsu(smooth)))
    radius = max(2.0, np.sqrt(typical_area(first) / np.pi))

    # 2. remove the background (uneven illumination, out-of-focus glow, bright debris
    #    wider than a nucleus), then threshold again
    background_sigma = float(config.get("background_scale", 4.0)) * radius
    foreground = smooth - filters.gaussian(smooth, sigma=background_sigma, preserve_range=True)
    if float(foreground.max()) <= float(foreground.min()):
        return np.zeros(image.shape, np.int32)
    mask = ndi.binary_fill_holes(foreground > filters.threshold_otsu(foreground))
    labels, n = ndi.label(mask)
    area = typical_area(labels) or np.pi * radius**2
    areas = np.bincount(labels.ravel())
    keep = areas >= max(4.0, float(config.get("min_area_fraction", 0.1)) * area)
    keep[0] = False
    mask = keep[labels]
    labels, n = ndi.label(mask)
    if n == 0 or not config.get("split_touching", True):
        return labels.astype(np.int32)

    # 3. split touching nuclei: one marker per peak of the smoothed distance to the edge
    radius = np.sqrt(area / np.pi)
    distance = ndi.distance_transform_edt(mask)
    distance = filters.gaussian(distance, sigma=max(1.0, radius / 4), preserve_range=True)
    min_distance = max(2, int(radius * float(config.get("split_distance", 0.5))))
    peaks = feature.peak_local_max(
        distance, min_distance=min_distance, labels=labels, exclude_border=False
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    split = segmentation.watershed(-distance, markers, mask=mask)
    orphans = mask & (split == 0)  # objects that got no marker keep their own label
    if orphans.any():
        extra, _ = ndi.label(orphans)
        split[orphans] = extra[orphans] + split.max()
    return split.astype(np.int32)


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
    folder = resolve_input_dir(config.get("input_dir", "."))
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
    t_next = time.monotonic()
    for i, frame in enumerate(movie):
        if ctx.cancelled:
            ctx.log(f"cancelled after {i} of {n} frames")
            break
        delay = t_next - time.monotonic()
        if delay > 0:
            ctx.wait(delay)  # the camera's next frame; returns at once on cancel
        t_next += interval
        ctx.preview("camera", frame)
        labels = segment_nuclei(frame.astype(np.float32), config)
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
        ctx.emit("max_projection", projection)
    print(f"{len(counts)} frames, {min(counts or [0])} to {max(counts or [0])} nuclei per frame")
    return {
        "frames": len(counts),
        "mean_nuclei": float(np.mean(counts)) if counts else 0.0,
        "shape": list(movie.shape),
    }
