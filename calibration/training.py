"""FP training of a diffusion UNet with the denoising loss (DDPM eq. 14) on the target the schedule's
``prediction_type`` names (ε, v or x0), EMA weights and resumable state.

Classifier-free guidance needs a model that also knows the unconditional case, so labels are replaced by the
null class with probability ``cond_drop_prob`` (Ho & Salimans 2022). The state needed to resume bit-exactly
(model, EMA, optimizer, step, RNG streams) is saved every ``checkpoint_every`` steps with ``torch.save`` and
read back with ``weights_only=True`` (no arbitrary unpickling).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tdqrt.calibration.checkpoint import save_fp_checkpoint
from tdqrt.calibration.data import ImageData, load_dataset
from tdqrt.calibration.models import PRESET_NAMES, count_parameters, model_from_preset
from tdqrt.engines.artifacts import atomic_path, read_json, write_json_atomic
from tdqrt.engines.config import check_choice, check_int, check_real, config_from_dict
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.progress import note, progress_bar, saved_progress
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

STATE_FILE = "train_state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.json"
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one FP training run; saved beside the checkpoint as ``train_config.json``.

    ``data`` is ``digits``, ``shapes`` or an image folder; ``model`` a preset name. ``lr_schedule`` decays the
    learning rate after ``warmup_steps`` of linear warm-up. ``cond_drop_prob`` is the label-dropout rate that
    teaches the null class for classifier-free guidance (ignored for unlabelled data).
    """

    data: str = "digits"
    model: str = "small"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    checkpoint_every: int = 500
    seed: int = 0
    image_size: int | None = None
    num_data: int | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        check_choice("TrainConfig.model", self.model, sorted(PRESET_NAMES), flag="--model", fix="pick a UNet preset")
        for name, flag in (("steps", "--steps"), ("batch_size", "--batch"), ("checkpoint_every", "--checkpoint-every")):
            check_int(f"TrainConfig.{name}", getattr(self, name), 1, flag=flag)
        check_real("TrainConfig.lr", self.lr, above=0.0, flag="--lr")
        check_choice("TrainConfig.lr_schedule", self.lr_schedule, LR_SCHEDULES, flag="--lr-schedule")
        check_int("TrainConfig.warmup_steps", self.warmup_steps, 0, flag="--warmup")
        check_real("TrainConfig.weight_decay", self.weight_decay, 0.0, finite=False)
        check_real("TrainConfig.grad_clip", self.grad_clip, above=0.0, finite=False)
        check_real("TrainConfig.ema_decay", self.ema_decay, 0.0, below=1.0, flag="--ema")
        check_real("TrainConfig.cond_drop_prob", self.cond_drop_prob, 0.0, below=1.0)
        if isinstance(self.schedule, dict):
            object.__setattr__(self, "schedule", ScheduleConfig.from_dict(self.schedule))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·model`` for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_warmup_decay(decay: float, step: int) -> float:
    """EMA decay at ``step`` (0-based): grows as (1+k)/(10+k) up to ``decay``, so early steps do not freeze the
    average at the initial weights."""
    return min(decay, (1 + step) / (10 + step))


def noisy_batch(data: ImageData, schedule: NoiseSchedule, batch_size: int, gen: torch.Generator, *,
                cond_drop_prob: float, null_label: int | None):
    """One batch of the denoising objective: ``(x_t, t, y, target)`` with images drawn with replacement, the
    target the schedule's ``prediction_type`` names (:meth:`~tdqrt.runtime.schedules.NoiseSchedule.training_target`),
    t ~ U{0..T−1} per sample, labels replaced by ``null_label`` with probability ``cond_drop_prob`` (CFG);
    ``y`` is None for unlabelled data. All randomness comes from ``gen``."""
    idx = torch.randint(0, len(data), (batch_size,), generator=gen)
    x0 = data.images[idx]
    y = None
    if data.num_classes:
        y = data.labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < cond_drop_prob] = null_label
    t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return schedule.add_noise(x0, noise, t), t, y, schedule.training_target(x0, noise, t)


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """Every setting except the total step count must equal the one the run was started with."""
    new = cfg.to_dict()
    diff = [k for k in new if k != "steps" and saved.get(k) != new[k]]
    if diff:
        raise ConfigError(
            f"cannot resume {path}: settings {diff} differ from the saved run "
            f"(saved {[saved.get(k) for k in diff]}, now {[new[k] for k in diff]}); use the same settings or a new --out"
        )


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a UNet preset on ``cfg.data`` and write the EMA weights as an FP checkpoint into ``out_dir``.

    ``resume`` continues from the last checkpoint in ``out_dir`` (every ``checkpoint_every`` steps), or starts at
    step 0 when the run there was stopped before its first checkpoint.
    """
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    if resume:
        if not (out_dir / CONFIG_FILE).is_file():
            raise ArtifactError(f"--resume given but {out_dir} holds no training run ({out_dir / CONFIG_FILE} does "
                                "not exist); start without --resume")
        _check_resumable(read_json(out_dir / CONFIG_FILE), cfg, out_dir)
        resume = state_path.is_file()
        if progress and not resume:
            note(f"resuming: no checkpoint was saved, starting at step 0 of {cfg.steps}")
    elif state_path.exists():
        raise ConfigError(f"{out_dir} already holds a training run; pass --resume to continue it or pick a new --out")

    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, image_size=cfg.image_size, num=cfg.num_data, seed=cfg.seed)
    num_classes = data.num_classes
    model = model_from_preset(
        cfg.model, image_size=data.images.shape[-1], in_channels=data.images.shape[1], num_classes=num_classes
    )
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = NoiseSchedule(cfg.schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    log: list[list[float]] = []
    start = 0
    if resume:
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if progress:
            note(f"resuming: from the checkpoint at step {start} of {cfg.steps}")
        log = read_json(out_dir / LOG_FILE).get("loss", [])[:start]
    else:
        write_json_atomic(out_dir / CONFIG_FILE, cfg.to_dict())

    def save_state(step: int) -> None:
        # the log first: a resume reads the log up to the state's step, so an interrupt between the two is harmless
        write_json_atomic(out_dir / LOG_FILE, {"loss": log})
        with atomic_path(state_path) as tmp:
            torch.save(
                {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step},
                tmp,
            )

    model.train()
    t0 = time.perf_counter()
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    step = start

    def where() -> str:  # read from disk: an interrupt can come between a checkpoint's write and anything after it
        if not state_path.is_file():
            return f"at step {step} of {cfg.steps}, before the first checkpoint (every {cfg.checkpoint_every} steps)"
        saved = torch.load(state_path, weights_only=True, mmap=True)["step"]
        return f"at step {step} of {cfg.steps} (last checkpoint: step {saved})"

    with saved_progress(where):
        for step in bar:
            x_t, t, y, target = noisy_batch(data, schedule, cfg.batch_size, gen, cond_drop_prob=cfg.cond_drop_prob,
                                            null_label=model.null_label)
            loss = F.mse_loss(model(x_t, t, y), target)
            if not torch.isfinite(loss):
                raise ArtifactError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema_update(ema, model, ema_warmup_decay(cfg.ema_decay, step))
            log.append([step, loss.item()])
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
    bar.close()
    save_state(cfg.steps)
    training = cfg.to_dict() | {
        "parameters": count_parameters(model),
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "final_loss": log[-1][1] if log else None,
    }
    return save_fp_checkpoint(out_dir, ema, cfg.schedule, data=data.info, training=training, ema=True)
