"""Collect the D² / PTQD quantization-error statistics on FP sampler trajectories, streaming float64 moments.

Collection (as in the code of both papers: D²-DPM, Zeng et al., arXiv 2501.08180; PTQD, He et al., arXiv
2305.10657): ``num`` trajectories of the FP sampler, run by :func:`tdqrt.runtime.sampling.sample` itself with a
step hook. At every step the hook gets the FP model's CFG-combined ε, evaluates the quantized model on the same x_t
through ``guided_eps`` (so the statistics are of CFG-combined outputs and hold only for that guidance scale),
accumulates the moments of (ε̂, Δ = ε̂ − ε, ε) and returns ``(ε, σ_t)`` unchanged, so x is advanced with the FP ε by
the sampler's own update. The statistics therefore describe the quantized model on FP trajectories. Sample i uses
``sample()``'s noise streams for ``(seed, [i])`` and label ``i % num_classes`` — or, for a text-conditioned model,
the embedding ``embeddings[i % P]`` of a caller-supplied table ``[P, L, D]`` with the unconditional embedding as
``null_label`` — : the trajectories are exactly those of ``sample(fp, ...)`` and do not depend on the batching.

Nothing per sample is kept: the state is a ``[K, C, 9]`` float64 array (``tdqrt.runtime.d2.MOMENTS``) per moment
set, whatever ``num`` is (the original code stored ~4 GB of raw tensors).

Outlier filter (D²'s rule, arXiv 2501.08180): a pair is dropped when |Δ − mean Δ| > k·std Δ (k = ``outlier_sigma``,
population std). The mean and std come from the unfiltered moments of pass 1; pass 2 replays the same trajectories
(deterministic from the seed, so it sees the same pairs as long as the denoisers are deterministic) and accumulates
only the inliers. This costs a second full collection run: 2× the model calls (4 UNet evaluations per step and
trajectory, each CFG-batched). Two inlier sets are accumulated in that one pass, because the two granularities
model different populations:

- tensor-wise: one Gaussian for all elements of step t, so an outlier is judged against that pooled
  distribution (limits per t). Filtering per channel instead would keep pairs the pooled model calls outliers and
  drop pairs it considers ordinary, so the fit would not be "the pooled distribution without its tails".
- channel-wise: one Gaussian per (t, c), so the limits are per (t, c) (a channel with a small error spread
  would otherwise keep its own outliers, and one with a large spread lose its ordinary tails).

Both sets are stored per channel; the tensor-wise fit sums the tensor-filtered set over channels. PTQD, which has
no outlier filter, uses the unfiltered pass-1 moments. ``outlier_sigma=None`` skips pass 2 and the filter.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tdqrt.engines.denoiser import Denoiser
from tdqrt.engines.config import check_int, check_real, invalid, is_int
from tdqrt.engines.progress import progress_bar
from tdqrt.runtime.d2 import MOMENTS, ZERO_VAR_RTOL, D2Settings, D2Table
from tdqrt.runtime.sampling import Sampler, SamplerConfig, StepInfo, as_eps_denoiser, guided_eps, sample
from tdqrt.runtime.schedules import NoiseSchedule


class MomentAccumulator:
    """Streaming per-(step, channel) float64 sums ``sums[k, c] = (n, Σq, Σd, Σe, Σq², Σd², Σe², Σqd, Σed)``.

    The state is the single ``[K, C, 9]`` tensor ``sums``: memory does not depend on how many samples are added.
    """

    def __init__(self, num_steps: int, num_channels: int, device: Union[str, torch.device] = "cpu") -> None:
        self.sums = torch.zeros(num_steps, num_channels, len(MOMENTS), dtype=torch.float64, device=device)

    def add(self, step: int, eps_hat: Tensor, eps: Tensor, keep: Optional[Tensor] = None) -> None:
        """Add the pairs of a batch ``[B, C, ...]`` at ``step``; ``keep`` (bool, same shape) selects the inliers."""
        q, e = eps_hat.double(), eps.double()
        d = q - e
        w = torch.ones_like(q) if keep is None else keep.double()
        terms = (w, w * q, w * d, w * e, w * q * q, w * d * d, w * e * e, w * q * d, w * e * d)  # order of MOMENTS
        self.sums[step] += torch.stack([_per_channel(v) for v in terms], dim=-1)

    def numpy(self) -> np.ndarray:
        return self.sums.cpu().numpy()


def _per_channel(v: Tensor) -> Tensor:
    """Sum over every axis but the channel axis 1: ``[B, C, ...]`` → ``[C]``."""
    return v.sum(dim=[d for d in range(v.dim()) if d != 1])


def _delta_limits(sums: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """Centre mean(Δ) and half-width k·std(Δ) (population std) per entry of ``sums[..., MOMENTS]``.

    An entry with (numerically) constant Δ, or without pairs, gets an infinite half-width: nothing to drop.
    """
    n, s, ss = sums[..., 0], sums[..., MOMENTS.index("d")], sums[..., MOMENTS.index("dd")]
    mean = s / n.clamp(min=1)
    var = ss / n.clamp(min=1) - mean**2
    flat = ~(var > ZERO_VAR_RTOL * ss / n.clamp(min=1))
    half = torch.where(flat, torch.full_like(var, math.inf), k * var.clamp(min=0).sqrt())
    return mean, half


def collect_d2_stats(
    fp: Denoiser,
    quant: Denoiser,
    schedule: NoiseSchedule,
    sampler: SamplerConfig,
    *,
    num: int,
    batch: int,
    seed: int,
    shape: Sequence[int],
    num_classes: int = 0,
    null_label: Union[int, Tensor, None] = None,
    embeddings: Union[Tensor, np.ndarray, None] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    outlier_sigma: Optional[float] = 4.0,
    fp_model_sha256: str = "",
    quant_model_sha256: str = "",
    prompts: Optional[dict] = None,
) -> D2Table:
    """Run ``num`` FP trajectories (two passes with the outlier filter) and return the fitted :class:`D2Table`.

    Args:
        fp, quant: the full-precision and the quantized denoiser ``eps = f(x, t, y)``.
        schedule, sampler: the noise schedule and the sampler settings the table will be used with.
        num, batch, seed: number of trajectories, trajectories per model call, noise seed.
        shape: one sample's shape ``(C, H, W)``; statistics are kept per channel ``C``.
        num_classes, null_label: labels ``i % num_classes`` (class-conditional models) and the null label for CFG.
        embeddings: text-conditioned models: the prompts' embeddings ``[P, L, D]``, sample i follows prompt
            ``i % P``; ``null_label`` is then the unconditional embedding ``[L, D]`` (:func:`guided_eps`).
        outlier_sigma: D²'s k-σ rule on Δ (4.0 in the paper); None disables it (one pass).
        fp_model_sha256, quant_model_sha256: free-form identifiers recorded in the table's settings.
    """
    _check_args(num, batch, shape, num_classes, outlier_sigma)
    if embeddings is not None and (num_classes or len(np.shape(embeddings)) != 3):
        raise invalid("embeddings", tuple(np.shape(embeddings)), "a [P, L, D] table of a text-"
                      "conditioned model (num_classes 0)", "pass the prompts' embeddings, or no embeddings")
    quant = as_eps_denoiser(quant, schedule)  # sample() converts the FP model's output to ε itself
    stepper = Sampler(schedule, sampler)
    K, C = len(stepper), int(shape[0])

    def replay(desc: str, visit: Visit) -> None:
        _fp_trajectories(fp, quant, schedule, sampler, visit, num=num, batch=batch, seed=seed, shape=shape,
                         num_classes=num_classes, null_label=null_label, embeddings=embeddings, device=device,
                         progress=progress, desc=desc)

    with torch.inference_mode():
        raw = MomentAccumulator(K, C, device)
        replay("D² stats" if outlier_sigma is None else "D² stats, pass 1/2", raw.add)
        if outlier_sigma is None:
            tensor = channel = raw
        else:
            tensor, channel = _filtered_pass(raw, replay, outlier_sigma, device)
    settings = D2Settings(sampler=sampler, schedule=schedule.config, num_samples=num, seed=seed,
                          outlier_sigma=None if outlier_sigma is None else float(outlier_sigma),
                          fp_model_sha256=fp_model_sha256, quant_model_sha256=quant_model_sha256, prompts=prompts)
    return D2Table(stepper.timesteps.numpy(), raw.numpy(), tensor.numpy(), channel.numpy(), settings)


Visit = Callable[[int, Tensor, Tensor], None]  # (step, ε̂, ε) of one batch at one step


def _filtered_pass(
    raw: MomentAccumulator, replay: Callable[[str, Visit], None], k: float, device
) -> tuple[MomentAccumulator, MomentAccumulator]:
    """Pass 2: accumulate the pairs inside the tensor-wise limits (per t) and inside the channel limits (per t, c)."""
    K, C, _ = raw.sums.shape
    tensor, channel = MomentAccumulator(K, C, device), MomentAccumulator(K, C, device)
    t_mean, t_half = _delta_limits(raw.sums.sum(dim=1), k)  # [K]
    c_mean, c_half = _delta_limits(raw.sums, k)  # [K, C]

    def add_inliers(i: int, eps_hat: Tensor, eps: Tensor) -> None:
        delta = eps_hat.double() - eps.double()
        per_channel = (-1, *[1] * (delta.dim() - 2))
        tensor.add(i, eps_hat, eps, keep=(delta - t_mean[i]).abs() <= t_half[i])
        channel.add(i, eps_hat, eps, keep=(delta - c_mean[i].view(per_channel)).abs() <= c_half[i].view(per_channel))

    replay("D² stats, pass 2/2", add_inliers)
    return tensor, channel


def _fp_trajectories(
    fp: Denoiser, quant: Denoiser, schedule: NoiseSchedule, config: SamplerConfig, visit: Visit, *, num: int,
    batch: int, seed: int, shape: Sequence[int], num_classes: int, null_label: Union[int, Tensor, None],
    embeddings: Union[Tensor, np.ndarray, None], device, progress: bool, desc: str,
) -> None:
    """Run ``sample(fp, ...)`` for samples ``0 .. num-1`` in batches; at every step call ``visit(step, ε̂, ε)`` with
    the quantized model's guided ε̂ on the step's x_t. The hook leaves ε and σ_t as they are, so the trajectories
    are ``sample()``'s own."""
    g = config.guidance_scale
    starts = range(0, num, batch)
    with progress_bar(total=len(starts) * config.steps, desc=desc, disable=not progress, leave=False) as bar:
        for start in starts:
            indices = list(range(start, min(start + batch, num)))
            if embeddings is not None:
                rows = [i % len(embeddings) for i in indices]  # a tensor, or an array (memory-mapped: rows only)
                y = (embeddings[rows] if torch.is_tensor(embeddings) else torch.from_numpy(
                    np.asarray(embeddings[rows], np.float32))).to(device, torch.float32)
            else:
                y = torch.tensor([i % num_classes for i in indices], device=device) if num_classes > 0 else None

            def pair(info: StepInfo, x: Tensor, eps: Tensor, noise) -> tuple[Tensor, float]:
                t = torch.full((len(indices),), info.t, dtype=torch.long, device=x.device)
                visit(info.index, guided_eps(quant, x, t, y, null_label, g).float(), eps)
                bar.update(1)
                return eps, info.sigma

            sample(fp, schedule, config, sample_indices=indices, seed=seed, shape=shape, y=y, null_label=null_label,
                   hook=pair, device=device)


def _check_args(num: int, batch: int, shape: Sequence[int], num_classes: int, outlier_sigma: Optional[float]) -> None:
    check_int("num", num, 2, fix="collect at least 2 trajectories (the papers use 1024)")
    check_int("batch", batch, 1)
    if len(shape) < 1 or not all(is_int(s) and s >= 1 for s in shape):
        raise invalid("shape", tuple(shape), "one sample's (C, H, W) of positive integers", "pass the model's shape")
    check_int("num_classes", num_classes, 0, fix="give 0 (unconditional) or the number of classes")
    check_real("outlier_sigma", outlier_sigma, above=0.0, optional=True,
               fix="use a positive number (D² uses 4) or None for no filter")