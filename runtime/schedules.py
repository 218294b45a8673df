"""Forward-process noise schedules (the betas and cumulative alphas ``ᾱ_t`` of DDPM) and the model-side settings
of a diffusers scheduler config.

The beta kinds reproduce diffusers' ``DDPMScheduler(beta_schedule=...)`` / ``trained_betas`` definitions exactly,
so models trained with diffusers (or with our trainer) are sampled with the very ``ᾱ_t`` they were trained on. The
tables are kept in float64: the samplers derive their per-step coefficients from them once.

Besides the betas, a :class:`ScheduleConfig` holds what a diffusers ``scheduler_config.json`` says about the model
and how its own DDIM/DDPM scheduler walks it: what the network predicts (``prediction_type``), whether x0 is
clipped, the timestep grid (``timestep_spacing``/``steps_offset``, used by the sampler's "scheduler" spacing), the
final ᾱ of DDIM and the DDPM variance. Every new field defaults to the behaviour tdqrt had before it existed, so
saved configs keep their meaning. :meth:`ScheduleConfig.from_diffusers` reads such a config.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from tdqrt.engines.config import (check_bool, check_choice, check_int, check_real, config_from_dict, invalid,
                                  is_real)

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear", "trained")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

#: diffusers' ``beta_schedule`` names → :attr:`ScheduleConfig.kind`.
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
#: Scheduler classes whose config describes a discrete DDPM forward process (betas over T integer timesteps): their
#: beta and prediction fields define the model, whichever sampler they were saved with; tdqrt samples it with its
#: own DDIM/DDPM, reading the DDIM/DDPM fields the way ``DDIMScheduler.from_config(config)`` would.
DIFFUSERS_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler",
)
#: Defaults of diffusers' ``DDIMScheduler``/``DDPMScheduler`` for the fields :meth:`ScheduleConfig.from_diffusers`
#: reads (a key missing from a config means this value, as in diffusers).
DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
    "steps_offset": 0, "timestep_spacing": "leading", "set_alpha_to_one": True, "variance_type": "fixed_small",
}
# Options that change the model or the sampler in ways tdqrt's DDIM/DDPM do not implement: key -> the only accepted
# values (diffusers' defaults) and the fix that the refusal names.
_UNSUPPORTED = {
    "thresholding": ((False, None), "dynamic thresholding is not implemented; use clip_sample instead"),
    "rescale_betas_zero_snr": ((False, None), "zero-terminal-SNR betas (ᾱ_T = 0) are not supported; use a model "
                               "trained with a standard beta schedule"),
    "timestep_type": (("discrete", None), "continuous-time models are not supported; use a discrete-timestep model"),
    "alpha_transform_type": (("cosine", None), "only the cosine ᾱ of squaredcos_cap_v2 is supported"),
}


@dataclass(frozen=True)
class ScheduleConfig:
    """Which beta schedule a model was trained with, what it predicts, and how its DDIM/DDPM scheduler samples it.

    ``beta_start``/``beta_end`` are used by "linear" and "scaled_linear"; "cosine" (Nichol & Dhariwal's
    squared-cosine ᾱ, diffusers' "squaredcos_cap_v2") has no free parameters besides T; "trained" takes the betas
    from ``trained_betas`` (T values in (0, 1), diffusers' ``trained_betas``).

    The remaining fields carry diffusers' meaning (``DDIMScheduler``/``DDPMScheduler``):

    * ``prediction_type``: the network outputs ε ("epsilon"), v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 ("v_prediction") or
      x0 ("sample"); the sampler converts the output to ε (:meth:`NoiseSchedule.eps_from_output`).
    * ``clip_sample``/``clip_sample_range``: clip the predicted x0 to ±range in every step.
    * ``timestep_spacing`` ("leading", "trailing", "linspace") and ``steps_offset``: the grid of the sampler's
      "scheduler" spacing (:func:`tdqrt.runtime.sampling.make_timesteps`).
    * ``set_alpha_to_one``: DDIM's ᾱ after the last step is 1 (else ᾱ_0).
    * ``variance_type``: DDPM's noise variance, the posterior β̃_t ("fixed_small") or β_t ("fixed_large").
    """

    kind: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: Optional[tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = True
    variance_type: str = "fixed_small"

    def __post_init__(self) -> None:
        check_choice("ScheduleConfig.kind", self.kind, SCHEDULE_KINDS, flag="--schedule")
        T = check_int("ScheduleConfig.num_train_timesteps", self.num_train_timesteps, 2,
                      fix="give the number of diffusion steps the model was trained with, usually 1000")
        for name in ("beta_start", "beta_end"):
            value = check_real(f"ScheduleConfig.{name}", getattr(self, name), above=0.0, below=1.0,
                               fix="give a number in (0, 1), e.g. 1e-4 / 0.02")
            object.__setattr__(self, name, value)  # canonical float so to_dict round-trips exactly
        if self.beta_start > self.beta_end:
            raise invalid("ScheduleConfig.beta_start", self.beta_start, f"<= beta_end={self.beta_end}",
                          "betas must grow with t, swap the two values")
        self._check_trained_betas(T)
        check_choice("ScheduleConfig.prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_bool("ScheduleConfig.clip_sample", self.clip_sample)
        object.__setattr__(self, "clip_sample_range", check_real(
            "ScheduleConfig.clip_sample_range", self.clip_sample_range, above=0.0,
            fix="give the x0 clipping bound, a number > 0 (1.0 for images in [-1, 1])"))
        check_int("ScheduleConfig.steps_offset", self.steps_offset, 0, T - 1,
                  fix="give the scheduler config's steps_offset, usually 0 or 1")
        check_choice("ScheduleConfig.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check_bool("ScheduleConfig.set_alpha_to_one", self.set_alpha_to_one)
        check_choice("ScheduleConfig.variance_type", self.variance_type, VARIANCE_TYPES)

    def _check_trained_betas(self, T: int) -> None:
        betas = self.trained_betas
        if (self.kind == "trained") != (betas is not None):
            raise invalid("ScheduleConfig.trained_betas", f"{'no' if betas is None else 'a'} list with "
                          f"kind={self.kind!r}", "a list of betas exactly when kind='trained'",
                          "give kind='trained' together with trained_betas, or neither")
        if betas is None:
            return
        if (not isinstance(betas, (list, tuple)) or len(betas) != T
                or not all(is_real(b) and 0.0 < b < 1.0 for b in betas)):
            shown = f"{len(betas)} values" if isinstance(betas, (list, tuple)) else betas
            raise invalid("ScheduleConfig.trained_betas", shown,
                          f"num_train_timesteps={T} numbers in (0, 1)",
                          "give one beta per training timestep (diffusers' trained_betas)")
        object.__setattr__(self, "trained_betas", tuple(float(b) for b in betas))  # hashable, JSON round-trips

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleConfig":
        """Read :meth:`to_dict`'s output; a dict saved before a field existed gets the field's default."""
        return config_from_dict(cls, d)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "scheduler config") -> "ScheduleConfig":
        """The schedule of a diffusers ``scheduler_config.json`` (a dict; ``source`` names it in messages).

        Reads the beta and prediction fields of any scheduler in ``DIFFUSERS_SCHEDULERS`` and the DDIM/DDPM fields
        (clip_sample, steps_offset, timestep_spacing, set_alpha_to_one, variance_type) as
        ``DDIMScheduler.from_config`` does: a missing key means diffusers' default (``DIFFUSERS_DEFAULTS``; note
        clip_sample defaults to True there). Settings of other samplers (PNDM's skip_prk_steps, Karras sigmas,
        solver orders, ...) are ignored: tdqrt samples with its own DDIM/DDPM. What tdqrt cannot honour raises a
        one-line ``ConfigError`` naming the option: another scheduler class, thresholding,
        rescale_betas_zero_snr, continuous timesteps, a learned variance, an unknown beta_schedule,
        prediction_type or timestep_spacing.
        """
        if not isinstance(config, Mapping):
            raise invalid(source, type(config).__name__, "a JSON object (a diffusers scheduler config)",
                          "pass the parsed scheduler_config.json")
        name = config.get("_class_name")
        if name is not None and name not in DIFFUSERS_SCHEDULERS:
            raise invalid(f"{source} _class_name", name, f"one of {', '.join(DIFFUSERS_SCHEDULERS)}",
                          "use a model trained as a discrete DDPM (epsilon, v or sample prediction)")
        for key, (accepted, why) in _UNSUPPORTED.items():
            if config.get(key) not in accepted:
                raise invalid(f"{source} {key}", config[key], repr(accepted[0]), why)
        c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}
        variance = {"fixed_small_log": "fixed_small"}.get(c["variance_type"], c["variance_type"])  # same std
        if variance not in VARIANCE_TYPES:
            raise invalid(f"{source} variance_type", c["variance_type"], "fixed_small or fixed_large",
                          "a learned variance needs the model's extra output channels, which tdqrt does not use")
        if c["trained_betas"] is None:
            kind = check_choice(f"{source} beta_schedule", c["beta_schedule"], tuple(DIFFUSERS_BETA_SCHEDULES),
                                fix="use a model trained with one of those schedules or give trained_betas")
            kind = DIFFUSERS_BETA_SCHEDULES[kind]
        else:
            kind = "trained"
        check_choice(f"{source} prediction_type", c["prediction_type"], PREDICTION_TYPES,
                     fix="tdqrt samples epsilon, v_prediction and sample models")
        check_choice(f"{source} timestep_spacing", c["timestep_spacing"], TIMESTEP_SPACINGS)
        return cls(kind=kind, num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"],
                   beta_end=c["beta_end"], trained_betas=c["trained_betas"], prediction_type=c["prediction_type"],
                   clip_sample=c["clip_sample"], clip_sample_range=c["clip_sample_range"],
                   steps_offset=c["steps_offset"], timestep_spacing=c["timestep_spacing"],
                   set_alpha_to_one=c["set_alpha_to_one"], variance_type=variance)


def _betas(config: ScheduleConfig) -> torch.Tensor:
    T = config.num_train_timesteps
    if config.kind == "trained":
        return torch.tensor(config.trained_betas, dtype=torch.float64)
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
        self._placed: dict[torch.device, Tensor] = {}

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``sqrt(ᾱ_t)`` and ``sqrt(1 − ᾱ_t)`` per sample, taken in float64 on ``like``'s device (the table is moved
        there once) and cast to its dtype, shaped ``[B, 1, ...]`` to broadcast against it."""
        if like.device not in self._placed:
            self._placed[like.device] = self.alphas_cumprod.to(like.device)
        a = self._placed[like.device][t.to(like.device).long().reshape(-1)]
        a = a.reshape(-1, *([1] * (like.dim() - 1)))
        return a.sqrt().to(like.dtype), (1.0 - a).sqrt().to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``q(x_t | x_0)``: ``sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise`` (DDPM eq. 4), ``t`` a LongTensor ``[B]``.

        The coefficients are taken in float64 and cast to ``x0``'s dtype/device, so training in any precision
        sees the same noise levels.
        """
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a network of this schedule's ``prediction_type`` is trained to output for
        ``x_t = add_noise(x0, noise, t)``: ε ("epsilon"), v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 ("v_prediction",
        diffusers' ``DDPMScheduler.get_velocity``) or x0 ("sample"); :meth:`eps_from_output` maps it back to ε."""
        if self.config.prediction_type == "epsilon":
            return noise
        if self.config.prediction_type == "sample":
            return x0
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def eps_from_output(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The ε that a network output of this schedule's ``prediction_type`` stands for, at ``x = x_t``:

            epsilon:       ε = output
            v_prediction:  ε = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t        (v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0)
            sample:        ε = (x_t − sqrt(ᾱ_t)·x0) / sqrt(1 − ᾱ_t)

        (the ``pred_epsilon`` of diffusers' ``DDIMScheduler.step``), with ``t`` the training timesteps ``[B]``. The
        result has ``x``'s dtype. The map is affine in the output with weights that depend only on (x_t, t), so it
        commutes with classifier-free guidance's combination ``u + g·(c − u)`` (weights 1 − g and g sum to 1).
        """
        if self.config.prediction_type == "epsilon":
            return output
        output = output.to(x.dtype)
        a, s = self._coefficients(t, x)
        if self.config.prediction_type == "v_prediction":
            return a * output + s * x
        return (x - a * output) / s

