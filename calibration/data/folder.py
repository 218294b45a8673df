"""Any folder of image files as a data set.

Layouts (files are found recursively; extensions are matched case-insensitively):

* ImageFolder: every image lies inside a subfolder of the root, e.g. ``root/cat/1.png``,
  ``root/dog/x/2.jpg``; the first-level subfolder names, sorted, are the classes. A subfolder without images
  is not a class.
* flat: every image lies directly in the root: one unlabelled set (``num_classes == 0``).

Images in the root *and* in subfolders are refused (the labels would be ambiguous). Files and folders whose
name starts with ``.`` are ignored (``.ipynb_checkpoints``, macOS ``._`` files).

Each image is centre-cropped to a square of its shorter side and resized to ``image_size`` with bicubic
filtering (antialiased when downscaling); images smaller than ``image_size`` are upscaled, not refused, so
``info["upscaled"]`` counts them. Colour modes: greyscale (``1``, ``L``, ``LA``) gives one channel; ``RGB``,
``RGBA``, ``P``, ``PA``, ``CMYK``, ``YCbCr`` give three; transparent pixels are composited onto white (a
transparent background should look like paper, not like black). All images must agree on one or three
channels. 16-bit and float images are refused rather than silently clipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tdqrt.engines.errors import ConfigError, DataError
from tdqrt.calibration.data.images import ImageData, choose_subset, from_uint8_nhwc, require_int

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "RGBA", "PA")


def load_folder(path: str | Path, *, image_size: int | None, num: int | None = None, seed: int = 0) -> ImageData:
    """Load the images under ``path`` (layouts in the module docstring) as ``image_size`` squares.

    ``num`` keeps at most that many files, chosen with ``seed`` before decoding (kept in sorted path order);
    the classes still come from all files, so a capped subset keeps the folder's full label space.
    """
    if image_size is None:
        raise ConfigError(f"image_size is required for an image folder ({path}): images there can have any "
                          "size, so pass the side length to crop and resize them to, e.g. image_size=32")
    image_size = require_int(image_size, "image_size", 1)
    num = None if num is None else require_int(num, "num", 1)
    seed = require_int(seed, "seed", 0)
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the folder that holds the images, not a single file")

    files = _find_images(root)
    if not files:
        raise DataError(f"no image files under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, "
                        "any letter case); put images there or pass another folder")
    in_root = [f for f in files if f.parent == root]
    in_subfolders = [f for f in files if f.parent != root]
    if in_root and in_subfolders:
        raise DataError(
            f"{root} mixes two layouts: {len(in_root)} images directly in it (e.g. {in_root[0].name}) and "
            f"{len(in_subfolders)} in subfolders (e.g. {in_subfolders[0].relative_to(root)}). Use either one "
            "subfolder per class (root/<class>/<image>, labelled) or all images directly in the folder "
            "(unlabelled); move the stray files accordingly")
    class_names = sorted({f.relative_to(root).parts[0] for f in in_subfolders})

    found = len(files)
    files = [files[i] for i in choose_subset(found, num, seed)]
    arrays, upscaled = [], 0
    for f in files:
        arr, small = _read_image(f, image_size)
        arrays.append(arr)
        upscaled += small
    _check_channels(files, arrays)

    labels = None
    if class_names:
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[f.relative_to(root).parts[0]] for f in files], dtype=torch.int64)
    return ImageData(
        images=from_uint8_nhwc(np.stack(arrays)),
        labels=labels,
        num_classes=len(class_names),
        class_names=class_names,
        name=root.resolve().name,
        info={"source": "folder", "path": str(root.resolve()), "layout": "classes" if class_names else "flat",
              "files_found": found, "seed": seed, "upscaled": upscaled},
    )


def _find_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted by path; hidden files and folders skipped."""
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """Decode ``path``, crop its centre square, resize it to ``size``; return uint8 ``[size, size, C]`` (C = 1
    for greyscale, 3 for colour) and whether it had to be upscaled."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. The file is corrupt or not really an image; "
                        "re-save it with an image editor or remove it from the folder") from exc
    if img.mode in _GREY_MODES:
        target = "L"
    elif img.mode in _COLOUR_MODES:
        target = "RGB"
    else:
        raise DataError(f"{path}: unsupported image mode {img.mode!r} (e.g. 16-bit or float pixels); convert it "
                        "to 8-bit RGB or greyscale, e.g. Image.open(f).convert('RGB').save(f)")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert(target)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr), side < size


def _check_channels(files: list[Path], arrays: list[np.ndarray]) -> None:
    """Refuse a folder that mixes greyscale and colour images, naming one file of each kind."""
    grey = [f for f, a in zip(files, arrays) if a.shape[-1] == 1]
    colour = [f for f, a in zip(files, arrays) if a.shape[-1] == 3]
    if grey and colour:
        raise DataError(
            f"images mix greyscale and colour: {len(grey)} greyscale (e.g. {grey[0]}) and {len(colour)} "
            f"colour (e.g. {colour[0]}). Convert them all to one kind, e.g. "
            "Image.open(f).convert('RGB').save(f) for every greyscale file (or .convert('L') for the colour ones)")
