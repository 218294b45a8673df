"""ONNX Runtime backend: a :class:`~tdqrt.engines.denoiser.Denoiser` over a bundle's ``unet.onnx`` (or any ONNX
file with the tdqrt signature ``(sample, timestep[, class_labels | encoder_hidden_states]) -> eps``).

Torch tensors in, torch tensors out: inputs are moved to the CPU as numpy arrays in the model's input dtypes
(float32 or float16 ``sample`` / ``encoder_hidden_states``, int64 ``timestep`` / ``class_labels``), the output comes
back as float32 on the device of ``x``. The attributes ``num_classes``, ``null_label``, ``image_size``,
``in_channels``, ``cond_shape`` (``(L, D)`` of a text-conditioned UNet, else None), ``min_timestep`` (1 for a Fourier
time embedding) come from the bundle manifest (or, for a bare ``.onnx`` file, from its ``tdqrt.*`` metadata), so
``tdqrt.runtime.sampling.sample`` drives it exactly like the torch model.

Providers: the CUDA execution provider first when ``onnxruntime-gpu`` is installed and torch sees a CUDA device,
then the CPU provider. ``onnxruntime`` is imported when a denoiser is created, so importing this module is cheap.
"""
from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from tdqrt.engines.bundle import Bundle, is_bundle_dir, open_bundle
from tdqrt.engines.denoiser import COND_INPUTS, EMBEDDINGS_INPUT, LABELS_INPUT, prepare_inputs
from tdqrt.engines.errors import ArtifactError

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}
METADATA_PREFIX = "tdqrt."


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


# ONNX Runtime's QDQS8ToU8Transformer rewrites int8 Q->DQ pairs (the TensorRT-flavour graph's activations) to uint8
# so that its x86 U8S8 integer kernels can run them. Those kernels multiply-add pairs of u8*s8 products into int16
# (VPMADDUBSW) and saturate on CPUs without VNNI (AVX2-only machines), which changes results by far more than
# rounding: https://github.com/microsoft/onnxruntime/pull/12088 describes the overflow, and its session option
# "session.x64quantprecision" fails to initialise tdqrt graphs in ONNX Runtime 1.32. Without the rewrite, ONNX Runtime
# computes the int8 Q/DQ math as written in float (it never fuses int8 activations on x86), which is what the
# TensorRT flavour is for on a CPU: a reference. Graphs of the ort-cpu flavour already hold uint8 Q/DQ pairs, which
# this rewrite does not touch.
DISABLED_OPTIMIZERS = ("QDQS8ToU8Transformer",)

# The same saturation hits the ort-cpu flavour's QLinearConv/QLinearMatMul (uint8 activations x int8 weights) on such
# CPUs unless every weight code lies in [-64, 63]: then two products sum to at most 2 * 255 * 64 < 2^15. Weights of
# at most this many bits (``tdqrt calibrate --wbits 7``) are safe everywhere.
U8S8_SAFE_WEIGHT_BITS = 7


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's x86 U8S8 kernels can saturate here: an x86 CPU without VNNI (no ``avx512_vnni`` /
    ``avx_vnni`` flag in /proc/cpuinfo; True when the flags cannot be read). Other architectures: False."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def saturation_warning(bundle: Bundle) -> Optional[str]:
    """The warning for an ort-cpu bundle whose weights need more than :data:`U8S8_SAFE_WEIGHT_BITS` bits on a CPU
    where ONNX Runtime's U8S8 kernels saturate; None when it does not apply."""
    export, quant = bundle.manifest.get("export") or {}, (bundle.manifest.get("quant") or {}).get("config") or {}
    wbits = int(quant.get("wbits", 8))
    if export.get("target") != "ort-cpu" or wbits <= U8S8_SAFE_WEIGHT_BITS or not u8s8_saturates():
        return None
    return (f"{bundle.path} is an ort-cpu bundle with {wbits}-bit weights and this CPU has no VNNI: ONNX Runtime's "
            f"integer kernels saturate there and its results drift from the quantized model; calibrate with "
            f"--wbits {U8S8_SAFE_WEIGHT_BITS} (or run on a CPU with VNNI, or export --target trt)")


