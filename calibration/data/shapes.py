"""Procedural 32x32 RGB shapes: one coloured circle, square or triangle on a textured background.

A small, label-conditioned data set that needs no files and is harder than flat blobs: the class is the
outline alone (all three classes draw their area from the same range), the shape sits at a random position
with a random size, colour and rotation, and the background is two colours blended by a random plaid of two
low-frequency sine waves plus pixel noise.

Contrast is guaranteed: in every channel the shape is at least 0.15 (of the 0..1 range) away from the
background, because the shape colour is drawn from the bright band ``[0.55, 1]`` and the background from the
dark band ``[0, 0.4]`` (+ noise), and half of the images are inverted (dark shape on a bright background).
Edges are anti-aliased with the pixel's signed distance to the outline.

Generation is vectorised numpy over blocks of ``_BLOCK`` images; block ``b`` draws everything from
``numpy.random.default_rng([seed, b])`` for a full block, so image ``i`` depends only on ``(seed, i)``: the
same seed gives identical bytes, and a shorter set is a prefix of a longer one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tdqrt.calibration.data.images import ImageData, require_int, resize_square

SHAPE_CLASSES = ("circle", "square", "triangle")
SHAPES_NATIVE_SIZE = 32
SHAPES_DEFAULT_NUM = 10000
_SIDES = (None, 4, 3)  # per class: None is a circle, otherwise a regular polygon with that many sides
_BLOCK = 1000
_AREA_PX = (60.0, 200.0)  # shape area in pixels of the 32x32 image, the same range for every class
_WAVE_CYCLES = (0.75, 2.5)  # background wave frequency, in cycles per image width
_NOISE_AMPLITUDE = 0.05  # uniform per-channel pixel noise, +-


def load_shapes(*, image_size: int | None = None, num: int | None = None, seed: int = 0) -> ImageData:
    """Generate ``num`` (default 10000) shape images, classes circle/square/triangle balanced, from ``seed``.

    Drawn at 32x32 and resized to ``image_size`` if that is given and differs.
    """
    num = require_int(SHAPES_DEFAULT_NUM if num is None else num, "num", 1)
    image_size = require_int(SHAPES_NATIVE_SIZE if image_size is None else image_size, "image_size", 1)
    seed = require_int(seed, "seed", 0)
    images = np.empty((num, 3, SHAPES_NATIVE_SIZE, SHAPES_NATIVE_SIZE), np.float32)
    labels = np.empty(num, np.int64)
    for start in range(0, num, _BLOCK):
        stop = min(start + _BLOCK, num)
        images[start:stop], labels[start:stop] = _render_block(np.random.default_rng([seed, start // _BLOCK]),
                                                            stop - start)
    return ImageData(
        images=resize_square(torch.from_numpy(images), image_size),
        labels=torch.from_numpy(labels),
        num_classes=len(SHAPE_CLASSES),
        class_names=list(SHAPE_CLASSES),
        name="shapes",
        info={"source": "shapes", "generator": "tdqrt-shapes-v1", "native_size": SHAPES_NATIVE_SIZE,
              "seed": seed},
    )


def _render_block(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw the parameters of a full block of ``_BLOCK`` images from ``rng`` (so the random stream does not
    depend on ``count``) and render the first ``count``: float32 RGB ``[count, 3, 32, 32]`` in [-1, 1], labels.

    Everything per pixel is float32: this is the hot loop of data generation."""
    n, s = _BLOCK, SHAPES_NATIVE_SIZE

    def uniform(low: float, high: float, *shape: int) -> np.ndarray:
        return (low + (high - low) * rng.random((n, *shape), dtype=np.float32))[:count]

    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES))[:count]
    area = uniform(*_AREA_PX)
    theta = uniform(0.0, 2.0 * math.pi)
    centre_u = uniform(0.0, 1.0, 2)
    shape_rgb = uniform(0.55, 1.0, 3)
    bg_low = uniform(0.0, 0.1, 3)
    bg_high = bg_low + uniform(0.15, 0.3, 3)
    cycles = uniform(*_WAVE_CYCLES, 2)
    direction = uniform(0.0, 2.0 * math.pi, 2)
    phase = uniform(0.0, 2.0 * math.pi, 2)
    invert = uniform(0.0, 1.0) < 0.5
    noise = uniform(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE, 3, s, s)

    # Inverting the colours (not the finished image) gives the dark-on-bright half; the noise is symmetric.
    for colour in (shape_rgb, bg_low, bg_high):
        colour[invert] = 1.0 - colour[invert]

    # Inradius of each outline for the drawn area; the circumradius keeps the whole shape inside the image.
    inradius = np.empty(count, np.float32)
    circumradius = np.empty(count, np.float32)
    for cls, sides in enumerate(_SIDES):
        sel = labels == cls
        if sides is None:
            inradius[sel] = circumradius[sel] = np.sqrt(area[sel] / math.pi)
        else:
            inradius[sel] = np.sqrt(area[sel] / (sides * math.tan(math.pi / sides)))
            circumradius[sel] = inradius[sel] / math.cos(math.pi / sides)
    margin = circumradius + 0.5
    centre = margin[:, None] + centre_u * (s - 2.0 * margin)[:, None]

    coords = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
    px, py = coords[None, None, :], coords[None, :, None]
    dx = px - centre[:, 0, None, None]
    dy = py - centre[:, 1, None, None]
    dist = np.empty((count, s, s), np.float32)
    for cls, sides in enumerate(_SIDES):
        sel = np.flatnonzero(labels == cls)
        dist[sel] = _signed_distance(dx[sel], dy[sel], inradius[sel], theta[sel], sides)
    coverage = np.clip(0.5 - dist, 0.0, 1.0)[:, None]  # ~fraction of the pixel inside the outline

    waves = np.zeros((count, s, s), np.float32)
    for w in range(2):
        along = px * np.cos(direction[:, w, None, None]) + py * np.sin(direction[:, w, None, None])
        waves += np.sin((2.0 * math.pi / s) * cycles[:, w, None, None] * along + phase[:, w, None, None])
    blend = (0.5 + 0.25 * waves)[:, None]
    background = bg_low[..., None, None] + (bg_high - bg_low)[..., None, None] * blend + noise
    rgb = background + (shape_rgb[..., None, None] - background) * coverage
    return np.clip(2.0 * rgb - 1.0, -1.0, 1.0), labels


def _signed_distance(dx: np.ndarray, dy: np.ndarray, inradius: np.ndarray, theta: np.ndarray,
                     sides: int | None) -> np.ndarray:
    """Signed distance in pixels from offsets ``(dx, dy)`` to the outline (negative inside): a circle of radius
    ``inradius`` when ``sides`` is None, else a regular polygon rotated by ``theta`` (the largest distance to
    its edge lines, exact near the edges, which is all the anti-aliasing needs)."""
    r = inradius[:, None, None]
    if sides is None:
        return np.hypot(dx, dy) - r
    dist = np.full(dx.shape, -np.inf, dtype=dx.dtype)
    for k in range(sides):
        normal = theta + 2.0 * math.pi * k / sides
        dist = np.maximum(dist, dx * np.cos(normal)[:, None, None] + dy * np.sin(normal)[:, None, None])
    return dist - r
