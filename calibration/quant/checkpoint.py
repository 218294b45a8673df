"""Quantized checkpoints: ``quant.safetensors`` + ``quant.json`` (+ ``scales.png`` written by the CLI).

The safetensors file holds the frozen quantized model's state: int8 weight codes and per-channel weight scales
of every quantized layer, its activation scale table ``[T]`` (together the ``[T, L]`` table), TDQ generator
weights where the method has them (to regenerate scales for other schedules), biases and the float layers.
``quant.json`` holds the architecture, the schedule, the FP checkpoint it came from (path + sha256) and its
autoencoder record when it is a latent model (``autoencoder``, from the FP card; None in pixel space), the
``QuantConfig``, the method options, the quantized layer names in table-column order and the calibration set
description. Loading rebuilds a model whose outputs equal the in-memory one bit for bit.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from tdqrt.calibration.checkpoint import FPCheckpoint, read_card_and_weights, write_card_and_weights
from tdqrt.calibration.models import build_model
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.methods import method_spec, options_from_dict
from tdqrt.calibration.quant.qmodel import QuantizedModel, quantize_model
from tdqrt.engines.errors import ArtifactError
from tdqrt.runtime.schedules import ScheduleConfig

QUANT_FORMAT = "tdqrt-quant-model"
QUANT_VERSION = 1
QUANT_WEIGHTS = "quant.safetensors"
QUANT_CARD = "quant.json"


def save_quant_checkpoint(out_dir: str | Path, qm: QuantizedModel, fp: FPCheckpoint, options, *,
                          calibration: dict, extra: dict | None = None) -> Path:
    """Write a frozen quantized model; the card is written last, so its presence means complete."""
    if not qm.frozen:
        raise ArtifactError("only a frozen quantized model can be saved; call freeze() after calibration")
    return write_card_and_weights(out_dir, qm.model, QUANT_WEIGHTS, QUANT_CARD, {
        "format": QUANT_FORMAT,
        "version": QUANT_VERSION,
        "model": qm.spec(),
        "schedule": fp.schedule.to_dict(),
        "fp_model": {"path": str(fp.path), "sha256": fp.sha256},
        "quant": qm.config.to_dict(),
        "options": asdict(options),
        "layers": list(qm.layer_names),
        "calibration": calibration,
        "autoencoder": fp.card.get("autoencoder"),  # a latent model's samples are decoded with it
        "text_encoder": fp.card.get("text_encoder"),  # a text-to-image model's prompts are encoded with it
    } | (extra or {}))


def load_quant_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> FPCheckpoint:
    """Load a quantized checkpoint as an :class:`FPCheckpoint`-shaped record whose ``model`` is quantized."""
    path = Path(path)
    card, state, digest = read_card_and_weights(path, QUANT_CARD, QUANT_FORMAT, QUANT_VERSION, "calibrate again")
    schedule = ScheduleConfig.from_dict(card["schedule"])
    config = QuantConfig.from_dict(card["quant"])
    spec = method_spec(config.method)
    qm = quantize_model(build_model(card["model"]), config, schedule.num_train_timesteps)
    if spec.prepare_load is not None:
        spec.prepare_load(qm, options_from_dict(spec.options_cls, card["options"]))
    qm.prepare_frozen()
    if qm.layer_names != card["layers"]:
        raise ArtifactError(f"{path / QUANT_CARD}: quantized layers differ from what the architecture gives")
    try:
        qm.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path / QUANT_WEIGHTS} does not fit the architecture in {path / QUANT_CARD}: {exc}") from exc
    qm.to(device).eval()
    return FPCheckpoint(qm, schedule, card, path, digest)
