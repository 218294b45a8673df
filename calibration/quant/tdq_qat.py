"""``tdq-qat``: TDQ inside quantization-aware training (So et al. 2023, arXiv 2306.02316).

Procedure (``calibrate_tdq_qat``):

1. Quantize the FP model; per-channel weight step sizes from ``init`` (abs-max or L_p search), made learnable
   (LSQ: :class:`WeightQuantizer` applies the LSQ gradient scale once ``scale`` requires grad).
2. Observe every quantized layer's input on the calibration set, **per timestep**.
3. ``act_scale="tdq"``: attach one generator ``s(t) = softplus(MLP(enc(t)))`` per activation quantizer and regress
   it onto the per-timestep scales (:func:`init_generators_from_observers`). ``act_scale="static"``: the LSQ
   baseline, one learnable scale per layer from the pooled statistics. Everything after this step is shared.
4. Train all UNet weights, the weight step sizes and the generators (or static scales) on real training data,
   with t ~ U{0..T−1} drawn per sample, so every sample of a batch has its own activation scale (``[B]``).
   AdamW with the original code's three groups: step sizes at lr/10 without weight decay, generator MLPs, other
   weights; linear warm-up, then a constant rate.

Objective. ``distill=True`` (default) minimises ``‖ε̂_q(x_t, t) − ε_FP(x_t, t)‖²`` against the frozen FP model on
the same noisy input — **an addition**: the original code has no teacher. ``distill=False`` is the original's plain
denoising loss ``‖ε̂_q − ε‖²``.

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

import torch
import torch.nn.functional as F

from tdqrt.calibration.data import ImageData, load_dataset
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
    * ``data``: training data set; None = the one recorded in the FP checkpoint's card.
    * ``init``: per-timestep (TDQ) or pooled (static) activation-scale and per-channel weight-scale rule,
      ``"mse"`` (L_p clipping search, p = ``QuantConfig.lp_norm``) or ``"minmax"``.
    * ``act_scale``: ``"tdq"`` (generator s(t)) or ``"static"`` (LSQ baseline: one learnable scale per layer).
    * ``frequencies``, ``base``, ``hidden``, ``layers``: generator shape (:class:`GeneratorConfig`);
      ``fit_steps``: iterations of the per-timestep initial fit.
    * ``ema_decay``: EMA of all trained parameters, which is then the returned (saved) model; 0 = off.
    * ``cond_drop_prob``: label dropout to the null class for CFG models (ignored without labels).
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


# --------------------------------------------------------------------------------------------------------------
# Building blocks (public so tests and other methods can use them step by step)
# --------------------------------------------------------------------------------------------------------------

def training_data(job: CalibrationJob, options: TdqQatOptions) -> ImageData:
    """The real training images: ``options.data`` or the data set recorded in the FP card, at the model's size."""
    card = job.fp.card
    if getattr(job.fp.model, "cond_shape", None) is not None:
        raise ConfigError("tdq-qat fine-tunes on training images and their labels; a text-conditioned UNet would "
                          "need image-caption pairs, which tdqrt does not read; use tdq-ptq (the same per-timestep "
                          "scales, fitted on the calibration set) or brecq")
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
             y: Optional[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the quantized model's output against the FP teacher's (``teacher`` given) or the
    training target (ε, v or x0: the schedule's prediction type, from :func:`noisy_batch`)."""
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


def train_qat(qm: QuantizedModel, teacher: Optional[torch.nn.Module], data: ImageData, schedule: NoiseSchedule,
              options: TdqQatOptions, *, device: str = "cpu", progress: bool = True) -> tuple[QuantizedModel, list]:
    """Step 4: fine-tune ``qm`` in place; returns the model to keep (the EMA copy if ``ema_decay`` > 0) and the
    loss log ``[[step, loss], …]``."""
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
        x_t, t, y, target = noisy_batch(data, schedule, options.batch, gen, cond_drop_prob=options.cond_drop_prob,
                                        null_label=qm.null_label)
        x_t, t, target = x_t.to(device), t.to(device), target.to(device)
        y = None if y is None else y.to(device)
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
    data = training_data(job, options)
    qm, init_info = prepare_qat_model(job, options)
    t_init = time.perf_counter() - t0
    teacher = job.fp.model if options.distill else None
    qm, log = train_qat(qm, teacher, data, job.schedule, options, device=job.device, progress=job.progress)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    (job.work_dir / LOG_FILE).write_text(json.dumps({
        "options": {f.name: getattr(options, f.name) for f in fields(options)},
        "data": data.info.get("name"), "init": init_info, "init_time_s": round(t_init, 2),
        "train_time_s": round(time.perf_counter() - t0 - t_init, 2), "loss": log}))
    return qm
