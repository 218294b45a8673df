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


def save_bars(path: str | Path, groups: dict[str, dict[str, float]], *, ylabel: str, title: str,
              logy: bool = False) -> Path:
    """Grouped bar chart ``{group: {bar: value}}`` (e.g. batch size -> variant -> images/s), saved as PNG.

    Every group gets one bar per name that occurs in any group (missing ones are left empty), in first-seen
    order, so a variant keeps its colour and position across groups.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for bars in groups.values() for name in bars))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(names)) * 0.6), 3.8), dpi=100)
    for k, name in enumerate(names):
        xs = [g + (k - (len(names) - 1) / 2) * width for g, bars in enumerate(groups.values()) if name in bars]
        ys = [bars[name] for bars in groups.values() if name in bars]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def save_image_panels(path: str | Path, panels: dict[str, np.ndarray], *, nrow: int = 10, title: str = "") -> Path:
    """Image grids side by side, one titled panel per entry ``{title: uint8 NHWC images}``: the same sample
    indices under different models, so differences show image by image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [image_grid(imgs, nrow=min(nrow, len(imgs)), scale=max(1, 32 // imgs.shape[1])) for imgs in panels.values()]
    height, width = max(g.shape[0] for g in grids), sum(g.shape[1] for g in grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(max(4.0, width / 80), max(2.5, height / 80 + 0.6)), dpi=100,
                             squeeze=False)
    for ax, (name, grid) in zip(axes[0], zip(panels, grids)):
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def save_scale_comparison(path: str | Path, tables: dict[str, np.ndarray], layer_names: list[str],
                          layers: list[int], *, title: str) -> Path:
    """Activation scale vs timestep of the same ``layers`` (indices into ``layer_names``) under several models
    on one set of axes: one colour per layer, one line style per model (``tables``: name -> ``[T, L]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ("-", "--", ":", "-.")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for m, (model, table) in enumerate(tables.items()):
        table = np.asarray(table)
        t = np.arange(table.shape[0])
        for c, i in enumerate(layers):
            ax.plot(t, table[:, i], styles[m % len(styles)], color=colours[c % len(colours)], linewidth=1.2,
                    label=f"{layer_names[i]} ({model})")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("activation scale")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
