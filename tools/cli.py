"""The ``tdqrt`` command line: one entry point, one subcommand per stage, each a thin layer that turns
arguments into a validated config object and calls the library function that does the work.

Errors tdqrt raises on purpose (``TdqrtError``) are printed as one line and exit with status 2; warnings are one
line each. Ctrl-C (SIGINT) and SIGTERM take one path: a line saying what of the run is saved and how to rerun it,
exit status 130 / 143. A command that writes a folder holds the lock on it while it runs (a second run into it is
refused, exit 2).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

from tdqrt.engines.errors import TdqrtError

# tdqrt.export.lint.FLAVOURS, listed in --help (not imported here, so --help stays fast; an unknown target is refused
# by ExportConfig in the one-line error style, not by argparse's usage dump)
EXPORT_TARGETS = ("trt", "ort-cpu")
SPACINGS = ("uniform", "quadratic", "scheduler")  # = runtime.sampling.SPACINGS (test_cli checks), no torch import
CALIBRATION_METHODS = ("minmax", "mse", "brecq", "tdq-ptq", "tdq-qat")  # = methods.METHODS (test_cli checks), no torch import
# What every FP --model / --fp takes (tdqrt.calibration.checkpoint.load_fp_checkpoint)
FP_MODEL = ("FP model: a `tdqrt train` or `tdqrt import` directory (model.json), a diffusers pipeline folder "
            "(model_index.json) or a UNet2DModel folder (config.json)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after every option help, except where there is nothing to show: no default
    (None, the help says what happens then), an on/off switch, or an empty repeatable list; an empty text default
    shows as ``""``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or action.default == []:
            return action.help or ""
        if action.default == "":
            return f'{action.help or ""} (default: "")'
        return super()._get_help_string(action)


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows every default."""
    return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)


# ---------------------------------------------------------------------------------------------- argument groups
# One add_*_args / *_from_args pair per config group, used by every subcommand that takes that group.


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="sampler kind")
    g.add_argument("--steps", type=int, default=50, help="sampling steps")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (0 = deterministic)")
    g.add_argument("--spacing", choices=SPACINGS, default="uniform",
                   help="timestep spacing (scheduler: the model's own scheduler config, e.g. an imported pipeline's)")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")


def _sampler_from_args(args: argparse.Namespace):
    from tdqrt.runtime.sampling import SamplerConfig

    return SamplerConfig(kind=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                         guidance_scale=args.guidance)


def _add_d2_args(p: argparse.ArgumentParser, default: str, *, bundle_stats: bool = False) -> None:
    """``bundle_stats``: a bundle's own statistics are used when --d2-stats is not given."""
    g = p.add_argument_group("quantization-error correction")
    g.add_argument("--d2", choices=("off", "s", "d", "ptqd"), default=default,
                   help="correction: S-D² (s), D-D² (d), PTQD (ptqd) or off")
    g.add_argument("--d2-granularity", choices=("tensor", "channel"), default="channel",
                   help="one correction per tensor or per channel")
    g.add_argument("--d2-stats", type=Path, default=None,
                   help="statistics directory from `tdqrt d2-stats`"
                        + (" (default: the bundle's)" if bundle_stats else ""))
    g.add_argument("--d2-force", action="store_true", help="use statistics collected for other settings")


def _d2_from_args(args: argparse.Namespace) -> dict:
    """The correction fields shared by SampleJob and LoopBenchConfig."""
    return dict(d2=args.d2, d2_granularity=args.d2_granularity,
                d2_stats=None if args.d2_stats is None else str(args.d2_stats), d2_force=args.d2_force)


def _add_calib_set_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration set")
    g.add_argument("--calib", type=Path, default=None,
                   help="reuse this calibration set directory (default: collect one with the settings below)")
    g.add_argument("--calib-num", type=int, default=256, help="calibration trajectories")
    g.add_argument("--calib-keep", type=int, default=20, help="kept steps per trajectory")
    g.add_argument("--calib-steps", type=int, default=50, help="DDIM steps of the calibration sampler")
    g.add_argument("--calib-guidance", type=float, default=1.0,
                   help="CFG scale of the calibration trajectories (text-to-image: > 1 stores both halves the UNet "
                        "sees; 1 = no CFG)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the calibration sampler")


