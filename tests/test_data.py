"""Data sets (digits, shapes, image folders), the ImageData container and the uint8 conversions."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tdqrt.calibration.data import (
    ImageData, check_finite, from_uint8_nhwc, load_dataset, load_digits, load_folder, load_shapes, to_uint8_nhwc,
)
from tdqrt.engines.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------------- conversions

def test_uint8_round_trip_is_exact():
    levels = np.arange(256, dtype=np.uint8)
    arr = np.stack([levels.reshape(16, 16, 1)[..., [0, 0, 0]], 255 - levels.reshape(16, 16, 1)[..., [0, 0, 0]]])
    x = from_uint8_nhwc(arr)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert np.array_equal(to_uint8_nhwc(x), arr)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0]).reshape(1, 1, 1, 6)
    assert to_uint8_nhwc(x).ravel().tolist() == [0, 0, 128, 255, 255, 255]


def test_non_finite_is_refused():
    x = torch.zeros(2, 3, 4, 4)
    x[1, 2, 3, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        to_uint8_nhwc(x)
    with pytest.raises(DataError, match=r"my samples.*Inf"):
        check_finite(np.array([0.0, np.inf]), "my samples")
    check_finite(torch.ones(3), "fine")  # finite data passes silently
    with pytest.raises(DataError, match="uint8"):
        from_uint8_nhwc(np.zeros((1, 4, 4, 3), np.float32))


# ------------------------------------------------------------------------------------------------ ImageData

def _tiny(n=10, labelled=True):
    """n one-pixel images whose value encodes their index, labels = index % 3."""
    images = (torch.arange(n, dtype=torch.float32) / n).reshape(n, 1, 1, 1)
    labels = torch.arange(n) % 3 if labelled else None
    k = 3 if labelled else 0
    return ImageData(images, labels, k, ["a", "b", "c"][:k], "tiny", {"source": "test"})


def test_image_data_validates_and_completes_info():
    data = _tiny()
    assert data.info["count"] == 10 and data.info["num_classes"] == 3 and data.info["source"] == "test"
    json.dumps(data.info)
    with pytest.raises(DataError, match="labels must lie"):
        ImageData(torch.zeros(2, 1, 2, 2), torch.tensor([0, 3]), 3, ["a", "b", "c"], "bad")
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        ImageData(torch.full((2, 1, 2, 2), 1.5), None, 0, [], "bad")
    with pytest.raises(DataError, match="NaN"):
        ImageData(torch.full((2, 1, 2, 2), float("nan")), None, 0, [], "bad")
    with pytest.raises(DataError, match="labels must be given"):
        ImageData(torch.zeros(2, 1, 2, 2), None, 3, ["a", "b", "c"], "bad")


def test_batches_cover_each_pass_and_repeat_with_the_generator():
    data = _tiny(12)
    it = data.batches(4, torch.Generator().manual_seed(7))
    first_pass = [next(it) for _ in range(3)]
    seen = torch.cat([x.ravel() for x, _ in first_pass])
    assert sorted((seen * 12).round().long().tolist()) == list(range(12))  # every image once per pass
    for x, y in first_pass:  # labels travel with their images
        assert torch.equal(y, (x.ravel() * 12).round().long() % 3)
    again = data.batches(4, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, next(again)[0]) for x, _ in first_pass)
    big = next(data.batches(30, torch.Generator().manual_seed(0)))[0]  # larger than the set: spans passes
    assert big.shape[0] == 30
    x, y = next(_tiny(5, labelled=False).batches(2, torch.Generator()))
    assert x.shape == (2, 1, 1, 1) and y is None
    with pytest.raises(ConfigError, match="batch_size"):
        next(data.batches(0, torch.Generator()))


# --------------------------------------------------------------------------------------------------- digits

def test_digits_resized_and_scaled():
    from sklearn.datasets import load_digits as sk_digits

    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 16, 16) and data.labels.shape == (1797,)
    assert float(data.images.min()) == -1.0 and 0.95 < float(data.images.max()) <= 1.0
    assert sorted(data.labels.unique().tolist()) == list(range(10)) and data.class_names == list("0123456789")
    original = torch.tensor(sk_digits().images, dtype=torch.float32) / 8 - 1
    back = F.avg_pool2d(data.images, 2).squeeze(1)  # our 16x16 downsampled to 8x8 again
    a = back.reshape(len(back), -1) - back.reshape(len(back), -1).mean(1, keepdim=True)
    b = original.reshape(len(back), -1) - original.reshape(len(back), -1).mean(1, keepdim=True)
    per_image = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # Pearson correlation per image
    assert float(per_image.median()) > 0.97 and float(per_image.min()) > 0.9
    native = load_digits(image_size=8)  # no resize: exactly the 0..16 -> -1..1 mapping
    assert torch.equal(native.images.squeeze(1), original)
    json.dumps(data.info)


def test_digits_subset_is_seeded():
    a, b, c = (load_digits(num=100, seed=s) for s in (1, 1, 2))
    assert len(a) == 100 and torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


# --------------------------------------------------------------------------------------------------- shapes

def _segment(images: np.ndarray) -> np.ndarray:
    """Foreground masks found from the pixels alone (no generator internals): a two-cluster (isodata) threshold
    on each image's luminance, the shape being the smaller side."""
    lum = images.mean(1).reshape(len(images), -1)
    thr = lum.mean(1, keepdims=True)
    for _ in range(15):
        above = lum > thr
        mean_hi = (lum * above).sum(1, keepdims=True) / np.maximum(above.sum(1, keepdims=True), 1)
        mean_lo = (lum * ~above).sum(1, keepdims=True) / np.maximum((~above).sum(1, keepdims=True), 1)
        thr = (mean_hi + mean_lo) / 2
    above = lum > thr
    mask = np.where(above.mean(1, keepdims=True) < 0.5, above, ~above)
    return mask.reshape(images.shape[0], *images.shape[2:])


