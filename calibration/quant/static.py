"""Static baselines: one activation scale for all timesteps, chosen by abs-max (``minmax``) or by the
L_p-optimal clipping search (``mse``, BRECQ's candidate grid with p = ``QuantConfig.lp_norm``); weights get
per-channel scales from the same rule and nearest rounding.

Also the two initial steps every method shares: observing each quantized layer's input per timestep
(:func:`observe_activations`) and turning those statistics into activation scales, static or TDQ generators
(:func:`init_act_scales`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tdqrt.calibration.quant.job import CalibrationJob
from tdqrt.calibration.quant.qmodel import QuantizedModel, quantize_model
from tdqrt.calibration.quant.tdq import GeneratorConfig, attach_generators, init_generators_from_observers
from tdqrt.engines.config import check_int
from tdqrt.engines.progress import progress_bar


@dataclass(frozen=True)
class StaticOptions:
    """``observer_cap``: values kept per layer and timestep for the scale search; ``batch``: forward batch."""

    observer_cap: int = 4096
    batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("StaticOptions.observer_cap", self.observer_cap, 16, flag="--option observer_cap")
        check_int("StaticOptions.batch", self.batch, 1, flag="--option batch")


@torch.no_grad()
def observe_activations(qm: QuantizedModel, job: CalibrationJob, cap: int, seed: int, batch: int) -> None:
    """Record per-timestep statistics of every quantized layer's input (weights already quantized): one forward
    pass of ``qm`` over the whole calibration set in batches of ``batch``."""
    for i, q in enumerate(qm.act_quantizers()):
        q.observe(cap, seed + i)
    total = (len(job.calib) + batch - 1) // batch
    for x, t, y in progress_bar(job.calib.batches(batch), total=total, desc="observe activations",
                                disable=not job.progress, leave=False):
        qm(x.to(job.device), t.to(job.device), None if y is None else y.to(job.device))


def init_act_scales(qm: QuantizedModel, act_scale: str, method: str, p: float, *,
                    generator: GeneratorConfig = GeneratorConfig(), fit_steps: int = 300, seed: int = 0,
                    trainable: bool = False) -> dict:
    """Turn the statistics :func:`observe_activations` recorded into activation scales and drop the observers.

    ``act_scale="static"``: one scale per layer from the pooled statistics by ``method`` (``"minmax"`` or the L_p
    search ``"mse"`` with exponent ``p``). ``"tdq"``: one TDQ generator of shape ``generator`` per layer
    (initialised from ``seed``) regressed in ``fit_steps`` iterations onto the per-timestep scales of ``method``.
    ``trainable``: whether the static scales or the generators' parameters then require grad (QAT trains them
    with the model; BRECQ enables them unit by unit). Returns the generator-fit record (``{}`` for static).
    """
    if act_scale == "tdq":
        torch.manual_seed(seed)  # generator init (and so the fit) reproducible whoever calls this
        attach_generators(qm, generator)
        info = init_generators_from_observers(qm, method, p, fit_steps=fit_steps)
    else:
        for q in qm.act_quantizers():
            q.scale.data.fill_(q.observer.scale(method, q.qmin, q.qmax, p))
            q.observer = None
            q.set_mode("static")
        info = {}
    for q in qm.act_quantizers():
        (q.generator if act_scale == "tdq" else q.scale).requires_grad_(trainable)
    return info


def static_model(job: CalibrationJob, scale_method: str) -> QuantizedModel:
    """Quantized model with ``scale_method`` weight scales and one pooled activation scale per layer."""
    options: StaticOptions = job.options
    qm = quantize_model(job.fp.model, job.quant, job.schedule.num_train_timesteps).to(job.device)
    for _, layer in qm.layers():
        layer.weight_quant.init_scale(layer.weight, scale_method, job.quant.lp_norm)
    observe_activations(qm, job, options.observer_cap, options.seed, options.batch)
    init_act_scales(qm, "static", scale_method, job.quant.lp_norm)
    return qm


def calibrate_minmax(job: CalibrationJob) -> QuantizedModel:
    return static_model(job, "minmax")


def calibrate_mse(job: CalibrationJob) -> QuantizedModel:
    return static_model(job, "mse")
