"""A small CNN classifier as the feature extractor of FID/KID/IS/PRC on the built-in data sets.

Inception-v3 features describe 299x299 photographs; on 16x16 grey digits or 32x32 procedural shapes they say
little, and the weights would have to be downloaded. So tdqrt trains its own classifier on the data set it
evaluates (``tdqrt extractor --data digits``, seconds on a CPU) and registers it with torch-fidelity as a
feature extractor of its own name, ``tdqrt-<dataset>-cnn``. Every number computed with it is printed and
stored as e.g. ``FID[tdqrt-digits-cnn]``: comparable between runs that use the same extractor file (its
sha256 is recorded next to the numbers), never comparable to Inception FIDs in papers.

Files (``--out DIR``, default ``default_extractor_dir(dataset)``)::

    extractor.safetensors   weights; its metadata key "tdqrt-extractor" holds the card below without sha256,
                            so the file alone is enough to rebuild the network
    extractor.json          the card: format, name, dataset, image size, channels, classes, architecture,
                            held-out accuracy, training settings, sha256 of the weights, versions, and "run"
                            (seconds, threads) - kept out of the weights, so equal settings give equal files

Network (``ExtractorCNN``; all ReLU)::

    conv3x3(C, w) conv3x3(w, w) avgpool2 | conv3x3(w, 2w) conv3x3(2w, 2w) avgpool2 | adaptive avgpool 4x4
    -> "pool"       flattened 2w*16 activations
    -> "embedding"  Linear(2w*16, embed_dim) + ReLU: the penultimate layer, used for FID, KID and PRC
    -> "logits"     Linear(embed_dim, num_classes): used for IS

torch-fidelity convention: a feature extractor receives ``uint8`` ``[B, 3, H, W]`` batches (grey images as
three equal channels). ``TdqrtCNNFeatureExtractor`` maps them back to the network's input exactly: 3 -> 1
channel by averaging (exact for replicated grey), 1 -> 3 by replication, ``v / 127.5 - 1`` (the inverse of
``to_uint8_nhwc``), and an antialiased bilinear resize to the extractor's image size when the sizes differ.

Nothing here ever downloads: the extractor loads only from ``feature_extractor_weights_path``.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from tdqrt.calibration.data import BUILTIN_DATASETS, from_uint8_nhwc, load_dataset, to_uint8_nhwc
from tdqrt.engines.artifacts import atomic_path, read_json, sha256_file, versions, write_json_atomic
from tdqrt.engines.config import check_choice, check_int, check_real, check_text
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.threads import torch_threads

EXTRACTOR_FORMAT = "tdqrt-extractor"
EXTRACTOR_VERSION = 1
WEIGHTS_FILE = "extractor.safetensors"
CARD_FILE = "extractor.json"
METADATA_KEY = "tdqrt-extractor"
FEATURE_LAYERS = ("pool", "embedding", "logits")
DEFAULT_LAYERS = {"fid": "embedding", "kid": "embedding", "prc": "embedding", "isc": "logits"}
CACHE_ENV = "TDQRT_CACHE_DIR"
_NAME_RE = re.compile(r"^tdqrt-[a-z0-9][a-z0-9-]*-cnn$")
RUN_ONLY = ("threads",)  # ExtractorConfig fields that change how training runs, not the network it makes


# ----------------------------------------------------------------------------------------------- locations

def cache_root() -> Path:
    """Root of tdqrt's caches: ``$TDQRT_CACHE_DIR``, else ``~/.cache/tdqrt``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/tdqrt").expanduser()


def dataset_slug(dataset: str) -> str:
    """``digits`` -> ``digits``; a folder path -> its lower-cased name with runs of other characters as ``-``."""
    if dataset in BUILTIN_DATASETS:
        return dataset
    name = Path(dataset).expanduser().resolve().name if dataset not in ("", ".") else "folder"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "folder"


def extractor_name(dataset: str) -> str:
    """The torch-fidelity name of the extractor for ``dataset``: ``tdqrt-<slug>-cnn``."""
    return f"tdqrt-{dataset_slug(dataset)}-cnn"


def default_extractor_dir(dataset: str) -> Path:
    """Where ``tdqrt extractor`` writes and ``tdqrt eval`` looks when no extractor is named:
    ``$TDQRT_CACHE_DIR/extractors/tdqrt-<slug>-cnn`` (``~/.cache/tdqrt/extractors/...`` by default)."""
    return cache_root() / "extractors" / extractor_name(dataset)


# ------------------------------------------------------------------------------------------------- network

