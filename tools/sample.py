"""Sample a checkpoint to files: ``samples.npz`` (uint8 NHWC ``arr_0`` + ``labels``, the layout of the
guided-diffusion evaluator), ``grid.png`` and ``sample.json`` (the settings and the model they came from).

Every sample has a global index; its noise comes from (seed, index) alone, so the same index gives the same
image whatever the batch size, the rank that draws it or the number of ranks. Class-conditional models get label
``index % num_classes``. A latent model's samples are decoded to images (the decoder the model resolver gives it,
:meth:`tdqrt.runtime.runnable.RunnableModel.decode`) before they are stored. Finished batches are saved as shards
(:mod:`tdqrt.tools.shards`) as they complete, so a killed run resumes, and several ranks (``torchrun ...
--distributed``) draw one job together.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tdqrt.calibration.data.images import to_uint8_nhwc
from tdqrt.calibration.models.text import PromptSet, prompt_embeddings
from tdqrt.calibration.resolve import open_model
from tdqrt.engines.artifacts import write_bytes_atomic, write_json_atomic
from tdqrt.engines.config import check_bool, check_choice, check_int
from tdqrt.engines.errors import ConfigError
from tdqrt.engines.progress import note, progress_bar, saved_progress
from tdqrt.runtime.corrections import CORRECTION_KINDS, GRANULARITIES, make_correction
from tdqrt.runtime.d2 import D2Table
from tdqrt.runtime.runnable import RunnableModel
from tdqrt.runtime.sampling import Sampler, SamplerConfig, StepHook, sample
from tdqrt.runtime.schedules import NoiseSchedule
from tdqrt.tools.distributed import Ranks
from tdqrt.tools.plots import save_grid
from tdqrt.tools.shards import ShardStore, npz_bytes, settings_diff


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
    d2_stats: Optional[str] = None  # default: the statistics the bundle ships (refused for other models)
    d2_force: bool = False
    engine: Optional[str] = None  # TensorRT plan from `tdqrt build`; the model path is then its bundle (or the plan)
    prompts: Optional[dict] = None  # a text-to-image model's PromptSet.to_dict(): sample n follows prompt n mod P

    def __post_init__(self) -> None:
        check_int("SampleJob.num", self.num, 1, flag="--num")
        check_int("SampleJob.batch", self.batch, 1, flag="--batch")
        check_int("SampleJob.seed", self.seed, 0, flag="--seed")
        check_choice("SampleJob.d2", self.d2, CORRECTION_KINDS, flag="--d2")
        check_choice("SampleJob.d2_granularity", self.d2_granularity, GRANULARITIES, flag="--d2-granularity")
        check_bool("SampleJob.d2_force", self.d2_force, flag="--d2-force")
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
    write_bytes_atomic(out_dir / "samples.npz", npz_bytes(arr_0=images, labels=labels))
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


def shipped_d2_stats(model: RunnableModel) -> str:
    """The D² statistics ``model`` ships (a bundle's): what ``--d2`` uses without ``--d2-stats``."""
    if model.d2_dir is None:
        raise ConfigError(f"--d2 needs --d2-stats DIR (written by `tdqrt d2-stats` for this model): {model.path} is "
                          "not a bundle that ships D² statistics; or pass --d2 off")
    return str(model.d2_dir)


def shard_settings(job: SampleJob, model_sha256: str) -> dict:
    """What fixes the samples' values, recorded in the shard manifest: the job (its device by type only, since
    cuda:0 and cuda:1 draw the same), the model and the torch version."""
    return job.to_dict() | {"device": torch.device(job.device).type, "model_sha256": model_sha256,
                            "torch": torch.__version__}


def sample_model(model_dir: str | Path, out_dir: str | Path, job: SampleJob, *,
                 progress: bool = True) -> Optional[SampleResult]:
    """Draw ``job.num`` images from the FP or quantized (fake-quant) checkpoint or the bundle in ``model_dir``.

    Runs over the current ``torch.distributed`` process group when there is one (:class:`Ranks`), else as its
    one process; either way every finished batch is written to ``out_dir/shards`` at once. The batches not yet
    on disk are dealt round-robin to the ranks, which draw them in lockstep rounds (a failing rank stops the
    others within one batch); each rank loads its own denoiser on ``job.device``. Rank 0 then merges the shards
    into ``samples.npz``, ``grid.png`` and ``sample.json``, removes them and returns the result; other ranks
    return None. A killed run restarted with the same settings draws only the missing batches, with any number
    of ranks; other settings are refused.
    """
    ranks = Ranks.current()
    out_dir = Path(out_dir)

    def load():
        ckpt = open_model(model_dir, device=job.device, engine=job.engine)
        resolved = job if job.d2 == "off" or job.d2_stats is not None else \
            dataclasses.replace(job, d2_stats=shipped_d2_stats(ckpt))
        prompts = None if job.prompts is None else PromptSet.from_dict(job.prompts)
        cond, uncond = prompt_embeddings(ckpt.model, ckpt.card, prompts, device=job.device)
        return ckpt, resolved, correction_hook(resolved, NoiseSchedule(ckpt.schedule), ckpt.sha256), cond, uncond

    ckpt, job, hook, cond, uncond = ranks.collective(load)
    t0 = time.perf_counter()
    model = ckpt.model
    schedule = NoiseSchedule(ckpt.schedule)
    decoder_info = ckpt.decoder_info
    store = ShardStore(out_dir / "shards", job.num, job.batch, ckpt.image_shape)
    every = ranks.gather(shard_settings(job, ckpt.sha256)
                         | ({"decoder_sha256": decoder_info["sha256"]} if decoder_info else {}))

    def plan() -> Optional[list[int]]:
        if ranks.rank != 0:
            return None
        for rank, settings in enumerate(every[1:], start=1):
            diffs = settings_diff(every[0], settings)
            if diffs:
                raise ConfigError(f"rank {rank} was started with other settings than rank 0 (rank 0 vs rank {rank}: "
                                  f"{'; '.join(diffs)}); start every rank with the same command")
        return store.open(every[0])

    pending = ranks.broadcast(ranks.collective(plan))
    total = len(store.ranges)
    if progress and ranks.rank == 0 and len(pending) < total:
        note(f"resuming: {total - len(pending)} of {total} batches already drawn")

    def draw(batch: Optional[int]) -> None:
        if batch is None:  # this rank has no batch left in this round
            return
        start, stop = store.ranges[batch]
        idx = torch.arange(start, stop)
        if cond is not None:  # text-to-image: prompt n mod P, guided against the negative prompt's embedding
            labels, y, null = idx % len(cond), cond[idx % len(cond)], uncond
        else:
            y = (idx % model.num_classes).to(job.device) if model.num_classes else None
            labels, null = (y.cpu() if y is not None else torch.full((len(idx),), -1)), model.null_label
        x = sample(model, schedule, job.sampler, sample_indices=idx, seed=job.seed, shape=ckpt.sample_shape, y=y,
                   null_label=null, hook=hook, device=job.device, progress=progress and ranks.rank == 0)
        x = ckpt.decode(x)
        labels = labels.numpy().astype(np.int64)
        store.write(batch, to_uint8_nhwc(x.cpu()), labels)

    def merge() -> Optional[SampleResult]:
        if ranks.rank != 0:
            return None
        images, labels = store.merge()
        seconds = time.perf_counter() - t0
        meta = {"format": "tdqrt-samples", "version": 1, "job": job.to_dict(), "model": str(Path(model_dir)),
                "model_sha256": ckpt.sha256, "seconds": round(seconds, 3), "world_size": ranks.world,
                "batches": {"total": len(store.ranges), "drawn": len(pending),
                            "resumed": len(store.ranges) - len(pending)}} \
            | ({"decoder": decoder_info} if decoder_info else {})
        write_samples(out_dir, images, labels, meta)
        store.remove()
        return SampleResult(images, labels, seconds, out_dir)

    mine = pending[ranks.rank::ranks.world]
    rounds = range(math.ceil(len(pending) / ranks.world))
    with saved_progress(lambda: f"after {store.count()} of {total} batches"):
        for r in progress_bar(rounds, disable=not progress or ranks.rank != 0 or len(rounds) <= 1, desc="batches"):
            ranks.collective(partial(draw, mine[r] if r < len(mine) else None))
        return ranks.collective(merge)
