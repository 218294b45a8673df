"""Time-stamped calibration data: ``(x_t, t, y)`` from the FP sampler at evenly spaced steps.

Q-Diffusion's recipe (Li et al. 2023, arXiv 2302.04304): run the FP sampler, keep the inputs of ``keep_steps`` evenly
spaced steps for ``num`` samples (default 20 × 256 = 5120 pairs). Batches are written straight into
memory-mapped ``.npy`` files as they are produced (never collected in one list in memory) and renamed into place
when complete, so a killed run leaves nothing that looks finished.

Class-conditional models: a fraction ``null_fraction`` of the stored pairs carries the null label, so the
quantizers also see the unconditional branch that classifier-free guidance evaluates.

Text-conditioned models (``cond_shape`` ``(L, D)``): the caller passes the prompts' embeddings ``[P, L, D]`` and the
unconditional (empty / negative prompt) embedding ``[L, D]``; they are stored once as a table ``[P + 1, L, D]``
(:data:`COND_FILE`, memory-mapped on read, the unconditional embedding its last row) and every stored sample keeps
only its row index in ``calib_y.npy``, so memory does not grow with the prompt count. Trajectory ``n`` follows
prompt ``n mod P``. With guidance (``sampler.guidance_scale != 1``) the UNet sees both halves of every step, so
each kept step stores two samples: ``(x_t, t, prompt row)`` and ``(x_t, t, uncond row)``; without guidance a
fraction ``null_fraction`` of the trajectories' samples gets the unconditional row, as for labels.
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

from tdqrt.engines.artifacts import read_json, sha256_file, write_json_atomic
from tdqrt.engines.config import check_int, check_real
from tdqrt.engines.denoiser import EMBEDDINGS_INPUT, LABELS_INPUT
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.engines.progress import progress_bar
from tdqrt.runtime.sampling import Sampler, SamplerConfig, sample
from tdqrt.runtime.schedules import NoiseSchedule

CALIB_FORMAT = "tdqrt-calibration-set"
FILES = ("calib_x.npy", "calib_t.npy", "calib_y.npy")
COND_FILE = "calib_cond.npy"  # the embeddings table of a text-conditioned model's set


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
    """A calibration set on disk: ``x`` ``[M, C, H, W]`` float32 (memory-mapped), ``t`` ``[M]``, ``y`` ``[M]``.

    For a text-conditioned model ``y`` holds row indices into ``cond`` ``[P + 1, L, D]`` float32 (memory-mapped;
    ``None`` otherwise) and :meth:`get` returns the gathered embeddings ``[B, L, D]`` as the conditioning.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_json(self.path / "calib.json", expect_format=CALIB_FORMAT)
        try:
            self.x = np.load(self.path / FILES[0], mmap_mode="r")
            self.t = np.load(self.path / FILES[1])
            self.y = np.load(self.path / FILES[2])
            self.cond = np.load(self.path / COND_FILE, mmap_mode="r") if self.meta.get("embeddings") else None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"calibration set {self.path} is incomplete or corrupt ({exc}); collect it again") from exc
        if not (len(self.x) == len(self.t) == len(self.y) == self.meta["count"]):
            raise ArtifactError(f"calibration set {self.path}: array lengths disagree with calib.json; collect it again")

    def __len__(self) -> int:
        return len(self.t)

    @property
    def timesteps(self) -> list[int]:
        return sorted(set(self.t.tolist()))

    def conditioning(self, idx: np.ndarray) -> Optional[np.ndarray]:
        """The model's conditioning of rows ``idx``: labels ``[B]`` int64, embeddings ``[B, L, D]`` float32 (gathered
        from the table), or None for an unconditional set."""
        if self.cond is not None:
            return np.ascontiguousarray(self.cond[self.y[idx]])
        return np.asarray(self.y[idx]) if self.meta["conditional"] else None

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        idx = np.sort(np.asarray(idx))
        x = torch.from_numpy(np.ascontiguousarray(self.x[idx]))
        y = self.conditioning(idx)
        return x, torch.from_numpy(self.t[idx]), None if y is None else torch.from_numpy(y)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[tuple]:
        """One pass over the set in batches of ``(x, t, y)``."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.get(order[i: i + batch_size])

    def random_batch(self, batch_size: int, gen: np.random.Generator) -> tuple:
        return self.get(gen.choice(len(self), size=min(batch_size, len(self)), replace=False))


def check_embeddings(model: torch.nn.Module, embeddings: Any, uncond: Any) -> bool:
    """Whether ``model`` is text-conditioned, after checking that it gets ``embeddings`` ``[P, L, D]`` and
    ``uncond`` ``[L, D]`` of its ``cond_shape`` then, and neither otherwise (one ConfigError / DataError line)."""
    cond_shape = getattr(model, "cond_shape", None)
    if cond_shape is None:
        if embeddings is not None or uncond is not None:
            raise ConfigError("prompt embeddings were given for a model that is not text-conditioned; pass none")
        return False
    if embeddings is None or uncond is None:
        raise ConfigError("this UNet is conditioned on text embeddings: the calibration set needs the prompts' "
                          "embeddings [P, L, D] and the unconditional (empty prompt) embedding [L, D]")
    shape, unc = tuple(np.shape(embeddings)), tuple(np.shape(uncond))
    if len(shape) != 3 or shape[0] == 0 or shape[1:] != tuple(cond_shape) or unc != tuple(cond_shape):
        raise DataError(f"prompt embeddings {list(shape)} and unconditional embedding {list(unc)} do not fit this "
                        f"UNet: it takes [P, {cond_shape[0]}, {cond_shape[1]}] and [{cond_shape[0]}, {cond_shape[1]}]")
    return True


def write_embeddings_table(path: Path, embeddings: Any, uncond: Any, chunk: int = 64) -> np.ndarray:
    """Write the table ``[P + 1, L, D]`` float32 to ``path`` (an ``.npy``) and return it memory-mapped:
    ``embeddings`` ``[P, L, D]`` (a tensor or an array, e.g. a memory-mapped ``.npy``, copied ``chunk`` prompts at
    a time, so memory does not grow with P) and ``uncond`` ``[L, D]`` as the last row."""
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                      shape=(len(embeddings) + 1, *tuple(np.shape(embeddings))[1:]))
    for i in range(0, len(embeddings), chunk):
        block = _float32(embeddings[i: i + chunk])
        table[i: i + len(block)] = block
    table[-1] = _float32(uncond)
    table.flush()
    del table
    return np.load(path, mmap_mode="r")


def _float32(a: Any) -> np.ndarray:
    return a.detach().cpu().float().numpy() if torch.is_tensor(a) else np.asarray(a, np.float32)


def collect_calibration_set(model: torch.nn.Module, schedule: NoiseSchedule, cfg: CalibSetConfig,
                            out_dir: str | Path, *, embeddings: Any = None, uncond: Any = None, device: str = "cpu",
                            progress: bool = True) -> CalibrationSet:
    """Sample ``cfg.num`` FP trajectories and stream the kept ``(x_t, t, y)`` to ``out_dir``.

    A text-conditioned model needs ``embeddings`` ``[P, L, D]`` (one per prompt; a tensor or an array, which may be
    memory-mapped: it is read a chunk of prompts at a time) and ``uncond`` ``[L, D]`` (see the module docstring);
    trajectory ``n`` follows prompt ``n mod P``."""
    out_dir = Path(out_dir)
    text = check_embeddings(model, embeddings, uncond)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = cfg.kept_indices()
    steps = Sampler(schedule, cfg.sampler).timesteps
    shape = (model.in_channels, model.image_size, model.image_size)
    halves = 2 if text and cfg.sampler.guidance_scale != 1.0 else 1  # CFG: both halves are inputs
    total = cfg.num * len(kept) * halves
    tmp = [out_dir / f".partial-{name}" for name in (*FILES, COND_FILE)]
    ts = np.empty(total, np.int64)
    ys = np.full(total, -1, np.int64)
    rng = np.random.default_rng(cfg.seed)
    conditional = bool(model.num_classes) or text
    null_mask = rng.random(cfg.num) < cfg.null_fraction if conditional and halves == 1 else np.zeros(cfg.num, bool)
    null_row = len(embeddings) if text else model.null_label
    try:
        table = write_embeddings_table(tmp[3], embeddings, uncond) if text else None
        xs = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=np.float32, shape=(total, *shape))
        for b in progress_bar(range(math.ceil(cfg.num / cfg.batch)), desc="calibration set", disable=not progress):
            idx = torch.arange(b * cfg.batch, min(cfg.num, (b + 1) * cfg.batch))
            if table is not None:
                rows_of = (idx % (len(table) - 1)).numpy()
                y = torch.from_numpy(np.ascontiguousarray(table[rows_of])).to(device)
                null = torch.from_numpy(np.array(table[-1])).to(device)
            else:
                rows_of = (idx % model.num_classes).numpy() if model.num_classes else None
                y, null = (None if rows_of is None else torch.from_numpy(rows_of).to(device)), model.null_label
            rows = []

            def record(info, x, eps, noise):
                if info.index in kept:
                    rows.append((info.index, x.detach().cpu().numpy()))
                return eps, info.sigma

            sample(model, schedule, cfg.sampler, sample_indices=idx, seed=cfg.seed, shape=shape, y=y,
                   null_label=null, hook=record, device=device)
            for k, (step_index, x) in enumerate(rows):
                # layout: sample-major within a batch, so row = (sample, kept step[, CFG half])
                for j, n in enumerate(idx.tolist()):
                    for h in range(halves):
                        r = (n * len(kept) + k) * halves + h
                        xs[r] = x[j]
                        ts[r] = int(steps[step_index])
                        if rows_of is not None:
                            ys[r] = null_row if (h == 1 or null_mask[n]) else int(rows_of[j])
        xs.flush()
        del xs
        np.save(tmp[1], ts)
        np.save(tmp[2], ys)
        names = (*FILES, COND_FILE) if text else FILES
        del table  # the memory map of tmp[3], before it is renamed
        for src, name in zip(tmp, names):
            os.replace(src, out_dir / name)
    finally:
        for p in tmp:
            p.unlink(missing_ok=True)
    meta = {"format": CALIB_FORMAT, "version": 1, "config": cfg.to_dict(), "count": total,
            "timesteps": sorted(set(ts.tolist())), "conditional": conditional, "shape": list(shape)}
    if text:
        meta["embeddings"] = {"file": COND_FILE, "sha256": sha256_file(out_dir / COND_FILE), "prompts": null_row,
                              "cond_shape": list(model.cond_shape), "uncond_row": null_row,
                              "cfg_halves": halves}
    write_json_atomic(out_dir / "calib.json", meta)
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
    with ``seed``): ``sample`` [B,C,H,W], ``timestep`` [B], ``class_labels`` [B] or ``encoder_hidden_states``
    [B, L, D] (only when ``inputs`` — name ->
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
        if EMBEDDINGS_INPUT in inputs:
            if calib.cond is None:
                raise ConfigError(f"the model takes text embeddings but the calibration set {calib.path} holds none; "
                                  "pass the calibration set of this model with --calib")
            emb, want = calib.conditioning(rows), inputs[EMBEDDINGS_INPUT][1][1:]
            if tuple(emb.shape[1:]) != tuple(want):
                raise DataError(f"calibration set {calib.path} holds embeddings of shape {list(emb.shape[1:])}, the "
                                f"model takes {list(want)}; pass the calibration set of this model with --calib")
            feed[EMBEDDINGS_INPUT] = emb.astype(inputs[EMBEDDINGS_INPUT][0])
        if LABELS_INPUT in inputs:
            if calib.meta.get("conditional") and calib.cond is None:
                y = np.asarray(calib.y[rows])
            elif null_label is not None:
                y = np.full(len(rows), null_label)
            else:
                raise ConfigError("the model is class-conditional but the calibration set has no labels and the "
                                  "model records no null label")
            feed[LABELS_INPUT] = y.astype(inputs[LABELS_INPUT][0])
        feeds.append((int(ts), feed))
    return feeds
