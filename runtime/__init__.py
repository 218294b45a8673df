"""Noise schedules, DDPM/DDIM samplers with classifier-free guidance, the per-step correction hook, and the
backend-agnostic sampling loop. Imports only ``tdqrt.engines``: a deployment host needs nothing else."""
from tdqrt.runtime.sampling import (
    NoiseSource,
    Sampler,
    SamplerConfig,
    StepHook,
    StepInfo,
    guided_eps,
    make_timesteps,
    sample,
)
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

__all__ = [
    "ScheduleConfig",
    "NoiseSchedule",
    "SamplerConfig",
    "Sampler",
    "StepInfo",
    "StepHook",
    "NoiseSource",
    "make_timesteps",
    "guided_eps",
    "sample",
]
