"""Sample a checkpoint to files: ``samples.npz`` (uint8 NHWC ``arr_0`` + ``labels``, the layout of the
guided-diffusion evaluator), ``grid.png`` and ``sample.json`` (the settings and the model they came from).

Every sample has a global index; its noise comes from (seed, index) alone, so the same index gives the same
image whatever the batch size. Class-conditional models get label ``index % num_classes``.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from tdqrt.calibration.data.images import to_uint8_nhwc
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.artifacts import atomic_path, write_json_atomic
from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.corrections import CORRECTION_KINDS, GRANULARITIES, make_correction
from tdqrt.runtime.d2 import D2Table
from tdqrt.runtime.sampling import Sampler, SamplerConfig, StepHook, sample
from tdqrt.runtime.schedules import NoiseSchedule
from tdqrt.tools.plots import save_grid


@dataclass(frozen=True)
class SampleJob:
    """How many images to draw and how; ``sampler`` holds the sampler kind, steps, eta, spacing, guidance."""

    num: int = 64
    batch: int = 64
    seed: int = 0
    device: str = "cpu"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    d2: str = "off"
    d2_granularity: str = "channel"
    d2_stats: Optional[str] = None
    d2_force: bool = False

    def __post_init__(self) -> None:
        if self.num < 1 or self.batch < 1:
            raise ConfigError(f"num and batch must be >= 1, got num={self.num} batch={self.batch}")
        if self.d2 not in CORRECTION_KINDS or self.d2_granularity not in GRANULARITIES:
            raise ConfigError(f"d2={self.d2!r} / d2_granularity={self.d2_granularity!r}: use one of "
                              f"{CORRECTION_KINDS} / {GRANULARITIES}")
        if self.d2 != "off" and self.d2_stats is None:
            raise ConfigError(f"--d2 {self.d2} needs --d2-stats DIR (written by `tdqrt d2-stats`)")
        if isinstance(self.sampler, dict):
            object.__setattr__(self, "sampler", SamplerConfig.from_dict(self.sampler))

    def to_dict(self) -> dict:
        return asdict(self) | {"sampler": self.sampler.to_dict()}


@dataclass
class SampleResult:
    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray  # int64 [N], -1 for unconditional models
    seconds: float
    out_dir: Path


def write_samples(out_dir: Path, images: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Write ``samples.npz``, ``grid.png`` (at most 100 images) and ``sample.json`` atomically."""
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, labels=labels)
    with atomic_path(out_dir / "samples.npz") as tmp:
        tmp.write_bytes(buf.getvalue())
    shown = images[:100]
    save_grid(shown, out_dir / "grid.png", nrow=min(10, len(shown)), scale=max(1, 64 // images.shape[1]))
    write_json_atomic(out_dir / "sample.json", meta)


def correction_hook(job: SampleJob, schedule: NoiseSchedule, model_sha256: str) -> Optional[StepHook]:
    """The D²/PTQD correction the job asks for, checked against the model and sampler the table was made for."""
    if job.d2 == "off":
        return None
    table = D2Table.load(job.d2_stats)
    recorded = table.settings.quant_model_sha256
    if recorded and recorded != model_sha256 and not job.d2_force:
        raise ConfigError(f"{job.d2_stats} was collected for another quantized model (sha256 {recorded[:12]}…, this "
                          f"one {model_sha256[:12]}…); run `tdqrt d2-stats` for it, or pass --d2-force")
    return make_correction(job.d2, job.d2_granularity, table, Sampler(schedule, job.sampler), force=job.d2_force)


def load_model_or_bundle(path: str | Path, *, device: str = "cpu"):
    """An FP/quantized checkpoint directory (torch model), or an exported bundle (``tdqrt export``): its INT8
    ``unet.onnx`` run by ONNX Runtime, with the bundle's schedule. For a bundle, ``sha256`` is the quantized
    model's (what D² statistics record), and ``--d2-stats`` may point at the bundle itself when it ships them."""
    from tdqrt.calibration.checkpoint import FPCheckpoint
    from tdqrt.engines.bundle import is_bundle_dir, open_bundle
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.runtime.schedules import ScheduleConfig

    if not is_bundle_dir(path):
        return load_model_dir(path, device=device)
    bundle = open_bundle(path)
    sha = bundle.manifest.get("sources", {}).get("quant_model", {}).get("sha256", bundle.sha256)
    return FPCheckpoint(OrtDenoiser(bundle), ScheduleConfig.from_dict(bundle.schedule), bundle.manifest,
                        bundle.path, sha)


def sample_model(model_dir: str | Path, out_dir: str | Path, job: SampleJob, *, progress: bool = True) -> SampleResult:
    """Draw ``job.num`` images from the FP or quantized (fake-quant) checkpoint in ``model_dir`` into ``out_dir``."""
    out_dir = Path(out_dir)
    ckpt = load_model_or_bundle(model_dir, device=job.device)
    model = ckpt.model
    schedule = NoiseSchedule(ckpt.schedule)
    shape = (model.in_channels, model.image_size, model.image_size)
    hook = correction_hook(job, schedule, ckpt.sha256)
    images, labels = [], []
    t0 = time.perf_counter()
    batches = range(math.ceil(job.num / job.batch))
    for b in tqdm(batches, disable=not progress or len(batches) == 1, desc="batches"):
        idx = torch.arange(b * job.batch, min(job.num, (b + 1) * job.batch))
        y = (idx % model.num_classes).to(job.device) if model.num_classes else None
        x = sample(model, schedule, job.sampler, sample_indices=idx, seed=job.seed, shape=shape, y=y,
                   null_label=model.null_label, hook=hook, device=job.device, progress=progress)
        images.append(to_uint8_nhwc(x.cpu()))
        labels.append(y.cpu().numpy() if y is not None else np.full(len(idx), -1, np.int64))
    seconds = time.perf_counter() - t0
    images_np, labels_np = np.concatenate(images), np.concatenate(labels)
    meta = {"format": "tdqrt-samples", "version": 1, "job": job.to_dict(), "model": str(Path(model_dir)),
            "model_sha256": ckpt.sha256, "seconds": round(seconds, 3)}
    write_samples(out_dir, images_np, labels_np, meta)
    return SampleResult(images_np, labels_np, seconds, out_dir)
