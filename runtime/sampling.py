"""DDIM/DDPM samplers, classifier-free guidance, the per-step correction hook and the sampling loop.

Everything here talks to the network only through the ``Denoiser`` protocol ``eps = f(x, t, y)``, so a torch
module, an ONNX Runtime session or a TensorRT engine are sampled by the same code. Both samplers share one
update, DDIM eq. 12 (Song et al. 2021, https://arxiv.org/abs/2010.02502):

    x0    = (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)
    x_p   = sqrt(ᾱ_p)·x0 + sqrt(1 − ᾱ_p − σ²)·ε + σ·z
    σ_t   = η·sqrt((1 − ᾱ_p)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_p)                       (DDIM eq. 16)

With η = 1, σ² is the DDPM posterior variance β̃ ("fixed_small", Ho et al. 2020 eq. 7) and the update is
exactly ancestral sampling from q(x_p | x_t, x0) on the (possibly strided) timestep grid, so "ddpm" is this
update with η = 1.

The schedule's scheduler settings (:class:`~tdqrt.runtime.schedules.ScheduleConfig`) are honoured as diffusers'
``DDIMScheduler.step`` / ``DDPMScheduler.step`` do, so an imported model samples as its own pipeline would:
the network output is converted to ε once per model call (:class:`EpsPrediction`; everything downstream — CFG,
step hooks, corrections, D² statistics — sees ε), x0 is clipped with ``clip_sample`` ("ddim" keeps ε as
``use_clipped_model_output=False`` does; "ddpm" takes the posterior mean of the clipped x0, i.e. the ε it
implies), "ddpm" with ``variance_type="fixed_large"`` injects σ = sqrt(β_t) (no noise at t = 0) around the same
posterior mean, and "ddim" ends at ᾱ = 1 or ᾱ_0 (``set_alpha_to_one``).

Noise is drawn per sample from its own counter-based stream (:class:`NoiseSource`), which makes a sample depend
only on (seed, its global index, config), not on the batch or the device: sharding a run over processes or moving
it to a GPU reproduces it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tdqrt.engines.denoiser import Denoiser
from tdqrt.engines.errors import ConfigError, DataError
from tdqrt.engines.config import check_choice, check_int, check_real, config_from_dict
from tdqrt.engines.progress import progress_bar
from tdqrt.runtime.philox import normal_from_words, philox4x32_words
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

SAMPLER_KINDS = ("ddim", "ddpm")
NOISE_CHUNK_BYTES = {"cpu": 1 << 20, "accelerator": 16 << 20}  # output per batched noise evaluation (NoiseSource.draws)
SPACINGS = ("uniform", "quadratic", "scheduler")


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: sampler kind, number of steps, DDIM η, timestep spacing and CFG scale.

    ``eta`` only matters for "ddim" ("ddpm" is the ancestral sampler, i.e. η = 1). ``guidance_scale`` 1.0
    means a single plain model call per step (no classifier-free guidance). ``spacing`` (:func:`make_timesteps`):
    "uniform" (tdqrt's own grid, diffusers' "leading" without offset), "quadratic", or "scheduler" — the grid of
    the model's scheduler config (its timestep_spacing and steps_offset), the spacing for imported diffusers models.
    """

    kind: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "uniform"
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice("SamplerConfig.kind", self.kind, SAMPLER_KINDS, flag="--sampler")
        check_int("SamplerConfig.steps", self.steps, 1, flag="--steps", fix="give an integer >= 1 (e.g. 50)")
        # canonical floats so to_dict round-trips exactly
        object.__setattr__(self, "eta", check_real(
            "SamplerConfig.eta", self.eta, 0.0, 1.0, flag="--eta",
            fix="give a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)"))
        check_choice("SamplerConfig.spacing", self.spacing, SPACINGS, flag="--spacing")
        object.__setattr__(self, "guidance_scale", check_real(
            "SamplerConfig.guidance_scale", self.guidance_scale, 0.0, flag="--guidance",
            fix="give a finite number >= 0 (1.0 = no classifier-free guidance)"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamplerConfig":
        return config_from_dict(cls, d)


def make_timesteps(num_train_timesteps: int, steps: int, spacing: str,
                   schedule: Optional[ScheduleConfig] = None) -> Tensor:
    """The descending grid of training timesteps visited by a ``steps``-step sampler.

    "uniform" is diffusers' "leading" spacing with steps_offset 0: ``arange(steps)·(T//steps)`` reversed.
    "quadratic" is the DDIM paper's "quad" grid ``int(linspace(0, sqrt(0.8·T), steps)²)``, denser at small t.
    "scheduler" is the grid of diffusers' ``DDIMScheduler``/``DDPMScheduler.set_timesteps`` for ``schedule``'s
    ``timestep_spacing`` and ``steps_offset`` (required then): "leading" ``arange(K)·(T//K) + steps_offset``,
    "trailing" ``round(arange(T, 0, −T/K)) − 1``, "linspace" ``round(linspace(0, T − 1, K))``, descending.
    """
    T = num_train_timesteps
    check_int("steps", steps, 1, T, flag="--steps", fix=f"use 1 <= steps <= {T} (the schedule's T)")
    if spacing == "scheduler":
        return _scheduler_timesteps(T, steps, schedule)
    if spacing == "uniform":
        grid = np.arange(steps, dtype=np.int64) * (T // steps)
    elif spacing == "quadratic":
        grid = (np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(np.int64)
        if len(np.unique(grid)) != steps:
            raise ConfigError(
                f"quadratic spacing with steps={steps} and T={T} repeats timesteps (its first gaps are < 1); "
                "use fewer steps or spacing='uniform'."
            )
    else:
        check_choice("spacing", spacing, SPACINGS, flag="--spacing")
    return torch.from_numpy(grid[::-1].copy())


def _scheduler_timesteps(T: int, steps: int, schedule: Optional[ScheduleConfig]) -> Tensor:
    """The "scheduler" grid of :func:`make_timesteps` (diffusers' set_timesteps, literally)."""
    if schedule is None or schedule.num_train_timesteps != T:
        raise ConfigError("spacing 'scheduler' needs the model's ScheduleConfig (its timestep_spacing and "
                          "steps_offset) with the same num_train_timesteps; pass schedule=, or use 'uniform'.")
    if schedule.timestep_spacing == "linspace":
        grid = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        grid = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:  # "trailing"
        grid = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    if len(grid) != steps or grid.max() >= T or len(np.unique(grid)) != steps:
        raise ConfigError(
            f"timestep_spacing={schedule.timestep_spacing!r} with steps_offset={schedule.steps_offset}, "
            f"steps={steps} and T={T} gives the grid {grid[:8].tolist()}..., not {steps} distinct timesteps "
            f"below {T}; use fewer steps or spacing='uniform'."
        )
    return torch.from_numpy(grid.copy())


@dataclass(frozen=True)
class StepInfo:
    """What a :class:`StepHook` knows about the step it is called for."""

    index: int  # 0 .. K-1 in sampling order
    t: int  # training timestep of this step
    t_prev: int  # next (smaller) timestep, -1 after the last step
    alpha_bar: float
    alpha_bar_prev: float  # the ᾱ the update steps to (Sampler.alpha_bar_prev)
    sigma: float  # the sampler's own noise std for this step (0 for DDIM eta=0)


class StepHook(Protocol):
    """Per-step correction: gets the (CFG-combined) eps and returns ``(eps', sigma')``.

    ``sigma'`` is a float or a tensor broadcastable to ``x`` (e.g. per-channel ``[1, C, 1, 1]``); the update then
    uses ``sqrt(max(0, 1 − ᾱ_p − σ'²))`` as the direction coefficient and ``σ'·z`` as the injected noise. Returning
    ``(eps, info.sigma)`` leaves the sampler unchanged. The hook may draw extra noise from ``noise``; it is called
    before the step's own ``z`` is drawn.
    """

    def __call__(
        self, info: StepInfo, x: Tensor, eps: Tensor, noise: "NoiseSource"
    ) -> tuple[Tensor, Union[Tensor, float]]: ...


class NoiseSource:
    """Per-sample standard-normal streams from the counter-based Philox4x32-10 (:mod:`tdqrt.runtime.philox`).

    Sample ``index`` of ``seed`` has the key ``SeedSequence([seed, index])`` (a hash-based mixer, so neighbouring
    indices or seeds give unrelated streams); element block ``j`` of its ``d``-th draw is the counter
    ``(j, d, 0, 0)``. A value therefore depends only on (seed, global sample index, draw number, position): not
    on the batch it is computed in, nor on the device — CPU and CUDA give the same integers, and normals equal to
    float32 rounding of one float64 ulp. A whole batch's draw is one vectorised evaluation (no launch per sample),
    and :meth:`draws` evaluates several draws at once.

    ``stream`` selects an independent family of streams: 0 is the sampler's (x_T and the per-step z); step hooks
    draw from :attr:`hook_noise` (stream 1), so a correction that samples (S-D²) leaves the sampler's noise, and
    hence the comparison with an uncorrected run of the same seed, untouched.
    """

    def __init__(
        self, seed: int, sample_indices: Union[Tensor, Sequence[int]], device: Union[str, torch.device] = "cpu",
        stream: int = 0,
    ) -> None:
        indices = torch.as_tensor(sample_indices, dtype=torch.long).reshape(-1).tolist()
        check_int("seed", seed, 0, flag="--seed")
        if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ConfigError(
                f"sample_indices {indices[:16]} must be a non-empty list of distinct integers >= 0 "
                "(each sample's global index); give every sample its own index."
            )
        self.device = torch.device(device)
        self.seed, self.stream = seed, stream
        self.sample_indices = indices
        keys = [np.random.SeedSequence([seed, i] if stream == 0 else [seed, i, stream]).generate_state(2)
                for i in indices]
        keys = torch.from_numpy(np.stack(keys).astype(np.int64))  # [B, 2] 32-bit words
        if self.device.type == "cuda":  # a pinned, asynchronous copy: a pageable one would synchronise the stream
            keys = keys.pin_memory()
        self.keys = keys.to(self.device, non_blocking=True)
        self.draws_taken = 0
        self._hook_noise: Optional["NoiseSource"] = None

    @property
    def hook_noise(self) -> "NoiseSource":
        """The streams step hooks draw from (stream 1 of the same seed and samples), created on first use."""
        if self._hook_noise is None:
            self._hook_noise = NoiseSource(self.seed, self.sample_indices, self.device, stream=self.stream + 1)
        return self._hook_noise

    def __len__(self) -> int:
        return len(self.sample_indices)

    def randn_many(self, count: int, shape: Sequence[int]) -> Tensor:
        """The next ``count`` draws of every sample's stream at once: float32 ``[count, B, *shape]``, equal to
        ``count`` successive :meth:`randn` calls."""
        numel = math.prod(shape)
        blocks = -(-numel // 4)  # one Philox evaluation gives 4 normals
        block = torch.arange(blocks, dtype=torch.int64, device=self.device)
        draw = torch.arange(self.draws_taken, self.draws_taken + count, dtype=torch.int64, device=self.device)
        full, zero = (count, len(self), blocks), torch.zeros_like(block)
        words = philox4x32_words(block.expand(full), draw[:, None, None].expand(full), zero, zero,
                                 self.keys[None, :, 0:1], self.keys[None, :, 1:2])
        self.draws_taken += count
        z = normal_from_words(*words).flatten(-2)[..., :numel].to(torch.float32)
        return z.reshape(count, len(self), *shape)

    def randn(self, shape: Sequence[int]) -> Tensor:
        """Next standard-normal values of every sample's stream: float32 ``[B, *shape]`` on ``device``."""
        return self.randn_many(1, shape)[0]

    def draws(self, count: int, shape: Sequence[int], chunk_bytes: Optional[int] = None) -> Iterator[Tensor]:
        """The next ``count`` draws one at a time, evaluated in chunks of up to ``chunk_bytes`` of output, so one
        batched evaluation (about a hundred element-wise ops, temporaries near ten times the chunk) serves several
        sampling steps. Default: ``NOISE_CHUNK_BYTES`` of the device type — large on an accelerator, where a chunk
        shares the kernel launches; small on the CPU, where it shares the per-op overhead without leaving the cache
        (larger CPU chunks measured slower). Draws are taken from the stream as each chunk is made."""
        if chunk_bytes is None:
            chunk_bytes = NOISE_CHUNK_BYTES["cpu" if self.device.type == "cpu" else "accelerator"]
        per_draw = 4 * len(self) * math.prod(shape)
        chunk = max(1, min(count, chunk_bytes // max(per_draw, 1)))
        left = count
        while left > 0:
            block = self.randn_many(min(chunk, left), shape)
            left -= len(block)
            yield from block


class Sampler:
    """DDIM (any η) or DDPM ancestral sampling over the grid of :func:`make_timesteps`, on ε.

    Per-step coefficients are precomputed once in float64: ``alpha_bar[i] = ᾱ_t``, ``alpha_bar_prev[i] = ᾱ_p`` and
    ``sigmas[i] = σ_t``, the std of the injected noise (:class:`StepInfo.sigma`).

    ᾱ_p is ᾱ of the next grid timestep; after the last step it is 1.0 ("ddpm", and "ddim" with the schedule's
    ``set_alpha_to_one``, so the last step returns x0) or ᾱ_0. With the "scheduler" spacing "ddim" steps to
    ᾱ[t − T//K] instead, as ``DDIMScheduler.step`` does whatever its spacing (the same timesteps for "leading",
    and for "trailing" when K divides T; "linspace" evaluates the model off that point, as in diffusers).

    σ_t is DDIM eq. 16 (η; η = 1 for "ddpm" "fixed_small"), or sqrt(β_t) = sqrt(1 − ᾱ_t/ᾱ_p) for "ddpm"
    "fixed_large" (0 at t = 0, where diffusers adds no noise). The direction coefficient of ε in the update is
    sqrt(1 − ᾱ_p − (λ_t·σ)²) with λ_t = 1 except for "fixed_large", where λ_t = β̃_t^½/σ_t keeps the posterior
    mean of DDPMScheduler (a step hook's σ' then scales the noise and the mean moves with it as in DDIM).
    """

    def __init__(self, schedule: NoiseSchedule, config: SamplerConfig) -> None:
        self.schedule = schedule
        self.config = config
        sc = schedule.config
        T = schedule.num_train_timesteps
        self.timesteps = make_timesteps(T, config.steps, config.spacing, sc)
        ab = schedule.alphas_cumprod
        ddim = config.kind == "ddim"
        fixed_large = not ddim and sc.variance_type == "fixed_large"
        if ddim and config.spacing == "scheduler":
            prev = self.timesteps - T // config.steps
        else:
            prev = torch.cat([self.timesteps[1:], torch.full((1,), -1, dtype=torch.long)])
        final = torch.tensor(1.0 if (sc.set_alpha_to_one or not ddim) else float(ab[0]), dtype=torch.float64)
        self.alpha_bar = ab[self.timesteps]
        self.alpha_bar_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], final)
        a_t, a_p = self.alpha_bar, self.alpha_bar_prev
        posterior = torch.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))  # DDIM eq. 16 with η = 1
        if ddim:
            self.sigmas = config.eta * posterior
        elif fixed_large:
            self.sigmas = torch.where(self.timesteps > 0, torch.sqrt(1 - a_t / a_p), 0.0)
        else:
            self.sigmas = posterior
        self.direction_scale = (torch.where(self.sigmas > 0, posterior / self.sigmas, 1.0) if fixed_large
                                else torch.ones_like(self.sigmas))  # λ_t
        self._clip = sc.clip_sample_range if sc.clip_sample else None
        # Whether the update can inject noise; the loop then draws z every step to keep streams aligned.
        self.stochastic = config.kind == "ddpm" or config.eta > 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def info(self, i: int) -> StepInfo:
        return StepInfo(
            index=i,
            t=int(self.timesteps[i]),
            t_prev=int(self.timesteps[i + 1]) if i + 1 < len(self) else -1,
            alpha_bar=float(self.alpha_bar[i]),
            alpha_bar_prev=float(self.alpha_bar_prev[i]),
            sigma=float(self.sigmas[i]),
        )

    def step(
        self,
        i: int,
        x: Tensor,
        eps: Tensor,
        noise: Optional[Tensor] = None,
        sigma: Union[Tensor, float, None] = None,
    ) -> Tensor:
        """One update x_t -> x_p with noise ``z = noise``; ``sigma`` overrides σ_t (float or broadcastable tensor).

        The direction coefficient is ``sqrt(max(0, 1 − ᾱ_p − (λ_t·σ)²))``, so an overridden σ larger than the step
        allows degrades gracefully. ``noise`` may be None only when the effective σ is 0 everywhere.
        """
        a_t, a_p = float(self.alpha_bar[i]), float(self.alpha_bar_prev[i])
        eps = eps.to(x.dtype)  # the update runs in x's dtype whatever a backend or hook returns
        # DDIM eq. 12: predicted x0, then x_p = sqrt(ᾱ_p)·x0 + sqrt(1 − ᾱ_p − σ²)·ε + σ·z.
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        if self._clip is not None:
            x0 = x0.clamp(-self._clip, self._clip)
            if self.config.kind == "ddpm":  # DDPMScheduler: the posterior mean of the clipped x0
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
        scale = float(self.direction_scale[i])
        if sigma is None:  # the schedule's σ_t: host floats, so a device loop copies nothing per step
            s = float(self.sigmas[i])
            d = scale * s
            x_prev = math.sqrt(a_p) * x0 + math.sqrt(max(0.0, 1.0 - a_p - d * d)) * eps
            if s == 0.0:
                return x_prev
            if noise is None:
                raise ValueError(f"step {i} has sigma > 0 but no noise tensor was given.")
            return x_prev + s * noise
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        direction = torch.sqrt(torch.clamp(1.0 - a_p - (scale * sigma) ** 2, min=0.0)).to(x.dtype)
        x_prev = math.sqrt(a_p) * x0 + direction * eps
        if noise is not None:
            return x_prev + sigma.to(x.dtype) * noise
        if x.device.type == "cpu" and bool((sigma != 0).any()):  # on a device, reading σ would synchronise
            raise ValueError(f"step {i} has sigma > 0 but no noise tensor was given.")
        return x_prev


class EpsPrediction:
    """A denoiser whose output is turned into ε: ``eps = schedule.eps_from_output(denoiser(x, t, y), x, t)``.

    Built by :func:`as_eps_denoiser` for models whose schedule predicts v or x0; every consumer of the ``Denoiser``
    protocol (the sampling loop, D² statistics, quality and speed measurements) then works on ε unchanged. The
    conversion runs once per model call, on the whole (CFG-doubled) batch, i.e. before the guidance combination;
    since it is affine with weights that depend only on (x_t, t), combining first and converting after gives the
    same ε. Attributes other than the call (``null_label``, ...) are the wrapped denoiser's.
    """

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule) -> None:
        self.denoiser = denoiser
        self.schedule = schedule

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.denoiser(x, t, y)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            return out  # guided_eps refuses it with its one clear message
        return self.schedule.eps_from_output(out, x, t)

    def __getattr__(self, name: str) -> Any:
        if name in ("denoiser", "schedule"):  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def as_eps_denoiser(denoiser: Denoiser, schedule: NoiseSchedule) -> Denoiser:
    """``denoiser`` as an ε-predictor for ``schedule``'s ``prediction_type``: itself for "epsilon" models and for
    an :class:`EpsPrediction` already (so wrapping twice is harmless), else an :class:`EpsPrediction`."""
    if schedule.config.prediction_type == "epsilon" or isinstance(denoiser, EpsPrediction):
        return denoiser
    return EpsPrediction(denoiser, schedule)


def guided_eps(
    denoiser: Denoiser,
    x: Tensor,
    t: Tensor,
    y: Optional[Tensor],
    null_label: Union[int, Tensor, None],
    scale: float,
) -> Tensor:
    """Noise prediction with classifier-free guidance: ``eps_u + scale·(eps_c − eps_u)``.

    ``scale == 1`` is a single plain call ``denoiser(x, t, y)``. Otherwise one batched call evaluates the
    conditional and unconditional halves on ``cat([x, x])`` with conditioning ``cat([y, null])`` (one engine
    launch per step instead of two): for class labels ``y`` ``[B]``, ``null`` is ``null_label`` (an int) per sample;
    for text embeddings ``y`` ``[B, L, D]``, ``null_label`` is the unconditional (empty or negative prompt)
    embedding, ``[L, D]`` (shared) or ``[B, L, D]`` (per sample). The raw output is checked: wrong shape or NaN/Inf
    raises DataError. The result is ε when ``denoiser`` predicts ε: pass v / x0 models through
    :func:`as_eps_denoiser` first (:func:`sample` does).
    """
    if scale == 1.0:
        return _checked(denoiser(x, t, y), x.shape, t)
    _require_cfg_labels(y, null_label, scale)
    out = _checked(
        denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, _null_like(y, null_label)])),
        (2 * x.shape[0], *x.shape[1:]),
        t,
    )
    eps_c, eps_u = out.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def _null_like(y: Tensor, null_label: Union[int, Tensor]) -> Tensor:
    """The unconditional half's conditioning for ``y``: the null label per sample, or the uncond embedding
    broadcast over the batch (:func:`guided_eps`)."""
    if y.is_floating_point():
        null = torch.as_tensor(null_label, dtype=y.dtype, device=y.device)
        if tuple(null.shape) not in (tuple(y.shape[1:]), tuple(y.shape)):
            raise ConfigError(f"the unconditional embedding has shape {tuple(null.shape)}, expected "
                              f"{tuple(y.shape[1:])} or {tuple(y.shape)} (like the embeddings y); pass the empty or "
                              "negative prompt's embedding")
        return null.expand(y.shape)
    return torch.full_like(y, int(null_label))


