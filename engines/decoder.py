"""The latent decoder of a latent model's bundle, run by ONNX Runtime: ``images = OrtDecoder(bundle)(latents)``.

``decoder.onnx`` (written by ``tdqrt export`` for models with an autoencoder) is the FP32 decode step of the
diffusers pipeline the model came from; here it needs neither diffusers nor torch modules, only ONNX Runtime
(sessions from :func:`tdqrt.engines.ort.create_session`, like the UNet's).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from tdqrt.engines.bundle import Bundle, open_bundle
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.ort import create_session


class OrtDecoder:
    """Latents ``[B, C, h, w]`` (torch) -> images ``[B, out_channels, image_size, image_size]`` in [-1, 1],
    float32 on the latents' device. ``source``: a :class:`Bundle` or a bundle directory (verified)."""

    def __init__(self, source: Union[Bundle, str, os.PathLike], providers: Optional[Sequence[Any]] = None, *,
                 threads: Optional[int] = None) -> None:
        self.bundle = source if isinstance(source, Bundle) else open_bundle(source)
        if self.bundle.decoder_path is None:
            raise ArtifactError(f"bundle {self.bundle.path} has no latent decoder (it samples pixels directly)")
        self.path = self.bundle.decoder_path
        self.sha256 = self.bundle.files[self.path.name]["sha256"]
        self.latent_shape = tuple(int(v) for v in self.bundle.decoder["latent_shape"])
        self.image_size, self.out_channels = self.bundle.output_image_size, self.bundle.output_channels
        self.session = create_session(self.path, providers, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __repr__(self) -> str:
        return f"OrtDecoder({str(self.path)!r})"

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ConfigError(f"{self.path} decodes latents shaped [B, {', '.join(map(str, self.latent_shape))}], "
                              f"got {list(latents.shape)}")
        feed = np.ascontiguousarray(latents.detach().to("cpu", torch.float32).numpy())
        out = self.session.run([self.output_name], {self.input_name: feed})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(latents.device)
