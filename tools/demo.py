"""``tdqrt demo``: the whole toolchain end to end on sklearn's bundled digits, ending in a report.

Stages, in order; each one is a directory ``out/<name>`` (see :class:`StageRunner` for how finished ones are
reused)::

    model            the FP model: the shipped checkpoint tools/assets/digits-small (made by the command in its
                     TRAINING.md), or trained here (--retrain: the small preset; --quick: the tiny one, briefly), or
                     the user's model (--model: anything ``open_model`` opens — a tdqrt model directory, a diffusers
                     pipeline or UNet2DModel folder, a ``tdqrt import`` directory; recorded, never copied)
    extractor        the digits CNN that FID/KID use: the default one (~/.cache/tdqrt/extractors, where `tdqrt eval`
                     looks), trained there when missing; a quick demo trains a short one of its own instead
    calib            one time-stamped calibration set, shared by both calibrations
    w8a8             a static method at W8A8 (mse)
    w4a8             TDQ at W4A8 (tdq-ptq; fewer generator-fit steps and cached samples than its defaults, to fit
                     the time budget: those two, not the AdaRound iterations, dominate its run time)
    d2               D² statistics of the W4A8 model on FP trajectories
    export           the W4A8 model as a linted ONNX Q/DQ bundle that ships the D² statistics
    validate         Polygraphy: torch FP vs ORT FP, torch fake-quant vs ORT INT8, per timestep
    build            the bundle built into a TensorRT plan with whichever TensorRT library is installed (TensorRT-RTX
                     builds without a GPU); skipped, with the reason in the report, when none can build here
    samples-fp       FP samples (torch)
    samples-int8     INT8 samples through the bundle (ONNX Runtime)
    samples-int8-d2  the same with the D-D² correction from the bundle's statistics
    eval             FID/KID of the three sample sets, labelled with the extractor's name
    eps-error        per-step ε error vs FP (W8A8 fake-quant, INT8 bundle) on FP trajectories
    speed            seconds per sampler step at the demo batch: torch FP, torch fake-quant, ORT FP, ORT INT8
    report           report/report.md with its PNGs, metrics.json and demo.json (the config)

With --model the stages that need the digits data set (``DIGITS_ONLY``: the extractor and FID/KID) are skipped and
the report says why; every other stage runs on the given model (a latent model's samples are decoded images).

Every stage calls the library function that does the work (``calibrate``, ``collect_to_dir``, ``export_bundle``,
``validate_bundle``, ``sample_model``, ``evaluate``, ``eps_error_per_step``, the plots); this module only wires
them together, records what it did (``out/stages.json``) and writes the report.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
from tdqrt.calibration.quant.checkpoint import QUANT_CARD
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.resolve import open_model
from tdqrt.calibration.training import TrainConfig, train
from tdqrt.engines.artifacts import (atomic_dir, read_json, sha256_file, sha256_json, versions, write_bytes_atomic,
                                     write_json_atomic)
from tdqrt.engines.config import check_bool, check_choice, check_int, check_text, config_from_dict, invalid
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.progress import saved_progress
from tdqrt.engines.threads import torch_threads
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.runtime.corrections import CORRECTION_KINDS
from tdqrt.runtime.sampling import Sampler, SamplerConfig, sample
from tdqrt.runtime.runnable import RunnableModel, is_deployed
from tdqrt.runtime.schedules import NoiseSchedule
from tdqrt.tools.d2 import D2StatsJob, collect_to_dir
from tdqrt.tools.extractor import (WEIGHTS_FILE, ExtractorConfig, default_extractor_dir, load_extractor,
                                   train_extractor)
from tdqrt.tools.bootstrap import Estimate, distinguishable
from tdqrt.tools.metrics import EVAL_VERSION, EvalConfig, evaluate
from tdqrt.tools.plots import save_curve, save_image_panels, save_scale_comparison
from tdqrt.tools.quality import eps_error_per_step, markdown_table
from tdqrt.tools.sample import SampleJob, sample_model
from tdqrt.tools.validate import ValidateConfig, validate_bundle

SHIPPED_MODEL = "digits-small"
STAGE_FILE = "stage.json"
STAGE_FORMAT = "tdqrt-demo-stage"
STAGE_VERSION = 1
RUN_FILE = "stages.json"
RUN_FORMAT = "tdqrt-demo-run"
REPORT_DIR = "report"
REPORT_FILE = "report.md"
CONFIG_FILE = "demo.json"
METRICS_FILE = "metrics.json"
STAGES = ("model", "extractor", "calib", "w8a8", "w4a8", "d2", "export", "validate", "build", "samples-fp",
          "samples-int8", "samples-int8-d2", "eval", "eps-error", "speed", "report")
SAMPLE_SETS = {"samples-fp": "FP", "samples-int8": "INT8", "samples-int8-d2": "INT8+D²"}
# Stages that need the digits data set, skipped for a --model of the user's, with the reason the report gives.
DIGITS_ONLY = {
    "extractor": "the feature extractor is the digits CNN; FID/KID of another model need its own reference set",
    "eval": "FID/KID need a reference image set; the demo's extractor and reference are digits (score the samples "
            "with `tdqrt eval --samples OUT/samples-int8/samples.npz --ref YOUR_IMAGES`)",
}

# --quick: everything tiny, so the test suite runs every stage in one to two minutes on one thread.
# The `polygraphy check lint` subprocess is skipped there (tdqrt's own lint rules and onnx.checker still run).
QUICK = {"train_steps": 10, "num": 20, "batch": 20, "steps": 5, "calib_num": 8, "calib_keep": 5, "d2_num": 8,
         "err_num": 4, "validate_timesteps": 3, "validate_per_timestep": 3, "speed_steps": 2, "speed_repeats": 1,
         "extractor_steps": 30, "polygraphy_lint": False,
         "w4a8_options": {"iters_w": 4, "iters_a": 4, "num_samples": 16, "batch": 8, "fit_steps": 2}}


QUICK_BOOTSTRAP = 20  # resamples behind the quick demo's FID/KID intervals (the full demo: EvalConfig's default)


def shipped_model_dir() -> Path:
    """Where the installed package keeps the demo's FP checkpoint."""
    return Path(str(resources.files("tdqrt.tools") / "assets" / SHIPPED_MODEL))