def _require_cfg_labels(y: Optional[Tensor], null_label: Union[int, Tensor, None], scale: float) -> None:
    missing = " and ".join(name for name, v in (("y", y), ("null_label", null_label)) if v is None)
    if missing:
        raise ConfigError(
            f"guidance_scale={scale} needs the conditioning y (class labels or text embeddings) and the "
            f"unconditional one (the null label or the uncond embedding); {missing} missing. "
            "Pass them, or set guidance_scale=1.0 to sample without classifier-free guidance."
        )


def _checked(eps: Tensor, shape: Sequence[int], t: Tensor) -> Tensor:
    """Shape check always; the NaN/Inf check reads the result on the host, so on CPU only (:func:`sample`
    checks device outputs once at the end, keeping the device loop free of host synchronisation)."""
    if not isinstance(eps, Tensor) or tuple(eps.shape) != tuple(shape):
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise DataError(f"denoiser returned {got} at timestep t={int(t[0])}, expected a tensor of shape "
                        f"{tuple(shape)}.")
    if eps.device.type == "cpu" and not bool(torch.isfinite(eps).all()):
        raise DataError(f"denoiser returned NaN/Inf at timestep t={int(t[0])}; check the model/engine "
                        "(overflow in fp16/int8?).")
    return eps


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: SamplerConfig,
    *,
    sample_indices: Union[Tensor, Sequence[int]],
    seed: int,
    shape: Sequence[int],
    y: Optional[Tensor] = None,
    null_label: Union[int, Tensor, None] = None,
    hook: Optional[StepHook] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
    x_T: Optional[Tensor] = None,
) -> Tensor:
    """Run the sampler from pure noise to x0; returns float32 ``[B, *shape]`` (not clamped).

    ``y``: class labels ``[B]`` with ``null_label`` the null class, or text embeddings ``[B, L, D]`` (float) with
    ``null_label`` the unconditional embedding ``[L, D]`` or ``[B, L, D]`` (:func:`guided_eps`).

    ``x_T``: the initial noise ``[B, *shape]`` to start from instead of the streams' first draw (to reproduce
    another implementation's run from its own noise, e.g. a diffusers pipeline's ``generator``); the streams
    still supply every later draw.

    ``denoiser`` outputs what ``schedule.config.prediction_type`` says; it is converted to ε per call
    (:func:`as_eps_denoiser`), so guidance and ``hook`` see ε.

    Noise draws, per sample stream: x_T first, then per step (after the denoiser and the hook) one ``z`` of
    ``shape`` — every step whenever the update can be stochastic (η > 0, "ddpm", or a hook is set, since a hook
    may make σ' > 0), never otherwise. Drawing unconditionally in those cases keeps the streams aligned.

    On a CUDA device nothing inside the loop waits for the device: the denoiser outputs' NaN/Inf check is
    accumulated on the device (first bad step) and read once after the last step.
    """
    sampler = Sampler(schedule, config)
    denoiser = as_eps_denoiser(denoiser, schedule)
    g = config.guidance_scale
    if g != 1.0:
        _require_cfg_labels(y, null_label, g)
    noise = NoiseSource(seed, sample_indices, device)
    B = len(noise)
    if y is not None and torch.is_tensor(y) and y.is_floating_point():
        y = y.to(device=device, dtype=torch.float32)
        if y.ndim != 3 or y.shape[0] != B:
            raise ConfigError(f"the embeddings y have shape {tuple(y.shape)}, expected ({B}, L, D): one [L, D] text "
                              "embedding per sample.")
        if torch.is_tensor(null_label):
            null_label = null_label.to(device=device, dtype=torch.float32)
    elif y is not None:
        y = torch.as_tensor(y, dtype=torch.long, device=device)
        if tuple(y.shape) != (B,):
            raise ConfigError(f"y has shape {tuple(y.shape)}, expected ({B},): one class label per sample.")
    draw_z = sampler.stochastic or hook is not None
    x = noise.randn(shape)
    if x_T is not None:
        if tuple(x_T.shape) != tuple(x.shape):
            raise ConfigError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(x.shape)}: [batch, *shape]")
        x = x_T.to(device=x.device, dtype=x.dtype)
    zs = noise.draws(len(sampler), shape) if draw_z else None
    on_device = noise.device.type != "cpu"
    first_bad = torch.full((), -1, dtype=torch.long, device=noise.device)  # first step with NaN/Inf (device only)
    with torch.inference_mode():
        for i in progress_bar(range(len(sampler)), desc="sampling", disable=not progress, leave=False):
            info = sampler.info(i)
            t = torch.full((B,), info.t, dtype=torch.long, device=noise.device)
            try:
                eps = guided_eps(denoiser, x, t, y, null_label, g).float()
            except DataError as err:
                raise DataError(f"sampling step {i + 1}/{len(sampler)}: {err}") from err
            if on_device:
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(eps).all(), i, first_bad)
            sigma = None
            if hook is not None:
                eps, sigma = hook(info, x, eps, noise)
            x = sampler.step(i, x, eps, None if zs is None else next(zs), sigma)
    if on_device and int(first_bad) >= 0:  # the loop's one host synchronisation
        step = int(first_bad)
        raise DataError(f"sampling step {step + 1}/{len(sampler)}: denoiser returned NaN/Inf at timestep "
                        f"t={sampler.info(step).t}; check the model/engine (overflow in fp16/int8?).")
    return x