def create_session(path: Path, providers: Optional[Sequence[Any]] = None, *, threads: Optional[int] = None,
                   session_options: Any = None):
    """An ``InferenceSession`` for ``path`` (without :data:`DISABLED_OPTIMIZERS`); an unreadable file raises
    ``ArtifactError`` naming it."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; re-export with `tdqrt export`")
    so = session_options or ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or default_providers()),
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as exc:  # InvalidProtobuf, Fail, InvalidGraph, ... (pybind exceptions)
        raise ArtifactError(f"{path} cannot be loaded by ONNX Runtime ({type(exc).__name__}: {str(exc)[:400]}); the "
                            "file is truncated or corrupt — re-export it with `tdqrt export`") from exc


class OrtDenoiser:
    """``eps = denoiser(x, t, y)`` with ONNX Runtime.

    ``source``: a :class:`Bundle`, a bundle directory (verified: every hash), or an ``.onnx`` file. ``role``
    picks the bundle's ``"unet"`` (INT8, default) or ``"unet_fp"`` (FP reference) graph.
    """

    def __init__(self, source: Union[Bundle, str, os.PathLike], providers: Optional[Sequence[Any]] = None, *,
                 role: str = "unet", threads: Optional[int] = None, session_options: Any = None,
                 verify: bool = True) -> None:
        self.bundle: Optional[Bundle] = None
        if isinstance(source, Bundle):
            self.bundle = source
        elif is_bundle_dir(source):
            self.bundle = open_bundle(source, verify=verify)
        if self.bundle is not None:
            path = self.bundle.onnx_path(role)
            if path is None:
                raise ArtifactError(f"bundle {self.bundle.path} has no {role} model; re-export it with `tdqrt export`")
        else:
            path = Path(source)
            if path.is_dir():
                raise ArtifactError(f"{path} is a directory without manifest.json; pass a bundle written by "
                                    "`tdqrt export` or an .onnx file")
        self.path = path
        self.session = create_session(path, providers, threads=threads, session_options=session_options)
        self.providers = self.session.get_providers()
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "sample" not in inputs or "timestep" not in inputs:
            raise ArtifactError(f"{path} does not have the tdqrt signature (sample, timestep[, conditioning]) -> eps; "
                                f"its inputs are {sorted(inputs)}")
        self.input_dtypes = {name: _NP_DTYPES.get(i.type, np.float32) for name, i in inputs.items()}
        self.cond_input = next((n for n in COND_INPUTS if n in inputs), None)
        self.conditional = self.cond_input is not None
        self.cond_shape = (tuple(int(d) for d in inputs[EMBEDDINGS_INPUT].shape[1:])
                           if self.cond_input == EMBEDDINGS_INPUT else None)
        self.output_name = self.session.get_outputs()[0].name
        self._describe(inputs)
        if self.bundle is not None and role == "unet" and (warning := saturation_warning(self.bundle)):
            warnings.warn(warning, stacklevel=2)

    def _describe(self, inputs: dict) -> None:
        if self.bundle is not None:
            b = self.bundle
            self.num_classes, self.null_label = b.num_classes, b.null_label
            self.image_size, self.in_channels = b.image_size, b.in_channels
            self.num_train_timesteps = int(b.schedule.get("num_train_timesteps", 0)) or None
            self.min_timestep = b.min_timestep
            return
        meta = {k[len(METADATA_PREFIX):]: v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k.startswith(METADATA_PREFIX)}
        shape = inputs["sample"].shape
        self.in_channels = int(meta.get("in_channels") or shape[1])
        self.image_size = int(meta.get("image_size") or shape[-1])
        self.num_classes = int(meta.get("num_classes") or 0)
        null = meta.get("null_label", "")
        self.null_label = int(null) if null not in ("", None) else (self.num_classes if self.num_classes else None)
        t = meta.get("num_train_timesteps")
        self.num_train_timesteps = int(t) if t else None
        self.min_timestep = int(meta.get("min_timestep") or 0)

    def __repr__(self) -> str:
        return f"OrtDenoiser({str(self.path)!r}, providers={self.providers})"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t, y = prepare_inputs(x, t, y, in_channels=self.in_channels, image_size=self.image_size,
                              num_train_timesteps=self.num_train_timesteps, conditional=self.conditional,
                              null_label=self.null_label, cond_shape=self.cond_shape,
                              min_timestep=self.min_timestep)
        feed = {"sample": np.ascontiguousarray(x.detach().to("cpu").numpy().astype(self.input_dtypes["sample"],
                                                                                     copy=False)),
                "timestep": t.detach().to("cpu", torch.int64).numpy().astype(self.input_dtypes["timestep"], copy=False)}
        if y is not None:
            y = y.detach().to("cpu", torch.int64 if self.cond_input == LABELS_INPUT else torch.float32).numpy()
            feed[self.cond_input] = np.ascontiguousarray(y.astype(self.input_dtypes[self.cond_input], copy=False))
        out = self.session.run([self.output_name], feed)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
