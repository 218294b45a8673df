"""Quantization-error corrections as sampler step hooks: S-D², D-D² (D²-DPM) and PTQD.

Every correction is the same element-wise map of the CFG-combined quantized prediction ε̂, applied between the
engine call and the sampler's own DDIM/DDPM update (``tdqrt.runtime.sampling``, which is reused unchanged):

    ε' = g_i·ε̂ − h_i − s_i·z1,     σ' = σ'_i

with per-step coefficients precomputed once from a :class:`~tdqrt.runtime.d2.D2Table` (shape ``[K]`` tensor-wise
or ``[K, 1, C, 1, 1]`` per channel; D²-DPM, arXiv 2501.08180, and PTQD, arXiv 2305.10657):

    S-D²  g = 1 − β,   h = a,              s = σ_cond,  σ' = σ_t                    (sampled error, z1 ~ N(0, I))
    D-D²  g = 1 − β,   h = a,              s = 0,       σ' = absorb(σ_cond)         (conditional mean only)
    PTQD  g = 1/(1+k⁺), h = b_c/(1+k⁺),    s = 0,       σ' = absorb(σ_q/(1+k⁺))

where ε̂ − E[Δ | ε̂] = (1 − β)ε̂ − a (D² conditional mean) and (ε̂ − b_c)/(1 + k⁺) is PTQD's bias and
correlated-noise correction. ``absorb`` takes the residual error variance that ε' still carries into x_p out of
the sampler's own noise budget ("variance schedule calibration" / D-D² noise fusion):

    c_t(σ) = sqrt(1 − ᾱ_p − (λ_t σ)²) − sqrt(ᾱ_p(1 − ᾱ_t)/ᾱ_t)  (the factor that carries an eps error into x_p;
                                                                λ_t = Sampler.direction_scale, 1 but for DDPM
                                                                "fixed_large")
    σ' = sqrt(max(0, σ_t² − c_t(σ_t)²·r²))                     (r = the residual std; σ' = 0 for η = 0)

computed per channel from each channel's own r (the original code read channel 0 for every channel). A sampler
timestep the table lacks, or an entry the fit marked degenerate, gets no correction (g = 1, h = 0, s = 0,
σ' = σ_t), announced by one warning that lists them all.

Note on D-D²'s absorption: it treats the residual as noise *added* to ε (PTQD's model ε' = ε + r, r ⟂ ε). Under
D²'s own joint model the residual is independent of ε̂ instead, so ε = ε' − r has *more* variance than ε', and
lowering σ' moves the sample variance further from FP (seen on a synthetic pair that follows the D² model; S-D²
is the variant that matches the FP variance there). It is implemented as published.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.d2 import STATUS_OK, STATUS_REASONS, D2Table, check_settings
from tdqrt.runtime.sampling import NoiseSource, Sampler, StepInfo

CORRECTION_KINDS = ("off", "s", "d", "ptqd")
GRANULARITIES = ("tensor", "channel")


class EpsCorrection:
    """The step hook behind every correction: ``ε' = gain[i]·ε̂ − offset[i] − noise_std[i]·z1``, ``σ' = sigma[i]``.

    Args:
        timesteps: the sampler's timesteps ``[K]``; a call for another grid is refused.
        gain, offset, noise_std: float coefficients ``[K]`` or ``[K, 1, C, 1, 1]``.
        sigma: float64 σ' per step, ``[K]`` or ``[K, 1, C, 1, 1]``.

    z1 is drawn from the per-sample hook streams (``noise.hook_noise``) only on steps where some ``noise_std`` is
    non-zero, so the sampler's own noise is the same with or without a correction, and a hook
    with all-zero coefficients reproduces the uncorrected sampler bit for bit.
    """

    def __init__(self, timesteps: Tensor, gain: Tensor, offset: Tensor, noise_std: Tensor, sigma: Tensor) -> None:
        self.timesteps = [int(t) for t in timesteps]
        coefficients = (gain, offset, noise_std, sigma)
        for c in coefficients:
            if c.shape[0] != len(self.timesteps) or (c.dim() != 1 and (c.dim() != 5 or c.shape[1] != 1)):
                raise ConfigError(f"a coefficient of shape {tuple(c.shape)} does not fit {len(self.timesteps)} steps; "
                                  "use [K] (tensor-wise) or [K, 1, C, 1, 1] (per channel).")
        self.gain, self.offset, self.noise_std = gain.float(), offset.float(), noise_std.float()
        self.sigma = sigma.double()
        self.draws_z1 = [bool((s != 0).any()) for s in self.noise_std]
        self.channels = max(c.shape[2] if c.dim() == 5 else 1 for c in coefficients)
        self._placed: dict[tuple, tuple[Tensor, ...]] = {}

    def _coefficients(self, eps: Tensor) -> tuple[Tensor, ...]:
        """The coefficient tensors on eps's device and dtype (moved once, then cached)."""
        key = (eps.device, eps.dtype)
        if key not in self._placed:
            self._placed[key] = (*(c.to(eps.device, eps.dtype) for c in (self.gain, self.offset, self.noise_std)),
                                 self.sigma.to(eps.device))
        return self._placed[key]

    def __call__(self, info: StepInfo, x: Tensor, eps: Tensor, noise: NoiseSource) -> tuple[Tensor, Tensor]:
        i = info.index
        if i >= len(self.timesteps) or info.t != self.timesteps[i]:
            raise ConfigError(
                f"this correction was built for the timesteps {self.timesteps}, but step {i} runs t={info.t}; "
                "build it from the Sampler that runs the loop."
            )
        if self.channels > 1 and (eps.dim() != 4 or eps.shape[1] != self.channels):
            raise ConfigError(
                f"a channel-wise correction for C={self.channels} got eps of shape {tuple(eps.shape)}; "
                "expected [B, C, H, W] with the channel count of the statistics."
            )
        gain, offset, noise_std, sigma = self._coefficients(eps)
        corrected = gain[i] * eps - offset[i]
        if self.draws_z1[i]:
            corrected = corrected - noise_std[i] * noise.hook_noise.randn(eps.shape[1:]).to(eps)
        return corrected, sigma[i]