def _options(value: Any, what: str) -> tuple:
    """Method options as a sorted tuple of (key, value) pairs (hashable, so the config stays frozen)."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple(sorted((str(k), v) for k, v in items))
    except (TypeError, ValueError) as exc:
        raise invalid(f"DemoConfig.{what}", value, "a dict of method options", "give KEY=VALUE pairs",
                      flag=f"--{what[:-1].replace('_', '-')}") from exc
    for k, v in pairs:
        if not isinstance(v, (bool, int, float, str)):
            raise invalid(f"--{what[:-1].replace('_', '-')} {k}", v, "a number, boolean or string",
                          "give a plain option value")
    return pairs


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo; saved beside the report as ``demo.json`` (``DemoConfig.from_dict`` reads it).

    Build one with :meth:`create`, which starts from the full or the ``quick`` preset. ``num`` images per sample
    set (FP, INT8, INT8+D²), drawn ``batch`` at a time by DDIM with ``steps`` steps (eta 0); the calibration set,
    the D² statistics and the per-step ε error use that sampler too. ``calib_num`` trajectories with ``calib_keep``
    kept steps each make the calibration set. ``w8a8_method`` / ``w4a8_method`` and their options (see
    ``tdqrt calibrate --option``) make the two quantized models; the W4A8 one is exported, corrected with D²
    (``d2`` = s, d or ptqd, statistics from ``d2_num`` trajectories) and sampled through ONNX Runtime.
    ``err_num`` trajectories measure the per-step ε error; ``speed_steps`` x ``speed_repeats`` sampler steps per
    backend measure speed. ``threads``: torch CPU threads for the whole demo (None: torch's default).
    ``polygraphy_lint``: also run ``polygraphy check lint`` on the exported graphs (a subprocess; tdqrt's own
    TensorRT Q/DQ rules and ``onnx.checker`` always run).
    ``extractor_steps``: training steps of the feature extractor when it has to be made.
    ``model``: the user's FP model instead of the digits one (any path ``tdqrt sample --model`` takes); the
    stages in ``DIGITS_ONLY`` are skipped then (see :attr:`stages`).
    """

    quick: bool = False
    retrain: bool = False
    train_steps: int = 1500
    num: int = 200
    batch: int = 100
    steps: int = 50
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    calib_num: int = 64
    calib_keep: int = 20
    w8a8_method: str = "mse"
    w8a8_options: tuple = ()
    w4a8_method: str = "tdq-ptq"
    w4a8_options: tuple = (("fit_steps", 100), ("num_samples", 256))
    d2: str = "d"
    d2_num: int = 64
    polygraphy_lint: bool = True
    err_num: int = 32
    validate_timesteps: int = 5
    validate_per_timestep: int = 5
    speed_steps: int = 5
    speed_repeats: int = 2
    extractor_steps: int = 500
    model: Optional[str] = None

    def __post_init__(self) -> None:
        flags = {"quick": "--quick", "retrain": "--retrain", "num": "--num", "batch": "--batch", "steps": "--steps",
                 "seed": "--seed", "calib_num": "--calib-num", "d2_num": "--d2-num", "err_num": "--err-num",
                 "threads": "--threads", "device": "--device", "d2": "--d2"}
        for name in ("quick", "retrain", "polygraphy_lint"):
            check_bool(f"DemoConfig.{name}", getattr(self, name), flag=flags.get(name))
        minimum = {"train_steps": 1, "num": 2, "batch": 1, "steps": 1, "seed": 0, "calib_num": 1, "calib_keep": 1,
                   "d2_num": 2, "err_num": 1, "validate_timesteps": 1, "validate_per_timestep": 1, "speed_steps": 1,
                   "speed_repeats": 1, "extractor_steps": 1}
        for name, lo in minimum.items():
            check_int(f"DemoConfig.{name}", getattr(self, name), lo, flag=flags.get(name))
        check_text("DemoConfig.device", self.device, "a torch device (cpu, cuda, cuda:1)", flag="--device")
        check_text("DemoConfig.model", self.model, "a model path", optional=True, flag="--model")
        if self.model is not None and self.retrain:
            raise ConfigError("--model and --retrain exclude each other: --model runs the demo on your model, "
                              "--retrain trains the digits one; drop one of them")
        check_int("DemoConfig.threads", self.threads, 1, optional=True, flag="--threads")
        if self.calib_keep > self.steps:
            raise invalid("DemoConfig.calib_keep", self.calib_keep, f"at most the sampler's {self.steps} steps",
                          "lower calib_keep or raise --steps")
        check_choice("DemoConfig.d2", self.d2, [k for k in CORRECTION_KINDS if k != "off"], flag="--d2",
                     fix="the INT8+D² row needs a correction; pick one of those")
        for which in ("w8a8", "w4a8"):
            object.__setattr__(self, f"{which}_options", _options(getattr(self, f"{which}_options"),
                                                                  f"{which}_options"))
            self.calibrate_config(which).method_options()  # unknown method / bad options fail here, by name

    @classmethod
    def create(cls, *, quick: bool = False, **overrides: Any) -> "DemoConfig":
        """The full preset (class defaults) or the ``quick`` one, with ``overrides`` (None values are ignored).
        ``w4a8_options`` / ``w8a8_options`` are merged into the preset's options, unless the method is changed
        too (the preset's options are those of its own method)."""
        settings: dict[str, Any] = dict(QUICK) if quick else {}
        defaults = {f.name: f.default for f in fields(cls)}
        for which in ("w8a8", "w4a8"):  # the preset's options belong to the preset's method
            method = overrides.get(f"{which}_method")
            base = {} if method not in (None, defaults[f"{which}_method"]) else settings.get(
                f"{which}_options", dict(defaults[f"{which}_options"]))
            settings[f"{which}_options"] = {**dict(base), **dict(overrides.pop(f"{which}_options", None) or {})}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, **settings)

    @classmethod
    def from_dict(cls, d: dict) -> "DemoConfig":
        return config_from_dict(cls, d)

    def to_dict(self) -> dict:
        return asdict(self) | {"w8a8_options": dict(self.w8a8_options), "w4a8_options": dict(self.w4a8_options)}

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this demo runs, in order: all of ``STAGES``, less ``DIGITS_ONLY`` for a ``model`` of the
        user's."""
        return tuple(s for s in STAGES if self.model is None or s not in DIGITS_ONLY)

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(kind="ddim", steps=self.steps, eta=0.0)

    def calibrate_config(self, which: str) -> CalibrateConfig:
        """The ``calibrate`` settings of the ``w8a8`` or the ``w4a8`` model."""
        wbits = 8 if which == "w8a8" else 4
        return CalibrateConfig(quant=QuantConfig(method=getattr(self, f"{which}_method"), wbits=wbits, abits=8),
                               calib_set=self.calib_set_config(), options=dict(getattr(self, f"{which}_options")),
                               device=self.device)

    def calib_set_config(self) -> CalibSetConfig:
        return CalibSetConfig(num=self.calib_num, keep_steps=self.calib_keep, batch=min(64, self.calib_num),
                              seed=1234, sampler=self.sampler)

    def label(self, which: str) -> str:
        return f"W{8 if which == 'w8a8' else 4}A8 {getattr(self, which + '_method')}"


