"""Sample-quality metrics (FID, KID, IS, precision/recall) through torch-fidelity, offline.

``evaluate(samples, ref, EvalConfig(...))`` compares a set of generated images with a reference set:

* ``samples``: a ``.npz`` in the OpenAI/guided-diffusion evaluator layout (``arr_0``: ``uint8`` NHWC, what
  ``tdqrt sample`` writes and ``write_openai_npz`` writes), a ``tdqrt sample`` output folder (its
  ``samples.npz``; never its ``grid.png``), a folder of images, or a ``uint8`` NHWC array.
* ``ref``: ``"digits"`` / ``"shapes"`` (loaded at the samples' image size), a ``.npz``, a folder, or an array.

Feature extractor (one per call; its name is part of every metric key, e.g. ``FID[tdqrt-digits-cnn]``):

* a tdqrt CNN (``tools/extractor.py``): ``feature_extractor`` = its folder / ``extractor.safetensors`` or its
  name ``tdqrt-<dataset>-cnn`` (looked up in ``default_extractor_dir``). With neither this nor
  ``inception_weights`` given, the default folder of the reference data set is used; if there is none the
  call fails and says how to train one (``tdqrt extractor --data digits``) - nothing is ever downloaded.
* Inception-v3 (torch-fidelity's ``inception-v3-compat``, the standard FID network): only from a local file,
  ``inception_weights`` = ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or torch-fidelity's
  identical ``weights-inception-2015-12-05-6726825d.pth``. Keys then read ``FID[inception-v3-compat]``.

Inputs are handed to torch-fidelity as ``Dataset`` objects of ``uint8`` ``[3, H, W]`` tensors (grey images as
three equal channels, torch-fidelity's convention). Reference features and FID statistics are cached by
torch-fidelity under ``cache_dir`` (default ``$TDQRT_CACHE_DIR/fidelity`` = ``~/.cache/tdqrt/fidelity``) with
the cache name ``tdqrt-ref-<sha256 of the reference pixels>-fe-<sha256 of the extractor weights>``, so a
changed reference or extractor can never hit a stale entry. Samples are never cached.

FID and KID come with a bootstrap interval (``tools/bootstrap.py``: features extracted once, the images resampled
``EvalConfig.bootstrap`` times): keys ``FID``, ``FID_se`` (standard error), ``FID_lo`` / ``FID_hi`` (the 95%
interval), the same for KID. KID is the unbiased MMD² over all images, class-stratified for a set whose labels
(``samples.npz``'s ``labels``, the built-in data sets, class subfolders) are balanced by design: ``tdqrt sample``
draws class-balanced samples, and the plain i.i.d. estimator - torch-fidelity's - is then biased far below 0 (why:
``tools/bootstrap.py``).
IS and precision/recall are torch-fidelity's, on the same features.

Results are a JSON-able dict (``format: tdqrt-eval``); when ``samples`` is a path they are also written to
``eval.json`` beside it (the ``.npz``'s folder, or inside the image folder), or to ``EvalConfig.out``.
"""
from __future__ import annotations

import hashlib
import io
import math
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                  resolve_feature_layer_for_metric)

from tdqrt.calibration.data import BUILTIN_DATASETS, IMAGE_EXTENSIONS, load_dataset, load_folder, to_uint8_nhwc
from tdqrt.engines.artifacts import atomic_path, sha256_file, versions, write_json_atomic
from tdqrt.engines.config import check_choice, check_int, invalid
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError, TdqrtError
from tdqrt.engines.threads import torch_threads
from tdqrt.tools.bootstrap import CI_LEVEL, bootstrap
from tdqrt.tools.extractor import (
    cache_root,
    default_extractor_dir,
    extractor_name,
    load_extractor,
    register_extractor_name,
)

EVAL_FORMAT = "tdqrt-eval"
EVAL_VERSION = 2  # 2: FID/KID intervals, class-stratified KID (no KID_std)
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.npz"  # what `tdqrt sample` writes (tools/sample.py), beside grid.png and sample.json
SAMPLE_CARD = "sample.json"
METRICS = ("fid", "kid", "isc", "prc")
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILE_HINT = ("the standard FID Inception-v3 weights, pt_inception-2015-12-05-6726825d.pth (pytorch-fid; "
                       "torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same file), a PyTorch "
                       "state dict of about 91 MB")
