"""Noise schedules, DDPM/DDIM samplers with classifier-free guidance, the per-step correction hook, the D² / PTQD
statistics table and corrections, and the backend-agnostic sampling loop. Imports only ``tdqrt.engines``: a
deployment host needs nothing else."""
from tdqrt.runtime.corrections import (
    DeterministicD2,
    EpsCorrection,
    PTQDCorrection,
    StochasticD2,
    make_correction,
)
from tdqrt.runtime.d2 import D2Settings, D2Table, check_settings
from tdqrt.runtime.runnable import RunnableModel, is_deployed, open_deployed
from tdqrt.runtime.sampling import (
    EpsPrediction,
    NoiseSource,
    Sampler,
    SamplerConfig,
    StepHook,
    StepInfo,
    as_eps_denoiser,
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
    "EpsPrediction",
    "as_eps_denoiser",
    "sample",
    "D2Settings",
    "D2Table",
    "check_settings",
    "EpsCorrection",
    "StochasticD2",
    "DeterministicD2",
    "PTQDCorrection",
    "make_correction",
    "RunnableModel",
    "is_deployed",
    "open_deployed",
]