# ---------------------------------------------------------------------------------------------------- stages

@dataclass
class Stage:
    """A finished stage: its directory, input key, output digest, summary, and what it cost to compute."""

    name: str
    path: Path
    key: str
    digest: str
    summary: dict
    seconds: float  # wall time when it ran (also when reused now)
    cpu: float  # CPU time of this process (all its threads) when it ran; against ``seconds`` it shows contention
    load: float  # the machine's 1-minute load average when it finished: how many runnable processes shared the cores
    status: str  # "ran" or "reused" in this run
    wall: float = 0.0  # time spent on it in this run (the reuse check, for a reused stage)


class StageRunner:
    """Runs stages into ``out/<name>`` and skips those already finished with the same inputs.

    A stage's *key* is the sha256 of its inputs: its directory, its settings and the *digests* of the upstream
    stages it reads.
    A stage's digest is the sha256 of its output files (every file's sha256) and its summary. ``stage.json`` in
    the stage directory records key, digest, file hashes, summary and compute time. A stage is reused when its
    ``stage.json`` has the same key and every recorded file still has its recorded hash (plus an optional
    ``still_valid`` check for things outside the directory, like the shared feature extractor); otherwise it runs
    again, and since a rerun writes new files (timings are part of them) the digests change and every stage
    downstream runs again too.

    Atomicity: a stage runs inside a temporary directory (:func:`atomic_dir`) that replaces ``out/<name>`` only
    once the stage, ``stage.json`` included, is complete; a killed demo leaves at most a ``.<name>.tmp-*``
    directory, which the next run deletes. Stage outputs never record their own directory, only upstream ones,
    so moving the temporary directory into place invalidates nothing.
    """

    def __init__(self, out: Path, *, progress: bool = True, stages: tuple[str, ...] = STAGES) -> None:
        self.out = out
        self.progress = progress
        self.stages = stages  # the stages this run will do (the progress lines count them)
        self.done: dict[str, Stage] = {}
        for stale in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*")]:  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)

    def say(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def run(self, name: str, title: str, inputs: dict, fn: Callable[[Path], dict], *,
            still_valid: Optional[Callable[[dict], bool]] = None) -> Stage:
        """Reuse stage ``name`` or run ``fn(tmp_dir) -> summary`` (JSON-able) to make it."""
        path = self.out / name
        # Artifacts record absolute paths of their upstream artifacts, so a moved demo directory runs again.
        key = sha256_json({"stage": name, "dir": str(path), "inputs": inputs})
        n = f"[{len(self.done) + 1:2d}/{len(self.stages)}] {name:<16}"
        t0, c0 = time.perf_counter(), time.process_time()
        record = self._reusable(path, key, still_valid)
        if record is not None:
            stage = Stage(name, path, key, record["digest"], record["summary"], record["seconds"], record["cpu_s"],
                          record["load_1min"], "reused")
            self.say(f"{n} reused (took {record['seconds']:.1f} s when it ran)")
        else:
            self.say(f"{n} {title} ...")
            with saved_progress(lambda: f"in stage {name} ({len(self.done)} of {len(self.stages)} stages finished)"), \
                    atomic_dir(path) as tmp:
                summary = fn(tmp)
                seconds, cpu, load = time.perf_counter() - t0, time.process_time() - c0, os.getloadavg()[0]
                files = {p.relative_to(tmp).as_posix(): sha256_file(p)
                         for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != STAGE_FILE}
                digest = sha256_json({"files": files, "summary": summary})
                write_json_atomic(tmp / STAGE_FILE, {
                    "format": STAGE_FORMAT, "version": STAGE_VERSION, "name": name, "title": title, "key": key, "inputs": inputs,
                    "digest": digest, "files": files, "summary": summary, "seconds": round(seconds, 3),
                    "cpu_s": round(cpu, 3), "load_1min": round(load, 2),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()})
            stage = Stage(name, path, key, digest, summary, round(seconds, 3), round(cpu, 3), round(load, 2), "ran")
            self.say(f"{n} done in {seconds:.1f} s (CPU {cpu:.1f} s)")
        stage.wall = time.perf_counter() - t0
        self.done[name] = stage
        return stage

    @staticmethod
    def _reusable(path: Path, key: str, still_valid: Optional[Callable[[dict], bool]]) -> Optional[dict]:
        try:
            record = read_json(path / STAGE_FILE, expect_format=STAGE_FORMAT)
        except ArtifactError:  # never ran, or a foreign/corrupt record: run it
            return None
        if record.get("version") != STAGE_VERSION or record.get("key") != key:
            return None
        for rel, digest in record.get("files", {}).items():
            file = path / rel
            if not file.is_file() or sha256_file(file) != digest:
                return None
        if still_valid is not None and not still_valid(record["summary"]):
            return None
        return record

    def save_log(self, cfg: DemoConfig, wall: float) -> Path:
        """``out/stages.json``: what this run did with every stage (ran or reused), and the seconds."""
        path = self.out / RUN_FILE
        write_json_atomic(path, {
            "format": RUN_FORMAT, "version": 1, "config": cfg.to_dict(), "wall_s": round(wall, 3),
            "stages": {s.name: {"status": s.status, "seconds": s.seconds, "cpu_s": s.cpu, "load_1min": s.load,
                                "wall_s": round(s.wall, 3), "key": s.key, "digest": s.digest}
                       for s in self.done.values()}})
        return path


# --------------------------------------------------------------------------------------------- stage bodies

def _model_stage(runner: StageRunner, cfg: DemoConfig) -> Stage:
    """The user's ``--model`` or the shipped checkpoint (either recorded by path and sha256, nothing copied), or a
    model trained into the stage."""
    if cfg.model is not None:
        given = Path(cfg.model).resolve()
        fp = _open_fp(given)
        summary = {"dir": str(given), "origin": "given with --model", "sha256": fp.sha256}
        if fp.decoder_info is not None:  # a latent model: its autoencoder's weights are an input too
            summary["decoder_sha256"] = fp.decoder_info["sha256"]
        return runner.run("model", "your model (--model)", summary, lambda tmp: summary)
    if not (cfg.quick or cfg.retrain):
        shipped = shipped_model_dir()
        try:
            ckpt = open_model(shipped)
        except ArtifactError as exc:
            raise ArtifactError(f"the shipped demo model is unusable ({exc}); reinstall tdqrt, or train one with "
                                "`tdqrt demo --retrain`") from exc
        summary = {"dir": str(shipped.resolve()), "origin": "shipped checkpoint", "sha256": ckpt.sha256}
        return runner.run("model", "shipped checkpoint", {"source": summary["dir"], "sha256": ckpt.sha256},
                          lambda tmp: summary)
    train_cfg = TrainConfig(model="tiny" if cfg.quick else "small", steps=cfg.train_steps,
                            batch_size=16 if cfg.quick else 128, warmup_steps=min(100, cfg.train_steps // 5),
                            checkpoint_every=cfg.train_steps, seed=cfg.seed)
    final = runner.out / "model"

    def body(tmp: Path) -> dict:
        train(train_cfg, tmp, progress=runner.progress)
        (tmp / "train_state.pt").unlink(missing_ok=True)  # resume state: the finished run needs none
        return {"dir": str(final.resolve()), "origin": f"trained by this demo ({train_cfg.model} preset)",
                "sha256": open_model(tmp).sha256}

    return runner.run("model", f"train the {train_cfg.model} preset for {cfg.train_steps} steps",
                      {"train": asdict(train_cfg) | {"schedule": train_cfg.schedule.to_dict()}}, body)


def _open_fp(path: Path) -> RunnableModel:
    """The user's ``--model``, which must be an FP model: the demo quantizes and exports it itself."""
    if is_deployed(path) or (path / QUANT_CARD).is_file():
        raise ConfigError(f"--model {path} is a quantized model or an exported bundle; the demo quantizes an FP "
                          "model itself: pass the FP model it was made from")
    return open_model(path)


def _extractor_stage(runner: StageRunner, cfg: DemoConfig) -> Stage:
    """The default digits extractor (trained into its default location when missing) — a quick demo trains a
    short one inside its own directory instead, so it never leaves a weak extractor where ``tdqrt eval`` looks."""
    default = default_extractor_dir("digits")
    final = runner.out / "extractor"
    ext_cfg = ExtractorConfig(data="digits", steps=cfg.extractor_steps, seed=cfg.seed)

    def body(tmp: Path) -> dict:
        if default.is_dir():
            ext, where = load_extractor(default), default
        elif cfg.quick:
            ext, where = train_extractor(ext_cfg, tmp, progress=runner.progress), final
        else:
            ext, where = train_extractor(ext_cfg, default, progress=runner.progress), default
        return {"dir": str(where.resolve()), "name": ext.name, "sha256": ext.sha256,
                "accuracy": ext.card.get("accuracy")}

    def still_valid(summary: dict) -> bool:
        """The shared extractor may have been retrained or removed since; a quick demo's own one is outdated
        once a default one exists (a run now would pick that)."""
        if Path(summary["dir"]) == default.resolve():
            weights = default / WEIGHTS_FILE
            return weights.is_file() and sha256_file(weights) == summary["sha256"]
        return not default.is_dir()

    return runner.run("extractor", f"feature extractor ({default})",
                      {"default": str(default), "quick": cfg.quick, "train": asdict(ext_cfg)}, body,
                      still_valid=still_valid)


def _calibrate_stage(runner: StageRunner, cfg: DemoConfig, which: str, model: Stage, calib: Stage) -> Stage:
    """``calibrate`` the ``w8a8`` or ``w4a8`` model on the shared calibration set."""
    ccfg = cfg.calibrate_config(which)

    def body(tmp: Path) -> dict:
        calibrate(model.summary["dir"], tmp, ccfg, calib_dir=calib.path, progress=runner.progress)
        shutil.rmtree(tmp / "work", ignore_errors=True)  # per-unit resume state of BRECQ/TDQ; the checkpoint has all
        card = read_json(tmp / "quant.json")
        return {"method": ccfg.quant.method, "label": cfg.label(which), "wall_time_s": card.get("wall_time_s")}

    return runner.run(which, f"calibrate {cfg.label(which)} (options {dict(ccfg.options)})",
                      {"quant": ccfg.quant.to_dict(), "options": ccfg.options, "device": ccfg.device,
                       "model": model.digest, "calib": calib.digest}, body)


def _sample_stage(runner: StageRunner, cfg: DemoConfig, name: str, source: Stage, model_dir: Path,
                  d2: Optional[Path] = None) -> Stage:
    """``sample_model`` on the FP model or the bundle (with the D² correction when ``d2`` names statistics)."""
    job = SampleJob(num=cfg.num, batch=cfg.batch, seed=cfg.seed, device=cfg.device, sampler=cfg.sampler,
                    d2=cfg.d2 if d2 is not None else "off", d2_stats=None if d2 is None else str(d2))

    def body(tmp: Path) -> dict:
        res = sample_model(model_dir, tmp, job, progress=runner.progress)
        calls = math.ceil(cfg.num / cfg.batch) * cfg.steps
        return {"seconds": round(res.seconds, 3), "s_per_step": res.seconds / calls, "batch": cfg.batch,
                "model": str(model_dir)}

    backend = "ONNX Runtime" if name != "samples-fp" else "torch"
    return runner.run(name, f"{cfg.num} {SAMPLE_SETS[name]} samples ({backend}, DDIM {cfg.steps} steps)",
                      {"job": job.to_dict() | {"d2_stats": None}, "source": source.digest}, body)


def _eval_stage(runner: StageRunner, cfg: DemoConfig, extractor: Stage, samples: dict[str, Stage]) -> Stage:
    """FID/KID of every sample set against the 1797 digits, one ``eval.json`` per set."""
    def body(tmp: Path) -> dict:
        out = {}
        for name, stage in samples.items():
            ecfg = EvalConfig(metrics=("fid", "kid"), feature_extractor=extractor.summary["dir"], seed=cfg.seed,
                              out=tmp / f"{name}.json", bootstrap=QUICK_BOOTSTRAP if cfg.quick else
                              EvalConfig.bootstrap)
            res = evaluate(stage.path / "samples.npz", "digits", ecfg)
            out[name] = res["metrics"]
        return {"extractor": extractor.summary["name"], "metrics": out}

    return runner.run("eval", f"FID/KID with {extractor.summary['name']}",
                      {"extractor": extractor.digest, "samples": {k: v.digest for k, v in samples.items()},
                       "seed": cfg.seed, "eval_version": EVAL_VERSION}, body)


def _eps_error_stage(runner: StageRunner, cfg: DemoConfig, model: Stage, w8a8: Stage, export: Stage) -> Stage:
    """Per-step ε error vs FP of the W8A8 fake-quant model and of the bundle's INT8 graph (what was sampled)."""
    bundle = export.path / "bundle"

    def body(tmp: Path) -> dict:
        fp = open_model(model.summary["dir"], device=cfg.device)
        m, schedule = fp.model, NoiseSchedule(fp.schedule)
        models = {f"{w8a8.summary['label']} (torch fake-quant)": open_model(w8a8.path, device=cfg.device).model,
                  f"{cfg.label('w4a8')} (INT8 bundle, ORT)": open_model(bundle).model}
        curves = {}
        for label, quant in models.items():
            err = eps_error_per_step(m, quant, schedule, cfg.sampler, num=cfg.err_num, batch=cfg.err_num,
                                     seed=cfg.seed + 7, shape=(m.in_channels, m.image_size, m.image_size),
                                     num_classes=m.num_classes, null_label=m.null_label, device=cfg.device)
            curves[label] = err.tolist()
        timesteps = Sampler(schedule, cfg.sampler).timesteps.tolist()
        save_curve(tmp / "eps_error.png", {k: (timesteps, [max(v, 1e-12) for v in c]) for k, c in curves.items()},
                   xlabel="timestep t", ylabel="E‖ε̂ − ε‖² per element",
                   title=f"per-step ε error vs FP ({cfg.err_num} FP trajectories)", logy=True)
        return {"timesteps": timesteps, "curves": curves, "mean": {k: float(np.mean(c)) for k, c in curves.items()}}

    return runner.run("eps-error", f"per-step ε error vs FP on {cfg.err_num} FP trajectories",
                      {"model": model.digest, "w8a8": w8a8.digest, "export": export.digest, "num": cfg.err_num,
                       "sampler": cfg.sampler.to_dict(), "seed": cfg.seed, "device": cfg.device}, body)


def _time_sampling(denoiser, schedule: NoiseSchedule, cfg: DemoConfig) -> float:
    """Seconds per sampler step of ``denoiser`` at the demo batch (one ``speed_steps``-step DDIM run)."""
    shape = (denoiser.in_channels, denoiser.image_size, denoiser.image_size)
    idx = torch.arange(cfg.batch)
    y = idx % denoiser.num_classes if denoiser.num_classes else None
    t0 = time.perf_counter()
    sample(denoiser, schedule, SamplerConfig(kind="ddim", steps=cfg.speed_steps), sample_indices=idx, seed=cfg.seed,
           shape=shape, y=y, null_label=denoiser.null_label, device=cfg.device)
    return (time.perf_counter() - t0) / cfg.speed_steps


def _speed_stage(runner: StageRunner, cfg: DemoConfig, model: Stage, w4a8: Stage, export: Stage) -> Stage:
    """Seconds per sampler step of each backend, measured back to back in one process at the demo batch."""
    bundle = export.path / "bundle"

    def body(tmp: Path) -> dict:
        from tdqrt.engines.ort import OrtDenoiser

        fp = open_model(model.summary["dir"], device=cfg.device)
        schedule = NoiseSchedule(fp.schedule)
        backends = {"torch FP": fp.model,
                    f"torch fake-quant ({cfg.label('w4a8')})": open_model(w4a8.path, device=cfg.device).model,
                    "ONNX Runtime FP (unet_fp.onnx)": OrtDenoiser(bundle, role="unet_fp"),
                    "ONNX Runtime INT8 (unet.onnx)": open_model(bundle).model}
        for denoiser in backends.values():  # warm-up: the first call allocates and (ORT) plans
            x = torch.zeros(cfg.batch, denoiser.in_channels, denoiser.image_size, denoiser.image_size)
            with torch.inference_mode():
                denoiser(x, torch.full((cfg.batch,), 500), torch.zeros(cfg.batch, dtype=torch.long)
                         if denoiser.num_classes else None)
        best = {name: math.inf for name in backends}
        for _ in range(cfg.speed_repeats):  # round robin, so a burst of load elsewhere hits every backend alike
            for name, denoiser in backends.items():
                best[name] = min(best[name], _time_sampling(denoiser, schedule, cfg))
        return {"batch": cfg.batch, "steps": cfg.speed_steps, "repeats": cfg.speed_repeats,
                "threads": torch.get_num_threads(), "s_per_step": best}

    return runner.run("speed", f"sampling speed per backend (batch {cfg.batch}, best of {cfg.speed_repeats})",
                      {"model": model.digest, "w4a8": w4a8.digest, "export": export.digest, "batch": cfg.batch,
                       "steps": cfg.speed_steps, "repeats": cfg.speed_repeats, "device": cfg.device}, body)


# ---------------------------------------------------------------------------------------------------- report

def _png(src: Path, dst_dir: Path, name: str) -> str:
    """Copy a stage's PNG into the report directory (the report must stand alone); returns its relative name."""
    shutil.copyfile(src, dst_dir / name)
    return name


def _scale_layers(tdq: np.ndarray, count: int = 4) -> list[int]:
    """The ``count`` layers whose TDQ scale varies most over t (max/min), in network order."""
    spread = tdq.max(axis=0) / np.maximum(tdq.min(axis=0), 1e-12)
    return sorted(np.argsort(-spread)[:count].tolist())


def _metric(metrics: dict, label: str) -> float:
    """The value of ``label`` (FID, KID) in an eval result whose keys read ``LABEL[extractor]``."""
    return next(v for k, v in metrics.items() if k.startswith(label + "["))


def _tensorrt_here() -> dict:
    """The TensorRT library a build would use here (name, version), or why there is none."""
    import importlib

    from tdqrt.engines.errors import DependencyError
    from tdqrt.engines.trt import library_name, require_tensorrt

    try:
        trt = require_tensorrt()
    except DependencyError as exc:
        return {"library": None, "reason": str(exc)}
    name = library_name(trt)
    return {"library": name, "version": importlib.import_module(name).__version__}


def _build_stage(runner: StageRunner, export: Stage) -> Stage:
    """``tdqrt build --backend trt`` of the bundle, or a record of why it could not run here."""
    from tdqrt.engines.build import BuildConfig, build_engine
    from tdqrt.engines.errors import DependencyError

    here = _tensorrt_here()
    build_cfg = BuildConfig(backend="trt")

    def body(tmp: Path) -> dict:
        if here["library"] is None:
            return {"built": False, "reason": here["reason"]}
        try:
            plan, card = build_engine(export.path / "bundle", build_cfg, tmp / "trt" / "unet.trt.plan")
        except DependencyError as exc:  # e.g. enterprise TensorRT without a GPU
            return {"built": False, "reason": str(exc)}
        report = card["report"]
        return {"built": True, "library": card["runtime"]["name"], "version": card["runtime"]["version"],
                "targets": card["runtime"].get("compute_capabilities") or card["runtime"]["gpu"],
                "seconds": card["build"]["seconds"], "plan_bytes": card["plan"]["bytes"],
                "network": report["network"], "plan": str(plan.relative_to(tmp))}

    return runner.run("build", f"TensorRT plan of the bundle ({here['library'] or 'no TensorRT here'})",
                      {"config": build_cfg.to_dict(), "export": export.digest, "tensorrt": here}, body)


def _build_lines(summary: dict) -> list[str]:
    if not summary["built"]:
        return ["## TensorRT engine", f"Not built here: {summary['reason']}", ""]
    net = summary["network"]
    targets = summary["targets"]
    return ["## TensorRT engine",
            f"`tdqrt build --backend trt` with {summary['library']} {summary['version']} (targets: "
            f"{', '.join(targets) if isinstance(targets, list) else targets}):",
            "",
            markdown_table(["library", "version", "build s", "plan MiB", "network Q / DQ layers",
                            "quantized Conv / MatMul"],
                           [[summary["library"], summary["version"], f"{summary['seconds']:.1f}",
                             f"{summary['plan_bytes'] / 2**20:.1f}", f"{net['quantize']} / {net['dequantize']}",
                             f"{net['quantized_conv']} / {net['quantized_matmul']}"]]),
            ""]


def _report_stage(runner: StageRunner, cfg: DemoConfig, st: dict[str, Stage]) -> Stage:
    """The report depends on every stage before it (its timings table included)."""
    def body(tmp: Path) -> dict:
        return _write_report(tmp, cfg, st, runner)

    return runner.run("report", "report.md, PNGs, metrics.json",
                      {"config": cfg.to_dict(), "upstream": {k: v.digest for k, v in st.items()}}, body)


def _write_report(tmp: Path, cfg: DemoConfig, st: dict[str, Stage], runner: StageRunner) -> dict:
    """``report.md`` and its PNGs, ``metrics.json`` and ``demo.json`` into ``tmp``; returns the stage summary."""
    fp = open_model(st["model"].summary["dir"])
    fp_card = fp.card
    training = fp_card.get("training", {})
    scored = "eval" in st
    ext = st["extractor"].summary if scored else None
    evals = st["eval"].summary["metrics"] if scored else {}
    err = st["eps-error"].summary
    err_labels = list(err["mean"])
    speed = st["speed"].summary
    val = read_json(st["validate"].path / "validate.json")
    manifest = read_json(st["export"].path / "bundle" / "manifest.json")

    # samples side by side: the same sample indices (noise seeds and labels) under each model
    shown = min(cfg.num, 50)
    panels = {SAMPLE_SETS[name]: np.load(st[name].path / "samples.npz")["arr_0"][:shown] for name in SAMPLE_SETS}
    save_image_panels(tmp / "samples.png", panels, title=f"first {shown} samples (same seeds and labels)")
    pixels = "×".join(str(n) for n in panels["FP"].shape[1:])

    # activation scale vs timestep: TDQ W4A8 vs static W8A8 on the same axes
    q8, q4 = open_model(st["w8a8"].path).model, open_model(st["w4a8"].path).model
    t8, t4 = q8.scale_table().numpy(), q4.scale_table().numpy()
    layers = _scale_layers(t4)
    save_scale_comparison(tmp / "scales.png", {cfg.label("w4a8"): t4, cfg.label("w8a8"): t8}, q4.layer_names, layers,
                          title="activation scale vs timestep (solid: TDQ W4A8, dashed: static W8A8)")
    d2_png = _png(st["d2"].path / "d2.png", tmp, "d2.png")
    val_png = _png(st["validate"].path / "validate.png", tmp, "validate.png")
    err_png = _png(st["eps-error"].path / "eps_error.png", tmp, "eps_error.png")

    def cell(name: str, label: str) -> str:  # only called when the samples were scored
        """``value ± half-width`` of the 95% bootstrap interval; "≈ FP" where the row is not distinguishable
        from the FP row at this sample count (difference within 1.96 standard errors of the difference)."""
        est = Estimate(_metric(evals[name], label), _metric(evals[name], label + "_se"), 0)
        fp = Estimate(_metric(evals["samples-fp"], label), _metric(evals["samples-fp"], label + "_se"), 0)
        same = "" if name == "samples-fp" or distinguishable(est, fp) else " (≈ FP)"
        return f"{est.value:.3g} ± {est.hi - est.value:.2g}{same}"

    rows = [
        ["FP", "torch", 0.0],
        [f"INT8 ({cfg.label('w4a8')})", "ONNX Runtime bundle", err["mean"][err_labels[1]]],
        [f"INT8 + {cfg.d2.upper()}-D²" if cfg.d2 != "ptqd" else "INT8 + PTQD", "ONNX Runtime bundle", "(as INT8)"],
        [cfg.label("w8a8"), "torch fake-quant", err["mean"][err_labels[0]]],
    ]
    skipped = {name: DIGITS_ONLY[name] for name in STAGES if name not in cfg.stages}
    metrics = {"extractor": ext, "sampler": cfg.sampler.to_dict(), "num": cfg.num,
               "fid_kid": evals if scored else None, "skipped": skipped, "eps_error": err,
               "validation": {"passed": val["passed"], "timesteps": val["timesteps"],
                              "pairs": {k: {"overall": p["overall"], "passed": p["passed"]}
                                        for k, p in val["pairs"].items()},
                              "layers": {k: v for k, v in val.get("layers", {}).items() if k != "per_layer"}},
               "speed": speed, "tensorrt_build": st["build"].summary,
               "sampling": {name: {"s_per_step": st[name].summary["s_per_step"], "seconds": st[name].summary["seconds"]}
                            for name in SAMPLE_SETS}}
    write_json_atomic(tmp / METRICS_FILE, metrics)
    write_json_atomic(tmp / CONFIG_FILE, cfg.to_dict())

    val_rows = []
    for k, ts in enumerate(val["timesteps"]):
        val_rows.append([ts] + [f"{p['per_timestep'][k]['rel_l2']:.3g}" for p in val["pairs"].values()])
    w4 = read_json(st["w4a8"].path / "quant.json")
    speed_rows = [[name, f"{s * 1000:.1f}", f"{s / cfg.batch * 1000:.2f}"] for name, s in speed["s_per_step"].items()]
    timing_rows = [[s.name, s.status, f"{s.seconds:.1f}", f"{s.cpu:.1f}", f"{s.load:.1f}"]
                   for s in runner.done.values()]
    total = [sum(s.seconds for s in runner.done.values()), sum(s.cpu for s in runner.done.values())]
    sampled_rows = [[SAMPLE_SETS[n], f"{st[n].summary['seconds']:.1f}", f"{st[n].summary['s_per_step'] * 1000:.1f}"]
                    for n in SAMPLE_SETS]
    conditional = bool(fp.model.num_classes)
    lines = [
        "# tdqrt demo report",
        "",
        f"FP model → calibration (static {cfg.label('w8a8')}, TDQ {cfg.label('w4a8')}) → D² statistics → ONNX Q/DQ "
        "bundle (linted) → Polygraphy validation → sampling (FP torch, INT8 and INT8+D² through ONNX Runtime)"
        f"{' → FID/KID' if scored else ''}. Settings: `{CONFIG_FILE}`; numbers: `{METRICS_FILE}`.",
        "",
        *_skipped_lines(skipped),
        "## FP model",
        f"- checkpoint: `{st['model'].summary['dir']}` ({st['model'].summary['origin']}), sha256 "
        f"`{st['model'].summary['sha256'][:12]}`",
        *_model_lines(fp_card, training),
        f"- sampler: DDIM {cfg.steps} steps, eta 0, no guidance (guidance scale 1"
        f"{'' if conditional else '; an unconditional model: no class labels'}), seed {cfg.seed}; calibration set: "
        f"{cfg.calib_num} trajectories × {cfg.calib_keep} kept steps",
        *([f"- latent model: samples are decoded by its {fp_card['autoencoder']['class']} (torch for FP, the "
           f"bundle's decoder.onnx for INT8) to {pixels} images"] if fp_card.get("autoencoder") else []),
        f"- {cfg.label('w4a8')} options: `{dict(cfg.w4a8_options)}`; calibration took "
        f"{(w4.get('wall_time_s') or {}).get('method', '?')} s",
        f"- bundle: `{st['export'].path / 'bundle'}`, lint clean: {all(v['clean'] for v in manifest['lint'].values())} "
        f"(TensorRT Q/DQ rules, onnx.checker{', polygraphy check lint' if cfg.polygraphy_lint else ''}), ships D² "
        f"statistics: {manifest['d2'] is not None}",
        "",
        "## Samples: FP vs INT8 vs INT8+D²",
        f"{cfg.num} {pixels} images per model; each panel shows the first {shown}, the same noise seeds"
        + (f" and labels (one column per {'digit' if cfg.model is None else 'class'})." if conditional else "."),
        "",
        "![FP vs INT8 vs INT8+D²](samples.png)",
        "",
        "## Metrics",
        *(_fid_lines(cfg, st, ext, rows, cell) if scored else [
            "FID/KID: not computed (see Skipped stages)."]),
        f"The ε error is E‖ε̂ − ε‖² per element, averaged over the {cfg.steps} steps of {cfg.err_num} FP "
        "trajectories.",
        "",
        markdown_table(["model", "backend", *(f"{m} [{ext['name']}]" for m in ("FID", "KID") if scored),
                        "mean per-step ε MSE vs FP"], rows),
        "",
        "D² corrects the sampler update, not ε̂ itself, so the INT8+D² row's network error is the INT8 row's.",
        "",
        "![per-step ε error vs FP](" + err_png + ")",
        "",
        "## Activation scale vs timestep",
        f"The {len(layers)} layers whose TDQ scale varies most over t: TDQ ({cfg.label('w4a8')}, solid) predicts a "
        f"scale per timestep, the static {cfg.label('w8a8')} (dashed) keeps one.",
        "",
        "![activation scale vs timestep](scales.png)",
        "",
        "## D² statistics vs timestep",
        f"Quantization error Δ = ε̂ − ε of the {cfg.label('w4a8')} model on {cfg.d2_num} FP trajectories "
        "(tensor-wise, 4σ outlier filter).",
        "",
        "![D² statistics](" + d2_png + ")",
        "",
        "## Validation",
        f"Polygraphy Comparator on calibration inputs: {'PASSED' if val['passed'] else 'FAILED'}"
        + ("" if val["passed"] else " — " + "; ".join(val["failures"][:3]))
        + (f". Teacher-forced per-layer check (the INT8 verdict): {val['layers']['layers_checked']} layers, "
           f"{val['layers']['code_errors']} wrong of {val['layers']['codes']} activation codes"
           if val.get("layers") else "") + ". Relative L2 error of ε per timestep:",
        "",
        markdown_table(["timestep", *val["pairs"].keys()], val_rows),
        "",
        "![validation](" + val_png + ")",
        "",
        *_build_lines(st["build"].summary),
        "## Timings",
        f"Wall and CPU seconds of every stage when it ran (`{RUN_FILE}` beside the stage directories records each "
        "run; reused: made by an earlier run with the same inputs). CPU time counts all threads of the process; "
        f"load is the 1-minute load average when the stage ended: above {os.cpu_count()} (the CPU count), other "
        "work shared the cores and slowed the stage down.",
        "",
        markdown_table(["stage", "this run", "wall s", "CPU s", "load"],
                       [*timing_rows, ["total (without the report)", "", f"{total[0]:.1f}", f"{total[1]:.1f}", ""]]),
        "",
        f"Sampling speed per backend at the demo batch ({cfg.batch}), best of {cfg.speed_repeats} runs of "
        f"{cfg.speed_steps} steps, {speed['threads']} torch thread(s):",
        "",
        markdown_table(["backend", "ms per step", "ms per image-step"], speed_rows),
        "",
        "Whole sampling stages (all steps and batches):",
        "",
        markdown_table(["samples", "seconds", "ms per step"], sampled_rows),
        "",
    ]
    write_bytes_atomic(tmp / REPORT_FILE, "\n".join(lines).encode())
    return {"report": REPORT_FILE, "fid": {SAMPLE_SETS[k]: _metric(v, "FID") for k, v in evals.items()},
            "skipped": sorted(skipped), "validation_passed": bool(val["passed"])}


def _skipped_lines(skipped: dict[str, str]) -> list[str]:
    """The report's list of the stages this demo skipped, each with its reason."""
    if not skipped:
        return []
    return ["## Skipped stages", *(f"- {name}: {why}" for name, why in skipped.items()), ""]


def _model_lines(card: dict, training: dict) -> list[str]:
    """What the FP model's card says about it: a digits checkpoint of tdqrt's, or a diffusers source."""
    schedule = f"{card['schedule']['kind']} schedule over {card['schedule']['num_train_timesteps']} steps"
    source = card.get("source")
    if source is not None:
        return [f"- {card['model']['kind']} UNet of a diffusers {source['kind']} ({source.get('pipeline') or 'bare UNet'}; "
                f"scheduler: {source.get('scheduler') or 'none'}); {schedule}"]
    return [f"- {card['model']['kind']} UNet, preset `{training.get('model', '?')}`, "
            f"{training.get('parameters', '?')} parameters; data {card.get('data', {}).get('name', '?')}; {schedule}"]


def _fid_lines(cfg: DemoConfig, st: dict[str, Stage], ext: dict, rows: list[list], cell: Callable) -> list[str]:
    """The FID/KID paragraph of the report; adds the two metric columns to ``rows`` (FP, INT8, INT8+D², W8A8)."""
    for row, name in zip(rows, [*SAMPLE_SETS, None]):
        row[2:2] = [cell(name, "FID"), cell(name, "KID")] if name else ["-", "-"]
    uncertainty = read_json(st["eval"].path / "samples-fp.json")["uncertainty"]
    return [
        f"FID/KID with the feature extractor `{ext['name']}` (tdqrt's own digits CNN, held-out accuracy "
        f"{ext.get('accuracy')}, sha256 `{ext['sha256'][:12]}`): comparable only with the same extractor, never with "
        f"Inception FID. {cfg.num} samples vs the 1797 digits, value ± the half-width of its 95% interval from "
        f"{uncertainty['resamples']} bootstrap resamples of the images (samples resampled "
        f"{uncertainty['samples']}, the digits {uncertainty['reference']}); \"≈ FP\": not distinguishable from the "
        f"FP row at {cfg.num} samples (the difference is within 1.96 standard errors; conservative, as the rows "
        f"share noise seeds and labels). KID is the unbiased MMD², class-stratified for class-balanced sets, so "
        f"it scatters around 0 when the sets match."]


# ------------------------------------------------------------------------------------------------------- run

def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), *, progress: bool = True) -> Path:
    """Run (or reuse) every stage into ``out`` and return the path of ``out/report/report.md``."""
    out = Path(out).resolve()
    if cfg.model is not None:
        _open_fp(Path(cfg.model))  # a path that is no FP model is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runner = StageRunner(out, progress=progress, stages=cfg.stages)
    try:
        with torch_threads(cfg.threads):
            _run_stages(runner, cfg)
    finally:
        runner.save_log(cfg, time.perf_counter() - t0)
    return out / REPORT_DIR / REPORT_FILE


