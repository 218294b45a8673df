"""``calibrate``: FP checkpoint + calibration data + method -> quantized checkpoint (the ``tdqrt calibrate`` verb),
and ``load_model_dir``: open an FP or a quantized checkpoint directory alike."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tdqrt.calibration.checkpoint import CARD_FILE, FPCheckpoint, load_fp_checkpoint
from tdqrt.calibration.models.sources import COMPONENT_CONFIG, PIPELINE_INDEX
from tdqrt.calibration.models.text import prompt_embeddings
from tdqrt.calibration.quant.brecq import finished_units
from tdqrt.calibration.quant.calib_set import CalibrationSet, CalibSetConfig, collect_calibration_set
from tdqrt.calibration.quant.checkpoint import QUANT_CARD, load_quant_checkpoint, save_quant_checkpoint
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.job import CalibrationJob
from tdqrt.calibration.quant.methods import method_spec, options_from_dict
from tdqrt.engines.artifacts import write_json_atomic
from tdqrt.engines.errors import ArtifactError
from tdqrt.engines.progress import saved_progress
from tdqrt.runtime.schedules import NoiseSchedule


@dataclass(frozen=True)
class CalibrateConfig:
    """A whole calibration run: quantizer settings, calibration-set settings, method options (a dict validated by
    the method's own options class), and the device."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    calib_set: CalibSetConfig = field(default_factory=CalibSetConfig)
    options: dict = field(default_factory=dict)
    device: str = "cpu"

    def method_options(self) -> Any:
        return options_from_dict(method_spec(self.quant.method).options_cls, self.options)


def load_model_dir(path: str | Path, *, device: str = "cpu") -> FPCheckpoint:
    """Open ``path`` as a quantized checkpoint (``quant.json``) or an FP one (``model.json``, a diffusers pipeline or
    UNet2DModel folder, a ``tdqrt import`` directory: see :func:`load_fp_checkpoint`)."""
    path = Path(path)
    if (path / QUANT_CARD).is_file():
        return load_quant_checkpoint(path, device=device)
    if path.is_dir() and not any((path / f).is_file() for f in (CARD_FILE, PIPELINE_INDEX, COMPONENT_CONFIG)):
        raise ArtifactError(f"{path} holds no model: expected {CARD_FILE} (FP model or `tdqrt import` output), "
                            f"{QUANT_CARD} (quantized model), {PIPELINE_INDEX} (a diffusers pipeline folder) or "
                            f"{COMPONENT_CONFIG} (a UNet2DModel folder)")
    return load_fp_checkpoint(path, device=device)


def _finished_units(job: CalibrationJob) -> Optional[str]:
    done = finished_units(job.work_dir) if job.quant.method == "brecq" else None
    return None if done is None else f"after {done[0]} of {done[1]} BRECQ units"


def calibrate(model_dir: str | Path, out_dir: str | Path, cfg: CalibrateConfig, *,
              calib_dir: Optional[str | Path] = None, embeddings: Any = None, uncond: Any = None,
              prompts: Any = None, progress: bool = True) -> Path:
    """Quantize the FP model in ``model_dir`` with ``cfg`` and write the checkpoint into ``out_dir``.

    The calibration set is read from ``calib_dir`` when given (share one set between methods), otherwise it
    is collected into ``out_dir/calib`` (a text-conditioned model's from the prompts' ``embeddings`` ``[P, L, D]`` and
    the unconditional ``uncond`` ``[L, D]``: :func:`collect_calibration_set`; or from ``prompts``, a
    :class:`~tdqrt.calibration.models.text.PromptSet` encoded by the text encoder the model records, whose count and
    sha256 the checkpoint then records). Activations of other than 8 bits are calibrated with a warning: TensorRT
    and ONNX Runtime run integer activations in 8 bits only, so such a model stays in torch (fake-quant) and
    ``tdqrt export`` refuses it. Interrupted, BRECQ keeps its finished units in ``out_dir/work`` for a rerun.
    """
    out_dir = Path(out_dir)
    options = cfg.method_options()
    abits = cfg.quant.abits
    if abits != 8:
        warnings.warn(f"--abits {abits}: {abits}-bit activations are a research setting that TensorRT and ONNX "
                      "Runtime cannot deploy (they quantize activations to 8 bits only), so `tdqrt export` will "
                      "refuse this model; it can still be sampled and evaluated in torch (fake-quant). To deploy, use "
                      "--abits 8 (weights may have fewer bits, e.g. --wbits 4: their codes are stored as int8)",
                      stacklevel=2)
    fp = load_fp_checkpoint(model_dir, device=cfg.device)
    spec = method_spec(cfg.quant.method)
    if spec.check_model is not None:
        spec.check_model(options, fp.model)
    schedule = NoiseSchedule(fp.schedule)
    t0 = time.perf_counter()
    if prompts is not None or (embeddings is None and calib_dir is None):
        embeddings, uncond = prompt_embeddings(fp.model, fp.card, prompts, device=cfg.device)
    if calib_dir is not None:
        calib = CalibrationSet(calib_dir)
    else:
        calib = collect_calibration_set(fp.model, schedule, cfg.calib_set, out_dir / "calib", embeddings=embeddings,
                                        uncond=uncond, device=cfg.device, progress=progress)
    t_calib = time.perf_counter() - t0
    job = CalibrationJob(fp, schedule, calib, cfg.quant, options, out_dir / "work", cfg.device, progress)
    t0 = time.perf_counter()
    with saved_progress(lambda: _finished_units(job)):
        qm = spec.run(job)
    qm.freeze()
    wall = time.perf_counter() - t0
    calibration = {"path": str(calib.path), "count": len(calib), "timesteps": calib.timesteps,
                   "config": calib.meta["config"], "prompts": None if prompts is None else prompts.record()}
    write_json_atomic(out_dir / "calibrate_config.json", {"quant": cfg.quant.to_dict(),
                                                          "calib_set": cfg.calib_set.to_dict(),
                                                          "options": cfg.options, "device": cfg.device})
    return save_quant_checkpoint(out_dir, qm.cpu(), fp, options, calibration=calibration,
                                 extra={"wall_time_s": {"calibration_set": round(t_calib, 2),
                                                        "method": round(wall, 2)}})
