"""Count nuclei in every image of a folder (fluorescence, nuclear stain).

Per image: Gaussian smoothing, background subtraction, automatic (Otsu) threshold,
labelling, and a distance-transform watershed that splits touching nuclei (a plain
threshold undercounts them by about a third). Every size is relative to the typical
nucleus radius, measured on the image itself, so one setting fits images taken at
different magnifications. Each image yields one ``counts`` row (image, count, mean
area) as soon as it is done, the image (``image``) and its segmentation (``labels``,
kind "labels") as results, a live preview of the image, and a progress step; with
``pixel_size`` in the config, images and labels carry their physical scale. Needs the
``examples`` extra: scikit-image, scipy, tifffile.
"""

import numpy as np

from zmqruntime.resources import load_example_module

_support = load_example_module("example_support")
resolve_input_dir = _support.resolve_input_dir
# the folder of the example images that input_dir = None (the default) stands for
EXAMPLE_DATA = "dsb2018_stage1_fluo_nuclei/images"
typical_area = _support.typical_area
segment_nuclei = _support.segment_nuclei


def read_gray(path):
    """A 2-D float image; colour images with equal channels are averaged."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(path)
    else:
        from skimage import io

        image = io.imread(path)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(f"{path.name}: expected a 2-D image, got shape {image.shape}")
    return image.astype(np.float32)


def run(ctx, config):
    folder = resolve_input_dir(config.get("input_dir"), example=EXAMPLE_DATA)
    pattern = str(config.get("pattern", "*.png"))
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no file matches {pattern!r} in {folder}")
    ctx.log(f"counting nuclei in {len(files)} images of {folder}")

    counts = []
    calibrated = _support.calibration(config)  # the pixel size, if the config gives one
    for i, path in enumerate(files):
        if ctx.cancelled:
            ctx.log(f"cancelled after {i} of {len(files)} images")
            break
        image = read_gray(path)
        labels = segment_nuclei(image, config)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        row = {
            "image": path.stem,
            "count": int(len(areas)),
            "mean_area": float(areas.mean()) if len(areas) else 0.0,
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
        }
        counts.append(row["count"])
        ctx.emit("counts", row)
        # the raw image and its segmentation, not a picture of them: a viewer overlays the
        # labels on the image (napari: a Labels layer) at the image's physical scale
        ctx.emit("image", image, **calibrated)
        ctx.emit("labels", labels.astype(np.int32), kind="labels", **calibrated)
        ctx.preview("nuclei", image, **calibrated)
        ctx.progress(i + 1, len(files), f"{path.name}: {row['count']} nuclei")

    total = int(sum(counts))
    print(f"{len(counts)} images, {total} nuclei (median {np.median(counts or [0]):g} per image)")
    return {"images": len(counts), "nuclei": total, "folder": str(folder)}
