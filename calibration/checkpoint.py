"""FP checkpoints on disk: ``model.safetensors`` + ``model.json``.

``model.json`` records everything needed to rebuild and use the network without the code that trained it:
the architecture spec (built-in UNet or diffusers ``UNet2DModel`` config), the noise schedule, the dataset it
was trained on, the training settings, whether the weights are the EMA copy, the versions that wrote it and the
sha256 of the weights file (so a truncated or swapped file is refused, not silently loaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tdqrt.calibration.models import build_model
from tdqrt.engines.artifacts import atomic_path, read_json, sha256_file, versions, write_json_atomic
from tdqrt.engines.errors import ArtifactError
from tdqrt.runtime.runnable import RunnableModel
from tdqrt.runtime.schedules import ScheduleConfig

FP_FORMAT = "tdqrt-fp-model"
FP_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


@dataclass
class FPCheckpoint(RunnableModel):
    """A torch model loaded from a checkpoint (FP, or quantized by :func:`~tdqrt.calibration.quant.checkpoint.
    load_quant_checkpoint`) with the schedule it was trained for, its JSON card and its weights' sha256."""


def save_fp_checkpoint(
    out_dir: str | Path,
    model: torch.nn.Module,
    schedule: ScheduleConfig,
    *,
    data: dict,
    training: dict,
    ema: bool,
    autoencoder: dict | None = None,
) -> Path:
    """Write the weights and the card atomically; the card is written last, so its presence means complete.

    ``autoencoder``: for a latent model, the record of the autoencoder that decodes its samples
    (:mod:`tdqrt.calibration.models.autoencoder`); None for a pixel model."""
    return write_card_and_weights(out_dir, model, WEIGHTS_FILE, CARD_FILE, {
        "format": FP_FORMAT,
        "version": FP_VERSION,
        "model": model.spec(),
        "schedule": schedule.to_dict(),
        "data": data,
        "training": training,
        "ema": ema,
        "autoencoder": autoencoder,
    })


def write_card_and_weights(out_dir: str | Path, model: torch.nn.Module, weights_file: str, card_file: str,
                           card: dict) -> Path:
    """Save ``model``'s state dict as safetensors, then ``card`` with the weights' file name and sha256 and the
    versions that wrote them (the counterpart of :func:`read_card_and_weights`). Both writes are atomic and the
    card comes last, so its presence means the checkpoint is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / weights_file) as tmp:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
    write_json_atomic(out_dir / card_file, card | {"weights": {"file": weights_file, "sha256": digest},
                                                   "versions": versions()})
    return out_dir


def read_card_and_weights(path: Path, card_file: str, fmt: str, version: int, remedy: str) -> tuple[dict, dict, str]:
    """Read a checkpoint's JSON card and its safetensors weights, refusing a foreign format or version, a
    missing file, a sha256 mismatch (truncated or replaced weights) or unreadable safetensors.

    Returns ``(card, tensors, sha256 of the weights)``; ``remedy`` says how to make the checkpoint again.
    """
    card = read_json(path / card_file, expect_format=fmt)
    if card.get("version") != version:
        raise ArtifactError(f"{path / card_file} has version {card.get('version')}, this tdqrt reads {version}")
    weights = path / card["weights"]["file"]
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing; the checkpoint is incomplete, {remedy}")
    digest = sha256_file(weights)
    if digest != card["weights"]["sha256"]:
        raise ArtifactError(
            f"{weights} does not match the sha256 recorded in {path / card_file} "
            f"({digest[:12]}… vs {card['weights']['sha256'][:12]}…): the file was truncated or replaced; {remedy}"
        )
    try:
        return card, load_file(str(weights)), digest
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights} cannot be read as safetensors ({exc}); {remedy}") from exc


def load_fp_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> FPCheckpoint:
    """Load an FP checkpoint directory, verifying the card's format and the weights' sha256.

    A diffusers pipeline folder, a bare ``UNet2DModel`` folder or a ``tdqrt import`` directory is opened by
    :func:`tdqrt.calibration.models.sources.open_source` instead (same record; its card has format
    ``tdqrt-diffusers-source``)."""
    from tdqrt.calibration.models import sources  # imported here: sources builds FPCheckpoint records of this module

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a model directory; pass the --out folder of `tdqrt train`, a diffusers "
                            "pipeline folder or a UNet2DModel folder")
    if sources.source_kind(path) is not None:
        return sources.open_source(path, device=device)
    if not (path / CARD_FILE).is_file():
        raise ArtifactError(f"{path} holds no model: expected {CARD_FILE} (`tdqrt train` or `tdqrt import` output), "
                            f"{sources.PIPELINE_INDEX} (a diffusers pipeline folder) or {sources.COMPONENT_CONFIG} "
                            f"(a {sources.UNET_CLASS} folder)")
    card, state, digest = read_card_and_weights(path, CARD_FILE, FP_FORMAT, FP_VERSION, "retrain or copy it again")
    model = build_model(card["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{path / card['weights']['file']} does not fit the architecture in {path / CARD_FILE}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.to(device).eval()
    return FPCheckpoint(model, ScheduleConfig.from_dict(card["schedule"]), card, path, digest)
