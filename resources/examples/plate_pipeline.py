"""One plate row, well by well: flat-field correction, intensity and spot counts.

Fields are read in acquisition order (well, then field). A first pass estimates the
illumination (the flat field) from all fields: the mean of the fields, each scaled to
mean 1, smoothed so that only the optics' vignetting remains. A second pass streams
every corrected field as a live preview (float32, at ``pixel_size`` when the config
gives it), measures its mean intensity
and counts its spots (difference of Gaussians above a robust noise threshold), and
emits one ``fields`` row per field and one ``wells`` row as soon as a well is done:
the ``wells`` rows are the per-well table. The flat field is stored as
``illumination``. Needs the ``examples`` extra: scikit-image, scipy, tifffile.
"""

import collections
import re
import time

import numpy as np

from zmqruntime.resources import load_example_module

_support = load_example_module("example_support")
resolve_input_dir = _support.resolve_input_dir
# the folder of the example images that input_dir = None (the default) stands for
EXAMPLE_DATA = "bbbc016_transfluor_plate"


def list_fields(folder, pattern, name_regex):
    """[(well, field, path)] in acquisition order: row letter, column number, field."""
    rx = re.compile(name_regex)
    fields = []
    for path in folder.glob(pattern):
        match = rx.search(path.name)
        if match is None:
            continue
        well = match["well"].upper()
        fields.append(((well[0], int(well[1:]), match["field"]), well, match["field"], path))
    if not fields:
        raise FileNotFoundError(
            f"no file in {folder} matches {pattern!r} with a well and field ({name_regex!r})"
        )
    fields.sort(key=lambda item: item[0])
    return [(well, field, path) for _, well, field, path in fields]


def read_field(path):
    import tifffile

    image = tifffile.imread(path)
    if image.ndim != 2:
        raise ValueError(f"{path.name}: expected a 2-D field, got shape {image.shape}")
    return image.astype(np.float32)


def estimate_illumination(ctx, fields, sigma):
    """Flat field (mean 1) from all fields; None if the run was cancelled meanwhile."""
    from skimage import filters

    total = None
    n = len(fields)
    for i, (_, _, path) in enumerate(fields):
        if ctx.cancelled:
            return None
        image = read_field(path)
        scaled = image / max(float(image.mean()), 1e-6)
        if total is None:
            total = np.zeros_like(scaled, dtype=np.float64)
        elif scaled.shape != total.shape:
            raise ValueError(f"{path.name}: shape {scaled.shape}, other fields {total.shape}")
        total += scaled
        ctx.progress(i + 1, 2 * n, f"illumination: {i + 1}/{n} fields")
    flat = filters.gaussian(total / n, sigma=sigma, preserve_range=True)
    return (flat / flat.mean()).astype(np.float32)


def find_spots(image, config):
    """Mask of the bright spots (pits and vesicles) of one corrected field."""
    from scipy import ndimage as ndi
    from skimage import filters

    response = filters.difference_of_gaussians(
        image,
        float(config.get("spot_sigma", 1.0)),
        float(config.get("spot_background_sigma", 3.0)),
    )
    center = float(np.median(response))
    noise = 1.4826 * float(np.median(np.abs(response - center)))
    mask = response > center + float(config.get("spot_threshold", 6.0)) * max(noise, 1e-6)
    labels, _ = ndi.label(mask)
    areas = np.bincount(labels.ravel())
    keep = areas >= int(config.get("min_spot_area", 3))
    keep[0] = False
    return keep[labels], int(keep.sum())


def well_row(well, rows):
    return {
        "well": well,
        "fields": len(rows),
        "mean_intensity": float(np.mean([r["mean_intensity"] for r in rows])),
        "spots": int(sum(r["spots"] for r in rows)),
        "spots_per_field": float(np.mean([r["spots"] for r in rows])),
    }


def run(ctx, config):
    folder = resolve_input_dir(config.get("input_dir"), example=EXAMPLE_DATA)
    fields = list_fields(
        folder,
        str(config.get("pattern", "*.TIF")),
        str(config.get("name_regex", r"_(?P<well>[A-Pa-p]\d{2})(?P<field>f\d{2})")),
    )
    n = len(fields)
    ctx.log(f"plate: {len({w for w, _, _ in fields})} wells, {n} fields in {folder}")

    flat = estimate_illumination(ctx, fields, float(config.get("illumination_sigma", 32.0)))
    if flat is None:
        ctx.log("cancelled while estimating the illumination")
        return None
    calibrated = _support.calibration(config)  # the pixel size, if the config gives one
    ctx.emit("illumination", flat, **calibrated)
    ctx.log(f"illumination: {flat.min():.2f} to {flat.max():.2f} of the mean (vignetting)")

    interval = float(config.get("field_interval", 0.0))
    per_well = collections.Counter(well for well, _, _ in fields)
    well_rows, done_wells = {}, []
    t_next = time.monotonic()
    for i, (well, field, path) in enumerate(fields):
        if ctx.cancelled:
            ctx.log(f"cancelled after {i} of {n} fields")
            break
        raw = read_field(path)
        corrected = raw / flat
        spots, n_spots = find_spots(corrected, config)
        # the corrected field itself (float32, at its physical scale), not a picture
        # rendered here: the viewer chooses levels and colours
        ctx.preview("field", corrected.astype(np.float32), **calibrated)
        row = {
            "index": i,
            "well": well,
            "field": field,
            "file": path.name,
            "mean_intensity": float(corrected.mean()),
            "raw_mean_intensity": float(raw.mean()),
            "spots": n_spots,
        }
        ctx.emit("fields", row)
        well_rows.setdefault(well, []).append(row)
        if len(well_rows[well]) == per_well[well]:  # the well's last field: its row is done
            done_wells.append(well_row(well, well_rows.pop(well)))
            ctx.emit("wells", done_wells[-1])
        ctx.progress(n + i + 1, 2 * n, f"{well} {field}: {n_spots} spots")
        t_next += interval
        delay = t_next - time.monotonic()
        if delay > 0:
            ctx.wait(delay)  # a cancel-aware sleep: returns at once on cancel
    for well, rows in well_rows.items():  # wells cut short by a cancel
        done_wells.append(well_row(well, rows))
        ctx.emit("wells", done_wells[-1])

    for w in done_wells:
        print(
            f"{w['well']}: {w['fields']} fields, intensity {w['mean_intensity']:6.1f}, "
            f"{w['spots_per_field']:6.1f} spots per field"
        )
    return {
        "wells": len(done_wells),
        "fields": sum(w["fields"] for w in done_wells),
        "folder": str(folder),
    }
