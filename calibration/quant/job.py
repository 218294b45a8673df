"""``CalibrationJob``: what every calibration method gets — the FP checkpoint, the calibration data, the quantizer
settings, the method's validated options and where to keep its state. The methods are listed in
:mod:`tdqrt.calibration.quant.methods`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdqrt.calibration.checkpoint import FPCheckpoint
from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.calibration.quant.config import QuantConfig
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