def _calib_set_from_args(args: argparse.Namespace):
    from tdqrt.calibration.quant.calib_set import CalibSetConfig
    from tdqrt.runtime.sampling import SamplerConfig

    return CalibSetConfig(num=args.calib_num, keep_steps=args.calib_keep, seed=args.seed,
                          sampler=SamplerConfig(kind="ddim", steps=args.calib_steps,
                                                guidance_scale=args.calib_guidance))


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Prompts of a text-to-image model (tdqrt.calibration.models.text.PromptSet)."""
    g = p.add_argument_group("prompts (text-to-image models)")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt; repeat for several (taken before those of --prompts)")
    g.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="a UTF-8 text file of prompts, one a line (blank lines ignored)")
    g.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help='negative prompt of classifier-free guidance ("": none, the unconditional embedding)')


def _prompts_from_args(args: argparse.Namespace):
    """The ``PromptSet`` of --prompt / --prompts / --negative-prompt, or None when no prompt was given (a model
    without text conditioning); a negative prompt without prompts is refused."""
    if args.prompt is None and args.prompts is None:
        if args.negative_prompt:
            from tdqrt.engines.errors import ConfigError

            raise ConfigError("--negative-prompt needs prompts: add --prompt TEXT or --prompts FILE")
        return None
    from tdqrt.calibration.models.text import PromptSet

    return PromptSet.from_sources(args.prompt or (), args.prompts, args.negative_prompt)


def _add_quant_args(p: argparse.ArgumentParser, *, methods: bool) -> None:
    """Bit widths, and the method(s): one ``--method`` (calibrate) or several ``--methods`` (bench calibrate)."""
    if methods:
        p.add_argument("--methods", nargs="+", default=list(CALIBRATION_METHODS), metavar="METHOD",
                       help="calibration methods")
    else:
        p.add_argument("--method", default="minmax", help=f"calibration method: {', '.join(CALIBRATION_METHODS)}")
    p.add_argument("--wbits", type=int, default=8, help="weight bits")
    p.add_argument("--abits", type=int, default=8, help="activation bits")


def _add_bench_parsers(sub) -> None:
    """``tdqrt bench {unet,loop,calibrate}`` (tdqrt.tools.bench)."""
    bench = _command(sub, "bench", "timings side by side in one run: UNet step, sampling loop, calibration")
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="BENCH")

    def common(p: argparse.ArgumentParser, warmup: int | None, repeats: int, thread_list: bool = False) -> None:
        if warmup is not None:
            p.add_argument("--warmup", type=int, default=warmup, help="untimed runs per variant")
        p.add_argument("--repeats", type=int, default=repeats, help="timed runs per variant")
        p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
        if thread_list:
            p.add_argument("--threads", type=int, nargs="+", default=None,
                           help="torch and ONNX Runtime intra-op threads; several counts are measured in the same "
                                "rounds (default: torch's current count)")
        else:
            p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
        p.add_argument("--out", type=Path, default=None,
                       help="result JSON to write (a bar chart of it goes beside it as .png; default: print only)")
        p.set_defaults(run=_run_bench)

    p = _command(kinds, "unet", "UNet step latency per backend (torch FP32/FP16/fake-quant, ORT FP/INT8)")
    p.add_argument("--model", type=Path, default=None, help=FP_MODEL)
    p.add_argument("--preset", default=None, help="random weights of this architecture instead of --model")
    p.add_argument("--image-size", type=int, default=32, help="--preset only: image side")
    p.add_argument("--channels", type=int, default=3, help="--preset only: image channels")
    p.add_argument("--classes", type=int, default=0, help="--preset only: class count, 0 = unconditional")
    p.add_argument("--quant", type=Path, default=None, help="quantized checkpoint directory (torch fake-quant)")
    p.add_argument("--bundle", type=Path, action="append", default=[], help="bundle from `tdqrt export`; repeatable")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of torch-fp32 torch-fp16 torch-fakequant ort-fp ort-int8 (default: all with a source)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="batch sizes")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (class- or text-conditioned models); > 1 doubles the batch the UNet sees")
    p.add_argument("--baseline", default=None, help="variant the speedups refer to (default torch-fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    common(p, warmup=3, repeats=10, thread_list=True)

    p = _command(kinds, "loop", "sampling throughput with D² off/on, loop overhead and D² update share")
    p.add_argument("--model", required=True, type=Path,
                   help=f"{FP_MODEL}, a quantized checkpoint (quant.json) or a bundle directory")
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="batch sizes")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_sampler_args(p)
    _add_d2_args(p, default="d", bundle_stats=True)
    common(p, warmup=1, repeats=5)

    p = _command(kinds, "calibrate", "calibration wall time and peak memory per method, and of D² collection")
    p.add_argument("--model", required=True, type=Path, help=FP_MODEL)
    _add_quant_args(p, methods=True)
    p.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="method option override (e.g. brecq:iters_w=50); repeatable")
    _add_calib_set_args(p)
    p.add_argument("--d2-num", type=int, default=64, help="D² collection trajectories (0 skips the D² job)")
    p.add_argument("--d2-steps", type=int, default=50, help="sampler steps of the D² collection")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the calibrated models, calibration set and D² statistics here (default: a temporary "
                        "directory, removed)")
    _add_prompt_args(p)
    common(p, warmup=None, repeats=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdqrt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", "train an FP diffusion UNet (EMA, resumable)")
    p.add_argument("--data", default="digits", help="digits, shapes, or a folder of images")
    p.add_argument("--model", default="small", help="UNet preset (tiny, small)")
    p.add_argument("--out", required=True, type=Path,
                   help="checkpoint directory to write: model.safetensors, model.json, train_config.json, "
                        "train_log.json, loss.png and the resumable training state")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="decay after the warm-up")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--image-size", type=int, default=None, help="resize the data (required for folders)")
    p.add_argument("--num-data", type=int, default=None, help="cap on the number of training images")
    p.add_argument("--schedule", choices=("linear", "cosine", "scaled_linear"), default="linear",
                   help="beta schedule")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.set_defaults(run=_run_train)

    p = _command(sub, "import", "reference a diffusers pipeline or UNet2DModel folder as a tdqrt model directory "
                                "(by path and sha256, nothing copied)")
    p.add_argument("src", type=Path, help="diffusers pipeline folder (model_index.json) or UNet2DModel folder "
                                          "(config.json + weights)")
    p.add_argument("--out", required=True, type=Path,
                   help="model directory to write: model.json (the source's path, weights sha256 and scheduler "
                        "config), import_config.json")
    p.add_argument("--scheduler-config", type=Path, default=None,
                   help="a diffusers scheduler_config.json giving the schedule (default: the folder's own: "
                        "scheduler/scheduler_config.json, or scheduler_config.json beside a UNet folder)")
    p.set_defaults(run=_run_import)

    p = _command(sub, "calibrate", "quantize an FP model (minmax, mse, brecq, tdq-ptq, tdq-qat)")
    p.add_argument("--model", required=True, type=Path, help=FP_MODEL)
    p.add_argument("--out", required=True, type=Path,
                   help="quantized checkpoint directory to write: quant.safetensors, quant.json, scales.png (and "
                        "the calibration set in calib/ unless --calib is given)")
    _add_quant_args(p, methods=False)
    p.add_argument("--weight-granularity", choices=("channel", "tensor"), default="channel",
                   help="one weight scale per output channel or per tensor")
    p.add_argument("--keep-float", nargs="*", default=None,
                   help="module-name patterns left in float (default: first/last conv and diffusers' skip_conv, time "
                        "and class embeddings)")
    _add_calib_set_args(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (e.g. iters_w=2000); repeatable")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    _add_prompt_args(p)
    p.set_defaults(run=_run_calibrate)

    p = _command(sub, "sample", "sample a model to samples.npz + grid.png")
    p.add_argument("--model", type=Path, default=None,
                   help=f"{FP_MODEL}, a quantized model directory (quant.json), a bundle (ONNX Runtime) or a "
                        "TensorRT .plan/.engine file")
    p.add_argument("--engine", type=Path, default=None,
                   help="TensorRT plan from `tdqrt build` (its bundle: --model, default the one in engine.json); "
                        "the loop then runs on cuda unless --device says otherwise")
    p.add_argument("--out", required=True, type=Path,
                   help="directory to write: samples.npz (uint8 NHWC images and labels), grid.png, sample.json")
    p.add_argument("--num", type=int, default=64, help="images to draw")
    p.add_argument("--batch", type=int, default=64, help="images per model call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (image i depends only on seed and i)")
    p.add_argument("--device", default=None,
                   help="default cpu; with --distributed each rank takes cuda:LOCAL_RANK (cpu without CUDA)")
    p.add_argument("--distributed", action="store_true",
                   help="shard the batches over the processes torchrun starts (gloo on CPU, nccl on CUDA)")
    _add_sampler_args(p)
    _add_d2_args(p, default="off", bundle_stats=True)
    _add_prompt_args(p)
    p.set_defaults(run=_run_sample)

    p = _command(sub, "d2-stats", "collect D²/PTQD quantization-error statistics (FP vs quantized)")
    p.add_argument("--quant", required=True, type=Path, help="quantized model directory (`tdqrt calibrate --out`)")
    p.add_argument("--fp", type=Path, default=None,
                   help=f"{FP_MODEL} it was calibrated from, if it moved (default: the path in quant.json)")
    p.add_argument("--out", required=True, type=Path, help="statistics directory to write: d2.npz, d2.json, d2.png")
    p.add_argument("--num", type=int, default=256, help="trajectories")
    p.add_argument("--batch", type=int, default=64, help="trajectories per model call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--outlier-sigma", type=float, default=4.0, help="errors beyond this many σ are outliers")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    _add_sampler_args(p)
    _add_prompt_args(p)
    p.set_defaults(run=_run_d2_stats)

    p = _command(sub, "export", "export a quantized model to an ONNX Q/DQ bundle (unet.onnx, unet_fp.onnx, manifest)")
    p.add_argument("--quant", required=True, type=Path, help="quantized model directory (quant.json)")
    p.add_argument("--out", required=True, type=Path,
                   help="bundle directory to write: unet.onnx, unet_fp.onnx, manifest.json, lint.json (and d2.npz, "
                        "d2.json with --d2-stats; decoder.onnx for a latent model)")
    p.add_argument("--d2-stats", type=Path, default=None, help="D² statistics directory to ship in the bundle")
    p.add_argument("--fp", type=Path, default=None,
                   help=f"{FP_MODEL}, if it moved (default: the path in quant.json)")
    p.add_argument("--target", default="trt", metavar="{" + ",".join(EXPORT_TARGETS) + "}",
                   help="graph flavour: trt (TensorRT) or ort-cpu (ONNX Runtime x86 CPU: uint8 activations and a "
                        "Q/DQ after every conv, fused into QLinearConv)")
    p.add_argument("--calib", type=Path, default=None,
                   help="ort-cpu: calibration set whose inputs set the conv output grids (default: the one in "
                        "quant.json)")
    p.add_argument("--calib-samples", type=int, default=512,
                   help="ort-cpu: calibration inputs observed for the output grids")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="float type of the graph")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 19 with --dtype fp16)")
    p.add_argument("--ratio-op", choices=("div", "mul"), default="div",
                   help="how r_t enters before Q: div by s_t/s_ref (bit-exact codes) or mul by r_t")
    p.add_argument("--no-polygraphy", action="store_true", help="skip `polygraphy check lint` (our rules still run)")
    p.set_defaults(run=_run_export)

    p = _command(sub, "lint", "check a bundle or an .onnx file against its target's Q/DQ rules (trt, ort-cpu)")
    p.add_argument("path", type=Path, help="bundle directory or model.onnx")
    p.add_argument("--target", default=None, metavar="{" + ",".join(EXPORT_TARGETS) + "}",
                   help="rules of this flavour (default: the bundle's, or trt)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--no-polygraphy", action="store_true", help="skip `polygraphy check lint`")
    p.set_defaults(run=_run_lint)

    p = _command(sub, "build", "build an engine of a bundle: TensorRT INT8 plan (trt) or ONNX Runtime check (ort)")
    p.add_argument("--bundle", required=True, type=Path, help="bundle directory written by `tdqrt export`")
    p.add_argument("--backend", choices=("trt", "trt-rtx", "ort"), default="trt",
                   help="trt: TensorRT plan with the TensorRT library installed (enterprise tensorrt needs a GPU; "
                        "tensorrt_rtx builds without one); trt-rtx: force TensorRT-RTX; ort: ONNX Runtime session "
                        "check and optimized graph (default trt)")
    p.add_argument("--compute-capability", nargs="+", default=None, metavar="CC",
                   help="TensorRT-RTX target compute capabilities, e.g. 8.6 8.9 12.0 (default: the library's "
                        "portable set)")
    p.add_argument("--use-gpu", action="store_true", help="TensorRT-RTX: build for the local GPU")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most images per call (doubled for classifier-free guidance on class-conditional bundles)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch size TensorRT tunes for (default --max-batch)")
    p.add_argument("--no-cfg", action="store_true", help="do not double the batch for classifier-free guidance")
    p.add_argument("--workspace", type=float, default=None, help="TensorRT workspace limit in GiB (default TensorRT's)")
    p.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache to load (if present) and update")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--out", type=Path, default=None,
                   help="engine file to write (default BUNDLE/trt/unet.trt.plan or BUNDLE/ort/unet.ort.onnx); "
                        "engine.json and layers.json are written beside it")
    p.set_defaults(run=_run_build)

    p = _command(sub, "validate", "check a bundle's ONNX graphs against its torch models (Polygraphy Comparator)")
    p.add_argument("bundle", type=Path, help="bundle directory written by `tdqrt export`")
    p.add_argument("--quant", type=Path, default=None, help="quantized model directory (default: the bundle's source)")
    p.add_argument("--fp", type=Path, default=None, help=f"{FP_MODEL} (default: the bundle's source)")
    p.add_argument("--calib", type=Path, default=None, help="calibration set (default: the one in quant.json)")
    p.add_argument("--timesteps", type=int, default=5, help="timesteps from the calibration set")
    p.add_argument("--per-timestep", type=int, default=5, help="samples per timestep")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder to write validate.json and validate.png into (default BUNDLE/validation)")
    p.add_argument("--engine", type=Path, default=None,
                   help="TensorRT plan from `tdqrt build` (compared when TensorRT and a GPU are there)")
    p.set_defaults(run=_run_validate)

    p = _command(sub, "demo", "the end-to-end demo on the bundled digits (or your --model): FP -> W8A8/W4A8 -> D² -> "
                              "ONNX bundle -> validation -> samples -> FID/KID -> report; finished stages are reused")
    p.add_argument("--out", required=True, type=Path,
                   help="directory to write: one folder per stage (models, bundle, samples, evaluations) and "
                        "report/report.md with its PNGs, metrics.json and demo.json")
    p.add_argument("--quick", action="store_true", help="tiny model, tiny everything: numbers meaningless: every stage in about half a minute")
    p.add_argument("--retrain", action="store_true", help="train the demo model instead of using the shipped one")
    p.add_argument("--model", type=Path, default=None,
                   help="your FP model instead of the digits one: a tdqrt model directory, a diffusers pipeline or "
                        "UNet2DModel folder, a `tdqrt import` directory (the digits-only extractor and FID/KID are "
                        "skipped; default: the shipped digits checkpoint)")
    p.add_argument("--num", type=int, default=None, help="images per sample set (default 200; quick 20)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch, also of the speed table (default 100)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; quick 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of every stage (default 0)")
    p.add_argument("--calib-num", type=int, default=None, help="calibration trajectories (default 64)")
    p.add_argument("--w8a8-method", default=None, help="static method of the W8A8 model (default mse)")
    p.add_argument("--w4a8-method", default=None, help="method of the W4A8 model that is exported (default tdq-ptq)")
    p.add_argument("--w4a8-option", action="append", default=[], metavar="KEY=VALUE",
                   help="W4A8 method option, merged into the preset's (e.g. iters_w=200); repeatable")
    p.add_argument("--d2", choices=("s", "d", "ptqd"), default=None, help="correction of the INT8+D² row (default d)")
    p.add_argument("--d2-num", type=int, default=None, help="trajectories of the D² statistics (default 64)")
    p.add_argument("--err-num", type=int, default=None, help="trajectories of the per-step ε error (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.set_defaults(run=_run_demo)

    p = _command(sub, "extractor", "train the small CNN feature extractor that eval uses on digits/shapes")
    p.add_argument("--data", default="digits", help="digits, shapes, or a folder with one subfolder per class")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write extractor.safetensors and extractor.json into (default: "
                        "$TDQRT_CACHE_DIR/extractors/tdqrt-<data>-cnn, ~/.cache/tdqrt/... - where eval looks when "
                        "no extractor is given)")
    p.add_argument("--image-size", type=int, default=None, help="side length (default: the data set's; folders: required)")
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, split and data order")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while training")
    p.set_defaults(run=_run_extractor)

    p = _command(sub, "eval", "FID/KID/IS/precision-recall of samples against a reference set")
    p.add_argument("--samples", required=True, type=Path, help="samples.npz (arr_0 uint8 NHWC) or a folder of images")
    p.add_argument("--ref", required=True, help="digits, shapes, a .npz or a folder of images")
    p.add_argument("--metrics", default="fid,kid,isc,prc", help="comma-separated subset of fid,kid,isc,prc")
    p.add_argument("--feature-extractor", default=None,
                   help="folder of `tdqrt extractor` or name tdqrt-<data>-cnn (default: the reference's default "
                        "extractor folder)")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="local pt_inception-2015-12-05-6726825d.pth: standard Inception FID (never downloaded)")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON to write, the metrics with their settings (default: eval.json beside the "
                        "samples)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="resamples behind the 95%% intervals of FID and KID (0: no intervals)")
    p.add_argument("--ref-num", type=int, default=None, help="cap on the number of reference images")
    p.add_argument("--batch", type=int, default=64, help="images per feature-extractor call")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subset and the bootstrap resamples")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="reference feature cache (default $TDQRT_CACHE_DIR/fidelity, ~/.cache/tdqrt/fidelity)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the reference feature cache")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS CPU threads during the evaluation")
    p.set_defaults(run=_run_eval)

    _add_bench_parsers(sub)

    p = _command(sub, "env", "print the versions of torch, onnx, onnxruntime, polygraphy, tensorrt, CUDA")
    p.set_defaults(run=_run_env)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    from tdqrt.calibration.training import TrainConfig, train
    from tdqrt.engines.artifacts import read_json
    from tdqrt.runtime.schedules import ScheduleConfig
    from tdqrt.tools.plots import save_curve

    cfg = TrainConfig(data=args.data, model=args.model, steps=args.steps, batch_size=args.batch, lr=args.lr,
                      lr_schedule=args.lr_schedule, warmup_steps=args.warmup, ema_decay=args.ema,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, image_size=args.image_size,
                      num_data=args.num_data, schedule=ScheduleConfig(kind=args.schedule))
    out = train(cfg, args.out, resume=args.resume)
    loss = read_json(out / "train_log.json")["loss"]
    save_curve(out / "loss.png", {"loss": ([s for s, _ in loss], [v for _, v in loss])}, xlabel="step",
               ylabel="ε-MSE", title=f"training loss ({cfg.model} on {cfg.data})", logy=True)
    print(f"model written to {out} (model.safetensors, model.json, loss.png)")
    return 0


def _parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> dict; values are read as JSON where they parse (numbers, booleans, lists)."""
    import json

    from tdqrt.engines.errors import ConfigError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r} must look like KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _run_import(args: argparse.Namespace) -> int:
    from tdqrt.calibration.models.sources import import_model, open_source

    out = import_model(args.src, args.out, scheduler_config=args.scheduler_config)
    fp = open_source(out)
    ae = fp.card["autoencoder"]
    print(f"{args.src} imported to {out} ({fp.card['source']['pipeline'] or 'UNet2DModel folder'}, "
          f"{fp.model.in_channels}×{fp.model.image_size}² {'latents, ' + ae['class'] if ae else 'pixels'}, "
          f"UNet sha256 {fp.sha256[:12]}); pass it as --model")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
    from tdqrt.calibration.quant.config import DEFAULT_KEEP_FLOAT, QuantConfig
    from tdqrt.calibration.resolve import open_model
    from tdqrt.tools.plots import save_scale_curves

    quant = QuantConfig(method=args.method, wbits=args.wbits, abits=args.abits,
                        weight_granularity=args.weight_granularity,
                        keep_float=tuple(args.keep_float) if args.keep_float is not None else DEFAULT_KEEP_FLOAT)
    cfg = CalibrateConfig(quant=quant, calib_set=_calib_set_from_args(args), options=_parse_options(args.option),
                          device=args.device)
    out = calibrate(args.model, args.out, cfg, calib_dir=args.calib, prompts=_prompts_from_args(args))
    qm = open_model(out, decoder=False).model
    save_scale_curves(out / "scales.png", qm.scale_table(), qm.layer_names, title=f"{args.method} W{args.wbits}A{args.abits}")
    print(f"quantized model written to {out} (quant.safetensors, quant.json, scales.png)")
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    from tdqrt.engines.engine_card import is_engine_file
    from tdqrt.engines.errors import ConfigError
    from tdqrt.tools.distributed import process_group
    from tdqrt.tools.sample import SampleJob, sample_model

    if args.model is None and args.engine is None:
        raise ConfigError("pass --model (a model directory, a bundle or a .plan file) or --engine PLAN")
    engine = args.model if args.engine is None and is_engine_file(args.model) else args.engine
    device = args.device if args.device is not None or engine is None else "cuda"
    with process_group(args.distributed, device) as device:
        prompts = _prompts_from_args(args)
        job = SampleJob(num=args.num, batch=args.batch, seed=args.seed, device=device,
                        sampler=_sampler_from_args(args), **_d2_from_args(args),
                        engine=None if engine is None else str(engine),
                        prompts=None if prompts is None else prompts.to_dict())
        res = sample_model(args.model if args.model is not None else engine, args.out, job)
    if res is not None:  # rank 0 (or the only process)
        print(f"{len(res.images)} samples in {res.seconds:.1f} s -> {res.out_dir}/samples.npz, grid.png")
    return 0


