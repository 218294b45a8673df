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

import numpy as np
import torch
from tqdm.auto import tqdm

from tdqrt.calibration.data.images import to_uint8_nhwc
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.artifacts import atomic_path, write_json_atomic
from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.sampling import SamplerConfig, sample
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

    def __post_init__(self) -> None:
        if self.num < 1 or self.batch < 1:
            raise ConfigError(f"num and batch must be >= 1, got num={self.num} batch={self.batch}")
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


def sample_model(model_dir: str | Path, out_dir: str | Path, job: SampleJob, *, progress: bool = True) -> SampleResult:
    """Draw ``job.num`` images from the FP or quantized (fake-quant) checkpoint in ``model_dir`` into ``out_dir``."""
    out_dir = Path(out_dir)
    ckpt = load_model_dir(model_dir, device=job.device)
    model = ckpt.model
    schedule = NoiseSchedule(ckpt.schedule)
    shape = (model.in_channels, model.image_size, model.image_size)
    images, labels = [], []
    t0 = time.perf_counter()
    batches = range(math.ceil(job.num / job.batch))
    for b in tqdm(batches, disable=not progress or len(batches) == 1, desc="batches"):
        idx = torch.arange(b * job.batch, min(job.num, (b + 1) * job.batch))
        y = (idx % model.num_classes).to(job.device) if model.num_classes else None
        x = sample(model, schedule, job.sampler, sample_indices=idx, seed=job.seed, shape=shape, y=y,
                   null_label=model.null_label, device=job.device, progress=progress)
        images.append(to_uint8_nhwc(x.cpu()))
        labels.append(y.cpu().numpy() if y is not None else np.full(len(idx), -1, np.int64))
    seconds = time.perf_counter() - t0
    images_np, labels_np = np.concatenate(images), np.concatenate(labels)
    meta = {"format": "tdqrt-samples", "version": 1, "job": job.to_dict(), "model": str(Path(model_dir)),
            "model_sha256": ckpt.sha256, "seconds": round(seconds, 3)}
    write_samples(out_dir, images_np, labels_np, meta)
    return SampleResult(images_np, labels_np, seconds, out_dir)
