"""What sampling needs from a model, whatever it was loaded from: :class:`RunnableModel`; and
:func:`open_deployed`, which makes one from the deployment artifacts (an exported bundle, a TensorRT plan) with
nothing above ``tdqrt.runtime`` / ``tdqrt.engines``.

A runnable model is the denoiser (a torch module, an ONNX Runtime session or a TensorRT engine: all of them
:class:`~tdqrt.engines.denoiser.Denoiser` with ``num_classes``, ``null_label``, ``image_size`` and ``in_channels``),
the noise schedule it was trained on (which also says what it predicts: ``prediction_type``), the card it was
described by, the sha256 that identifies it (what D² statistics record), the D² statistics it ships (bundles) and
the decoder that turns its samples into images (latent models; ``None`` for pixel models). The torch side
(checkpoints, diffusers folders) is opened by :func:`tdqrt.calibration.resolve.open_model`, which hands bundles
and plans to :func:`open_deployed`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from tdqrt.engines.denoiser import Denoiser
from tdqrt.engines.errors import ArtifactError
from tdqrt.runtime.schedules import ScheduleConfig

PathLike = Union[str, os.PathLike]

# Latents decoded per call: a VQModel's nearest-codebook search holds a [latent pixels x codebook entries] distance
# matrix per image (LDM-CelebA-HQ: 64x64 latents x 8192 entries, ~0.2 GB per image in ONNX Runtime), so a sampling
# batch of 64 would need ~14 GB at once.
DECODE_BATCH = 8


@dataclass
class RunnableModel:
    """A denoiser with the schedule it was trained for, its card and identity, and what sampling adds around it."""

    model: Denoiser
    schedule: ScheduleConfig
    card: dict
    path: Path
    sha256: str = field(default="")
    d2_dir: Optional[Path] = None  # D² statistics shipped with the model (a bundle's d2.npz + d2.json)
    decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # latents -> images in [-1, 1]
    #: the decoder's identity for sample.json and shard settings: kind, path, sha256, image_size, out_channels
    decoder_info: Optional[dict] = None

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def null_label(self) -> Optional[int]:
        return getattr(self.model, "null_label", None)

    @property
    def cond_shape(self) -> Optional[tuple[int, ...]]:
        """``(L, D)`` of the text embeddings the model takes as ``y``; None for label and unconditional models."""
        return getattr(self.model, "cond_shape", None)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the sampler draws: the image, or the latent of a latent model."""
        m = self.model
        return (int(m.in_channels), int(m.image_size), int(m.image_size))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images :meth:`decode` gives (what samples.npz stores)."""
        if self.decoder_info is None:
            c, h, w = self.sample_shape
            return (h, w, c)
        size = int(self.decoder_info["image_size"])
        return (size, size, int(self.decoder_info["out_channels"]))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → images in [-1, 1]: the decoder's output for a latent model (``DECODE_BATCH`` latents per
        call), ``x`` itself otherwise."""
        if self.decoder is None:
            return x
        with torch.no_grad():
            return torch.cat([self.decoder(part) for part in x.split(DECODE_BATCH)])

    def require_sha256(self, expected: Optional[str], should_be: str, flag: str) -> "RunnableModel":
        """Refuse this model unless its sha256 is ``expected`` (no check when ``expected`` is empty): the one
        check behind "this is not the model the artifact was made from" (``should_be`` says which model that is,
        ``flag`` passes the right one)."""
        if expected and self.sha256 != expected:
            raise ArtifactError(f"{self.path} (sha256 {self.sha256[:12]}…) is not {should_be} ({expected[:12]}…); "
                                f"pass the right one with {flag}")
        return self


def is_deployed(path: PathLike) -> bool:
    """Whether ``path`` is a bundle directory or a TensorRT plan (what :func:`open_deployed` opens)."""
    from tdqrt.engines.bundle import is_bundle_dir
    from tdqrt.engines.engine_card import is_engine_file

    return is_bundle_dir(path) or is_engine_file(path)


def open_deployed(path: PathLike, *, engine: Optional[PathLike] = None, threads: Optional[int] = None) -> RunnableModel:
    """A bundle's INT8 ``unet.onnx`` run by ONNX Runtime (``threads`` intra-op threads; None: its default), or a
    TensorRT plan (``engine``, or ``path`` itself ending in .plan/.engine; ``path`` then names its bundle, by
    default the one its engine.json records). The schedule, D² statistics and decoder (``decoder.onnx`` of a latent
    model, run by ONNX Runtime) are the bundle's; ``sha256``
    is the quantized model's that the bundle was exported from (what D² statistics record)."""
    from tdqrt.engines.bundle import open_bundle
    from tdqrt.engines.decoder import OrtDecoder
    from tdqrt.engines.engine_card import is_engine_file
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.engines.trt import TrtDenoiser

    if engine is None and is_engine_file(path):
        engine = path
    if engine is not None:
        denoiser = TrtDenoiser(engine, bundle=None if Path(path) == Path(engine) else path)
        bundle = denoiser.bundle
    else:
        bundle = open_bundle(path)
        denoiser = OrtDenoiser(bundle, threads=threads)
    sha = bundle.manifest.get("sources", {}).get("quant_model", {}).get("sha256", bundle.sha256)
    decoder = info = None
    if bundle.decoder is not None:
        decoder = OrtDecoder(bundle, threads=threads)
        info = {"kind": "onnx", "path": str(decoder.path), "sha256": decoder.sha256,
                "image_size": decoder.image_size, "out_channels": decoder.out_channels}
    return RunnableModel(denoiser, ScheduleConfig.from_dict(bundle.schedule), bundle.manifest, bundle.path, sha,
                         d2_dir=bundle.d2_dir, decoder=decoder, decoder_info=info)