def _run_stages(runner: StageRunner, cfg: DemoConfig) -> None:
    """Every stage in order, each fed the finished upstream stages it reads."""
    st: dict[str, Stage] = {}
    st["model"] = model = _model_stage(runner, cfg)
    if "extractor" in cfg.stages:
        st["extractor"] = _extractor_stage(runner, cfg)
    model_dir = Path(model.summary["dir"])
    calib_cfg = cfg.calib_set_config()

    def calib_body(tmp: Path) -> dict:
        fp = open_model(model_dir, device=cfg.device)
        calib = collect_calibration_set(fp.model, NoiseSchedule(fp.schedule), calib_cfg, tmp, device=cfg.device,
                                        progress=runner.progress)
        return {"count": len(calib), "timesteps": len(calib.timesteps)}

    st["calib"] = calib = runner.run("calib", f"calibration set: {cfg.calib_num} trajectories x {cfg.calib_keep} steps",
                                     {"config": calib_cfg.to_dict(), "model": model.digest, "device": cfg.device},
                                     calib_body)
    st["w8a8"] = _calibrate_stage(runner, cfg, "w8a8", model, calib)
    st["w4a8"] = w4a8 = _calibrate_stage(runner, cfg, "w4a8", model, calib)

    d2_job = D2StatsJob(sampler=cfg.sampler, num=cfg.d2_num, batch=min(64, cfg.d2_num), seed=cfg.seed,
                        device=cfg.device)
    st["d2"] = d2 = runner.run(
        "d2", f"D² statistics of {cfg.label('w4a8')} on {cfg.d2_num} FP trajectories",
        {"job": asdict(d2_job) | {"sampler": cfg.sampler.to_dict()}, "model": model.digest, "w4a8": w4a8.digest},
        lambda tmp: {"timesteps": len(collect_to_dir(model_dir, w4a8.path, tmp, d2_job,
                                                     progress=runner.progress).timesteps)})

    export_cfg = ExportConfig(polygraphy=cfg.polygraphy_lint)

    def export_body(tmp: Path) -> dict:
        bundle = export_bundle(w4a8.path, tmp / "bundle", export_cfg, d2_stats=d2.path, fp_dir=model_dir)
        lint = read_json(bundle / "manifest.json")["lint"]
        return {"lint": {k: {"errors": v["errors"], "warnings": v["warnings"]} for k, v in lint.items()}}

    st["export"] = export = runner.run("export", "ONNX Q/DQ export + lint (bundle with D² statistics)",
                                       {"config": export_cfg.to_dict(), "w4a8": w4a8.digest, "d2": d2.digest,
                                        "model": model.digest}, export_body)
    bundle = export.path / "bundle"
    val_cfg = ValidateConfig(timesteps=cfg.validate_timesteps, per_timestep=cfg.validate_per_timestep)

    def validate_body(tmp: Path) -> dict:
        report = validate_bundle(bundle, val_cfg, out=tmp)
        return {"passed": report.passed, "failures": report.failures}

    st["validate"] = validate = runner.run(
        "validate", "Polygraphy: torch vs ONNX Runtime on calibration inputs",
        {"config": val_cfg.to_dict(), "export": export.digest, "calib": calib.digest}, validate_body)
    if not validate.summary["passed"]:
        runner.say(f"warning: bundle validation FAILED ({'; '.join(validate.summary['failures'][:2])}); "
                   "the report shows the per-timestep errors")

    st["build"] = _build_stage(runner, export)
    st["samples-fp"] = _sample_stage(runner, cfg, "samples-fp", model, model_dir)
    st["samples-int8"] = _sample_stage(runner, cfg, "samples-int8", export, bundle)
    st["samples-int8-d2"] = _sample_stage(runner, cfg, "samples-int8-d2", export, bundle, d2=bundle)
    if "eval" in cfg.stages:
        st["eval"] = _eval_stage(runner, cfg, st["extractor"], {k: st[k] for k in SAMPLE_SETS})
    st["eps-error"] = _eps_error_stage(runner, cfg, model, st["w8a8"], export)
    st["speed"] = _speed_stage(runner, cfg, model, w4a8, export)
    _report_stage(runner, cfg, st)
