"""Forward-process noise schedules (the betas and cumulative alphas ``ᾱ_t`` of DDPM).

The three kinds reproduce diffusers' ``DDPMScheduler(beta_schedule=...)`` definitions exactly, so models
trained with diffusers (or with our trainer) are sampled with the very ``ᾱ_t`` they were trained on. The
tables are kept in float64: the samplers derive their per-step coefficients from them once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tdqrt.engines.config import check_choice, check_int, check_real, config_from_dict, invalid

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear")


@dataclass(frozen=True)
class ScheduleConfig:
    """Which beta schedule a model was trained with.

    ``beta_start``/``beta_end`` are used by "linear" and "scaled_linear"; "cosine" (Nichol & Dhariwal's
    squared-cosine ᾱ, diffusers' "squaredcos_cap_v2") has no free parameters besides T.
    """

    kind: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        check_choice("ScheduleConfig.kind", self.kind, SCHEDULE_KINDS, flag="--schedule")
        check_int("ScheduleConfig.num_train_timesteps", self.num_train_timesteps, 2,
                  fix="give the number of diffusion steps the model was trained with, usually 1000")
        for name in ("beta_start", "beta_end"):
            value = check_real(f"ScheduleConfig.{name}", getattr(self, name), above=0.0, below=1.0,
                               fix="give a number in (0, 1), e.g. 1e-4 / 0.02")
            object.__setattr__(self, name, value)  # canonical float so to_dict round-trips exactly
        if self.beta_start > self.beta_end:
            raise invalid("ScheduleConfig.beta_start", self.beta_start, f"<= beta_end={self.beta_end}",
                          "betas must grow with t, swap the two values")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleConfig":
        return config_from_dict(cls, d)


def _betas(config: ScheduleConfig) -> torch.Tensor:
    T = config.num_train_timesteps
    if config.kind == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    if config.kind == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2

    # "cosine": Improved DDPM eq. 17, ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) with s = 0.008, discretised as
    # β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999) (diffusers' betas_for_alpha_bar / "squaredcos_cap_v2").
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float64
    )


class NoiseSchedule:
    """Tables ``betas`` and ``alphas_cumprod`` (float64, shape ``[T]``) of one :class:`ScheduleConfig`."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config if config is not None else ScheduleConfig()
        self.betas = _betas(self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t = Π_{s<=t} (1 − β_s)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``q(x_t | x_0)``: ``sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise`` (DDPM eq. 4), ``t`` a LongTensor ``[B]``.

        The coefficients are taken in float64 and cast to ``x0``'s dtype/device, so training in any precision
        sees the same noise levels.
        """
        a = self.alphas_cumprod.to(x0.device)[t.to(x0.device).long()]
        a = a.reshape(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt().to(x0.dtype) * x0 + (1.0 - a).sqrt().to(x0.dtype) * noise
