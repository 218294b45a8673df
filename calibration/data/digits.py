"""Handwritten digits from scikit-learn's bundled copy of the UCI optdigits set.

1797 grey 8x8 images with 17 intensity levels (0..16), ten classes. The data ships inside scikit-learn, so
loading it needs no network. The images are upscaled (16x16 by default) because an 8x8 image leaves a UNet no
room to downsample.
"""
from __future__ import annotations

import torch

from tdqrt.calibration.data.images import ImageData, choose_subset, require_int, resize_square

DIGITS_NATIVE_SIZE = 8
DIGITS_MAX_VALUE = 16
DIGITS_DEFAULT_SIZE = 16


def load_digits(*, image_size: int | None = None, num: int | None = None, seed: int = 0) -> ImageData:
    """Load the digits as one-channel images of ``image_size`` pixels (default 16), values ``0 -> -1`` and
    ``16 -> +1``.

    ``num`` keeps that many images, chosen with ``seed`` and kept in source order; ``seed`` has no other use.
    """
    # Imported here: scikit-learn is heavy and only this loader needs it.
    from sklearn.datasets import load_digits as sklearn_load_digits

    image_size = require_int(DIGITS_DEFAULT_SIZE if image_size is None else image_size, "image_size", 1)
    num = None if num is None else require_int(num, "num", 1)
    seed = require_int(seed, "seed", 0)
    bunch = sklearn_load_digits()
    keep = choose_subset(len(bunch.target), num, seed)
    raw = torch.as_tensor(bunch.images[keep], dtype=torch.float32).unsqueeze(1)
    images = resize_square(raw * (2.0 / DIGITS_MAX_VALUE) - 1.0, image_size)
    return ImageData(
        images=images.contiguous(),
        labels=torch.as_tensor(bunch.target[keep], dtype=torch.int64),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        name="digits",
        info={"source": "digits", "origin": "sklearn.datasets.load_digits", "native_size": DIGITS_NATIVE_SIZE,
              "available": int(len(bunch.target)), "seed": seed},
    )