INCEPTION_SHA256_PREFIX = "6726825d"
_INCEPTION_PROBE_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                         "fc.weight": (1008, 2048)}
_KEYS = {  # torch-fidelity result key -> tdqrt metric label
    "inception_score_mean": "IS",
    "inception_score_std": "IS_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


# -------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class EvalConfig:
    """What to compute and with which extractor.

    ``metrics``: subset of fid, kid, isc (Inception Score, on the samples alone), prc (precision/recall).
    ``feature_extractor``: a tdqrt extractor folder / ``.safetensors`` / name ``tdqrt-<dataset>-cnn``, or
    ``inception-v3-compat`` (then ``inception_weights`` is required). ``bootstrap``: resamples behind the FID/KID
    intervals (0: none; tools/bootstrap.py). ``isc_splits`` is lowered to the number of samples when larger.
    ``ref_num``: cap on reference images (chosen with ``seed``). ``image_size``: side folders are resized to
    (default: the first sample image's shorter side). ``cache_dir``: torch-fidelity cache root for reference
    features/statistics. ``out``: where to write eval.json (default beside path ``samples``; arrays: nowhere).
    ``device``: auto (CUDA when available), cpu or cuda. ``threads``: torch CPU threads during the call.
    """

    metrics: tuple[str, ...] = METRICS
    feature_extractor: str | Path | None = None
    inception_weights: Path | None = None
    bootstrap: int = 200
    isc_splits: int = 10
    prc_neighborhood: int = 3
    batch: int = 64
    seed: int = 0
    ref_num: int | None = None
    image_size: int | None = None
    cache_dir: Path | None = None
    cache: bool = True
    out: Path | None = None
    device: str = "auto"
    threads: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        metrics = self.metrics
        if isinstance(metrics, str):
            metrics = tuple(m.strip() for m in metrics.split(",") if m.strip())
        metrics = tuple(str(m).lower() for m in metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if not metrics or unknown or len(set(metrics)) != len(metrics):
            raise invalid("EvalConfig.metrics", self.metrics, f"a non-empty subset of {','.join(METRICS)} without "
                          "repeats", "give a comma-separated list such as fid,kid", flag="--metrics")
        object.__setattr__(self, "metrics", tuple(m for m in METRICS if m in metrics))
        check_int("EvalConfig.bootstrap", self.bootstrap, 0, flag="--bootstrap")
        if self.bootstrap == 1:
            raise invalid("EvalConfig.bootstrap", 1, "0 (no intervals) or at least 2 resamples", "give 0 or >= 2",
                          flag="--bootstrap")
        for name, minimum, flag in (("isc_splits", 1, None), ("prc_neighborhood", 1, None), ("batch", 1, "--batch"),
                                    ("seed", 0, "--seed")):
            check_int(f"EvalConfig.{name}", getattr(self, name), minimum, flag=flag)
        for name, minimum, flag in (("ref_num", 2, "--ref-num"), ("image_size", 1, None), ("threads", 1, "--threads")):
            check_int(f"EvalConfig.{name}", getattr(self, name), minimum, optional=True, flag=flag)
        check_choice("EvalConfig.device", self.device, ("auto", "cpu", "cuda"), flag="--device")
        for name in ("inception_weights", "cache_dir", "out"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()} | {
            "metrics": list(self.metrics)}


# ------------------------------------------------------------------------------------------------- images

@dataclass
class ImageSet:
    """``uint8`` NHWC images (C = 1 or 3) plus where they came from and their content hash."""

    images: np.ndarray
    source: str
    info: dict = field(default_factory=dict)
    labels: np.ndarray | None = None  # class per image, when the source says (see tools/bootstrap.py strata)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def grey(self) -> bool:
        """True for one channel or three equal channels (grey stored as RGB)."""
        x = self.images
        return x.shape[-1] == 1 or bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(f"{self.images.dtype}{self.images.shape}".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "count": len(self.images), "image_size": self.image_size,
                "channels": self.channels, "sha256": self.sha256, "labelled": self.labels is not None, **self.info}


def check_uint8_nhwc(arr: np.ndarray, what: str) -> np.ndarray:
    """Validate an image array in the evaluator layout: ``uint8`` ``[N, H, W, C]``, C in {1, 3}, N >= 1, square."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{what} contains {bad} NaN/Inf values (dtype {arr.dtype}); the images are unusable - "
                            "check the stage that produced them (a diverged model?)")
        raise DataError(f"{what} has dtype {arr.dtype}; expected uint8 pixels 0..255 shaped [N, H, W, C] (the "
                        "OpenAI evaluator layout). Convert float images in [-1, 1] with "
                        "tdqrt.calibration.data.to_uint8_nhwc, or write them with write_openai_npz")
    if arr.ndim == 3:
        raise DataError(f"{what} has shape {arr.shape}; expected [N, H, W, C] - add the channel axis "
                        "(arr[..., None] for grey images)")
    if arr.ndim != 4:
        raise DataError(f"{what} has shape {arr.shape}; expected uint8 images shaped [N, H, W, C]")
    if arr.shape[0] == 0:
        raise DataError(f"{what} holds no images (shape {arr.shape}); nothing to evaluate")
    if arr.shape[-1] not in (1, 3):
        hint = " - it looks like NCHW; transpose with arr.transpose(0, 2, 3, 1)" if arr.shape[1] in (1, 3) else ""
        raise DataError(f"{what} has {arr.shape[-1]} channels (shape {arr.shape}); expected 1 (grey) or 3 (RGB) "
                        f"in the last axis{hint}")
    if arr.shape[1] != arr.shape[2]:
        raise DataError(f"{what} images are {arr.shape[1]}x{arr.shape[2]}; expected square images")
    return arr


def write_openai_npz(path: str | Path, images_uint8_nhwc: np.ndarray, *, labels: np.ndarray | None = None,
                     rgb: bool = True) -> Path:
    """Write images as the OpenAI (guided-diffusion) evaluator expects: ``arr_0`` = ``uint8`` ``[N, H, W, 3]``.

    ``rgb=True`` replicates grey images to three channels, because that evaluator's Inception needs RGB;
    ``rgb=False`` keeps one channel (as ``tdqrt sample`` writes; ``tdqrt eval`` reads both). ``labels``
    (optional, ``[N]`` ints) are stored as ``labels``. Written atomically; returns the path.
    """
    arr = check_uint8_nhwc(images_uint8_nhwc, "images")
    if rgb and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    payload = {"arr_0": np.ascontiguousarray(arr)}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (arr.shape[0],) or labels.dtype.kind not in "iu":
            raise DataError(f"labels must be integers shaped [{arr.shape[0]}], got dtype {labels.dtype} "
                            f"shape {labels.shape}")
        payload["labels"] = labels.astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def read_npz_images(path: str | Path, what: str = "samples") -> np.ndarray:
    """``arr_0`` of an evaluator ``.npz``, validated with ``check_uint8_nhwc``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "arr_0" not in keys:
                raise DataError(f"{path} has no 'arr_0' array (found {keys or 'nothing'}); expected the OpenAI "
                                "evaluator layout: arr_0 = uint8 [N, H, W, C] (write it with write_openai_npz)")
            arr = npz["arr_0"]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a .npz ({exc}); the file is truncated or not an npz") from exc
    return check_uint8_nhwc(arr, f"{what} {path}:arr_0")


def _first_image_side(root: Path) -> int:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"no image files under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}); "
                        "the folder is empty - put the sample images there or pass another folder")
    try:
        with Image.open(files[0]) as img:
            return min(img.size)
    except OSError as exc:
        raise DataError(f"cannot read image {files[0]}: {exc}") from exc


def load_images(spec, what: str, *, image_size: int | None = None, num: int | None = None,
                seed: int = 0) -> ImageSet:
    """``spec`` -> ``ImageSet``: an array, a ``.npz``, a folder, or (references) ``digits`` / ``shapes``.

    Built-in data sets and folders are loaded at ``image_size``; ``num`` caps them (chosen with ``seed``).
    """
    if isinstance(spec, torch.Tensor):
        spec = spec.numpy()
    if isinstance(spec, np.ndarray):
        return ImageSet(check_uint8_nhwc(spec, what), source="array")
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        data = load_dataset(spec, image_size=image_size, num=num, seed=seed)
        return ImageSet(to_uint8_nhwc(data.images), source=spec, info={"num": num, "seed": seed},
                        labels=_labels(data.labels))
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"{what} must be a path (.npz or folder), a uint8 NHWC array"
                          f"{' or digits/shapes' if what == 'reference' else ''}; got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if path.is_dir() and (path / SAMPLES_FILE).is_file():  # a `tdqrt sample` folder means its samples
        path = path / SAMPLES_FILE
    elif path.is_dir() and (path / SAMPLE_CARD).is_file():
        raise DataError(f"{path} is a `tdqrt sample` output folder without {SAMPLES_FILE} (an unfinished run?); "
                        "rerun the same `tdqrt sample` command to finish it - its grid.png is not a sample set")
    if path.is_dir():
        first_side = _first_image_side(path)  # also gives a clear "empty folder" error
        data = load_folder(path, image_size=image_size or first_side, num=num, seed=seed)
        return ImageSet(to_uint8_nhwc(data.images), source=str(path.resolve()), info={"layout": data.info["layout"]},
                        labels=_labels(data.labels))
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{what} {path} is a {path.suffix or 'extension-less'} file; expected a .npz (arr_0 = "
                            "uint8 [N, H, W, C]) or a folder of images")
        arr = read_npz_images(path, what)
        with np.load(path, allow_pickle=False) as npz:
            labels = _labels(npz["labels"]) if "labels" in npz.files else None
        if labels is not None and labels.shape != (len(arr),):
            labels = None
        if num is not None and num < len(arr):
            keep = np.sort(np.random.default_rng(seed).choice(len(arr), num, replace=False))
            arr, labels = arr[keep], None if labels is None else labels[keep]
        return ImageSet(arr, source=str(path.resolve()), labels=labels)
    builtin = f", {', '.join(BUILTIN_DATASETS)}" if what == "reference" else ""
    raise DataError(f"{what} {path} does not exist; expected a .npz, a folder of images{builtin}")


def _labels(labels) -> np.ndarray | None:
    """Class labels as int64, or None when there are none (unconditional samples carry -1)."""
    if labels is None:
        return None
    labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels < 0).any():
        return None
    return labels.astype(np.int64)


class UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity input: item ``i`` is ``uint8`` ``[3, H, W]`` (grey replicated to three channels)."""

    def __init__(self, images_nhwc: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
        self.images = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------------------------- extractors

@dataclass(frozen=True)
class ResolvedExtractor:
    name: str  # the torch-fidelity name; appears in every metric key
    weights: Path
    sha256: str
    channels: int | None  # what the network expects (None: RGB Inception, any input)
    image_size: int | None
    card: dict


def check_inception_weights(path: Path) -> str:
    """Validate a local Inception-v3 FID weights file; return its sha256. Errors say what file is expected."""
    if not path.exists():
        raise ConfigError(f"--inception-weights {path} does not exist; expected {INCEPTION_FILE_HINT}. tdqrt never "
                          "downloads it: copy the file to this machine and pass its path")
    if not path.is_file():
        raise ConfigError(f"--inception-weights {path} is not a file; expected {INCEPTION_FILE_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise ArtifactError(f"--inception-weights {path} is not a readable PyTorch weights file "
                            f"({type(exc).__name__}: {str(exc)[:120]}); expected {INCEPTION_FILE_HINT}") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"--inception-weights {path} holds a {type(state).__name__}, not a state dict; "
                            f"expected {INCEPTION_FILE_HINT}")
    for key, shape in _INCEPTION_PROBE_KEYS.items():
        tensor = state.get(key)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            found = "missing" if tensor is None else f"shape {tuple(getattr(tensor, 'shape', ()))}"
            raise ArtifactError(f"--inception-weights {path} is a state dict but not the FID Inception-v3 ({key} "
                                f"{found}, expected shape {shape}); expected {INCEPTION_FILE_HINT}")
    digest = sha256_file(path)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        warnings.warn(f"{path} has the FID Inception-v3 layout but sha256 {digest[:8]}..., not the standard "
                      f"{INCEPTION_SHA256_PREFIX}...; its FIDs are not comparable to published ones", stacklevel=3)
    return digest


def resolve_extractor(cfg: EvalConfig, ref) -> ResolvedExtractor:
    """Pick the feature extractor of ``cfg`` (module docstring); never one that would download."""
    fe = cfg.feature_extractor
    if cfg.inception_weights is not None:
        if fe is not None and str(fe) != INCEPTION_NAME:
            raise ConfigError(f"both --feature-extractor {fe} and --inception-weights were given; pick one "
                              f"(--inception-weights means the {INCEPTION_NAME} extractor)")
        digest = check_inception_weights(cfg.inception_weights)
        return ResolvedExtractor(INCEPTION_NAME, cfg.inception_weights, digest, None, None,
                                 {"kind": "inception-v3", "weights": str(cfg.inception_weights)})
    if fe is not None and str(fe) == INCEPTION_NAME:
        raise ConfigError(f"{INCEPTION_NAME} needs --inception-weights FILE ({INCEPTION_FILE_HINT}); tdqrt never "
                          "downloads it")
    if fe is None:
        dataset = ref if isinstance(ref, str) and ref in BUILTIN_DATASETS else (
            str(ref) if isinstance(ref, (str, Path)) and Path(ref).expanduser().is_dir() else None)
        if dataset is None:
            raise ConfigError("no feature extractor given: pass --feature-extractor DIR (train one with `tdqrt "
                              "extractor --data DATA --out DIR`) or --inception-weights FILE")
        location = default_extractor_dir(dataset)
        if not location.is_dir():
            raise ConfigError(f"no feature extractor for {dataset!r} at its default location {location}; train one "
                              f"with `tdqrt extractor --data {dataset}` (writes there), or pass --feature-extractor "
                              "DIR or --inception-weights FILE. Inception weights are never downloaded")
        fe = location
    elif isinstance(fe, str) and not Path(fe).expanduser().exists() and fe.startswith("tdqrt-") and fe.endswith("-cnn"):
        location = cache_root() / "extractors" / fe
        if not location.is_dir():
            raise ConfigError(f"feature extractor {fe!r} is not at its default location {location}; train it with "
                              f"`tdqrt extractor --data {fe[len('tdqrt-'):-len('-cnn')]}` or pass its folder")
        fe = location
    elif isinstance(fe, str) and not Path(fe).expanduser().exists():
        raise ConfigError(f"feature extractor {fe!r} is neither a folder/file nor a known name; use the folder of "
                          f"`tdqrt extractor`, a name tdqrt-<dataset>-cnn, or {INCEPTION_NAME} with "
                          "--inception-weights (other torch-fidelity extractors would download weights)")
    loaded = load_extractor(fe)
    register_extractor_name(loaded.name)
    return ResolvedExtractor(loaded.name, loaded.weights, loaded.sha256, loaded.spec.in_channels,
                             loaded.spec.image_size, loaded.card)


# ------------------------------------------------------------------------------------------------ evaluate

def metric_key(label: str, extractor: str) -> str:
    """``("FID", "tdqrt-digits-cnn")`` -> ``"FID[tdqrt-digits-cnn]"``."""
    return f"{label}[{extractor}]"


def _check_pair(samples: ImageSet, ref: ImageSet, fe: ResolvedExtractor, cfg: EvalConfig) -> None:
    if samples.channels != ref.channels:
        colour = samples if samples.channels == 3 else ref
        if not colour.grey:
            raise DataError(
                f"channel mismatch: samples have {samples.channels} channel(s) ({samples.source}) but the reference "
                f"has {ref.channels} ({ref.source}), and the {'samples' if colour is samples else 'reference'} are "
                "real colour images; compare like with like (grey with grey, RGB with RGB)")
    if samples.image_size != ref.image_size:
        raise DataError(f"size mismatch: samples are {samples.image_size}x{samples.image_size} but the reference is "
                        f"{ref.image_size}x{ref.image_size} ({ref.source}); resample one set so both match")
    if fe.channels == 1 and not (samples.grey and ref.grey):
        raise ConfigError(f"feature extractor {fe.name} was trained on grey images but the data are colour; use an "
                          "extractor trained on colour data (e.g. `tdqrt extractor --data shapes`)")
    n1, n2 = len(samples.images), len(ref.images)
    if "fid" in cfg.metrics and min(n1, n2) < 2:
        raise DataError(f"FID needs at least 2 images per set (samples {n1}, reference {n2})")
    if "kid" in cfg.metrics and min(n1, n2) < 2:
        raise DataError(f"KID needs at least 2 images per set (samples {n1}, reference {n2})")
    if "prc" in cfg.metrics and min(n1, n2) <= cfg.prc_neighborhood:
        raise DataError(f"precision/recall with {cfg.prc_neighborhood} neighbours needs more than that many images "
                        f"per set (samples {n1}, reference {n2})")


def _compute(kwargs: dict, cfg: EvalConfig, samples: ImageSet, ref: ImageSet | None) -> tuple[dict, dict | None]:
    """Features of both sets once (torch-fidelity's extractor and reference cache), then every metric from them:
    IS and precision/recall by torch-fidelity, FID (torch-fidelity's formula) and KID with bootstrap intervals."""
    layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m in cfg.metrics}
    extractor = create_feature_extractor(kwargs["feature_extractor"], sorted(set(layers.values())), **kwargs)
    f1 = extract_featuresdict_from_input_id_cached(1, extractor, **kwargs)
    f2 = extract_featuresdict_from_input_id_cached(2, extractor, **kwargs) if ref is not None else None
    raw: dict[str, float] = {}
    if "isc" in cfg.metrics:
        raw.update({_KEYS[k]: v for k, v in isc_featuresdict_to_metric(f1, layers["isc"], **kwargs).items()})
    uncertainty = None
    if "fid" in cfg.metrics or "kid" in cfg.metrics:
        layer = layers.get("fid", layers.get("kid"))
        if "fid" in layers and "kid" in layers and layers["fid"] != layers["kid"]:
            raise ConfigError(f"FID and KID use different feature layers ({layers['fid']}, {layers['kid']}); "
                              "evaluate them in separate calls")
        estimates, how = bootstrap(f1[layer].numpy(), f2[layer].numpy(), labels_x=samples.labels,
                                   labels_y=ref.labels, fid="fid" in cfg.metrics, kid="kid" in cfg.metrics,
                                   resamples=cfg.bootstrap, seed=cfg.seed)
        if "fid" in estimates:  # the headline FID exactly as torch-fidelity computes it
            point = fid_statistics_to_metric(fid_features_to_statistics(f1[layer]),
                                             fid_features_to_statistics(f2[layer]), False)
            estimates["FID"] = replace(estimates["FID"], value=point["frechet_inception_distance"])
        for label, est in estimates.items():
            raw[label] = est.value
            if cfg.bootstrap:
                raw.update({f"{label}_se": est.se, f"{label}_lo": est.lo, f"{label}_hi": est.hi})
        uncertainty = how if cfg.bootstrap else {"kid_estimator": how["kid_estimator"], "samples": how["samples"],
                                                  "reference": how["reference"]}
    if "prc" in cfg.metrics:
        raw.update({_KEYS[k]: v for k, v in prc_featuresdict_to_metric(f1, f2, layers["prc"], **kwargs).items()})
    return raw, uncertainty


def evaluate(samples, ref, cfg: EvalConfig = EvalConfig()) -> dict:
    """Compute ``cfg.metrics`` of ``samples`` against ``ref`` (module docstring); returns the result dict and
    writes it to eval.json beside path ``samples`` (or ``cfg.out``)."""
    t0 = time.perf_counter()
    sample_set = load_images(samples, "samples", image_size=cfg.image_size)
    binary = any(m != "isc" for m in cfg.metrics)
    ref_set = load_images(ref, "reference", image_size=cfg.image_size or sample_set.image_size,
                          num=cfg.ref_num, seed=cfg.seed) if binary else None
    fe = resolve_extractor(cfg, ref)
    if ref_set is not None:
        _check_pair(sample_set, ref_set, fe, cfg)
    elif fe.channels == 1 and not sample_set.grey:
        raise ConfigError(f"feature extractor {fe.name} was trained on grey images but the samples are colour")

    n1 = len(sample_set.images)
    isc_splits = min(cfg.isc_splits, n1)
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device; use --device cpu")
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else cache_root() / "fidelity"
    ref_cache_name = (f"tdqrt-ref-{ref_set.sha256[:24]}-fe-{fe.sha256[:24]}" if ref_set is not None and cfg.cache
                      else None)
    kwargs = dict(
        input1=UInt8Images(sample_set.images),
        input2=UInt8Images(ref_set.images) if ref_set is not None else None,
        input2_cache_name=ref_cache_name,
        cuda=cuda,
        batch_size=cfg.batch,
        fid="fid" in cfg.metrics, kid="kid" in cfg.metrics, isc="isc" in cfg.metrics, prc="prc" in cfg.metrics,
        feature_extractor=fe.name,
        feature_extractor_weights_path=str(fe.weights),
        isc_splits=isc_splits, prc_neighborhood=cfg.prc_neighborhood,
        rng_seed=cfg.seed,
        cache=cfg.cache, cache_root=str(cache_dir),
        save_cpu_ram=True,  # no DataLoader worker processes: the data are already in memory
        verbose=cfg.verbose,
    )
    if not binary:
        del kwargs["input2"], kwargs["input2_cache_name"]
    try:
        with torch_threads(cfg.threads), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            raw, uncertainty = _compute(kwargs, cfg, sample_set, ref_set)
    except TdqrtError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"torch-fidelity refused the evaluation with {fe.name}: {exc}") from exc

    metrics = {}
    for label, value in raw.items():
        value = float(value)
        if not math.isfinite(value):
            raise DataError(f"{metric_key(label, fe.name)} came out {value}; the sets are degenerate (e.g. all "
                            "images identical) - check the samples")
        metrics[metric_key(label, fe.name)] = value
    result = {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "extractor": {"name": fe.name, "weights": str(fe.weights), "sha256": fe.sha256,
                      "kind": "inception-v3" if fe.name == INCEPTION_NAME else "tdqrt-cnn",
                      "image_size": fe.image_size, "channels": fe.channels,
                      "accuracy": fe.card.get("accuracy"), "dataset": fe.card.get("dataset"),
                      "note": ("standard Inception-v3 FID features" if fe.name == INCEPTION_NAME else
                               "tdqrt's own CNN: numbers are comparable only with the same extractor sha256, "
                               "never with Inception FID")},
        "metrics": metrics,
        "samples": sample_set.describe(),
        "ref": ref_set.describe() if ref_set is not None else None,
        "uncertainty": uncertainty,
        "settings": cfg.to_dict() | {"isc_splits": isc_splits, "cuda": cuda, "cache_root": str(cache_dir),
                                     "ref_cache_name": ref_cache_name},
        "seconds": round(time.perf_counter() - t0, 3),
        "versions": versions() | {"torch_fidelity": torch_fidelity.__version__},
    }
    out = cfg.out
    if out is None and isinstance(samples, (str, Path)):
        path = Path(samples).expanduser()
        out = (path if path.is_dir() else path.parent) / EVAL_FILE
    if out is not None:
        write_json_atomic(out, result)
        result["path"] = str(out)
    return result


def format_metrics(result: dict) -> list[str]:
    """One ``KEY = value`` line per metric, for printing; FID and KID with their bootstrap interval."""
    m = result["metrics"]
    lines = []
    for key, value in m.items():
        label, _, rest = key.partition("[")
        if label.endswith(("_se", "_lo", "_hi")):
            continue
        se = m.get(f"{label}_se[{rest}")
        lines.append(f"{key} = {value:.6g}" if se is None else
                     f"{key} = {value:.6g} ± {value - m[f'{label}_lo[{rest}']:.3g} ({CI_LEVEL:.0%} interval "
                     f"[{m[f'{label}_lo[{rest}']:.6g}, {m[f'{label}_hi[{rest}']:.6g}], standard error {se:.3g}, "
                     f"{result['uncertainty']['resamples']} bootstrap resamples)")
    return lines


__all__ = [
    "EVAL_FILE", "EvalConfig", "INCEPTION_NAME", "ImageSet", "METRICS", "UInt8Images", "check_inception_weights",
    "check_uint8_nhwc", "evaluate", "extractor_name", "format_metrics", "load_images", "metric_key",
    "read_npz_images", "resolve_extractor", "write_openai_npz",
]
