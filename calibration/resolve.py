"""One place turns a path into a runnable model: :func:`open_model`.

Every command that takes ``--model`` (sample, bench, demo, d2-stats, calibrate's FP model, export's and validate's
recorded sources) opens it here. The kinds of path, in the order they are recognised:

* a TensorRT plan (``.plan``/``.engine`` with its ``engine.json``) or an exported bundle (``manifest.json``):
  :func:`tdqrt.runtime.runnable.open_deployed` — ONNX Runtime or TensorRT, nothing above ``tdqrt.runtime``;
* a quantized checkpoint (``quant.json``) or an FP checkpoint (``model.json``, including what ``tdqrt import``
  writes) and the other sources :func:`~tdqrt.calibration.checkpoint.load_fp_checkpoint` reads: a torch model,
  with the torch decoder of its autoencoder when it is a latent model.

:func:`open_recorded` opens the model an artifact records (a path and the sha256 it had), refusing another one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from tdqrt.calibration.models.autoencoder import LatentDecoder
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.runtime.runnable import RunnableModel, is_deployed, open_deployed

PathLike = Union[str, os.PathLike]


def open_model(path: PathLike, *, device: str = "cpu", threads: Optional[int] = None,
               engine: Optional[PathLike] = None, decoder: bool = True) -> RunnableModel:
    """The runnable model at ``path`` (see the module docstring); ``device`` places torch models, ``threads`` sets
    ONNX Runtime's intra-op threads, ``engine`` runs a TensorRT plan of the bundle at ``path``. A torch model of a
    latent diffusion model gets the float decoder of the autoencoder its card records (sha256-checked) unless
    ``decoder=False`` (for work on the UNet alone)."""
    if engine is not None or is_deployed(path):
        return open_deployed(path, engine=engine, threads=threads)
    model = load_model_dir(path, device=device)
    record = model.card.get("autoencoder")
    if decoder and record is not None:
        model.decoder = LatentDecoder.from_record(record, device)
        model.decoder_info = {"kind": record["class"], "path": str(Path(record["path"]) / record["weights"]),
                              "sha256": record["sha256"], "image_size": int(record["image_size"]),
                              "out_channels": int(record["out_channels"])}
    return model


def open_recorded(record: Optional[dict], override: Optional[PathLike], what: str, source: str, flag: str, *,
                  device: str = "cpu") -> RunnableModel:
    """The torch model that ``source`` (e.g. "the bundle") records as ``record = {"path": ..., "sha256": ...}``
    (``what`` names it, e.g. "FP model"), or ``override`` (given with ``flag``) in its place; either must have the
    recorded sha256."""
    record = record or {}
    path = override if override is not None else record.get("path")
    if path is None:
        raise ConfigError(f"{source} records no {what}; pass it with {flag}")
    if not Path(path).exists():
        raise ArtifactError(f"the {what} {path} recorded by {source} does not exist; pass it with {flag}")
    return load_model_dir(path, device=device).require_sha256(record.get("sha256"), f"the {what} {source} was made "
                                                              "from", flag)
