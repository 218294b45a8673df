"""Image data sets for training and calibration, all returned as one ``ImageData`` type.

``load_dataset(spec)`` is the single entry point the CLI and the pipeline use: ``"digits"`` (sklearn's bundled
8x8 digits, upscaled), ``"shapes"`` (procedural circles/squares/triangles on textured backgrounds) or the path
of a folder of images. The built-in names win over a folder of the same name in the working directory; write
``./digits`` to mean the folder.
"""
from __future__ import annotations

from pathlib import Path

from tdqrt.engines.errors import ConfigError
from tdqrt.calibration.data.digits import load_digits
from tdqrt.calibration.data.folder import IMAGE_EXTENSIONS, load_folder
from tdqrt.calibration.data.images import ImageData, check_finite, from_uint8_nhwc, to_uint8_nhwc
from tdqrt.calibration.data.shapes import SHAPE_CLASSES, load_shapes

BUILTIN_DATASETS = ("digits", "shapes")

__all__ = [
    "BUILTIN_DATASETS", "IMAGE_EXTENSIONS", "SHAPE_CLASSES", "ImageData", "check_finite", "from_uint8_nhwc",
    "load_dataset", "load_digits", "load_folder", "load_shapes", "to_uint8_nhwc",
]


def load_dataset(spec: str, *, image_size: int | None = None, num: int | None = None, seed: int = 0) -> ImageData:
    """Load the data set named by ``spec``.

    ``image_size``: side length of the square images; defaults to 16 for digits and 32 for shapes, required
    for a folder. ``num``: digits and folders keep at most that many images (chosen with ``seed``); shapes
    generates exactly that many (default 10000) from ``seed``.
    """
    if spec == "digits":
        return load_digits(image_size=image_size, num=num, seed=seed)
    if spec == "shapes":
        return load_shapes(image_size=image_size, num=num, seed=seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(path, image_size=image_size, num=num, seed=seed)
    why = "is a file, not a folder" if path.exists() else "does not exist"
    raise ConfigError(f"unknown data set {spec!r}: expected one of {', '.join(map(repr, BUILTIN_DATASETS))} or "
                      f"the path of a folder of images ({path} {why})")
