"""Helpers shared by the bundled example pipelines (loaded from the installed package).

Pipelines are sent to a server as source code, so they cannot import a sibling file;
they load this one with ``zmqruntime.resources.load_example_module("example_support")``.
"""

import os
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