class _D2Correction(EpsCorrection):
    """Common part of S-D² and D-D²: gain = 1 − β and offset = a of the chosen granularity."""

    def __init__(self, table: D2Table, sampler: Sampler, granularity: str, force: bool, absorb: bool) -> None:
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity {granularity!r} is not supported; use one of {list(GRANULARITIES)}.")
        fit = table.tensor if granularity == "tensor" else table.channel
        rows = _rows(table, sampler, force, fit.status, f"D² {granularity}-wise")
        beta, a, sigma_cond = (_per_step(getattr(fit, name), rows) for name in ("beta", "a", "sigma_cond"))
        zeros = torch.zeros_like(sigma_cond)
        sigma = _absorbed_sigma(sampler, sigma_cond) if absorb else _broadcast(sampler.sigmas, sigma_cond)
        super().__init__(sampler.timesteps, 1.0 - beta, a, zeros if absorb else sigma_cond, sigma)


class StochasticD2(_D2Correction):
    """S-D² (D²-DPM): subtract one sampled error, ε' = (1 − β)ε̂ − a − σ_cond·z1; σ' = σ_t unchanged."""

    def __init__(self, table: D2Table, sampler: Sampler, granularity: str = "channel", *, force: bool = False):
        super().__init__(table, sampler, granularity, force, absorb=False)


class DeterministicD2(_D2Correction):
    """D-D² (D²-DPM): ε' = (1 − β)ε̂ − a; with η > 0 the residual c_t²σ_cond² leaves the sampler noise."""

    def __init__(self, table: D2Table, sampler: Sampler, granularity: str = "channel", *, force: bool = False):
        super().__init__(table, sampler, granularity, force, absorb=True)


class PTQDCorrection(EpsCorrection):
    """PTQD (arXiv 2305.10657): ε' = (ε̂ − b_c)/(1 + k⁺), σ' = absorb(σ_q/(1 + k⁺)).

    PTQD's granularity is fixed by the method: k and σ_q per step, the bias b_c per (step, channel).
    """

    def __init__(self, table: D2Table, sampler: Sampler, *, force: bool = False) -> None:
        fit = table.ptqd
        rows = _rows(table, sampler, force, fit.status, "PTQD")
        inv = 1.0 / (1.0 + _per_step(fit.k_plus, rows))
        bias = _per_step(fit.bias, rows)
        residual = _per_step(fit.sigma_q, rows) * inv
        super().__init__(sampler.timesteps, inv, bias * inv[:, None, None, None, None], torch.zeros_like(inv),
                         _absorbed_sigma(sampler, residual))


