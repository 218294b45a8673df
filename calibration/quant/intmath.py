"""The integer math of every quantizer in tdqrt — the only place that rounds and clamps.

Grid: signed integers, zero point 0 (TensorRT accepts only symmetric INT8: Developer Guide, "Working with Quantized
Types"), codes ``q = clamp(round_half_even(x / s), qmin, qmax)`` and values ``x̂ = s·q``. This is exactly ONNX
``QuantizeLinear`` (divide, round half to even, saturate) followed by ``DequantizeLinear``, so a fake-quant torch
model and its exported Q/DQ graph produce the same codes (up to float ties).

Activations use the full range ``[-2^(b-1), 2^(b-1)-1]`` (what QuantizeLinear saturates to); weights use the
narrow symmetric range ``[-(2^(b-1)-1), 2^(b-1)-1]``, as TensorRT's weight quantization does.

Gradients: rounding is a straight-through estimator (identity), clamping passes no gradient outside the range,
and through autograd the step size ``s`` receives the LSQ gradient (Esser et al. 2020, eq. 3):
``∂x̂/∂s = round(x/s) − x/s`` inside the range and ``qmin``/``qmax`` outside.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tdqrt.engines.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8


def qrange(bits: int, *, narrow: bool) -> tuple[int, int]:
    """Integer range of a signed ``bits``-bit grid; ``narrow`` drops the lowest code to make it symmetric."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bit-width {bits!r} is not supported; use an integer in [{MIN_BITS}, {MAX_BITS}]")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def round_ste(v: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return v + (torch.round(v) - v).detach()


def grad_scale(s: Tensor, g: float) -> Tensor:
    """Value ``s``, gradient multiplied by ``g`` (LSQ's step-size gradient scale, Esser et al. 2020 §2.2)."""
    return (s - s * g).detach() + s * g


def quantize_codes(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as a float tensor holding integers) of ``x`` on the grid of ``scale``; no gradient."""
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """``s·clamp(round(x/s))`` with the straight-through / LSQ gradients described in the module docstring."""
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def channel_view(scale: Tensor, ndim: int, axis: int = 0) -> Tensor:
    """Reshape a per-channel ``[C]`` scale so it broadcasts along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def batch_view(scale: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample ``[B]`` activation scale (one per timestep of the batch) to broadcast over a sample."""
    return scale.reshape([-1] + [1] * (ndim - 1))


def lp_scale_search(x: Tensor, qmin: int, qmax: int, *, p: float, dim: int | None = None,
                    candidates: int = 80) -> Tensor:
    """Scale minimising ``mean |x − x̂|^p`` over clipping ranges ``absmax·(1 − 0.01·i)``, i < ``candidates``.

    The candidate grid is BRECQ's / Q-Diffusion's; p = 2.4 is their (LAPQ's) choice. ``dim=None`` searches one
    scale for the whole tensor; ``dim=0`` one per slice along dim 0 (per output channel of a weight).
    """
    flat = x.detach().reshape(x.shape[0], -1) if dim == 0 else x.detach().reshape(1, -1)
    absmax = flat.abs().amax(dim=1).clamp_min(1e-8)  # [C]
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for i in range(candidates):
        s = (absmax * (1.0 - 0.01 * i) / qmax).unsqueeze(1)
        err = (flat - torch.clamp(torch.round(flat / s), qmin, qmax) * s).abs().pow(p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s.squeeze(1), best)
    return best if dim == 0 else best[0]
