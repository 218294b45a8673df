"""The registry of calibration methods: name -> (options dataclass, run function, load preparation).

:data:`METHODS` is the one list of method names, complete as soon as this module is imported (it imports every
method module itself, so no caller has to import one first). ``tdqrt calibrate --method NAME`` looks a method up
here, validates ``options`` with the method's own dataclass (and, with ``check_model``, against the FP model, before
any work) and calls ``run(job)``, which returns a calibrated (not yet frozen) :class:`QuantizedModel`.
``prepare_load`` re-creates method-specific submodules (e.g. TDQ generators) on a fresh quantized model so a saved
state dict loads into it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from tdqrt.calibration.quant import brecq, static, tdq, tdq_qat
from tdqrt.calibration.quant.job import CalibrationJob
from tdqrt.calibration.quant.qmodel import QuantizedModel
from tdqrt.engines.config import config_from_dict
from tdqrt.engines.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    options_cls: type
    run: Callable[[CalibrationJob], QuantizedModel]
    prepare_load: Optional[Callable[[QuantizedModel, Any], None]] = None
    check_model: Optional[Callable[[Any, torch.nn.Module], Any]] = None  # refusals that need the FP model


METHODS: dict[str, MethodSpec] = {
    "minmax": MethodSpec(static.StaticOptions, static.calibrate_minmax),
    "mse": MethodSpec(static.StaticOptions, static.calibrate_mse),
    "brecq": MethodSpec(brecq.BrecqOptions, brecq.brecq_model, tdq.prepare_load),
    "tdq-ptq": MethodSpec(brecq.TdqPtqOptions, brecq.brecq_model, tdq.prepare_load),
    "tdq-qat": MethodSpec(tdq_qat.TdqQatOptions, tdq_qat.calibrate_tdq_qat, tdq.prepare_load,
                          tdq_qat.uses_calib_set),
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"calibration method {name!r} is not available; choose one of {sorted(METHODS)}")
    return METHODS[name]


def options_from_dict(cls: type, d: dict) -> Any:
    """Build a method's options dataclass from a dict, refusing unknown keys by name."""
    return config_from_dict(cls, d)
