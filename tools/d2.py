"""``tdqrt d2-stats``: collect the D² / PTQD quantization-error statistics of a quantized model against its FP
model on FP sampler trajectories, save ``d2.npz`` + ``d2.json`` and a PNG of the statistics vs timestep."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tdqrt.calibration.d2_stats import collect_d2_stats
from tdqrt.calibration.models.text import PromptSet, prompt_embeddings
from tdqrt.calibration.quant.checkpoint import QUANT_FORMAT
from tdqrt.calibration.resolve import open_model, open_recorded
from tdqrt.engines.config import check_int, check_real
from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.d2 import D2Table
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.runtime.schedules import NoiseSchedule
from tdqrt.tools.plots import save_curve


@dataclass(frozen=True)
class D2StatsJob:
    """Sampler settings the statistics are for (they are refused for other settings), sample count, outlier rule."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    num: int = 256
    batch: int = 64
    seed: int = 0
    outlier_sigma: float = 4.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_int("D2StatsJob.num", self.num, 2, flag="--num")
        check_int("D2StatsJob.batch", self.batch, 1, flag="--batch")
        check_real("D2StatsJob.outlier_sigma", self.outlier_sigma, above=0.0, finite=False, flag="--outlier-sigma")


def collect_to_dir(fp_dir: Optional[str | Path], quant_dir: str | Path, out_dir: str | Path, job: D2StatsJob, *,
                   prompts: Optional[PromptSet] = None, progress: bool = True) -> D2Table:
    """Statistics of the quantized checkpoint ``quant_dir`` against the FP model it was calibrated from (the one its
    card records, or ``fp_dir`` with the recorded sha256), saved into ``out_dir`` with a plot. A text-to-image model
    needs ``prompts``: trajectory ``n`` follows prompt ``n mod P``, guided against the negative prompt."""
    quant = open_model(quant_dir, device=job.device, decoder=False)
    if quant.card.get("format") != QUANT_FORMAT:
        raise ConfigError(f"--quant {quant_dir} is not a quantized checkpoint (quant.json); pass the --out folder of "
                          "`tdqrt calibrate`")
    fp = open_recorded(quant.card["fp_model"], fp_dir, "FP model", f"the quantized checkpoint {quant_dir}", "--fp",
                       device=job.device)
    m = fp.model
    embeddings, uncond = prompt_embeddings(m, fp.card, prompts, device=job.device)
    table = collect_d2_stats(
        m, quant.model, NoiseSchedule(fp.schedule), job.sampler, num=job.num, batch=job.batch, seed=job.seed,
        shape=(m.in_channels, m.image_size, m.image_size), num_classes=m.num_classes,
        null_label=m.null_label if uncond is None else uncond, embeddings=embeddings,
        device=job.device, progress=progress, outlier_sigma=job.outlier_sigma,
        fp_model_sha256=fp.sha256, quant_model_sha256=quant.sha256,
        prompts=None if prompts is None else prompts.record())
    out_dir = Path(out_dir)
    table.save(out_dir)
    plot_d2(table, out_dir / "d2.png")
    return table


def plot_d2(table: D2Table, path: Path) -> Path:
    """Tensor-wise error mean, error std, correlation and residual std vs timestep."""
    data = table.plot_data()
    t = data["timesteps"].tolist()
    tensor = data["tensor"]
    series = {name: (t, [float(abs(v)) for v in tensor[key]]) for name, key in
              (("|μ_Δ|", "mu_y"), ("σ_Δ", "sigma_y"), ("|ρ(ε̂,Δ)|", "rho"), ("σ_cond", "sigma_cond"))}
    series["PTQD k"] = (t, [float(abs(v)) for v in data["ptqd"]["k"]])
    return save_curve(path, series, xlabel="timestep t", ylabel="value (abs)", title="D² quantization-error statistics",
                      logy=True)