def _run_d2_stats(args: argparse.Namespace) -> int:
    from tdqrt.tools.d2 import D2StatsJob, collect_to_dir

    job = D2StatsJob(sampler=_sampler_from_args(args), num=args.num, batch=args.batch, seed=args.seed,
                     outlier_sigma=args.outlier_sigma, device=args.device)
    collect_to_dir(args.fp, args.quant, args.out, job, prompts=_prompts_from_args(args))
    print(f"D² statistics written to {args.out} (d2.npz, d2.json, d2.png)")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from tdqrt.export.bundle import export_bundle
    from tdqrt.export.exporter import ExportConfig

    cfg = ExportConfig(target=args.target, dtype=args.dtype, opset=args.opset, ratio_op=args.ratio_op,
                       polygraphy=not args.no_polygraphy, calib_samples=args.calib_samples)
    with warnings.catch_warnings(record=True) as caught:  # one line each, not Python's file:line format
        warnings.simplefilter("always")
        out = export_bundle(args.quant, args.out, cfg, d2_stats=args.d2_stats, fp_dir=args.fp, calib_dir=args.calib)
    for w in caught:
        print(f"tdqrt export: warning: {w.message}", file=sys.stderr)
    print(f"{cfg.target} bundle written to {out} (unet.onnx, unet_fp.onnx, manifest.json"
          f"{', d2' if args.d2_stats else ''}); lint clean, report in {out / 'lint.json'}")
    return 0


