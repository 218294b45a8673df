"""``tdq-qat``: TDQ inside quantization-aware training (So et al. 2023, arXiv 2306.02316).

Procedure (``calibrate_tdq_qat``):

1. Quantize the FP model; per-channel weight step sizes from ``init`` (abs-max or L_p search), made learnable
   (LSQ: :class:`WeightQuantizer` applies the LSQ gradient scale once ``scale`` requires grad).
2. Observe every quantized layer's input on the calibration set, **per timestep**.
3. ``act_scale="tdq"``: attach one generator ``s(t) = softplus(MLP(enc(t)))`` per activation quantizer and regress
   it onto the per-timestep scales (:func:`init_generators_from_observers`). ``act_scale="static"``: the LSQ
   baseline, one learnable scale per layer from the pooled statistics. Everything after this step is shared.
4. Train all UNet weights, the weight step sizes and the generators (or static scales) on batches drawn from
   :func:`training_batches` (below); every sample of a batch has its own timestep and so its own activation scale
   (``[B]``). AdamW with the original code's three groups: step sizes at lr/10 without weight decay, generator MLPs,
   other weights; linear warm-up, then a constant rate.

Objective. ``distill=True`` (default) minimises ``‖ε̂_q(x_t, t, c) − ε_FP(x_t, t, c)‖²`` against the frozen FP model
on the same input — **an addition**: the original code has no teacher. ``distill=False`` is the original's plain
denoising loss ``‖ε̂_q − ε‖²``, which needs the clean image behind ``x_t``.

Data (``options.data``). A data set name or image folder (the default for label and unconditional models: the one
the FP card records) — the original's real training images, noised at t ~ U{0..T−1}, labels dropped to the null
class with ``cond_drop_prob``. ``"calib"`` — the calibration set's own inputs ``(x_t, t, conditioning)``: the FP
sampler's trajectories at the timesteps the sampler visits, with the conditioning the UNet saw there (for a
text-conditioned UNet the prompt embeddings and, with guidance, the unconditional one). No clean image stands behind
these ``x_t``, so the only target is the FP teacher's output (``distill=True`` is required): data-free,
distillation-based QAT on the FP model's own trajectories, as EfficientDM does (He et al. 2023, arXiv 2310.03270;
it fine-tunes LoRA adapters, this method all weights). It is the default, and the only choice, for a
text-conditioned UNet, because tdqrt reads no image-caption pairs; any model may use it.

Paper / original-code recipe (for scale, not the CPU defaults here): AdamW, lr 2e-4 (CIFAR-10, batch 128) or 5e-5
(LSUN-Churches, batch 32), 5000 warm-up steps, up to 200k steps, EMA weights for sampling. The defaults below
(300 steps at batch 64, lr 2e-4) calibrate the ``small`` digits model in minutes on one CPU thread (wall times in
docs/results.md, "Calibration methods on the `small` digits model").

The method returns the trained (not frozen) model; ``calibrate()`` freezes it, which evaluates every generator at
every training timestep into the ``[T]`` table of each layer, and saves it.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tdqrt.calibration.data import ImageData, load_dataset
from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.calibration.quant.job import CalibrationJob
from tdqrt.calibration.quant.qmodel import QuantizedModel, quantize_model
from tdqrt.calibration.quant.static import init_act_scales, observe_activations
from tdqrt.calibration.quant.tdq import generator_config_of
from tdqrt.calibration.training import ema_update, ema_warmup_decay, noisy_batch
from tdqrt.engines.config import check_bool, check_choice, check_int, check_real, check_text
from tdqrt.engines.errors import ConfigError, DataError
from tdqrt.engines.progress import progress_bar
from tdqrt.runtime.schedules import NoiseSchedule

ACT_SCALES = ("tdq", "static")
INIT_METHODS = ("mse", "minmax")
LOG_FILE = "tdq_qat_log.json"
CALIB_DATA = "calib"  # options.data: train on the calibration set (module docstring)


@dataclass(frozen=True)
class TdqQatOptions:
    """Settings of ``tdq-qat``.

    * ``steps``, ``batch``: training iterations and batch size (CPU defaults; the paper trains up to 200k steps at
      batch 128/32).
    * ``lr``: base AdamW rate of the weights and the generators; step sizes use ``lr/10`` (paper: 2e-4 CIFAR,
      5e-5 Churches). ``warmup_steps``: linear warm-up, then constant (paper: 5000).
    * ``weight_decay``: for weights and generators (0.01 as in the original); step sizes get none.
    * ``grad_clip``: global gradient-norm clip (``None`` = off; the original does not clip).
    * ``distill``: loss against the frozen FP model (True, an addition) or against the training target (False: ε,
      v or x0, as the schedule's prediction type says).
    * ``data``: a training data set (name or image folder), or ``"calib"``: distil on the calibration set's own
      inputs ``(x_t, t, conditioning)``, drawn at random with ``seed`` (needs ``distill=True``: those inputs have no
      ground-truth target; module docstring). None = ``"calib"`` for a text-conditioned UNet (tdqrt reads no
      image-caption pairs, so it is the only choice there), otherwise the data set recorded in the FP card.
    * ``init``: per-timestep (TDQ) or pooled (static) activation-scale and per-channel weight-scale rule,
      ``"mse"`` (L_p clipping search, p = ``QuantConfig.lp_norm``) or ``"minmax"``.
    * ``act_scale``: ``"tdq"`` (generator s(t)) or ``"static"`` (LSQ baseline: one learnable scale per layer).
    * ``frequencies``, ``base``, ``hidden``, ``layers``: generator shape (:class:`GeneratorConfig`);
      ``fit_steps``: iterations of the per-timestep initial fit.
    * ``ema_decay``: EMA of all trained parameters, which is then the returned (saved) model; 0 = off.
    * ``cond_drop_prob``: label dropout to the null class for CFG models (ignored without labels and with
      ``data="calib"``, whose set already holds the unconditional inputs the sampler made).
    * ``observer_cap``: activation values kept per layer and timestep for the initial scale search.
    """

    steps: int = 300
    batch: int = 64
    lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: Optional[float] = 1.0
    distill: bool = True
    data: Optional[str] = None
    init: str = "mse"
    act_scale: str = "tdq"
    frequencies: int = 64
    base: float = 10000.0
    hidden: int = 64
    layers: int = 3
    fit_steps: int = 300
    ema_decay: float = 0.0
    cond_drop_prob: float = 0.1
    observer_cap: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch", 1), ("warmup_steps", 0), ("frequencies", 1), ("hidden", 1),
                          ("layers", 1), ("fit_steps", 0), ("observer_cap", 16), ("seed", 0)):
            check_int(f"TdqQatOptions.{name}", getattr(self, name), low, flag=f"--option {name}")
        check_real("TdqQatOptions.lr", self.lr, above=0.0, flag="--option lr", fix="give a number > 0 (e.g. 2e-4)")
        check_real("TdqQatOptions.weight_decay", self.weight_decay, 0.0, flag="--option weight_decay")
        check_real("TdqQatOptions.grad_clip", self.grad_clip, above=0.0, optional=True, flag="--option grad_clip")
        check_bool("TdqQatOptions.distill", self.distill, flag="--option distill")
        check_text("TdqQatOptions.data", self.data, "a data set name or folder", optional=True, flag="--option data")
        check_choice("TdqQatOptions.init", self.init, INIT_METHODS, flag="--option init")
        check_choice("TdqQatOptions.act_scale", self.act_scale, ACT_SCALES, flag="--option act_scale",
                     fix="pick one of those ('static' = the LSQ baseline)")
        check_real("TdqQatOptions.base", self.base, above=1.0, flag="--option base",
                   fix="the encoding base must be > 1")
        for name in ("ema_decay", "cond_drop_prob"):
            check_real(f"TdqQatOptions.{name}", getattr(self, name), 0.0, below=1.0, flag=f"--option {name}")
        if self.data == CALIB_DATA and not self.distill:
            raise ConfigError("TdqQatOptions: data='calib' trains on the calibration set, which holds no ground-truth "
                              "target, only the FP model's inputs; keep distill=True (--option distill=true) or name a "
                              "training data set")


# --------------------------------------------------------------------------------------------------------------
# Building blocks (public so tests and other methods can use them step by step)
# --------------------------------------------------------------------------------------------------------------

def uses_calib_set(options: TdqQatOptions, model: torch.nn.Module) -> bool:
    """Whether ``options`` train ``model`` on the calibration set (``data="calib"``, or unset for a text-conditioned
    UNet); refuses any other ``data`` for a text-conditioned UNet. ``calibrate()`` calls it before any work (the
    method's ``check_model``: :mod:`tdqrt.calibration.quant.methods`)."""
    if getattr(model, "cond_shape", None) is None:
        return options.data == CALIB_DATA
    if options.data not in (None, CALIB_DATA):
        raise ConfigError(f"TdqQatOptions.data={options.data!r}: this UNet is text-conditioned and tdqrt reads no "
                          "image-caption pairs to train it on; use data='calib' (distillation on the calibration set) "
                          "or leave it unset")
    return True


class ImageBatches:
    """Noisy training images (:func:`~tdqrt.calibration.training.noisy_batch`): ``(x_t, t, y, target)`` with
    t ~ U{0..T−1} and labels dropped to ``null_label`` with ``cond_drop_prob``."""

    def __init__(self, data: ImageData, schedule: NoiseSchedule, cond_drop_prob: float, null_label: Optional[int]):
        self.data, self.schedule, self.cond_drop_prob, self.null_label = data, schedule, cond_drop_prob, null_label

    def __call__(self, batch_size: int, gen: torch.Generator) -> tuple:
        return noisy_batch(self.data, self.schedule, batch_size, gen, cond_drop_prob=self.cond_drop_prob,
                           null_label=self.null_label)

    def record(self) -> dict:
        return {"data": self.data.info.get("name")}


class CalibBatches:
    """Rows of a calibration set, ``batch_size`` distinct ones (all, if fewer) drawn at random from ``rows`` (default:
    every row): ``(x_t, t, conditioning, None)`` — no target, the FP teacher gives it (:func:`qat_loss`)."""

    def __init__(self, calib: CalibrationSet, rows: Optional[np.ndarray] = None):
        self.calib = calib
        self.rows = torch.arange(len(calib)) if rows is None else torch.as_tensor(rows, dtype=torch.long)

    def __call__(self, batch_size: int, gen: torch.Generator) -> tuple:
        pick = torch.randperm(len(self.rows), generator=gen)[:batch_size]
        x_t, t, y = self.calib.get(self.rows[pick].numpy())
        return x_t, t, y, None

    def record(self) -> dict:
        return {"data": CALIB_DATA, "calib_set": {"path": str(self.calib.path), "rows": len(self.rows)}}


def training_batches(job: CalibrationJob, options: TdqQatOptions) -> ImageBatches | CalibBatches:
    """Where step 4 draws its batches from (module docstring, "Data"): the calibration set or training images."""
    if uses_calib_set(options, job.fp.model):
        return CalibBatches(job.calib)
    return ImageBatches(training_data(job, options), job.schedule, options.cond_drop_prob, job.fp.model.null_label)


def training_data(job: CalibrationJob, options: TdqQatOptions) -> ImageData:
    """The real training images: ``options.data`` or the data set recorded in the FP card, at the model's size."""
    card = job.fp.card
    trained = card.get("training") or {}
    spec = options.data or trained.get("data") or (card.get("data") or {}).get("name")
    if not spec:
        raise ConfigError("TdqQatOptions.data is not set and the FP checkpoint records no training data set; "
                          "pass data='digits', 'shapes' or an image folder")
    num = trained.get("num_data") if spec == trained.get("data") else None
    model = job.fp.model
    data = load_dataset(spec, image_size=model.image_size, num=num, seed=trained.get("seed", 0))
    if data.channels != model.in_channels:
        raise ConfigError(f"TdqQatOptions.data={spec!r} has {data.channels} channels, the model expects "
                          f"{model.in_channels}")
    if model.num_classes and data.num_classes > model.num_classes:
        raise ConfigError(f"TdqQatOptions.data={spec!r} has {data.num_classes} classes, the model knows "
                          f"{model.num_classes}")
    if not model.num_classes and data.num_classes:  # unconditional model: ignore the labels
        data = ImageData(data.images, None, 0, [], data.name, dict(data.info))
    return data


def init_weight_scales(qm: QuantizedModel, method: str, p: float) -> None:
    """Per-channel weight step sizes from ``method``, made learnable (LSQ with gradient scaling)."""
    for _, layer in qm.layers():
        layer.weight_quant.init_scale(layer.weight, method, p)
        layer.weight_quant.scale.requires_grad_(True)


def init_qat_act_scales(qm: QuantizedModel, options: TdqQatOptions, p: float) -> dict:
    """Step 3: trainable activation scales from the observed statistics (:func:`observe_activations` first): TDQ
    generators fitted per timestep, or one pooled scale per layer (static LSQ baseline)."""
    return init_act_scales(qm, options.act_scale, options.init, p, generator=generator_config_of(options),
                           fit_steps=options.fit_steps, seed=options.seed, trainable=True)


def param_groups(qm: QuantizedModel, options: TdqQatOptions) -> list[dict]:
    """The original code's three AdamW groups: step sizes (lr/10, no decay), generator MLPs, other weights."""
    steps, gens = [], []
    for q in qm.act_quantizers():
        if q.scale.requires_grad:
            steps.append(q.scale)
        if q.mode == "tdq":
            gens += list(q.generator.parameters())
    steps += [layer.weight_quant.scale for _, layer in qm.layers()]
    taken = {id(p) for p in steps + gens}
    others = [p for p in qm.parameters() if p.requires_grad and id(p) not in taken]
    groups = [
        {"name": "step_sizes", "params": steps, "lr": options.lr / 10, "weight_decay": 0.0},
        {"name": "generators", "params": gens, "lr": options.lr, "weight_decay": options.weight_decay},
        {"name": "weights", "params": others, "lr": options.lr, "weight_decay": options.weight_decay},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def qat_loss(qm: QuantizedModel, teacher: Optional[torch.nn.Module], x_t: torch.Tensor, t: torch.Tensor,
             y: Optional[torch.Tensor], target: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the quantized model's output against the FP teacher's (``teacher`` given) or the
    training target (ε, v or x0: the schedule's prediction type, from :func:`noisy_batch`; None for calibration
    rows, which only a teacher can score)."""
    if teacher is not None:
        with torch.no_grad():
            target = teacher(x_t, t, y)
    return F.mse_loss(qm(x_t, t, y), target)


def prepare_qat_model(job: CalibrationJob, options: TdqQatOptions) -> tuple[QuantizedModel, dict]:
    """Steps 1–3: the quantized model with learnable weight scales and initialised activation scales."""
    p = job.quant.lp_norm
    qm = quantize_model(job.fp.model, job.quant, job.schedule.num_train_timesteps).to(job.device)
    init_weight_scales(qm, options.init, p)
    observe_activations(qm, job, options.observer_cap, options.seed, options.batch)
    return qm, init_qat_act_scales(qm, options, p)


def train_qat(qm: QuantizedModel, teacher: Optional[torch.nn.Module], batches: ImageBatches | CalibBatches,
              options: TdqQatOptions, *, device: str = "cpu", progress: bool = True) -> tuple[QuantizedModel, list]:
    """Step 4: fine-tune ``qm`` in place on ``batches`` (:func:`training_batches`); returns the model to keep (the
    EMA copy if ``ema_decay`` > 0) and the loss log ``[[step, loss], …]``."""
    torch.manual_seed(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    if teacher is not None:
        teacher.eval()
    opt = torch.optim.AdamW(param_groups(qm, options), foreach=True)  # many small tensors: batch the updates
    ema = copy.deepcopy(qm).requires_grad_(False) if options.ema_decay > 0 else None
    trainable = [p for g in opt.param_groups for p in g["params"]]
    log = []
    qm.train()
    bar = progress_bar(range(options.steps), desc=f"tdq-qat ({options.act_scale})", disable=not progress, leave=False)
    for step in bar:
        x_t, t, y, target = (None if v is None else v.to(device) for v in batches(options.batch, gen))
        loss = qat_loss(qm, teacher, x_t, t, y, target)
        if not torch.isfinite(loss):
            raise DataError(f"tdq-qat diverged at step {step} (loss {loss.item()}); lower lr")
        factor = min(1.0, (step + 1) / options.warmup_steps) if options.warmup_steps else 1.0
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if options.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, options.grad_clip)
        opt.step()
        if ema is not None:
            ema_update(ema, qm, ema_warmup_decay(options.ema_decay, step))
        log.append([step, loss.item()])
        bar.set_postfix(loss=f"{loss.item():.4g}")
    bar.close()
    kept = ema if ema is not None else qm
    return kept.eval(), log


# --------------------------------------------------------------------------------------------------------------
# The registered method
# --------------------------------------------------------------------------------------------------------------

def calibrate_tdq_qat(job: CalibrationJob) -> QuantizedModel:
    """Steps 1–4 of the module docstring; writes ``tdq_qat_log.json`` (init fit error, times, losses) to the
    work directory and returns the trained, not yet frozen, model."""
    options: TdqQatOptions = job.options
    t0 = time.perf_counter()
    torch.manual_seed(options.seed)
    batches = training_batches(job, options)
    qm, init_info = prepare_qat_model(job, options)
    t_init = time.perf_counter() - t0
    teacher = job.fp.model if options.distill else None
    qm, log = train_qat(qm, teacher, batches, options, device=job.device, progress=job.progress)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    (job.work_dir / LOG_FILE).write_text(json.dumps({
        "options": {f.name: getattr(options, f.name) for f in fields(options)},
        **batches.record(), "init": init_info, "init_time_s": round(t_init, 2),
        "train_time_s": round(time.perf_counter() - t0 - t_init, 2), "loss": log}))
    return qm
