"""Helpers shared by the bundled example pipelines (loaded from the installed package).

Pipelines are sent to a server as source code, so they cannot import a sibling file;
they load this one with ``zmqruntime.resources.load_example_module("example_support")``.
"""

import os
from pathlib import Path

import numpy as np

EXAMPLE_DATA_ENV = "ZMQRUNTIME_EXAMPLE_DATA"


def bundled_example_data():
    """The small subset of the example images that ships with zmqruntime (tests/data in a
    checkout, resources/example-data in the wheel); None if this install lacks it."""
    from zmqruntime.resources import resources_dir

    resources = resources_dir()
    for folder in (resources / "example-data", resources.parent / "tests" / "data"):
        if folder.is_dir():
            return folder.resolve()
    return None


def example_data_dir(subfolder):
    """Where an example's images are when its config leaves ``input_dir`` at None.

    In order: ``$ZMQRUNTIME_EXAMPLE_DATA/<subfolder>`` (when the variable is set, only
    there), the full set in ``../shared/data`` from the server's working directory, then
    the subset bundled with zmqruntime, so the examples run in a bare clone or a plain
    install. All three share the layout of ``../shared/data``.
    """
    chosen = os.environ.get(EXAMPLE_DATA_ENV)
    if chosen:
        path = Path.cwd() / Path(chosen).expanduser() / subfolder
        if not path.is_dir():
            raise FileNotFoundError(
                f"{EXAMPLE_DATA_ENV}={chosen!r} has no folder {subfolder!r} (looked for {path})"
            )
        return path.resolve()
    candidates = [Path.cwd().parent / "shared" / "data"]
    bundled = bundled_example_data()
    if bundled is not None:
        candidates.append(bundled)
    for root in candidates:
        if (root / subfolder).is_dir():
            return (root / subfolder).resolve()
    looked = ", ".join(str(root / subfolder) for root in candidates)
    raise FileNotFoundError(
        f"no example images {subfolder!r}: looked in {looked}; set input_dir in the config "
        f"or {EXAMPLE_DATA_ENV}=DIR"
    )


def resolve_input_dir(value, example=None):
    """The input folder; a relative path is taken from the server's working directory.

    ``value`` None (the examples' default) means the example images ``example`` names
    (a folder of the example data, e.g. ``"cell_migration_timelapse"``).
    """
    if value is None and example is not None:
        return example_data_dir(example)
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_dir():
        where = "" if Path(str(value)).is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"input_dir {str(value)!r} not found: no folder {path}{where}")
    return path.resolve()


def calibration(config):
    """The image metadata keywords of ``config.pixel_size`` (micrometres per pixel) for
    ``ctx.emit``/``ctx.preview``: ``{"scale": {"y": p, "x": p}}``, or {} when not set."""
    size = config.get("pixel_size")
    return {"scale": {"y": float(size), "x": float(size)}} if size else {}


def binning_factor(config):
    """``config.binning`` (default 1) checked: a whole number of pixels, 1 or more."""
    value = config.get("binning", 1)
    value = 1 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"binning must be a whole number of pixels (1, 2, 4...), not {value!r}")
    if value < 1:
        raise ValueError(f"binning must be 1 (none) or more, not {value!r}")
    return int(value)


def bin_frame(frame, n):
    """The 2-D ``frame`` binned ``n`` x ``n`` as a camera bins: the mean of each n x n block
    of pixels, as float32; rows and columns that do not fill a block are cropped. ``n`` 1
    gives the frame itself as float32."""
    if n == 1:
        return frame.astype(np.float32)
    height, width = frame.shape[0] // n, frame.shape[1] // n
    if height == 0 or width == 0:
        raise ValueError(f"binning {n} is larger than the {frame.shape[1]}x{frame.shape[0]} frame")
    blocks = frame[: height * n, : width * n].astype(np.float32)
    return blocks.reshape(height, n, width, n).mean(axis=(1, 3), dtype=np.float32)


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
