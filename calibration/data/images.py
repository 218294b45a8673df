"""The image container every dataset loader returns, and the conversions shared by loaders and later stages.

Convention used throughout tdqrt: images are float32 tensors ``[N, C, H, W]`` with values in ``[-1, 1]``
(the range a diffusion model is trained on); files on disk (``samples.npz``, PNG grids) hold ``uint8``
``[N, H, W, C]``. ``to_uint8_nhwc`` / ``from_uint8_nhwc`` convert between the two with one fixed mapping
(``-1 -> 0``, ``+1 -> 255``) so every stage quantises pixels identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tdqrt.engines.config import check_int
from tdqrt.engines.errors import DataError


def require_int(value: object, what: str, minimum: int) -> int:
    """:func:`~tdqrt.engines.config.check_int` that also takes numpy integers (indices, counts computed with
    numpy), returned as a Python int."""
    return check_int(what, int(value) if isinstance(value, np.integer) else value, minimum)


def check_finite(x: torch.Tensor | np.ndarray, what: str) -> None:
    """Raise DataError if ``x`` holds NaN or +-Inf; ``what`` names the data in the message.

    Non-finite pixels would silently become 0 or 255 after clamping, so they are refused wherever images
    enter or leave a stage.
    """
    t = torch.as_tensor(x)
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)  # NaN propagates into both; one fast pass instead of a boolean mask
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return
    finite = torch.isfinite(t)
    n_nan = int(torch.isnan(t).sum())
    n_inf = int((~finite).sum()) - n_nan
    first = tuple(int(i) for i in torch.nonzero(~finite)[0])
    raise DataError(
        f"{what} contains {n_nan} NaN and {n_inf} Inf values out of {t.numel()} (first at index {first}); "
        "the data is unusable - check the stage that produced it (a diverged model or a corrupt file)"
    )


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Convert float images ``[N, C, H, W]`` in ``[-1, 1]`` to ``uint8`` ``[N, H, W, C]``.

    Values are clamped to ``[-1, 1]`` and rounded to the nearest of 256 levels; NaN/Inf raise DataError.
    """
    if x.ndim != 4:
        raise DataError(f"expected images shaped [N, C, H, W], got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    check_finite(x, "images")
    levels = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return levels.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8_nhwc(arr: np.ndarray) -> torch.Tensor:
    """Convert ``uint8`` ``[N, H, W, C]`` to float32 ``[N, C, H, W]`` in ``[-1, 1]``; exact inverse of
    ``to_uint8_nhwc`` on its outputs."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DataError(f"expected uint8 images shaped [N, H, W, C], got dtype {arr.dtype} shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(torch.float32)
    return (x / 127.5 - 1.0).contiguous()


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square images ``[N, C, H, H]`` in ``[-1, 1]`` to ``size x size``.

    Bilinear with antialiasing, so downscaling averages instead of aliasing; the result is clamped because a
    resize must never leave the ``[-1, 1]`` range the rest of tdqrt relies on.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(-1.0, 1.0)


def choose_subset(total: int, num: int | None, seed: int) -> np.ndarray:
    """Indices of ``num`` of ``total`` items, drawn without replacement with ``seed`` and returned sorted
    (so the subset keeps the source order); all indices when ``num`` is None or ``>= total``."""
    if num is None or num >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))


@dataclass
class ImageData:
    """A loaded image set: what training, calibration and evaluation consume.

    ``images``: float32 ``[N, C, H, W]`` in ``[-1, 1]``, square. ``labels``: int64 ``[N]`` in
    ``[0, num_classes)``, or None for an unlabelled set (then ``num_classes == 0`` and ``class_names == []``).
    ``info``: a JSON-able description saved into model.json so a model records its data; on construction it
    is completed with ``name``, ``count``, ``channels``, ``image_size``, ``num_classes`` and ``class_names``.
    The constructor validates all of this and raises DataError on any inconsistency.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    class_names: list[str]
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        x = self.images
        if x.dtype != torch.float32 or x.ndim != 4 or x.shape[0] == 0 or x.shape[2] != x.shape[3]:
            raise DataError(f"dataset {self.name!r}: images must be non-empty float32 [N, C, H, H], "
                            f"got dtype {x.dtype} shape {tuple(x.shape)}")
        check_finite(x, f"dataset {self.name!r} images")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 or hi > 1.0:
            raise DataError(f"dataset {self.name!r}: images must lie in [-1, 1], got [{lo}, {hi}]")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"dataset {self.name!r}: {self.num_classes} classes but {len(self.class_names)} "
                            "class names")
        if (self.labels is None) != (self.num_classes == 0):
            raise DataError(f"dataset {self.name!r}: labels must be given exactly when num_classes > 0 "
                            f"(num_classes={self.num_classes}, labels {'missing' if self.labels is None else 'given'})")
        if self.labels is not None:
            y = self.labels
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(f"dataset {self.name!r}: labels must be int64 [{x.shape[0]}], "
                                f"got dtype {y.dtype} shape {tuple(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DataError(f"dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                                f"got [{int(y.min())}, {int(y.max())}]")
        self.info = {**self.info, "name": self.name, "count": len(self), "channels": self.channels,
                     "image_size": self.image_size, "num_classes": self.num_classes,
                     "class_names": list(self.class_names)}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(images, labels)`` training batches forever (``labels`` is None for an unlabelled set).

        Each pass visits every image once in an order drawn from ``generator``; a batch that straddles two
        passes takes the rest of one and the start of the next, so every batch has exactly ``batch_size``
        images (``batch_size`` may exceed the dataset size). The same generator state gives the same batches.
        """
        batch_size = require_int(batch_size, "batch_size", 1)
        n = len(self)
        order = torch.empty(0, dtype=torch.int64)
        while True:
            while order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            idx, order = order[:batch_size], order[batch_size:]
            yield self.images[idx], None if self.labels is None else self.labels[idx]
