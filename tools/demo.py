"""``tdqrt demo``: the pipeline that exists so far, end to end on sklearn's bundled digits.

Stages: (1) the FP model — the checkpoint shipped in ``tools/assets/digits-small`` (made by the command in its
``TRAINING.md``), or a fresh training run with ``retrain``/``quick``; (2) DDIM sampling to ``samples.npz`` and a
grid; (3) ``report.md`` with the grid, the model card and the timings. ``quick`` trains the ``tiny`` preset
for a few steps so the test suite can run the whole demo in seconds (its samples are not meant to look good).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tdqrt.calibration.checkpoint import CARD_FILE, load_fp_checkpoint
from tdqrt.calibration.training import TrainConfig, train
from tdqrt.engines.artifacts import write_bytes_atomic, write_json_atomic
from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.tools.sample import SampleJob, sample_model

SHIPPED_MODEL = "digits-small"


def shipped_model_dir() -> Path:
    return Path(str(resources.files("tdqrt.tools") / "assets" / SHIPPED_MODEL))


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = False
    retrain: bool = False
    num: int = 100
    steps: int = 50
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num < 1 or self.steps < 1:
            raise ConfigError(f"num and steps must be >= 1, got num={self.num} steps={self.steps}")


def _model_stage(cfg: DemoConfig, out: Path, progress: bool) -> tuple[Path, str]:
    shipped = shipped_model_dir()
    if not (cfg.quick or cfg.retrain) and (shipped / CARD_FILE).is_file():
        return shipped, "shipped checkpoint"
    model_dir = out / "model"
    if (model_dir / CARD_FILE).is_file():
        return model_dir, "reused from an earlier run of this demo"
    train_cfg = (TrainConfig(model="tiny", steps=30, batch_size=32, warmup_steps=5, checkpoint_every=1000)
                 if cfg.quick else TrainConfig(model="small"))
    train(train_cfg, model_dir, progress=progress)
    return model_dir, "trained by this demo"


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), *, progress: bool = True) -> Path:
    """Run every stage into ``out`` and return the path of ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    model_dir, origin = _model_stage(cfg, out, progress)
    timings["model"] = time.perf_counter() - t0

    num = min(cfg.num, 20) if cfg.quick else cfg.num
    steps = min(cfg.steps, 5) if cfg.quick else cfg.steps
    job = SampleJob(num=num, batch=num, seed=cfg.seed, device=cfg.device,
                    sampler=SamplerConfig(kind="ddim", steps=steps, eta=0.0))
    t0 = time.perf_counter()
    result = sample_model(model_dir, out / "samples", job, progress=progress)
    timings["sampling"] = time.perf_counter() - t0

    card = load_fp_checkpoint(model_dir).card
    training = card.get("training", {})
    write_json_atomic(out / "demo.json", {"config": cfg.__dict__, "model_dir": str(model_dir), "model_origin": origin,
                                          "timings_s": {k: round(v, 3) for k, v in timings.items()}})
    lines = [
        "# tdqrt demo report",
        "",
        "## FP model",
        f"- checkpoint: `{model_dir}` ({origin})",
        f"- architecture: {card['model']['kind']} UNet, {training.get('parameters', '?')} parameters, "
        f"preset `{training.get('model', '?')}`",
        f"- data: {card['data'].get('name', card['data'])}, schedule: {card['schedule']['kind']} "
        f"over {card['schedule']['num_train_timesteps']} steps",
        f"- training: {training.get('steps', '?')} steps, batch {training.get('batch_size', '?')}, "
        f"final loss {training.get('final_loss', '?')}, {training.get('wall_time_s', '?')} s",
        "",
        "## Samples (FP)",
        f"{num} images, DDIM {steps} steps, eta 0, seed {cfg.seed}: {result.seconds:.1f} s "
        f"({num / result.seconds:.1f} images/s on {cfg.device})",
        "",
        "![FP samples](samples/grid.png)",
        "",
        "## Timings",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
    ]
    report = out / "report.md"
    write_bytes_atomic(report, "\n".join(lines).encode())
    return report
