"""Quality measurements shared by the results scripts: the per-step ε error of a quantized denoiser against the
FP one along FP sampler trajectories (what D² also models), and a markdown table writer."""
from __future__ import annotations

import numpy as np
import torch

from tdqrt.engines.denoiser import Denoiser
from tdqrt.runtime.sampling import Sampler, SamplerConfig, as_eps_denoiser, guided_eps, sample
from tdqrt.runtime.schedules import NoiseSchedule


def eps_error_per_step(fp: Denoiser, quant: Denoiser, schedule: NoiseSchedule, config: SamplerConfig, *, num: int,
                       batch: int, seed: int, shape, num_classes: int, null_label, device: str = "cpu") -> np.ndarray:
    """Mean squared error ``E‖ε̂ − ε‖²`` per element at every sampler step, on FP trajectories (``[K]``); both
    models' outputs are taken as ε (converted from v or x0 when the schedule's prediction type says so)."""
    quant = as_eps_denoiser(quant, schedule)  # sample() converts the FP model's output itself
    sums = np.zeros(len(Sampler(schedule, config)))
    for start in range(0, num, batch):
        idx = torch.arange(start, min(num, start + batch))
        y = (idx % num_classes).to(device) if num_classes else None

        def measure(info, x, eps, noise):
            t = torch.full((len(idx),), info.t, dtype=torch.long, device=x.device)
            eq = guided_eps(quant, x, t, y, null_label, config.guidance_scale)
            sums[info.index] += float((eq - eps).pow(2).mean(dim=tuple(range(1, x.ndim))).sum())
            return eps, info.sigma

        sample(fp, schedule, config, sample_indices=idx, seed=seed, shape=shape, y=y, null_label=null_label,
               hook=measure, device=device)
    return sums / num


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
