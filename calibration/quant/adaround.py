"""AdaRound (Nagel et al. 2020) as BRECQ / Q-Diffusion use it: learn, per weight, whether to round down or up.

Notation (as in the AdaRound paper, arXiv 2004.10568): ``W`` the float weight, ``s`` its (fixed) per-channel step,
``[qmin, qmax]`` the weight grid of :func:`intmath.qrange`, ``V`` a free parameter of the weight's shape and
the rectified sigmoid ``h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1)`` with ζ = 1.1, γ = −0.1.

1. Soft weight (training):  ``W̃ = s·clamp(⌊W/s⌋ + h(V), qmin, qmax)``.
2. Initialisation:           ``h(V) = frac(W/s)``, so ``W̃ = W`` inside the clamp range at the start.
3. Regulariser:              ``f_reg = Σ (1 − |2h(V) − 1|^β)``, which pushes every h(V) to 0 or 1; β is annealed
   linearly from 20 to 2 after a warm-up (20 % of the iterations) during which the regulariser is off
   (:class:`BetaSchedule`, BRECQ's ``LinearTempDecay``).
4. Hard rounding (after training): ``q = clamp(⌊W/s⌋ + 1[V ≥ 0], qmin, qmax)``; :meth:`AdaRound.harden` makes
   the forward pass use exactly these codes, so later stages see the final weights.

The module plugs into :attr:`WeightQuantizer.rounding` (``rounding(weight, scale, qmin, qmax)`` and
``rounding.hard_codes(...)``, where ``scale`` is already shaped to broadcast); ``WeightQuantizer.freeze`` then
stores :meth:`hard_codes` as the int8 codes. :mod:`intmath`'s nearest-rounding primitives do not cover
``floor + learned offset``, so that one expression lives here; the grid itself (``qmin``/``qmax``) comes from
the quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tdqrt.calibration.quant.intmath import channel_view
from tdqrt.calibration.quant.quantizers import WeightQuantizer
from tdqrt.engines.errors import ConfigError

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1)``: exactly 0 or 1 over a finite range of V, so rounding can settle."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """A V with ``h(V) = h`` for ``h`` in [0, 1) (the fractional part of W/s is never 1)."""
    sig = (h - GAMMA) / (ZETA - GAMMA)  # in [1/12, 11/12]: finite logits
    return torch.log(sig) - torch.log1p(-sig)


class AdaRound(nn.Module):
    """Learned rounding of one weight tensor; ``V`` has the weight's shape.

    Args:
        weight (Tensor): the float weight.
        scale (Tensor): the step, already broadcastable to ``weight`` (e.g. ``channel_view(s, weight.ndim)``).
    """

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        w = weight.detach() / scale.detach()
        self.V = nn.Parameter(inverse_rectified_sigmoid(w - torch.floor(w)))
        self.hard = False

    def soft(self) -> Tensor:
        """``h(V)`` ∈ [0, 1]: the fraction added to ``⌊W/s⌋``."""
        return rectified_sigmoid(self.V)

    def up(self) -> Tensor:
        """The hard decision ``1[V ≥ 0]`` (round up) as 0/1 floats."""
        return (self.V >= 0).to(self.V.dtype)

    def forward(self, weight: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
        offset = self.up() if self.hard else self.soft()
        return torch.clamp(torch.floor(weight / scale) + offset, qmin, qmax) * scale

    @torch.no_grad()
    def hard_codes(self, weight: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
        """Integer codes (float tensor) ``clamp(⌊W/s⌋ + 1[V ≥ 0], qmin, qmax)``."""
        return torch.clamp(torch.floor(weight / scale) + self.up(), qmin, qmax)

    def harden(self) -> None:
        """Use the hard decisions from now on (forward = ``s·hard_codes``) and stop learning V."""
        self.hard = True
        self.V.requires_grad_(False)

    def regularizer(self, beta: float) -> Tensor:
        """``Σ (1 − |2h(V) − 1|^β)``: 0 when every h(V) is exactly 0 or 1."""
        return (1.0 - (2.0 * self.soft() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def settled_fraction(self, tol: float = 1e-2) -> float:
        """Fraction of entries whose h(V) lies within ``tol`` of 0 or 1."""
        h = self.soft()
        return float(((h <= tol) | (h >= 1.0 - tol)).float().mean())


def attach_adaround(quantizer: WeightQuantizer, weight: Tensor) -> AdaRound:
    """Attach a fresh :class:`AdaRound` (initialised from ``weight`` and the quantizer's current scale)."""
    if quantizer.frozen:
        raise ConfigError("cannot attach AdaRound to a frozen weight quantizer")
    rounding = AdaRound(weight, channel_view(quantizer.scale, weight.ndim)).to(weight.device)
    quantizer.rounding = rounding
    return rounding


@dataclass(frozen=True)
class BetaSchedule:
    """β of the rounding regulariser at iteration ``it`` of ``iters`` (BRECQ's ``LinearTempDecay``).

    The regulariser is off for the first ``warmup·iters`` iterations (β stays at ``start``); then β falls
    linearly from ``start`` to ``end`` at the last iteration.
    """

    iters: int
    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    def regularised(self, it: int) -> bool:
        return it >= self.warmup * self.iters

    def beta(self, it: int) -> float:
        begin = self.warmup * self.iters
        if it < begin:
            return self.start
        rel = (it - begin) / max(self.iters - begin, 1e-12)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)
