"""Sample a checkpoint to files: ``samples.npz`` (uint8 NHWC ``arr_0`` + ``labels``, the layout of the
guided-diffusion evaluator), ``grid.png`` and ``sample.json`` (the settings and the model they came from).

Every sample has a global index; its noise comes from (seed, index) alone, so the same index gives the same
image whatever the batch size, the rank that draws it or the number of ranks. Class-conditional models get label
``index % num_classes``. A latent model's samples are decoded to images (:func:`latent_decoder`) before they are
stored. Finished batches are saved as shards (:mod:`tdqrt.tools.shards`) as they complete, so a
killed run resumes, and several ranks (``torchrun ... --distributed``) draw one job together.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tdqrt.calibration.data.images import to_uint8_nhwc
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.artifacts import write_bytes_atomic, write_json_atomic
from tdqrt.engines.config import check_bool, check_choice, check_int
from tdqrt.engines.errors import ConfigError
from tdqrt.engines.progress import note, progress_bar, saved_progress
from tdqrt.runtime.corrections import CORRECTION_KINDS, GRANULARITIES, make_correction
from tdqrt.runtime.d2 import D2Table
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


def bundle_d2_stats(path: str | Path) -> str:
    """The D² statistics the bundle at ``path`` ships: what ``--d2`` uses without ``--d2-stats``."""
    from tdqrt.engines.bundle import is_bundle_dir, open_bundle

    if not is_bundle_dir(path) or open_bundle(path).d2_dir is None:
        raise ConfigError(f"--d2 needs --d2-stats DIR (written by `tdqrt d2-stats` for this model): {path} is not a "
                          "bundle that ships D² statistics; or pass --d2 off")
    return str(open_bundle(path).d2_dir)


def load_model_or_bundle(path: str | Path, *, device: str = "cpu", threads: Optional[int] = None,
                         engine: Optional[str | Path] = None):
    """An FP/quantized checkpoint directory (torch model), or an exported bundle (``tdqrt export``): its INT8
    ``unet.onnx`` run by ONNX Runtime (``threads`` intra-op threads; None: ONNX Runtime's default), with the
    bundle's schedule. A TensorRT plan (``engine``, or ``path`` itself ending in .plan/.engine) runs in TensorRT
    instead, ``path`` then naming its bundle (default: the one its engine.json records). For a bundle, ``sha256``
    is the quantized model's (what D² statistics record), and ``--d2-stats`` may point at the bundle itself when
    it ships them."""
    from tdqrt.calibration.checkpoint import FPCheckpoint
    from tdqrt.engines.bundle import is_bundle_dir, open_bundle
    from tdqrt.engines.engine_card import is_engine_file
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.engines.trt import TrtDenoiser
    from tdqrt.runtime.schedules import ScheduleConfig

    if engine is None and is_engine_file(path):
        engine = path
    if engine is not None:
        denoiser = TrtDenoiser(engine, bundle=None if Path(path) == Path(engine) else path)
        bundle = denoiser.bundle
    elif not is_bundle_dir(path):
        return load_model_dir(path, device=device)
    else:
        bundle = open_bundle(path)
        denoiser = OrtDenoiser(bundle, threads=threads)
    sha = bundle.manifest.get("sources", {}).get("quant_model", {}).get("sha256", bundle.sha256)
    return FPCheckpoint(denoiser, ScheduleConfig.from_dict(bundle.schedule), bundle.manifest, bundle.path, sha)


# Latents decoded per call: a VQModel's nearest-codebook search holds a [latent pixels x codebook entries] distance
# matrix per image (LDM-CelebA-HQ: 64x64 latents x 8192 entries, ~0.2 GB per image in ONNX Runtime), so a sampling
# batch of 64 would need ~14 GB at once.
DECODE_BATCH = 8


def latent_decoder(ckpt, device: str = "cpu") -> tuple[Optional[Callable], Optional[dict], tuple[int, int, int]]:
    """``(decode, info, (H, W, C))`` for the model ``ckpt`` (from :func:`load_model_or_bundle`): ``decode`` turns
    its samples into images in [-1, 1] — a latent bundle's ``decoder.onnx`` (ONNX Runtime), or for an FP /
    quantized checkpoint of a latent model the torch decoder of the autoencoder its card records —, ``info`` the
    decoder's path and sha256 (for sample.json), ``(H, W, C)`` the shape of the stored images. Pixel models:
    ``(None, None, the UNet's sample shape)``."""
    from tdqrt.calibration.models.autoencoder import LatentDecoder
    from tdqrt.engines.decoder import OrtDecoder

    model = ckpt.model
    bundle = getattr(model, "bundle", None)  # ORT / TensorRT denoisers of a bundle
    if bundle is not None and bundle.decoder is not None:
        ort_decoder = OrtDecoder(bundle)
        info = {"kind": "onnx", "path": str(ort_decoder.path), "sha256": ort_decoder.sha256}
        return ort_decoder, info, (bundle.output_image_size, bundle.output_image_size, bundle.output_channels)
    record = None if bundle is not None else ckpt.card.get("autoencoder")
    if record is None:
        return None, None, (model.image_size, model.image_size, model.in_channels)
    torch_decoder = LatentDecoder.from_record(record, device)
    info = {"kind": record["class"], "path": str(Path(record["path"]) / record["weights"]), "sha256": record["sha256"]}
    return torch_decoder, info, (int(record["image_size"]), int(record["image_size"]), int(record["out_channels"]))


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
        ckpt = load_model_or_bundle(model_dir, device=job.device, engine=job.engine)
        resolved = job if job.d2 == "off" or job.d2_stats is not None else \
            dataclasses.replace(job, d2_stats=bundle_d2_stats(ckpt.path))
        return ckpt, resolved, correction_hook(resolved, NoiseSchedule(ckpt.schedule), ckpt.sha256), \
            latent_decoder(ckpt, job.device)

    ckpt, job, hook, (decode, decoder_info, image_shape) = ranks.collective(load)
    t0 = time.perf_counter()
    model = ckpt.model
    schedule = NoiseSchedule(ckpt.schedule)
    shape = (model.in_channels, model.image_size, model.image_size)
    store = ShardStore(out_dir / "shards", job.num, job.batch, image_shape)
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
        y = (idx % model.num_classes).to(job.device) if model.num_classes else None
        x = sample(model, schedule, job.sampler, sample_indices=idx, seed=job.seed, shape=shape, y=y,
                   null_label=model.null_label, hook=hook, device=job.device, progress=progress and ranks.rank == 0)
        if decode is not None:
            with torch.no_grad():
                x = torch.cat([decode(part) for part in x.split(DECODE_BATCH)])
        labels = y.cpu().numpy() if y is not None else np.full(len(idx), -1, np.int64)
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