def test_shapes_are_deterministic_per_seed():
    a, b, c = (load_shapes(num=300, seed=s) for s in (5, 5, 6))
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes() and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    longer = load_shapes(num=1200, seed=5)  # image i depends only on (seed, i)
    assert torch.equal(longer.images[:300], a.images)
    assert load_dataset("shapes", image_size=16, num=10).images.shape == (10, 3, 16, 16)


def test_shapes_hold_recognisable_shapes_on_textured_backgrounds():
    data = load_dataset("shapes", num=3000, seed=3)
    x, y = data.images.numpy(), data.labels.numpy()
    assert x.shape == (3000, 3, 32, 32) and data.class_names == ["circle", "square", "triangle"]
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert all(900 <= (y == k).sum() <= 1100 for k in range(3))

    mask = _segment(x)
    area = mask.sum((1, 2))
    # Compactness = area / (largest distance from the centroid)^2 is pi for a disc, 2 for a square and ~1.3 for
    # an equilateral triangle, whatever the size or rotation; a nearest-centroid rule on it must find the class.
    yy, xx = np.mgrid[0:32, 0:32]
    cy = (mask * yy).sum((1, 2)) / area
    cx = (mask * xx).sum((1, 2)) / area
    r2 = np.where(mask, (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2, 0).max((1, 2))
    feature = np.log(area / r2)
    centres = np.array([feature[:1500][y[:1500] == k].mean() for k in range(3)])
    predicted = np.abs(feature[1500:, None] - centres).argmin(1)
    assert (predicted == y[1500:]).mean() > 0.95
    # Size alone must not give the class away: mean areas per class are close.
    mean_area = [area[y == k].mean() for k in range(3)]
    assert max(mean_area) / min(mean_area) < 1.15

    lum = x.mean(1)
    bg = ~mask
    bg_mean = (lum * bg).sum((1, 2)) / bg.sum((1, 2))
    fg_mean = (lum * mask).sum((1, 2)) / area
    assert np.abs(fg_mean - bg_mean).min() > 0.3  # every shape contrasts with its background
    # Texture, not just pixel noise: 4x4 block means of pure background (noise averages out to ~0.01) vary.
    blocks = lum.reshape(-1, 8, 4, 8, 4).mean((2, 4))
    clean = ~mask.reshape(-1, 8, 4, 8, 4).any((2, 4))
    block_std = np.array([b[c].std() for b, c in zip(blocks, clean)])
    assert np.mean(block_std > 0.03) > 0.97


# --------------------------------------------------------------------------------------------------- folder

def _save(path, mode, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_layout(tmp_path):
    _save(tmp_path / "cats" / "a.png", "RGB", (40, 30), (255, 0, 0))
    _save(tmp_path / "cats" / "b.JPG", "RGB", (8, 8), (0, 255, 0))  # upper-case extension, upscaled
    wide = Image.new("RGB", (48, 16), (0, 0, 255))
    wide.paste((255, 0, 0), (16, 0, 32, 16))  # centre square red, sides blue
    wide.save(tmp_path / "cats" / "wide.bmp")
    _save(tmp_path / "dogs" / "deep" / "c.png", "RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent
    _save(tmp_path / "dogs" / ".hidden" / "d.png", "RGB", (20, 20), (0, 0, 0))  # ignored
    (tmp_path / "notes.txt").write_text("not an image")  # ignored
    data = load_dataset(str(tmp_path), image_size=16)
    assert data.class_names == ["cats", "dogs"] and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1]  # sorted paths: cats/a, cats/b, cats/wide, dogs/deep/c
    assert data.images.shape == (4, 3, 16, 16)
    u8 = to_uint8_nhwc(data.images)
    assert (u8[2] == [255, 0, 0]).all(axis=-1).mean() > 0.9  # the centre crop kept the red middle
    assert (u8[3] == 255).all()  # transparent -> white
    assert data.info["layout"] == "classes" and data.info["upscaled"] == 1
    json.dumps(data.info)


def test_flat_folder_is_unlabelled_and_num_caps(tmp_path):
    for i in range(5):
        _save(tmp_path / f"{i}.png", "L", (12, 20), 50 * i)
    data = load_folder(tmp_path, image_size=8)
    assert data.labels is None and data.num_classes == 0 and data.class_names == []
    assert data.images.shape == (5, 1, 8, 8) and data.info["layout"] == "flat"
    some = load_folder(tmp_path, image_size=8, num=3, seed=1)
    assert len(some) == 3 and torch.equal(some.images, load_folder(tmp_path, image_size=8, num=3, seed=1).images)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", image_size=8)
    with pytest.raises(ConfigError, match="'digits', 'shapes'"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files.*\.png.*\.webp"):
        load_folder(tmp_path / "empty", image_size=8)
    with pytest.raises(DataError, match="not a folder"):
        load_folder(tmp_path / "empty" / "readme.txt", image_size=8)

    with pytest.raises(ConfigError, match="image_size is required"):
        load_dataset(str(tmp_path / "empty"))

    corrupt = tmp_path / "corrupt"
    _save(corrupt / "ok.png", "RGB", (8, 8), (1, 2, 3))
    (corrupt / "x.png").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DataError, match=r"cannot read image .*x\.png"):
        load_folder(corrupt, image_size=8)

    truncated = tmp_path / "truncated"
    _save(truncated / "t.png", "RGB", (64, 64), (9, 9, 9))
    data = (truncated / "t.png").read_bytes()
    (truncated / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.png"):
        load_folder(truncated, image_size=8)

    mixed = tmp_path / "mixed"
    _save(mixed / "grey.png", "L", (8, 8), 100)
    _save(mixed / "colour.png", "RGB", (8, 8), (1, 2, 3))
    with pytest.raises(DataError, match=r"greyscale \(e\.g\. .*grey\.png\).*colour \(e\.g\. .*colour\.png\).*convert"):
        load_folder(mixed, image_size=8)

    both = tmp_path / "both"
    _save(both / "root.png", "RGB", (8, 8), (1, 2, 3))
    _save(both / "cls" / "in_class.png", "RGB", (8, 8), (1, 2, 3))
    with pytest.raises(DataError, match=r"mixes two layouts.*root\.png.*in_class\.png"):
        load_folder(both, image_size=8)

    sixteen = tmp_path / "sixteen"
    sixteen.mkdir()
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(sixteen / "deep.png")
    with pytest.raises(DataError, match=r"deep\.png.*unsupported image mode"):
        load_folder(sixteen, image_size=8)