def make_correction(
    kind: str, granularity: str, table: Optional[D2Table], sampler: Sampler, *, force: bool = False
) -> Optional[EpsCorrection]:
    """The hook for ``kind`` ("off" → None, "s" → S-D², "d" → D-D², "ptqd" → PTQD; PTQD ignores granularity).

    ``sampler`` must be built from the schedule and config of the run (``Sampler(schedule, config)``); the table's
    collection settings are checked against it (:func:`~tdqrt.runtime.d2.check_settings`, ``force`` overrides).
    """
    if kind not in CORRECTION_KINDS:
        raise ConfigError(f"correction {kind!r} is not supported; use one of {list(CORRECTION_KINDS)}.")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not supported; use one of {list(GRANULARITIES)}.")
    if kind == "off":
        return None
    if table is None:
        raise ConfigError(f"correction {kind!r} needs a D² statistics table; collect one or use 'off'.")
    if kind == "ptqd":
        return PTQDCorrection(table, sampler, force=force)
    cls = StochasticD2 if kind == "s" else DeterministicD2
    return cls(table, sampler, granularity, force=force)


# ----------------------------------------------------------------------------------------------- helpers


def _rows(table: D2Table, sampler: Sampler, force: bool, status: np.ndarray, what: str) -> np.ndarray:
    """Table row per sampler step (-1: uncorrected), after the settings check; one warning per kind of gap."""
    check_settings(table, sampler.config, sampler.schedule.config, force=force)
    timesteps = sampler.timesteps.tolist()
    rows, missing = table.rows(timesteps)
    if missing:
        warnings.warn(f"{what} correction: the statistics have no entry for sampler timestep(s) {missing}; "
                      "those steps run uncorrected.", stacklevel=3)
    degenerate = {}
    for t, row in zip(timesteps, rows):
        reasons = sorted({STATUS_REASONS[int(s)] for s in np.ravel(status[row]) if s != STATUS_OK}) if row >= 0 else []
        if reasons:
            degenerate[t] = reasons
    if degenerate:
        warnings.warn(f"{what} correction: degenerate statistics at timestep(s) {degenerate}; "
                      "those entries run uncorrected.", stacklevel=3)
    return rows


def _per_step(values: np.ndarray, rows: np.ndarray) -> Tensor:
    """Gather table rows into per-step float64 coefficients, 0 for absent rows: [K] or [K, 1, C, 1, 1]."""
    out = np.where((rows >= 0).reshape(-1, *[1] * (values.ndim - 1)), values[np.maximum(rows, 0)], 0.0)
    out = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float64))
    return out if out.dim() == 1 else out.reshape(out.shape[0], 1, out.shape[1], 1, 1)


def _broadcast(per_step: Tensor, like: Tensor) -> Tensor:
    """A [K] tensor shaped to broadcast against ``like`` ([K] or [K, 1, C, 1, 1])."""
    return per_step.reshape(-1, *[1] * (like.dim() - 1))


def _absorbed_sigma(sampler: Sampler, residual_std: Tensor) -> Tensor:
    """σ' = sqrt(max(0, σ_t² − c_t(σ_t)²·r²)) per step (and channel); exactly σ_t where r = 0."""
    a_t, a_p, sigma = sampler.alpha_bar, sampler.alpha_bar_prev, sampler.sigmas
    direction_sigma = sampler.direction_scale * sigma  # the σ in the update's ε coefficient (Sampler.step)
    c = torch.sqrt(torch.clamp(1.0 - a_p - direction_sigma**2, min=0.0)) - torch.sqrt(a_p * (1.0 - a_t) / a_t)
    c, sigma = _broadcast(c, residual_std), _broadcast(sigma, residual_std)
    removed = (c * residual_std) ** 2
    return torch.where(removed > 0, torch.sqrt(torch.clamp(sigma**2 - removed, min=0.0)), sigma.expand_as(removed))
