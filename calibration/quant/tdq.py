"""TDQ interval generators (So et al. 2023, arXiv 2306.02316): one small MLP per activation quantizer predicts the
step size from the timestep alone, ``s(t) = softplus(MLP(enc(t)))``, so every scale can be precomputed per timestep.

``enc(t)`` is the geometric Fourier encoding ``[sin(t·ω_i), cos(t·ω_i)]`` with ``ω_i = base^(−i/F)``, i < F
frequencies; the MLP has ``layers`` ReLU layers of width ``hidden`` and a linear output (:class:`GeneratorConfig`'s
defaults, F = 64, base 10000, 3 × 64, are the paper's). Unlike the original code (which only set the last bias from
one value pooled over all timesteps), the generators here start from per-timestep statistics: the MLP is regressed
onto the per-timestep scales the calibration data gives (``fit_generator``), so s(t) starts as the per-timestep
optimum, not a constant.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdqrt.calibration.quant.qmodel import QuantizedModel
from tdqrt.engines.config import check_int, check_real


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of every TDQ generator: Fourier frequencies, encoding base, hidden width and depth."""

    frequencies: int = 64
    base: float = 10000.0
    hidden: int = 64
    layers: int = 3

    def __post_init__(self) -> None:
        for name in ("frequencies", "hidden", "layers"):
            check_int(f"GeneratorConfig.{name}", getattr(self, name), 1, flag=f"--option {name}")
        check_real("GeneratorConfig.base", self.base, above=1.0, finite=False, flag="--option base")


class TdqGenerator(nn.Module):
    """``t`` (LongTensor ``[B]``) -> positive step sizes ``[B]`` (float32).

    The MLP runs in float64 and rounds its output to float32: float32 GEMMs give results that differ in the last
    bit with the batch shape, so the scale of timestep t would depend on which timesteps share the batch, and the
    frozen table (evaluated on all T timesteps at once) could differ by one ulp from what training used — enough
    to flip a code at a rounding tie. In float64 that difference is ~1e-16 and vanishes in the rounding.
    """

    def __init__(self, cfg: GeneratorConfig = GeneratorConfig()) -> None:
        super().__init__()
        self.register_buffer("omega", cfg.base ** (-torch.arange(cfg.frequencies, dtype=torch.float64) / cfg.frequencies))
        dims = [2 * cfg.frequencies] + [cfg.hidden] * cfg.layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*body, nn.Linear(cfg.hidden, 1))
        self.double()

    def encode(self, t: Tensor) -> Tensor:
        angles = t.double().unsqueeze(-1) * self.omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return F.softplus(self.mlp(self.encode(t))).squeeze(-1).float()


def inverse_softplus(s: Tensor) -> Tensor:
    return s + torch.log(-torch.expm1(-s))


def fit_generator(gen: TdqGenerator, timesteps: Tensor, scales: Tensor, *, steps: int = 300, lr: float = 1e-2,
                  seed: int = 0) -> float:
    """Regress ``gen`` onto per-timestep ``scales`` (relative error in log space); returns the final max rel. error.

    The last bias starts at softplus⁻¹(geometric mean) so the fit only has to learn the variation over t.
    """
    torch.manual_seed(seed)
    target = torch.log(scales.float())
    with torch.no_grad():
        gen.mlp[-1].bias.fill_(float(inverse_softplus(scales.float().log().mean().exp())))
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = (torch.log(gen(timesteps)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        return float(((gen(timesteps) - scales).abs() / scales).max())


def attach_generators(qm: QuantizedModel, cfg: GeneratorConfig = GeneratorConfig()) -> None:
    """Give every activation quantizer of ``qm`` a fresh generator (its parameters then live in the state dict)."""
    device = next(qm.parameters()).device
    for q in qm.act_quantizers():
        q.generator = TdqGenerator(cfg).to(device)


def dense_targets(timesteps: list[int], scales: Tensor, num_train_timesteps: int) -> Tensor:
    """Per-timestep scales for every training timestep: log-linear interpolation between the calibrated
    timesteps, constant beyond the first/last one.

    The Fourier encoding has periods down to ~6 timesteps, so a generator fitted only at calibration timesteps
    (spaced by tens of steps) is free to swing between them; fitting it on this dense curve pins every integer t.
    """
    grid = np.arange(num_train_timesteps)
    return torch.from_numpy(np.exp(np.interp(grid, np.asarray(timesteps), np.log(scales.double().numpy())))).float()


def init_generators_from_observers(qm: QuantizedModel, method: str, p: float, *, fit_steps: int = 300) -> dict:
    """Fit each generator to its quantizer's per-timestep scales (``minmax`` or ``mse`` per timestep).

    Requires the quantizers to have observed the calibration set (``ActObserver``); switches them to ``tdq`` mode
    and drops the observers. Returns ``{"max_rel_fit_error": …}`` over all layers and timesteps for the record.
    """
    worst = 0.0
    grid = torch.arange(qm.num_train_timesteps)
    for q in qm.act_quantizers():
        ts = q.observer.timesteps
        scales = torch.tensor([q.observer.scale(method, q.qmin, q.qmax, p, t=t) for t in ts])
        target = dense_targets(ts, scales, qm.num_train_timesteps)
        device = q.generator.omega.device
        worst = max(worst, fit_generator(q.generator, grid.to(device), target.to(device), steps=fit_steps))
        q.observer = None
        q.set_mode("tdq")
    return {"max_rel_fit_error": worst}


def generator_config_of(options) -> GeneratorConfig:
    """The generator shape a method's options ask for (their ``frequencies``/``base``/``hidden``/``layers``)."""
    return GeneratorConfig(**{k: getattr(options, k) for k in ("frequencies", "base", "hidden", "layers")
                              if hasattr(options, k)})


def prepare_load(qm: QuantizedModel, options) -> None:
    """Load preparation of every method with an ``act_scale`` option: with ``act_scale="tdq"`` a fresh quantized
    model gets generators of the saved shape (:func:`generator_config_of`), so the checkpoint's state dict loads."""
    if options.act_scale == "tdq":
        attach_generators(qm, generator_config_of(options))
