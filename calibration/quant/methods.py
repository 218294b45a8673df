"""The registry of calibration methods: name -> (options dataclass, run function, load preparation).

Each method module registers itself with :func:`register_method`; ``tdqrt calibrate --method NAME`` looks it
up here, validates ``options`` with the method's own dataclass and calls ``run(job)``, which returns a
calibrated (not yet frozen) :class:`QuantizedModel`. ``prepare_load`` re-creates method-specific submodules
(e.g. TDQ generators) on a fresh quantized model so a saved state dict loads into it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tdqrt.calibration.checkpoint import FPCheckpoint
from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.qmodel import QuantizedModel
from tdqrt.engines.config import config_from_dict
from tdqrt.engines.errors import ConfigError
from tdqrt.engines.progress import progress_bar
from tdqrt.runtime.schedules import NoiseSchedule


@dataclass
class CalibrationJob:
    """Everything a method needs: the FP checkpoint, the calibration data, the settings, where to keep state."""

    fp: FPCheckpoint
    schedule: NoiseSchedule
    calib: CalibrationSet
    quant: QuantConfig
    options: Any
    work_dir: Path
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class MethodSpec:
    options_cls: type
    run: Callable[[CalibrationJob], QuantizedModel]
    prepare_load: Optional[Callable[[QuantizedModel, Any], None]] = None


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, options_cls: type, prepare_load: Optional[Callable] = None):
    def decorator(run: Callable[[CalibrationJob], QuantizedModel]):
        METHODS[name] = MethodSpec(options_cls, run, prepare_load)
        return run

    return decorator


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"calibration method {name!r} is not available; choose one of {sorted(METHODS)}")
    return METHODS[name]


def options_from_dict(cls: type, d: dict) -> Any:
    """Build a method's options dataclass from a dict, refusing unknown keys by name."""
    return config_from_dict(cls, d)


def options_to_dict(options: Any) -> dict:
    return asdict(options)


@torch.no_grad()
def run_calibration_passes(qm: QuantizedModel, job: CalibrationJob, batch: int, desc: str) -> None:
    """One forward pass of ``qm`` over the whole calibration set (used to observe activations)."""
    total = (len(job.calib) + batch - 1) // batch
    for x, t, y in progress_bar(job.calib.batches(batch), total=total, desc=desc, disable=not job.progress,
                                leave=False):
        qm(x.to(job.device), t.to(job.device), None if y is None else y.to(job.device))
