"""Weight and activation quantizers (nn.Modules) built on :mod:`intmath`.

* :class:`WeightQuantizer` — per-output-channel (Conv axis 0, Linear per output row) or per-tensor scales,
  narrow symmetric grid; nearest rounding, AdaRound soft rounding (set by BRECQ), or frozen int8 codes.
* :class:`ActQuantizer` — one per-tensor scale per timestep, full signed grid; the scale comes from a learnable
  scalar (static / LSQ), a TDQ generator ``s = f(t)``, or, once frozen, a table ``[T]`` indexed by the
  timestep of each sample. The timestep reaches the quantizer through a :class:`TimestepContext` that the
  quantized model sets on every forward call (an explicit shared object, not a global).
* :class:`ActObserver` — per-timestep statistics (abs-max and a random subsample) used by the static scale
  search and by TDQ's per-timestep initialisation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from tdqrt.calibration.quant.intmath import (
    batch_view,
    channel_view,
    fake_quant,
    grad_scale,
    lp_scale_search,
    qrange,
    quantize_codes,
)
from tdqrt.engines.errors import ConfigError, DataError

ACT_MODES = ("float", "observe", "static", "tdq", "table")


class TimestepContext:
    """Carries the timesteps ``t`` ``[B]`` of the current forward call to every activation quantizer."""

    def __init__(self) -> None:
        self.t: Optional[Tensor] = None

    def require(self) -> Tensor:
        if self.t is None:
            raise RuntimeError("activation quantizer called outside QuantizedModel.forward (no timestep set)")
        return self.t


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer with one scale per output channel (``scale`` has shape ``[C_out]``).

    ``granularity="tensor"`` keeps one value broadcast to every channel, so export always sees a ``[C_out]``
    vector. ``rounding`` (AdaRound) replaces nearest rounding while BRECQ learns it; ``freeze`` stores the final
    int8 codes, after which the float weight is no longer needed.
    """

    def __init__(self, weight: Tensor, bits: int, granularity: str = "channel") -> None:
        super().__init__()
        if granularity not in ("channel", "tensor"):
            raise ConfigError(f"weight granularity {granularity!r} must be 'channel' or 'tensor'")
        self.bits = bits
        self.granularity = granularity
        self.qmin, self.qmax = qrange(bits, narrow=True)
        self.scale = nn.Parameter(torch.ones(weight.shape[0]), requires_grad=False)
        self.rounding: Optional[nn.Module] = None
        self.register_buffer("codes", None)
        self.init_scale(weight, "minmax")

    def init_scale(self, weight: Tensor, method: str, p: float = 2.4) -> None:
        """Abs-max (``minmax``) or L_p-optimal clipping (``mse``) scales, per channel or per tensor."""
        w = weight.detach()
        per_channel = self.granularity == "channel"
        if method == "minmax":
            amax = w.reshape(w.shape[0], -1).abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
            scale = amax.clamp_min(1e-8) / self.qmax
        elif method == "mse":
            scale = lp_scale_search(w, self.qmin, self.qmax, p=p, dim=0 if per_channel else None)
            scale = scale if per_channel else scale.expand(w.shape[0])
        else:
            raise ConfigError(f"weight scale method {method!r} must be 'minmax' or 'mse'")
        self.scale.data.copy_(scale)

    @property
    def frozen(self) -> bool:
        return self.codes is not None

    def forward(self, weight: Optional[Tensor]) -> Tensor:
        scale = channel_view(self.scale, weight.ndim if weight is not None else self.codes.ndim)
        if self.frozen:
            return self.codes.to(scale.dtype) * scale
        if self.rounding is not None:
            return self.rounding(weight, scale, self.qmin, self.qmax)
        if self.scale.requires_grad:  # LSQ on weights (QAT): scale the step-size gradient
            g = 1.0 / (weight[0].numel() * self.qmax) ** 0.5
            scale = channel_view(grad_scale(self.scale, g), weight.ndim)
        return fake_quant(weight, scale, self.qmin, self.qmax)

    @torch.no_grad()
    def integer_codes(self, weight: Optional[Tensor]) -> Tensor:
        """The int8 codes the weight maps to (hard AdaRound decision if one is attached)."""
        if self.frozen:
            return self.codes
        scale = channel_view(self.scale, weight.ndim)
        if self.rounding is not None:
            return self.rounding.hard_codes(weight, scale, self.qmin, self.qmax).to(torch.int8)
        return quantize_codes(weight, scale, self.qmin, self.qmax).to(torch.int8)

    @torch.no_grad()
    def freeze(self, weight: Optional[Tensor]) -> None:
        codes = self.integer_codes(weight)
        self.rounding = None
        self.scale.requires_grad_(False)
        self.codes = codes

    def prepare_frozen(self, weight_shape: torch.Size) -> None:
        """Give an unfrozen quantizer a codes buffer of the right shape, so a frozen state dict can load."""
        self.rounding = None
        self.codes = torch.zeros(weight_shape, dtype=torch.int8)


