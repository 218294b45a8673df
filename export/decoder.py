"""A latent model's decoder as ``decoder.onnx``: FP32 latents ``[batch, C, h, w]`` -> images ``[batch, c, H, W]``
in [-1, 1], exactly :class:`tdqrt.calibration.models.autoencoder.LatentDecoder` (the diffusers pipelines' decode
step, VQ quantize-on-decode included).

Why an ONNX file in the bundle rather than the diffusers autoencoder itself: the deployment side
(:mod:`tdqrt.engines`, :mod:`tdqrt.runtime`) must not import diffusers or the calibration code, so a bundle has to
be self-contained; ONNX Runtime (:class:`tdqrt.engines.decoder.OrtDecoder`) runs it there. The decoder stays in
FP32: only the UNet is quantized (the autoencoder runs once per image, not once per step, and both papers
quantize the denoiser alone).

Traced like the UNet (:func:`tdqrt.export.exporter._trace`, the TorchScript exporter, dynamic batch). A
``VQModel``'s nearest-codebook lookup (``torch.cdist`` + ``argmin``) exports as MatMul/ReduceSum/Sqrt/ArgMin; a
latent lying (within float rounding) midway between two codebook entries may pick the other one in ONNX Runtime,
which changes that latent pixel's decode — random latents do not hit such ties in practice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from tdqrt.calibration.models.autoencoder import LatentDecoder
from tdqrt.engines.errors import ConfigError
from tdqrt.export.exporter import METADATA_PREFIX, ExportConfig, _signature, _trace, save_onnx
from tdqrt.export.lint import MAX_IR_VERSION

DECODER_INPUT = "latents"
DECODER_OUTPUT = "images"


def export_decoder(decoder: LatentDecoder, latent_shape: Sequence[int], path: Path,
                   config: ExportConfig = ExportConfig()) -> tuple[list[str], dict]:
    """Write ``decoder`` (FP32, whatever ``config.dtype`` the UNet has) for latents of ``latent_shape``
    ``[C, h, w]`` to ``path``; returns the file names written and ``{"image_size", "out_channels",
    "latent_shape", "signature"}`` of the graph."""
    latent_shape = [int(v) for v in latent_shape]
    if len(latent_shape) != 3 or latent_shape[0] != decoder.latent_channels:
        raise ConfigError(f"the UNet's samples {latent_shape} do not fit the autoencoder's {decoder.latent_channels} "
                          "latent channels; the FP model's autoencoder record belongs to another pipeline")
    decoder = decoder.float().eval()
    example = torch.randn(config.trace_batch, *latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_shape = list(decoder(example).shape[1:])
    model = _trace(decoder, (example,), config.resolved_opset, input_names=(DECODER_INPUT,),
                   output_name=DECODER_OUTPUT)
    dims = model.graph.output[0].type.tensor_type.shape
    del dims.dim[:]
    dims.dim.add().dim_param = "batch"
    for v in out_shape:
        dims.dim.add().dim_value = v
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    model.producer_name = "tdqrt"
    model.doc_string = "tdqrt FP32 latent decoder: latents -> images in [-1, 1]"
    info = {"image_size": int(out_shape[-1]), "out_channels": int(out_shape[0]), "latent_shape": latent_shape}
    del model.metadata_props[:]
    for k, v in ({"kind": "fp32-latent-decoder", "autoencoder": type(decoder.autoencoder).__name__,
                  "scaling_factor": decoder.scaling_factor} | info).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + k, str(v)
    files = save_onnx(model, path, external_data_mb=config.external_data_mb)
    return files, info | {"signature": _signature(model)}
