"""PNG outputs people look at: sample grids and curves. matplotlib runs headless (Agg)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from tdqrt.engines.artifacts import atomic_path


def image_grid(images: np.ndarray, *, nrow: int | None = None, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC uint8 image with ``pad`` pixels of white between them."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return grid


def save_grid(images: np.ndarray, path: str | Path, **kwargs) -> Path:
    grid = image_grid(images, **kwargs)
    mode = "L" if grid.shape[2] == 1 else "RGB"
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if mode == "L" else grid, mode).save(tmp, format="PNG")
    return Path(path)


def save_curve(path: str | Path, series: dict[str, tuple[list[float], list[float]]], *, xlabel: str,
               ylabel: str, title: str, logy: bool = False) -> Path:
    """One line per named series ``{name: (x, y)}``, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def save_scale_curves(path: str | Path, table, layer_names: list[str], *, title: str, max_layers: int = 6) -> Path:
    """Activation scale vs timestep for up to ``max_layers`` layers spread over the network (``table`` ``[T, L]``)."""
    import numpy as np

    table = np.asarray(table)
    picks = sorted({int(round(i)) for i in np.linspace(0, table.shape[1] - 1, min(max_layers, table.shape[1]))})
    t = list(range(table.shape[0]))
    series = {layer_names[i]: (t, table[:, i].tolist()) for i in picks}
    return save_curve(path, series, xlabel="timestep t", ylabel="activation scale", title=title, logy=True)