class ActObserver:
    """Per-timestep abs-max and a random subsample (at most ``cap`` values per timestep) of a tensor's values."""

    def __init__(self, cap: int = 4096, seed: int = 0) -> None:
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)
        self.absmax: dict[int, float] = {}
        self.samples: dict[int, Tensor] = {}

    def update(self, x: Tensor, t: Tensor) -> None:
        x = x.detach().float().cpu()
        if not bool(torch.isfinite(x).all()):
            raise DataError("NaN/Inf activations during calibration; check the FP model and the calibration set")
        t = t.cpu()
        for tv in t.unique().tolist():
            values = x[t == tv].reshape(-1)
            self.absmax[tv] = max(self.absmax.get(tv, 0.0), float(values.abs().max()))
            pick = values[torch.randperm(values.numel(), generator=self.gen)[: self.cap]]
            pool = torch.cat([self.samples[tv], pick]) if tv in self.samples else pick
            if pool.numel() > self.cap:
                pool = pool[torch.randperm(pool.numel(), generator=self.gen)[: self.cap]]
            self.samples[tv] = pool

    @property
    def timesteps(self) -> list[int]:
        return sorted(self.absmax)

    def pooled(self) -> Tensor:
        return torch.cat([self.samples[t] for t in self.timesteps])

    def scale(self, method: str, qmin: int, qmax: int, p: float, t: Optional[int] = None) -> float:
        """One scale for timestep ``t`` (or pooled over all timesteps): abs-max or L_p search on the subsample."""
        if not self.absmax:
            raise DataError("an activation quantizer saw no data; the calibration set is empty or the layer unused")
        if method == "minmax":
            amax = self.absmax[t] if t is not None else max(self.absmax.values())
            return max(amax, 1e-8) / qmax
        values = self.samples[t] if t is not None else self.pooled()
        return float(lp_scale_search(values, qmin, qmax, p=p))


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer whose scale may depend on the timestep.

    Modes: ``float`` (pass through), ``observe`` (record statistics, pass through), ``static`` (learnable
    scalar ``scale``), ``tdq`` (``generator(t)`` gives one scale per sample), ``table`` (frozen ``table[t]``).
    """

    def __init__(self, bits: int, ctx: TimestepContext, num_train_timesteps: int) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = qrange(bits, narrow=False)
        self.ctx = ctx
        self.num_train_timesteps = num_train_timesteps
        self.mode = "float"
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.generator: Optional[nn.Module] = None
        self.register_buffer("table", None)
        self.observer: Optional[ActObserver] = None

    def set_mode(self, mode: str) -> None:
        if mode not in ACT_MODES:
            raise ConfigError(f"activation quantizer mode {mode!r} is not one of {ACT_MODES}")
        if mode == "tdq" and self.generator is None:
            raise ConfigError("mode 'tdq' needs a TDQ generator attached first")
        if mode == "table" and self.table is None:
            raise ConfigError("mode 'table' needs a frozen scale table (call freeze first)")
        self.mode = mode

    def current_scale(self, ndim: int) -> Tensor:
        """The scale used for the current batch, shaped to broadcast over ``ndim``-d activations."""
        if self.mode == "static":
            return self.scale
        t = self.ctx.require()
        if self.mode == "tdq":
            return batch_view(self.generator(t), ndim)
        return batch_view(self.table[t], ndim)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "float":
            return x
        if self.mode == "observe":
            self.observer.update(x, self.ctx.require())
            return x
        return fake_quant(x, self.current_scale(x.ndim), self.qmin, self.qmax)

    @torch.no_grad()
    def scales_for(self, timesteps: Tensor) -> Tensor:
        """The scale each timestep in ``timesteps`` gets in the current mode (``[len(timesteps)]``)."""
        if self.mode == "static":
            return self.scale.detach().expand(len(timesteps)).clone()
        if self.mode == "tdq":
            return self.generator(timesteps).detach().reshape(-1)
        if self.mode == "table":
            return self.table[timesteps].clone()
        raise ConfigError(f"an activation quantizer in mode {self.mode!r} has no scale")

    @torch.no_grad()
    def freeze(self) -> None:
        """Evaluate the scale for every training timestep into ``table`` ``[T]`` and switch to table mode."""
        table = self.scales_for(torch.arange(self.num_train_timesteps, device=self.scale.device)).float()
        if not bool(torch.isfinite(table).all()) or bool((table <= 0).any()):
            raise DataError("a learned activation scale is non-positive or NaN; calibration diverged")
        self.table = table
        self.mode = "table"

    def prepare_frozen(self) -> None:
        self.table = torch.ones(self.num_train_timesteps)
        self.mode = "table"

    def observe(self, cap: int, seed: int) -> None:
        self.observer = ActObserver(cap, seed)
        self.mode = "observe"
