"""Time-stamped calibration data: ``(x_t, t, y)`` from the FP sampler at evenly spaced steps.

Q-Diffusion's recipe (Li et al. 2023, arXiv 2302.04304): run the FP sampler, keep the inputs of ``keep_steps`` evenly
spaced steps for ``num`` samples (default 20 × 256 = 5120 pairs). Batches are written straight into
memory-mapped ``.npy`` files as they are produced (never collected in one list in memory) and renamed into place
when complete, so a killed run leaves nothing that looks finished.

Class-conditional models: a fraction ``null_fraction`` of the stored pairs carries the null label, so the
quantizers also see the unconditional branch that classifier-free guidance evaluates.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections import OrderedDict
from typing import Any, Iterator, Optional

import numpy as np
import torch

from tdqrt.engines.artifacts import read_json, write_json_atomic
from tdqrt.engines.config import check_int, check_real
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.engines.progress import progress_bar
from tdqrt.runtime.sampling import Sampler, SamplerConfig, sample
from tdqrt.runtime.schedules import NoiseSchedule

CALIB_FORMAT = "tdqrt-calibration-set"
FILES = ("calib_x.npy", "calib_t.npy", "calib_y.npy")


@dataclass(frozen=True)
class CalibSetConfig:
    """``num`` trajectories of ``sampler``; the inputs of ``keep_steps`` evenly spaced steps are kept."""

    num: int = 256
    keep_steps: int = 20
    batch: int = 64
    seed: int = 1234
    null_fraction: float = 0.2
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="ddim", steps=50))

    def __post_init__(self) -> None:
        if isinstance(self.sampler, dict):
            object.__setattr__(self, "sampler", SamplerConfig.from_dict(self.sampler))
        check_int("CalibSetConfig.num", self.num, 1, flag="--calib-num")
        check_int("CalibSetConfig.batch", self.batch, 1)
        check_int("CalibSetConfig.keep_steps", self.keep_steps, 1, self.sampler.steps, flag="--calib-keep",
                  fix=f"keep at most the sampler's {self.sampler.steps} steps (--calib-steps)")
        check_real("CalibSetConfig.null_fraction", self.null_fraction, 0.0, below=1.0)

    def kept_indices(self) -> list[int]:
        return sorted({int(round(v)) for v in np.linspace(0, self.sampler.steps - 1, self.keep_steps)})

    def to_dict(self) -> dict:
        return asdict(self) | {"sampler": self.sampler.to_dict()}


class CalibrationSet:
    """A calibration set on disk: ``x`` ``[M, C, H, W]`` float32 (memory-mapped), ``t`` ``[M]``, ``y`` ``[M]``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_json(self.path / "calib.json", expect_format=CALIB_FORMAT)
        try:
            self.x = np.load(self.path / FILES[0], mmap_mode="r")
            self.t = np.load(self.path / FILES[1])
            self.y = np.load(self.path / FILES[2])
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"calibration set {self.path} is incomplete or corrupt ({exc}); collect it again") from exc
        if not (len(self.x) == len(self.t) == len(self.y) == self.meta["count"]):
            raise ArtifactError(f"calibration set {self.path}: array lengths disagree with calib.json; collect it again")

    def __len__(self) -> int:
        return len(self.t)

    @property
    def timesteps(self) -> list[int]:
        return sorted(set(self.t.tolist()))

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        idx = np.sort(np.asarray(idx))
        x = torch.from_numpy(np.ascontiguousarray(self.x[idx]))
        y = torch.from_numpy(self.y[idx]) if self.meta["conditional"] else None
        return x, torch.from_numpy(self.t[idx]), y

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[tuple]:
        """One pass over the set in batches of ``(x, t, y)``."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.get(order[i: i + batch_size])

    def random_batch(self, batch_size: int, gen: np.random.Generator) -> tuple:
        return self.get(gen.choice(len(self), size=min(batch_size, len(self)), replace=False))


def collect_calibration_set(model: torch.nn.Module, schedule: NoiseSchedule, cfg: CalibSetConfig,
                            out_dir: str | Path, *, device: str = "cpu", progress: bool = True) -> CalibrationSet:
    """Sample ``cfg.num`` FP trajectories and stream the kept ``(x_t, t, y)`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = cfg.kept_indices()
    steps = Sampler(schedule, cfg.sampler).timesteps
    shape = (model.in_channels, model.image_size, model.image_size)
    total = cfg.num * len(kept)
    tmp = [out_dir / f".partial-{name}" for name in FILES]
    xs = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=np.float32, shape=(total, *shape))
    ts = np.empty(total, np.int64)
    ys = np.full(total, -1, np.int64)
    rng = np.random.default_rng(cfg.seed)
    null_mask = rng.random(cfg.num) < cfg.null_fraction if model.num_classes else np.zeros(cfg.num, bool)
    try:
        for b in progress_bar(range(math.ceil(cfg.num / cfg.batch)), desc="calibration set", disable=not progress):
            idx = torch.arange(b * cfg.batch, min(cfg.num, (b + 1) * cfg.batch))
            y = (idx % model.num_classes).to(device) if model.num_classes else None
            rows = []

            def record(info, x, eps, noise):
                if info.index in kept:
                    rows.append((info.index, x.detach().cpu().numpy()))
                return eps, info.sigma

            sample(model, schedule, cfg.sampler, sample_indices=idx, seed=cfg.seed, shape=shape, y=y,
                   null_label=model.null_label, hook=record, device=device)
            for k, (step_index, x) in enumerate(rows):
                # layout: sample-major within a batch, so row = (sample, kept step)
                for j, n in enumerate(idx.tolist()):
                    r = n * len(kept) + k
                    xs[r] = x[j]
                    ts[r] = int(steps[step_index])
                    if y is not None:
                        ys[r] = model.null_label if null_mask[n] else int(y[j])
        xs.flush()
        del xs
        np.save(tmp[1], ts)
        np.save(tmp[2], ys)
        for src, name in zip(tmp, FILES):
            os.replace(src, out_dir / name)
    finally:
        for p in tmp:
            p.unlink(missing_ok=True)
    write_json_atomic(out_dir / "calib.json", {
        "format": CALIB_FORMAT, "version": 1, "config": cfg.to_dict(), "count": total,
        "timesteps": sorted(set(ts.tolist())), "conditional": bool(model.num_classes), "shape": list(shape)})
    return CalibrationSet(out_dir)


def pick_timesteps(available: list[int], n: int) -> list[int]:
    """``n`` timesteps spread evenly over ``available`` (all of them when there are fewer)."""
    available = sorted(available)
    if n >= len(available):
        return available
    idx = np.unique(np.round(np.linspace(0, len(available) - 1, n)).astype(int))
    return [available[i] for i in idx]


def calibration_feeds(calib: CalibrationSet, inputs: dict[str, tuple[Any, tuple]], *, timesteps: int,
                      per_timestep: int, seed: int = 0, null_label: Optional[int] = None
                      ) -> list[tuple[int, "OrderedDict[str, np.ndarray]"]]:
    """One feed dict per timestep (``timesteps`` of them spread over the set's, ``per_timestep`` samples each, picked
    with ``seed``): ``sample`` [B,C,H,W], ``timestep`` [B], ``class_labels`` [B] (only when ``inputs`` — name ->
    (numpy dtype, shape with None for dynamic dims) — has that input), in those dtypes. What ``tdqrt validate``
    compares on, and what a bundle's Polygraphy data-loader script replays."""
    if len(calib) == 0:
        raise DataError(f"calibration set {calib.path} is empty")
    rng = np.random.default_rng(seed)
    feeds = []
    for ts in pick_timesteps(calib.timesteps, timesteps):
        rows = np.flatnonzero(calib.t == ts)
        rows = np.sort(rng.choice(rows, size=min(per_timestep, len(rows)), replace=False))
        x = np.ascontiguousarray(calib.x[rows])
        shape = inputs["sample"][1]
        if len(shape) != x.ndim or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:])):
            raise DataError(f"calibration set {calib.path} holds samples of shape {list(x.shape[1:])}, the model "
                            f"takes {list(shape)}; pass the calibration set of this model with --calib")
        feed = OrderedDict(sample=x.astype(inputs["sample"][0]),
                           timestep=np.asarray(calib.t[rows]).astype(inputs["timestep"][0]))
        if "class_labels" in inputs:
            if calib.meta.get("conditional"):
                y = np.asarray(calib.y[rows])
            elif null_label is not None:
                y = np.full(len(rows), null_label)
            else:
                raise ConfigError("the model is class-conditional but the calibration set has no labels and the "
                                  "model records no null label")
            feed["class_labels"] = y.astype(inputs["class_labels"][0])
        feeds.append((int(ts), feed))
    return feeds
