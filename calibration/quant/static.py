"""Static baselines: one activation scale for all timesteps, chosen by abs-max (``minmax``) or by the
L_p-optimal clipping search (``mse``, BRECQ's candidate grid with p = ``QuantConfig.lp_norm``); weights get
per-channel scales from the same rule and nearest rounding."""
from __future__ import annotations

from dataclasses import dataclass

from tdqrt.calibration.quant.methods import CalibrationJob, register_method, run_calibration_passes
from tdqrt.calibration.quant.qmodel import QuantizedModel, quantize_model
from tdqrt.engines.config import check_int


@dataclass(frozen=True)
class StaticOptions:
    """``observer_cap``: values kept per layer and timestep for the scale search; ``batch``: forward batch."""

    observer_cap: int = 4096
    batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("StaticOptions.observer_cap", self.observer_cap, 16, flag="--option observer_cap")
        check_int("StaticOptions.batch", self.batch, 1, flag="--option batch")


def observe_activations(qm: QuantizedModel, job: CalibrationJob, cap: int, seed: int, batch: int) -> None:
    """Record per-timestep statistics of every quantized layer's input (weights already quantized)."""
    for i, q in enumerate(qm.act_quantizers()):
        q.observe(cap, seed + i)
    run_calibration_passes(qm, job, batch, "observe activations")


def static_model(job: CalibrationJob, scale_method: str, options: StaticOptions) -> QuantizedModel:
    """Quantized model with ``scale_method`` weight scales and one pooled activation scale per layer."""
    qm = quantize_model(job.fp.model, job.quant, job.schedule.num_train_timesteps).to(job.device)
    for _, layer in qm.layers():
        layer.weight_quant.init_scale(layer.weight, scale_method, job.quant.lp_norm)
    observe_activations(qm, job, options.observer_cap, options.seed, options.batch)
    for q in qm.act_quantizers():
        q.scale.data.fill_(q.observer.scale(scale_method, q.qmin, q.qmax, job.quant.lp_norm))
        q.observer = None
        q.set_mode("static")
    return qm


@register_method("minmax", StaticOptions)
def calibrate_minmax(job: CalibrationJob) -> QuantizedModel:
    return static_model(job, "minmax", job.options)


@register_method("mse", StaticOptions)
def calibrate_mse(job: CalibrationJob) -> QuantizedModel:
    return static_model(job, "mse", job.options)
