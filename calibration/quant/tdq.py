"""TDQ interval generators (So et al. 2023): one small MLP per activation quantizer predicts the step size
from the timestep alone, ``s(t) = softplus(MLP(enc(t)))``, so every scale can be precomputed per timestep.

``enc(t)`` is the geometric Fourier encoding ``[sin(t·ω_i), cos(t·ω_i)]`` with ``ω_i = base^(−i/F)``,
i < F = 64 frequencies, base 10000 (methods-tdq-brecq.md §1.2); the MLP is 3 × 64 ReLU layers and a linear
output. Unlike the original code (which only set the last bias from one value pooled over all timesteps), the
generators here start from per-timestep statistics: the MLP is regressed onto the per-timestep scales the
calibration data gives (``fit_generator``), so s(t) starts as the per-timestep optimum, not a constant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdqrt.calibration.quant.qmodel import QuantizedModel
from tdqrt.engines.errors import ConfigError


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of every TDQ generator: Fourier frequencies, encoding base, hidden width and depth."""

    frequencies: int = 64
    base: float = 10000.0
    hidden: int = 64
    layers: int = 3

    def __post_init__(self) -> None:
        if self.frequencies < 1 or self.hidden < 1 or self.layers < 1 or not self.base > 1:
            raise ConfigError(f"invalid TDQ generator shape {self}")


class TdqGenerator(nn.Module):
    """``t`` (LongTensor ``[B]``) -> positive step sizes ``[B]``."""

    def __init__(self, cfg: GeneratorConfig = GeneratorConfig()) -> None:
        super().__init__()
        self.register_buffer("omega", cfg.base ** (-torch.arange(cfg.frequencies, dtype=torch.float32) / cfg.frequencies))
        dims = [2 * cfg.frequencies] + [cfg.hidden] * cfg.layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*body, nn.Linear(cfg.hidden, 1))

    def encode(self, t: Tensor) -> Tensor:
        angles = t.float().unsqueeze(-1) * self.omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return F.softplus(self.mlp(self.encode(t))).squeeze(-1)


def inverse_softplus(s: Tensor) -> Tensor:
    return s + torch.log(-torch.expm1(-s))


def fit_generator(gen: TdqGenerator, timesteps: Tensor, scales: Tensor, *, steps: int = 300, lr: float = 3e-3,
                  seed: int = 0) -> float:
    """Regress ``gen`` onto per-timestep ``scales`` (relative error in log space); returns the final max rel. error.

    The last bias starts at softplus⁻¹(geometric mean) so the fit only has to learn the variation over t.
    """
    torch.manual_seed(seed)
    target = torch.log(scales.float())
    with torch.no_grad():
        gen.mlp[-1].bias.fill_(float(inverse_softplus(scales.float().log().mean().exp())))
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    for _ in range(steps):
        loss = (torch.log(gen(timesteps)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((gen(timesteps) - scales).abs() / scales).max())


def attach_generators(qm: QuantizedModel, cfg: GeneratorConfig = GeneratorConfig()) -> None:
    """Give every activation quantizer of ``qm`` a fresh generator (its parameters then live in the state dict)."""
    device = next(qm.parameters()).device
    for q in qm.act_quantizers():
        q.generator = TdqGenerator(cfg).to(device)


def init_generators_from_observers(qm: QuantizedModel, method: str, p: float, *, fit_steps: int = 300) -> dict:
    """Fit each generator to its quantizer's per-timestep scales (``minmax`` or ``mse`` per timestep).

    Requires the quantizers to have observed the calibration set (``ActObserver``); switches them to ``tdq`` mode
    and drops the observers. Returns ``{"max_rel_fit_error": …}`` over all layers for the record.
    """
    worst = 0.0
    for q in qm.act_quantizers():
        ts = q.observer.timesteps
        scales = torch.tensor([q.observer.scale(method, q.qmin, q.qmax, p, t=t) for t in ts])
        device = q.generator.omega.device
        worst = max(worst, fit_generator(q.generator, torch.tensor(ts, device=device), scales.to(device),
                                         steps=fit_steps))
        q.observer = None
        q.set_mode("tdq")
    return {"max_rel_fit_error": worst}


def generator_config_of(options) -> GeneratorConfig:
    return GeneratorConfig(**{k: getattr(options, k) for k in ("frequencies", "base", "hidden", "layers")
                              if hasattr(options, k)})

