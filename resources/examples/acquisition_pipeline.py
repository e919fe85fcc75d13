"""Simulated fluorescence acquisition: the bundled demo of zmqruntime.

A camera watches fluorescent cells that drift and blink, with Poisson shot noise and
uneven illumination. Each frame is previewed live, background-subtracted, and its
cells are counted (local maxima of the smoothed frame); the run stores the maximum
projection and a per-frame count table. numpy only, so it runs on a bare install.
"""

import time

import numpy as np


def box_blur(image, radius):
    """Mean over a (2r+1)^2 window, edges clamped: two cumulative sums, O(pixels)."""
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        padded = np.pad(out, pad, mode="edge")
        c = np.cumsum(padded, axis=axis, dtype=np.float64)
        hi = np.take(c, np.arange(2 * radius + 1, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - 2 * radius - 1), axis=axis)
        out = ((hi - lo) / (2 * radius + 1)).astype(np.float32)
    return out


def count_cells(foreground, threshold):
    """Cells = local maxima of the smoothed foreground above a noise threshold."""
    smooth = box_blur(foreground, 2)
    padded = np.pad(smooth, 1, mode="constant", constant_values=-np.inf)
    h, w = smooth.shape
    peak = smooth > threshold
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                peak &= smooth >= padded[dy : dy + h, dx : dx + w]
    return int(peak.sum())


class Scene:
    """Cells as Gaussian spots that drift (random walk) and blink (on/off switching)."""

    def __init__(self, size, n_cells, rng):
        self.size = size
        self.rng = rng
        margin = 12
        self.pos = rng.uniform(margin, size - margin, (n_cells, 2))
        self.brightness = rng.uniform(300, 900, n_cells)
        self.on = rng.random(n_cells) < 0.9
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.illumination = 1.0 - 0.35 * (
            ((xx - size / 2) ** 2 + (yy - size / 3) ** 2) / (size**2 / 2)
        )
        self.sigma = 2.5

    def step(self):
        self.pos += self.rng.normal(0, 0.8, self.pos.shape)
        self.pos = np.clip(self.pos, 8, self.size - 8)
        flip = self.rng.random(len(self.on)) < 0.04
        self.on ^= flip

    def render(self):
        size, s = self.size, self.sigma
        image = np.full((size, size), 100.0, dtype=np.float32)  # camera offset
        r = int(4 * s)
        g = np.arange(-r, r + 1, dtype=np.float32)
        for (y, x), b, on in zip(self.pos, self.brightness, self.on):
            if not on:
                continue
            iy, ix = int(round(y)), int(round(x))
            ky = np.exp(-((g + iy - y) ** 2) / (2 * s * s))
            kx = np.exp(-((g + ix - x) ** 2) / (2 * s * s))
            y0, y1 = max(iy - r, 0), min(iy + r + 1, size)
            x0, x1 = max(ix - r, 0), min(ix + r + 1, size)
            spot = b * np.outer(ky, kx)
            image[y0:y1, x0:x1] += spot[y0 - iy + r : y1 - iy + r, x0 - ix + r : x1 - ix + r]
        image = (image - 100.0) * self.illumination + 100.0 + 40.0  # illumination + autofluor.
        noisy = self.rng.poisson(np.maximum(image, 0)).astype(np.float32)
        return np.clip(noisy, 0, 65535).astype(np.uint16), int(self.on.sum())


def run(ctx, config):
    size = int(config.get("size", 512))
    frames = int(config.get("frames", 60))
    n_cells = int(config.get("n_cells", 40))
    interval = float(config.get("frame_interval", 0.05))
    rng = np.random.default_rng(config.get("seed", 0))
    scene = Scene(size, n_cells, rng)
    ctx.log(f"acquiring {frames} frames of {size}x{size} uint16, {n_cells} cells")
    pixel = config.get("pixel_size")  # micrometres per pixel: the frames' physical scale
    calibrated = {"scale": {"y": float(pixel), "x": float(pixel)}} if pixel else {}

    projection = np.zeros((size, size), dtype=np.float32)
    table = {"frame": [], "cells": [], "cells_visible": [], "mean_intensity": [], "background": []}
    t_next = time.monotonic()
    for i in range(frames):
        if ctx.cancelled:
            ctx.log(f"cancelled after {i} frames")
            break
        frame, visible = scene.render()
        ctx.preview("camera", frame, **calibrated)
        background = box_blur(frame, 24)
        foreground = frame.astype(np.float32) - background
        noise = 1.4826 * float(np.median(np.abs(foreground)))
        n = count_cells(foreground, threshold=6 * noise + 20)
        np.maximum(projection, foreground, out=projection)
        table["frame"].append(i)
        table["cells"].append(n)
        table["cells_visible"].append(visible)
        table["mean_intensity"].append(float(frame.mean()))
        table["background"].append(float(np.median(background)))
        ctx.progress(i + 1, frames, f"frame {i + 1}/{frames}: {n} cells")
        if (i + 1) % 10 == 0:
            print(f"frame {i + 1}: {n} cells counted, {visible} visible")
        scene.step()
        t_next += interval
        delay = t_next - time.monotonic()
        if delay > 0:
            ctx.wait(delay)  # a cancel-aware sleep: returns at once on cancel

    ctx.emit("max_projection", np.clip(projection, 0, 65535).astype(np.uint16), **calibrated)
    ctx.emit("counts", table)
    return {"frames": len(table["frame"]), "mean_cells": float(np.mean(table["cells"] or [0]))}
