"""The autoencoder of a latent diffusion model: load it from its record and decode latents to images.

A latent model's UNet denoises in the latent space of a diffusers ``VQModel`` (``LDMPipeline``) or
``AutoencoderKL`` (``StableDiffusionPipeline`` and relatives). Calibration, D² statistics and export are the
UNet's; the autoencoder only turns the sampler's final latents into images, in float (it is not quantized).

An **autoencoder record** (``model.json["autoencoder"]`` of the FP checkpoint, copied into ``quant.json``; None
for pixel models) says where the autoencoder is and which weights it had when the model was made::

    {"class": "VQModel" | "AutoencoderKL", "path": "<folder with config.json + weights>", "weights": "<file>",
     "sha256": "<of that file>", "scaling_factor": <float, from its config>, "latent_channels": <int>,
     "image_size": <decoded pixel size>, "out_channels": <pixel channels>}

:func:`load_autoencoder` reads the folder locally (``local_files_only``) after checking the weights' sha256, so
weights changed or removed after the model was made are refused instead of silently decoding with others.
:class:`LatentDecoder` is the decode step of the diffusers pipelines as a module (what ``tdqrt export`` writes to
the bundle's ``decoder.onnx``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tdqrt.engines.artifacts import sha256_file
from tdqrt.engines.errors import ArtifactError, ConfigError

AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")
RECORD_KEYS = ("class", "path", "weights", "sha256", "scaling_factor", "latent_channels", "image_size",
               "out_channels")


def check_component_record(record: Any, what: str, keys: tuple[str, ...], classes: tuple[str, ...],
                           use: str) -> dict:
    """``record`` (the card's description of a pipeline component: ``what``, e.g. "autoencoder") as a dict after
    checking it has every one of ``keys`` and a ``class`` among ``classes`` (``use`` says what tdqrt does with it)."""
    if not isinstance(record, Mapping) or any(k not in record for k in keys):
        raise ArtifactError(f"the {what} record {record!r} lacks some of {list(keys)}; re-import the pipeline folder")
    if record["class"] not in classes:
        raise ConfigError(f"{what} class {record['class']!r} in {record['path']} is not supported; tdqrt {use} with "
                          f"{' or '.join(classes)}")
    return dict(record)


def check_record(record: Any) -> dict:
    """``record`` as a dict after checking it has every key of an autoencoder record and a supported class."""
    return check_component_record(record, "autoencoder", RECORD_KEYS, AUTOENCODER_CLASSES, "decodes")


def load_autoencoder(record: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The diffusers ``VQModel`` / ``AutoencoderKL`` the record names, in eval mode on ``device``.

    The weights file must still have the recorded sha256 (one-line ``ArtifactError`` naming the file otherwise).
    """
    record = check_record(record)
    folder = Path(record["path"])
    weights = folder / record["weights"]
    if not folder.is_dir() or not weights.is_file():
        raise ArtifactError(f"the autoencoder weights {weights} are missing (the {record['class']} folder was moved "
                            "or deleted); put the folder back, or import the pipeline again from where it is now")
    digest = sha256_file(weights)
    if digest != record["sha256"]:
        raise ArtifactError(f"the autoencoder weights {weights} changed after the model was made (sha256 "
                            f"{digest[:12]}… vs {str(record['sha256'])[:12]}… recorded); restore them, or import "
                            "the pipeline again and recalibrate")
    import diffusers

    cls = getattr(diffusers, record["class"])
    try:
        # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate`, said here so it does not warn
        model = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{folder} cannot be loaded as a diffusers {record['class']} "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    return model.to(device).eval()


class LatentDecoder(nn.Module):
    """``images = decoder(latents)``: latents ``[B, C, h, w]`` -> images ``[B, out_channels, H, W]`` in [-1, 1].

    Exactly the decode step of diffusers' ``LDMPipeline`` and ``StableDiffusionPipeline`` before their
    ``(image / 2 + 0.5).clamp(0, 1)``: ``autoencoder.decode(latents / scaling_factor).sample``, where a
    ``VQModel`` quantizes the latents to their nearest codebook entries first (its ``decode`` default,
    ``force_not_quantize=False``, which ``LDMPipeline`` keeps), then clamped to [-1, 1] (the same clamp, before the
    affine map instead of after). The scaling factor is the autoencoder config's, as in those pipelines. The
    diffusers module itself does the work, so the decode is theirs by construction, not a re-implementation.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        if type(autoencoder).__name__ not in AUTOENCODER_CLASSES:
            raise ConfigError(f"{type(autoencoder).__name__} is not a supported autoencoder; tdqrt decodes with "
                              f"{' or '.join(AUTOENCODER_CLASSES)}")
        self.autoencoder = autoencoder
        self.scaling_factor = float(autoencoder.config.scaling_factor)
        self.latent_channels = int(autoencoder.config.latent_channels)
        self.out_channels = int(autoencoder.config.out_channels)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], device: str | torch.device = "cpu") -> "LatentDecoder":
        """The decoder of the autoencoder ``record`` names (sha256-checked by :func:`load_autoencoder`)."""
        return cls(load_autoencoder(record, device)).eval()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.scaling_factor).sample.clamp(-1.0, 1.0)