def _run_lint(args: argparse.Namespace) -> int:
    from tdqrt.export.lint import lint_path

    kwargs = {"polygraphy": not args.no_polygraphy}
    if args.target is not None:
        kwargs["target"] = args.target
    report = lint_path(args.path, **kwargs)
    print(report.format())
    if args.json is not None:
        report.save(args.json)
    return 0 if report else 1


def _run_build(args: argparse.Namespace) -> int:
    from tdqrt.engines.build import LAYERS_FILE, BuildConfig, build_engine

    cfg = BuildConfig(backend=args.backend, max_batch=args.max_batch, opt_batch=args.opt_batch,
                      workspace_gb=args.workspace, opt_level=args.opt_level,
                      timing_cache=None if args.timing_cache is None else str(args.timing_cache),
                      cfg=False if args.no_cfg else None,
                      compute_capabilities=None if args.compute_capability is None else tuple(args.compute_capability),
                      use_gpu=args.use_gpu)
    out, card = build_engine(args.bundle, cfg, args.out, log=print)
    runtime, batch, report = card["runtime"], card["profile"]["sample"], card["report"]
    where = f" on {runtime['gpu']}" if runtime["gpu"] else ""
    print(f"{args.backend} engine written to {out} ({runtime['name']} {runtime['version']}{where}; batch "
          f"{batch['min'][0]}/{batch['opt'][0]}/{batch['max'][0]} min/opt/max; engine.json beside it)")
    if "precision_counts" in report:
        counts = ", ".join(f"{k} {v}" for k, v in report["precision_counts"].items())
        print(f"{report['layers']} layers ({counts}); {len(report['unfused_qdq'])} unfused Q/DQ; "
              f"per-layer report in {out.parent / LAYERS_FILE}")
    if "network" in report:
        net = report["network"]
        print(f"network: {net['layers']} layers, {net['quantize']} Q / {net['dequantize']} DQ, "
              f"{net['quantized_conv']} quantized Conv, {net['quantized_matmul']} quantized MatMul; plan "
              f"{report['plan_bytes'] / 2**20:.1f} MiB")
    if report.get("needs_gpu"):
        print(f"note: {report['needs_gpu']}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from tdqrt.tools.validate import ValidateConfig, validate_bundle

    cfg = ValidateConfig(timesteps=args.timesteps, per_timestep=args.per_timestep)
    report = validate_bundle(args.bundle, cfg, quant_dir=args.quant, fp_dir=args.fp, calib_dir=args.calib,
                             out=args.out, engine=args.engine)
    for line in report.format():
        print(line)
    out = args.out if args.out is not None else args.bundle / "validation"
    print(f"{'PASSED' if report.passed else 'FAILED'} at timesteps {report.timesteps}; report in {out}/validate.json")
    return 0 if report.passed else 1


def _run_demo(args: argparse.Namespace) -> int:
    from tdqrt.tools.demo import DemoConfig, run_demo

    cfg = DemoConfig.create(quick=args.quick, retrain=args.retrain,
                            model=None if args.model is None else str(args.model.resolve()), num=args.num, batch=args.batch, steps=args.steps,
                            seed=args.seed, calib_num=args.calib_num, w8a8_method=args.w8a8_method,
                            w4a8_method=args.w4a8_method, w4a8_options=_parse_options(args.w4a8_option),
                            d2=args.d2, d2_num=args.d2_num, err_num=args.err_num, threads=args.threads,
                            device=args.device)
    report = run_demo(args.out, cfg)
    print(f"report: {report}")
    return 0


def _run_extractor(args: argparse.Namespace) -> int:
    from tdqrt.tools.extractor import ExtractorConfig, train_extractor

    cfg = ExtractorConfig(data=args.data, image_size=args.image_size, steps=args.steps, batch=args.batch,
                          seed=args.seed, threads=args.threads)
    ext = train_extractor(cfg, args.out, progress=True)
    print(f"extractor {ext.name} written to {ext.weights.parent} (held-out accuracy {ext.card['accuracy']:.4f}, "
          f"{ext.card['run']['seconds']:.1f} s, sha256 {ext.sha256[:12]})")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from tdqrt.tools.metrics import EvalConfig, evaluate, format_metrics

    cfg = EvalConfig(metrics=args.metrics, feature_extractor=args.feature_extractor,
                     inception_weights=args.inception_weights, bootstrap=args.bootstrap, ref_num=args.ref_num,
                     batch=args.batch, seed=args.seed,
                     cache_dir=args.cache_dir, cache=not args.no_cache, out=args.out, device=args.device,
                     threads=args.threads)
    result = evaluate(args.samples, args.ref, cfg)
    for line in format_metrics(result):
        print(line)
    print(f"({result['samples']['count']} samples vs {result['ref']['count'] if result['ref'] else 0} reference "
          f"images, extractor sha256 {result['extractor']['sha256'][:12]}) -> {result['path']}")
    return 0


def _run_env(args: argparse.Namespace) -> int:
    from tdqrt.tools.env import environment

    info = environment()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def _bench_config(args: argparse.Namespace):
    from tdqrt.engines.errors import ConfigError
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.tools import bench
    from tdqrt.tools.d2 import D2StatsJob

    common = dict(repeats=args.repeats, device=args.device, threads=args.threads)
    path = lambda p: None if p is None else str(p)
    if args.bench_kind == "unet":
        return bench.bench_unet, bench.UnetBenchConfig(
            model=path(args.model), preset=args.preset, image_size=args.image_size, in_channels=args.channels,
            num_classes=args.classes, quant=path(args.quant), bundles=tuple(map(str, args.bundle)),
            backends=args.backends, batches=tuple(args.batch), guidance=args.guidance, warmup=args.warmup,
            baseline=args.baseline, seed=args.seed, **common)
    if args.bench_kind == "loop":
        return bench.bench_loop, bench.LoopBenchConfig(
            model=str(args.model), batches=tuple(args.batch), sampler=_sampler_from_args(args), **_d2_from_args(args),
            warmup=args.warmup, seed=args.seed, **common)
    options: dict = {}
    for item in args.option:
        method, sep, pair = item.partition(":")
        if not sep or not method:
            raise ConfigError(f"--option {item!r} must look like METHOD:KEY=VALUE (e.g. brecq:iters_w=50)")
        options.setdefault(method, {}).update(_parse_options([pair]))
    calib_set = _calib_set_from_args(args)
    d2 = D2StatsJob(sampler=SamplerConfig(steps=args.d2_steps), num=args.d2_num) if args.d2_num else None
    prompts = _prompts_from_args(args)
    return bench.bench_calibrate, bench.CalibrateBenchConfig(
        model=str(args.model), methods=tuple(args.methods), wbits=args.wbits, abits=args.abits, options=options,
        calib=path(args.calib), calib_set=calib_set, d2=d2, work_dir=path(args.work),
        prompts=None if prompts is None else prompts.to_dict(), **common)


def _run_bench(args: argparse.Namespace) -> int:
    from tdqrt.tools.bench import format_report, save_report

    run, cfg = _bench_config(args)
    report = run(cfg, command=args.command_line, progress=True)
    for line in format_report(report):
        print(line)
    if args.out is not None:
        print(f"report written to {save_report(report, args.out)} (and {args.out.with_suffix('.png').name})")
    return 0


# What a rerun after an interrupt does, per command (the line printed on Ctrl-C / SIGTERM ends with it).
_RERUN = {
    "train": "rerun with --resume to continue from the last checkpoint",
    "calibrate": "rerun the same command to resume (BRECQ keeps its finished units, other methods start over)",
    "sample": "rerun the same command to resume",
    "d2-stats": "rerun the same command to collect them again",
    "demo": "rerun the same command to resume (finished stages are reused)",
}
_RERUN_DEFAULT = "rerun the same command to start again"


def _output_folder(args: argparse.Namespace) -> Optional[Path]:
    """The folder (or file) the command writes, locked while it runs; None for commands that write none."""
    if args.command == "extractor" and args.out is None:
        from tdqrt.tools.extractor import default_extractor_dir

        return default_extractor_dir(args.data)
    if args.command in ("train", "import", "calibrate", "sample", "d2-stats", "export", "extractor", "demo"):
        return args.out
    if args.command in ("build", "validate"):  # they write into the bundle unless told otherwise
        return args.out if args.out is not None else args.bundle
    if args.command == "bench" and getattr(args, "work", None) is not None:
        return args.work
    return None


@contextlib.contextmanager
def _locked(args: argparse.Namespace) -> Iterator[None]:
    from tdqrt.engines.artifacts import folder_lock

    folder = _output_folder(args)
    # torchrun ranks of one --distributed job share --out: rank 0 holds the lock for them all
    if folder is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    with folder_lock(folder, command=args.command_line):
        yield


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both leave the same way (files closed,
    temporary files removed, what is finished kept)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _own_files() -> tuple[str, ...]:
    roots = []
    for layer in ("tools", "export", "calibration", "runtime", "engines"):
        spec = importlib.util.find_spec(f"tdqrt.{layer}")
        roots += [str(Path(p).resolve()) + os.sep for p in (spec.submodule_search_locations or [])] if spec else []
    return tuple(roots)


def _warning_line(command: str):
    """``warnings.formatwarning`` for the CLI: one line per warning, no source line; a warning from another
    library names its origin."""
    own = _own_files()

    def format_warning(message, category, filename, lineno, line=None) -> str:
        text = " ".join(str(message).split())
        origin = "" if str(Path(filename).resolve()).startswith(own) else \
            f" [{category.__name__} from {filename}:{lineno}]"
        return f"tdqrt {command}: warning: {text}{origin}\n"

    return format_warning


def main(argv: list[str] | None = None) -> int:
    from tdqrt.engines.progress import pop_interrupted

    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["tdqrt", *map(str, sys.argv[1:] if argv is None else argv)])
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    format_warning, warnings.formatwarning = warnings.formatwarning, _warning_line(args.command)
    try:
        with _locked(args):
            return args.run(args)
    except TdqrtError as exc:
        print(f"tdqrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        where = pop_interrupted()
        what, status = ("terminated", 143) if isinstance(exc, _Terminated) else ("interrupted", 130)
        print(f"tdqrt {args.command}: {what}{' ' + where if where else ''}; "
              f"{_RERUN.get(args.command, _RERUN_DEFAULT)}", file=sys.stderr, flush=True)
        return status
    finally:
        warnings.formatwarning = format_warning
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