@dataclass(frozen=True)
class CNNSpec:
    """Architecture of ``ExtractorCNN``; stored in the card and in the weights' metadata."""

    in_channels: int
    image_size: int
    num_classes: int
    width: int = 32
    embed_dim: int = 128

    def __post_init__(self) -> None:
        for name, minimum in (("in_channels", 1), ("image_size", 4), ("num_classes", 2), ("width", 1),
                              ("embed_dim", 1)):
            check_int(f"CNNSpec.{name}", getattr(self, name), minimum)
        check_choice("CNNSpec.in_channels", self.in_channels, (1, 3), fix="use 1 (grey) or 3 (RGB)")


class ExtractorCNN(nn.Module):
    """The classifier; ``forward`` takes float ``[B, C, S, S]`` in ``[-1, 1]`` and returns a dict of features."""

    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.conv1 = nn.Conv2d(spec.in_channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w * 16, spec.embed_dim)
        self.head = nn.Linear(spec.embed_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.avg_pool2d(x, 2) if x.shape[-1] >= 8 else x
        x = F.relu(self.conv4(F.relu(self.conv3(x))))
        x = F.avg_pool2d(x, 2) if x.shape[-1] >= 8 else x
        pool = F.adaptive_avg_pool2d(x, 4).flatten(1)
        emb = F.relu(self.fc(pool))
        return {"pool": pool, "embedding": emb, "logits": self.head(emb)}


def to_network_input(x: torch.Tensor, spec: CNNSpec) -> torch.Tensor:
    """torch-fidelity's ``uint8 [B, 1|3, H, W]`` -> the network's float input (module docstring)."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"the tdqrt CNN feature extractor expects uint8 images [B, 1|3, H, W], got "
                          f" dtype {x.dtype} shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    if x.shape[1] != spec.in_channels:
        x = x.mean(dim=1, keepdim=True) if spec.in_channels == 1 else x.expand(-1, 3, -1, -1)
    x = x / 127.5 - 1.0
    if x.shape[-2:] != (spec.image_size, spec.image_size):
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear", antialias=True,
                          align_corners=False).clamp_(-1.0, 1.0)
    return x


# ------------------------------------------------------------------------------------------------ training

@dataclass(frozen=True)
class ExtractorConfig:
    """How to train an extractor. ``data``: digits, shapes or a folder with one subfolder per class.

    ``image_size``: the side the network works at (default: the data set's, 16 for digits, 32 for shapes;
    required for a folder). ``num``: cap on the images used (shapes: how many to generate, default 6000).
    ``holdout``: fraction kept out of training to measure accuracy. ``threads``: torch CPU threads while
    training (None: torch's setting).
    """

    data: str = "digits"
    image_size: int | None = None
    steps: int = 500
    batch: int = 64
    lr: float = 3e-3
    holdout: float = 0.2
    num: int | None = None
    width: int = 32
    embed_dim: int = 128
    augment: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        flags = {"steps": "--steps", "batch": "--batch", "seed": "--seed"}
        for name, minimum in (("steps", 1), ("batch", 2), ("width", 1), ("embed_dim", 1), ("seed", 0)):
            check_int(f"ExtractorConfig.{name}", getattr(self, name), minimum, flag=flags.get(name))
        check_real("ExtractorConfig.lr", self.lr, above=0.0)
        check_real("ExtractorConfig.holdout", self.holdout, 0.05, 0.5)
        check_int("ExtractorConfig.threads", self.threads, 1, optional=True, flag="--threads")
        check_text("ExtractorConfig.data", self.data, "'digits', 'shapes' or a folder path", flag="--data")


@dataclass
class Extractor:
    """A loaded extractor: the network (eval mode, no grad), its card, the weights file and its sha256."""

    model: ExtractorCNN
    card: dict
    weights: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def spec(self) -> CNNSpec:
        return self.model.spec

    def features(self, images_uint8_nchw: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.model(to_network_input(images_uint8_nchw, self.spec))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (shift up to 1/16 of the side, scale 0.9-1.1, rotation +-10 degrees)."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    angle, scale = u(-0.17, 0.17), u(0.9, 1.1)
    tx, ty = u(-0.125, 0.125), u(-0.125, 0.125)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _split(labels: torch.Tensor, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``holdout`` of every class (at least one image) goes to the held-out set."""
    rng = np.random.default_rng([seed, 7])
    y = labels.numpy()
    train, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        k = max(1, int(round(holdout * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train_extractor(cfg: ExtractorConfig, out_dir: str | Path | None = None, *, progress: bool = False) -> Extractor:
    """Train an ``ExtractorCNN`` on ``cfg.data`` and write ``extractor.safetensors`` + ``extractor.json`` to
    ``out_dir`` (default ``default_extractor_dir(cfg.data)``); returns the loaded result."""
    with torch_threads(cfg.threads):
        return _train(cfg, out_dir, progress)


def _train(cfg: ExtractorConfig, out_dir: str | Path | None, progress: bool) -> Extractor:
    out_dir = Path(out_dir) if out_dir is not None else default_extractor_dir(cfg.data)
    num = cfg.num if cfg.num is not None or cfg.data != "shapes" else 6000
    data = load_dataset(cfg.data, image_size=cfg.image_size, num=num, seed=cfg.seed)
    if data.num_classes < 2 or data.labels is None:
        raise ConfigError(f"data set {cfg.data!r} has {data.num_classes} classes; a feature extractor is a "
                          "classifier, so it needs labelled data with >= 2 classes (a folder with one subfolder "
                          "per class: root/<class>/<image>)")
    spec = CNNSpec(in_channels=data.channels, image_size=data.image_size, num_classes=data.num_classes,
                   width=cfg.width, embed_dim=cfg.embed_dim)
    # Train on exactly what evaluation will see: images quantised to uint8 and mapped back.
    x = from_uint8_nhwc(to_uint8_nhwc(data.images))
    y = data.labels
    train_idx, held_idx = _split(y, cfg.holdout, cfg.seed)
    if len(held_idx) == 0 or len(train_idx) == 0:
        raise ConfigError(f"data set {cfg.data!r} has too few images ({len(y)}) to hold some out for accuracy")

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ExtractorCNN(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    xt, yt = x[train_idx], y[train_idx]
    t0 = time.perf_counter()
    model.train()
    order = torch.empty(0, dtype=torch.int64)
    last_loss = float("nan")
    for step in range(cfg.steps):
        while order.numel() < cfg.batch:
            order = torch.cat([order, torch.randperm(len(xt), generator=gen)])
        idx, order = order[:cfg.batch], order[cfg.batch:]
        xb = _augment(xt[idx], gen) if cfg.augment else xt[idx]
        loss = F.cross_entropy(model(xb)["logits"], yt[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last_loss = float(loss.detach())
        if progress and (step + 1) % max(1, cfg.steps // 10) == 0:
            print(f"step {step + 1}/{cfg.steps} loss {last_loss:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    if not math.isfinite(last_loss):
        raise ConfigError(f"extractor training diverged (loss {last_loss}); lower --lr (now {cfg.lr})")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[held_idx][i:i + 512])["logits"].argmax(1) for i in range(0, len(held_idx), 512)])
    accuracy = float((pred == y[held_idx]).float().mean())

    card = {
        "format": EXTRACTOR_FORMAT,
        "version": EXTRACTOR_VERSION,
        "name": extractor_name(cfg.data),
        "dataset": cfg.data if cfg.data in BUILTIN_DATASETS else str(Path(cfg.data).expanduser().resolve()),
        "image_size": spec.image_size,
        "channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "class_names": list(data.class_names),
        "arch": {"kind": "ExtractorCNN", **asdict(spec)},
        "features": {"pool": 2 * spec.width * 16, "embedding": spec.embed_dim, "logits": spec.num_classes},
        "default_layers": dict(DEFAULT_LAYERS),
        "accuracy": round(accuracy, 6),
        "holdout_count": int(len(held_idx)),
        "train_count": int(len(train_idx)),
        "training": {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY} | {
            "num": num, "final_loss": round(last_loss, 6)},
        "data": data.info,
    }
    run = {"seconds": round(seconds, 3), "threads": cfg.threads}
    _save(out_dir, model, card, run)
    ext = load_extractor(out_dir)
    ext.card = {**ext.card, "run": run}
    return ext


def _save(out_dir: Path, model: ExtractorCNN, card: dict, run: dict) -> None:
    """Weights with the card as metadata, and ``extractor.json`` = card + ``run`` + sha256 + versions.

    Only what defines the network goes into the weights file (``run``, how long and on how many threads this
    training ran, goes into extractor.json alone), so retraining with the same settings writes a byte-identical
    file: the same sha256, the same extractor id in every eval.json and demo report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(card, sort_keys=True)})
        digest = sha256_file(tmp)
    write_json_atomic(out_dir / CARD_FILE, {**card, "run": run, "weights": {"file": WEIGHTS_FILE, "sha256": digest},
                                            "versions": versions()})


# ------------------------------------------------------------------------------------------------- loading

def _weights_path(path: str | Path) -> Path:
    """A directory holding ``extractor.safetensors`` or the ``.safetensors`` file itself -> the file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise ArtifactError(f"no extractor weights at {p}; pass the --out folder of `tdqrt extractor` (it holds "
                            f"{WEIGHTS_FILE} and {CARD_FILE}) or make one with `tdqrt extractor --data digits --out DIR`")
    return p


def load_extractor(path: str | Path) -> Extractor:
    """Load an extractor from its folder or its ``extractor.safetensors``; no network is ever used.

    The architecture comes from the weights' metadata; when ``extractor.json`` lies beside the file, its
    sha256 must match the weights (a swapped or truncated file is refused).
    """
    weights = _weights_path(path)
    digest = sha256_file(weights)
    sidecar = weights.parent / CARD_FILE
    if sidecar.is_file():
        card_on_disk = read_json(sidecar, expect_format=EXTRACTOR_FORMAT)
        expected = card_on_disk.get("weights", {}).get("sha256")
        if expected is not None and expected != digest:
            raise ArtifactError(f"{weights} has sha256 {digest[:12]}..., but {sidecar} expects {expected[:12]}...; "
                                "the weights were replaced or truncated - retrain with `tdqrt extractor`")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file ({exc}); retrain it with "
                            "`tdqrt extractor`") from exc
    if METADATA_KEY not in meta:
        raise ArtifactError(f"{weights} is a safetensors file but not a tdqrt extractor (no {METADATA_KEY!r} "
                            "metadata); pass the output of `tdqrt extractor`")
    try:
        card = json.loads(meta[METADATA_KEY])
        if card.get("format") != EXTRACTOR_FORMAT or card.get("version") != EXTRACTOR_VERSION:
            raise ArtifactError(f"{weights}: extractor format {card.get('format')!r} v{card.get('version')} is not "
                                f"{EXTRACTOR_FORMAT!r} v{EXTRACTOR_VERSION}; retrain it with this tdqrt")
        arch = {k: v for k, v in card["arch"].items() if k != "kind"}
        model = ExtractorCNN(CNNSpec(**arch))
        model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{weights} does not hold a consistent tdqrt extractor ({exc}); retrain it") from exc
    model.requires_grad_(False)
    model.eval()
    return Extractor(model=model, card=card, weights=weights, sha256=digest)


# ------------------------------------------------------------------------------------ torch-fidelity plug-in

class TdqrtCNNFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around ``ExtractorCNN``; registered as ``tdqrt-<dataset>-cnn``.

    Features: ``pool``, ``embedding`` (FID/KID/PRC default) and ``logits`` (IS default). Requires
    ``feature_extractor_weights_path`` (folder or ``extractor.safetensors``) whose card names the same
    extractor; it never downloads anything.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None,
                 feature_extractor_internal_dtype=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ConfigError(f"feature extractor {name!r} is trained by tdqrt, not downloaded: pass "
                              "feature_extractor_weights_path=<folder of `tdqrt extractor`> (make one with "
                              "`tdqrt extractor --data digits --out DIR`)")
        if feature_extractor_internal_dtype not in (None, "float32", "float64"):
            raise ConfigError(f"feature_extractor_internal_dtype must be float32 or float64, got "
                              f"{feature_extractor_internal_dtype!r}")
        loaded = load_extractor(feature_extractor_weights_path)
        if loaded.name != name:
            raise ConfigError(f"{loaded.weights} holds the extractor {loaded.name!r} (trained on "
                              f"{loaded.card.get('dataset')!r}), not {name!r}; pass the matching weights or name")
        self.net = loaded.model
        self.spec = loaded.model.spec
        self.sha256 = loaded.sha256
        self.dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        self.net.to(self.dtype)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = to_network_input(x, self.spec).to(self.dtype)
        feats = self.net(x)
        return tuple(feats[k].to(torch.float32) for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return FEATURE_LAYERS

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return DEFAULT_LAYERS[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 16, 16]) * 255).to(torch.uint8)


def register_extractor_name(name: str) -> str:
    """Register ``name`` (``tdqrt-<slug>-cnn``) with torch-fidelity; repeated calls are no-ops."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"extractor name {name!r} must look like 'tdqrt-<dataset>-cnn'")
    current = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if current is None:
        register_feature_extractor(name, TdqrtCNNFeatureExtractor)
    elif current is not TdqrtCNNFeatureExtractor:
        raise ConfigError(f"torch-fidelity already has a different feature extractor named {name!r}")
    return name


for _dataset in BUILTIN_DATASETS:
    register_extractor_name(extractor_name(_dataset))
