"""The ``tdqrt`` command line: one entry point, one subcommand per stage, each a thin layer that turns
arguments into a validated config object and calls the library function that does the work.

Errors tdqrt raises on purpose (``TdqrtError``) are printed as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from tdqrt.engines.errors import TdqrtError

def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (default 0)")
    p.add_argument("--spacing", choices=("uniform", "quadratic"), default="uniform")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")


def _sampler_config(args: argparse.Namespace):
    from tdqrt.runtime.sampling import SamplerConfig

    return SamplerConfig(kind=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing,
                         guidance_scale=args.guidance)


def _add_bench_parsers(sub) -> None:
    """``tdqrt bench {unet,loop,calibrate}`` (tdqrt.tools.bench)."""
    bench = sub.add_parser("bench", help="timings side by side in one run: UNet step, sampling loop, calibration")
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="BENCH")

    def common(p: argparse.ArgumentParser, warmup: int | None, repeats: int) -> None:
        if warmup is not None:
            p.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs per variant (default {warmup})")
        p.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per variant (default {repeats})")
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
        p.add_argument("--out", type=Path, default=None, help="result JSON (a bar chart goes beside it as .png)")
        p.set_defaults(run=_run_bench)

    p = kinds.add_parser("unet", help="UNet step latency per backend (torch FP32/FP16/fake-quant, ORT FP/INT8)")
    p.add_argument("--model", type=Path, default=None, help="FP checkpoint directory")
    p.add_argument("--preset", default=None, help="random weights of this architecture instead of --model")
    p.add_argument("--image-size", type=int, default=32, help="--preset only (default 32)")
    p.add_argument("--channels", type=int, default=3, help="--preset only (default 3)")
    p.add_argument("--classes", type=int, default=0, help="--preset only: class count, 0 = unconditional")
    p.add_argument("--quant", type=Path, default=None, help="quantized checkpoint directory (torch fake-quant)")
    p.add_argument("--bundle", type=Path, action="append", default=[], help="bundle from `tdqrt export`; repeatable")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of torch-fp32 torch-fp16 torch-fakequant ort-fp ort-int8 (default: all with a source)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale; > 1 doubles the batch the UNet sees")
    p.add_argument("--baseline", default=None, help="variant the speedups refer to (default torch-fp32)")
    p.add_argument("--seed", type=int, default=0)
    common(p, warmup=3, repeats=10)

    p = kinds.add_parser("loop", help="sampling throughput with D² off/on, loop overhead and D² update share")
    p.add_argument("--model", required=True, type=Path, help="FP or quantized checkpoint, or bundle directory")
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--seed", type=int, default=0)
    _add_sampler_args(p)
    p.add_argument("--d2", choices=("off", "s", "d", "ptqd"), default="d", help="correction of the 'on' variant")
    p.add_argument("--d2-granularity", choices=("tensor", "channel"), default="channel")
    p.add_argument("--d2-stats", type=Path, default=None, help="`tdqrt d2-stats` directory (default: the bundle's)")
    p.add_argument("--d2-force", action="store_true", help="use statistics collected for other settings")
    common(p, warmup=1, repeats=5)

    p = kinds.add_parser("calibrate", help="calibration wall time and peak memory per method, and of D² collection")
    p.add_argument("--model", required=True, type=Path, help="FP checkpoint directory")
    p.add_argument("--methods", nargs="+", default=["minmax", "mse", "brecq", "tdq-ptq", "tdq-qat"])
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="method option override (e.g. brecq:iters_w=50); repeatable")
    p.add_argument("--calib", type=Path, default=None, help="reuse this calibration set (else one is collected)")
    p.add_argument("--calib-num", type=int, default=256)
    p.add_argument("--calib-keep", type=int, default=20)
    p.add_argument("--calib-steps", type=int, default=50)
    p.add_argument("--d2-num", type=int, default=64, help="D² collection trajectories (0 skips the D² job)")
    p.add_argument("--d2-steps", type=int, default=50)
    p.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temporary directory)")
    common(p, warmup=None, repeats=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdqrt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an FP diffusion UNet (EMA, resumable)")
    p.add_argument("--data", default="digits", help="digits, shapes, or a folder of images")
    p.add_argument("--model", default="small", help="UNet preset (tiny, small, ...)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--image-size", type=int, default=None, help="resize the data (required for folders)")
    p.add_argument("--num-data", type=int, default=None, help="cap on the number of training images")
    p.add_argument("--schedule", choices=("linear", "cosine", "scaled_linear"), default="linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.set_defaults(run=_run_train)

    p = sub.add_parser("calibrate", help="quantize an FP model (minmax, mse, brecq, tdq-ptq, tdq-qat)")
    p.add_argument("--model", required=True, type=Path, help="FP model directory (model.json)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--method", default="minmax", help="minmax, mse, brecq, tdq-ptq or tdq-qat")
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--weight-granularity", choices=("channel", "tensor"), default="channel")
    p.add_argument("--keep-float", nargs="*", default=None, help="module-name patterns left in float")
    p.add_argument("--calib", type=Path, default=None, help="reuse a calibration set directory")
    p.add_argument("--calib-num", type=int, default=256, help="calibration trajectories (default 256)")
    p.add_argument("--calib-keep", type=int, default=20, help="kept steps per trajectory (default 20)")
    p.add_argument("--calib-steps", type=int, default=50, help="DDIM steps of the calibration sampler")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (e.g. iters_w=2000); repeatable")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(run=_run_calibrate)

    p = sub.add_parser("sample", help="sample a model to samples.npz + grid.png")
    p.add_argument("--model", type=Path, default=None,
                   help="FP (model.json) or quantized (quant.json) model directory, a bundle (ONNX Runtime) or a "
                        "TensorRT .plan/.engine file")
    p.add_argument("--engine", type=Path, default=None,
                   help="TensorRT plan from `tdqrt build` (its bundle: --model, default the one in engine.json); "
                        "the loop then runs on cuda unless --device says otherwise")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="default cpu; with --distributed each rank takes cuda:LOCAL_RANK (cpu without CUDA)")
    p.add_argument("--distributed", action="store_true",
                   help="shard the batches over the processes torchrun starts (gloo on CPU, nccl on CUDA)")
    _add_sampler_args(p)
    p.add_argument("--d2", choices=("off", "s", "d", "ptqd"), default="off",
                   help="quantization-error correction: S-D², D-D², PTQD (default off)")
    p.add_argument("--d2-granularity", choices=("tensor", "channel"), default="channel")
    p.add_argument("--d2-stats", type=Path, default=None, help="statistics directory from `tdqrt d2-stats`")
    p.add_argument("--d2-force", action="store_true", help="use statistics collected for other settings")
    p.set_defaults(run=_run_sample)

    p = sub.add_parser("d2-stats", help="collect D²/PTQD quantization-error statistics (FP vs quantized)")
    p.add_argument("--fp", required=True, type=Path, help="FP model directory")
    p.add_argument("--quant", required=True, type=Path, help="quantized model directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num", type=int, default=256, help="trajectories (default 256)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outlier-sigma", type=float, default=4.0)
    p.add_argument("--device", default="cpu")
    _add_sampler_args(p)
    p.set_defaults(run=_run_d2_stats)

    p = sub.add_parser("export", help="export a quantized model to an ONNX Q/DQ bundle (unet.onnx, unet_fp.onnx, manifest)")
    p.add_argument("--quant", required=True, type=Path, help="quantized model directory (quant.json)")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--d2-stats", type=Path, default=None, help="D² statistics directory to ship in the bundle")
    p.add_argument("--fp", type=Path, default=None, help="FP model directory if it moved (default: the path in quant.json)")
    p.add_argument("--target", default="trt",
                   help="graph flavour: trt (TensorRT, default) or ort-cpu (ONNX Runtime x86 CPU: uint8 activations "
                        "and a Q/DQ after every conv, fused into QLinearConv)")
    p.add_argument("--calib", type=Path, default=None,
                   help="ort-cpu: calibration set whose inputs set the conv output grids (default: the one in "
                        "quant.json)")
    p.add_argument("--calib-samples", type=int, default=512,
                   help="ort-cpu: calibration inputs observed for the output grids (default 512)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 19 with --dtype fp16)")
    p.add_argument("--ratio-op", choices=("div", "mul"), default="div",
                   help="how r_t enters before Q: div by s_t/s_ref (bit-exact codes, default) or mul by r_t")
    p.add_argument("--no-polygraphy", action="store_true", help="skip `polygraphy check lint` (our rules still run)")
    p.set_defaults(run=_run_export)

    p = sub.add_parser("lint", help="check a bundle or an .onnx file against its target's Q/DQ rules (trt, ort-cpu)")
    p.add_argument("path", type=Path, help="bundle directory or model.onnx")
    p.add_argument("--target", default=None, help="rules of this flavour (default: the bundle's, or trt)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--no-polygraphy", action="store_true", help="skip `polygraphy check lint`")
    p.set_defaults(run=_run_lint)

    p = sub.add_parser("build", help="build an engine of a bundle: TensorRT INT8 plan (trt) or ONNX Runtime check "
                                     "(ort)")
    p.add_argument("--bundle", required=True, type=Path, help="bundle directory written by `tdqrt export`")
    p.add_argument("--backend", choices=("trt", "ort"), default="trt",
                   help="trt: TensorRT plan (needs the trt extra and a GPU); ort: ONNX Runtime session check and "
                        "optimized graph (default trt)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most images per call (doubled for classifier-free guidance on class-conditional bundles; "
                        "default 16)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch size TensorRT tunes for (default --max-batch)")
    p.add_argument("--no-cfg", action="store_true", help="do not double the batch for classifier-free guidance")
    p.add_argument("--workspace", type=float, default=None, help="TensorRT workspace limit in GiB (default TensorRT's)")
    p.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache to load (if present) and update")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5 (default 3)")
    p.add_argument("--out", type=Path, default=None,
                   help="engine file (default BUNDLE/trt/unet.trt.plan or BUNDLE/ort/unet.ort.onnx); engine.json is "
                        "written beside it")
    p.set_defaults(run=_run_build)

    p = sub.add_parser("validate", help="check a bundle's ONNX graphs against its torch models (Polygraphy Comparator)")
    p.add_argument("bundle", type=Path, help="bundle directory written by `tdqrt export`")
    p.add_argument("--quant", type=Path, default=None, help="quantized model directory (default: the bundle's source)")
    p.add_argument("--fp", type=Path, default=None, help="FP model directory (default: the bundle's source)")
    p.add_argument("--calib", type=Path, default=None, help="calibration set (default: the one in quant.json)")
    p.add_argument("--timesteps", type=int, default=5, help="timesteps from the calibration set (default 5)")
    p.add_argument("--per-timestep", type=int, default=5, help="samples per timestep (default 5)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default BUNDLE/validation)")
    p.add_argument("--engine", type=Path, default=None,
                   help="TensorRT plan from `tdqrt build` (compared when TensorRT and a GPU are there)")
    p.set_defaults(run=_run_validate)

    p = sub.add_parser("demo", help="the end-to-end demo on the bundled digits: FP -> W8A8/W4A8 -> D² -> ONNX bundle "
                                    "-> validation -> samples -> FID/KID -> report; finished stages are reused")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quick", action="store_true", help="tiny model, tiny everything: every stage in about a minute")
    p.add_argument("--retrain", action="store_true", help="train the demo model instead of using the shipped one")
    p.add_argument("--num", type=int, default=None, help="images per sample set (default 200; quick 20)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch, also of the speed table (default 100)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; quick 5)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--calib-num", type=int, default=None, help="calibration trajectories (default 64)")
    p.add_argument("--w8a8-method", default=None, help="static method of the W8A8 model (default mse)")
    p.add_argument("--w4a8-method", default=None, help="method of the W4A8 model that is exported (default tdq-ptq)")
    p.add_argument("--w4a8-option", action="append", default=[], metavar="KEY=VALUE",
                   help="W4A8 method option, merged into the preset's (e.g. iters_w=200); repeatable")
    p.add_argument("--d2", choices=("s", "d", "ptqd"), default=None, help="correction of the INT8+D² row (default d)")
    p.add_argument("--d2-num", type=int, default=None, help="trajectories of the D² statistics (default 64)")
    p.add_argument("--err-num", type=int, default=None, help="trajectories of the per-step ε error (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None)
    p.set_defaults(run=_run_demo)

    p = sub.add_parser("extractor", help="train the small CNN feature extractor that eval uses on digits/shapes")
    p.add_argument("--data", default="digits", help="digits, shapes, or a folder with one subfolder per class")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $TDQRT_CACHE_DIR/extractors/tdqrt-<data>-cnn, "
                        "~/.cache/tdqrt/... - where eval looks when no extractor is given)")
    p.add_argument("--image-size", type=int, default=None, help="side length (default: the data set's; folders: required)")
    p.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while training")
    p.set_defaults(run=_run_extractor)

    p = sub.add_parser("eval", help="FID/KID/IS/precision-recall of samples against a reference set")
    p.add_argument("--samples", required=True, type=Path, help="samples.npz (arr_0 uint8 NHWC) or a folder of images")
    p.add_argument("--ref", required=True, help="digits, shapes, a .npz or a folder of images")
    p.add_argument("--metrics", default="fid,kid,isc,prc", help="comma-separated subset of fid,kid,isc,prc")
    p.add_argument("--feature-extractor", default=None,
                   help="folder of `tdqrt extractor` or name tdqrt-<data>-cnn (default: the reference's default "
                        "extractor folder)")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="local pt_inception-2015-12-05-6726825d.pth: standard Inception FID (never downloaded)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: eval.json beside the samples)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="resamples behind the 95%% intervals of FID and KID (default 200; 0: no intervals)")
    p.add_argument("--ref-num", type=int, default=None, help="cap on the number of reference images")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="reference feature cache (default $TDQRT_CACHE_DIR/fidelity, ~/.cache/tdqrt/fidelity)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the reference feature cache")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS CPU threads during the evaluation")
    p.set_defaults(run=_run_eval)

    _add_bench_parsers(sub)

    p = sub.add_parser("env", help="print the versions of torch, onnx, onnxruntime, polygraphy, tensorrt, CUDA")
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


def _run_calibrate(args: argparse.Namespace) -> int:
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
    from tdqrt.calibration.quant.calib_set import CalibSetConfig
    from tdqrt.calibration.quant.config import DEFAULT_KEEP_FLOAT, QuantConfig
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.tools.plots import save_scale_curves

    quant = QuantConfig(method=args.method, wbits=args.wbits, abits=args.abits,
                        weight_granularity=args.weight_granularity,
                        keep_float=tuple(args.keep_float) if args.keep_float is not None else DEFAULT_KEEP_FLOAT)
    calib_set = CalibSetConfig(num=args.calib_num, keep_steps=args.calib_keep, seed=args.seed,
                               sampler=SamplerConfig(kind="ddim", steps=args.calib_steps))
    cfg = CalibrateConfig(quant=quant, calib_set=calib_set, options=_parse_options(args.option), device=args.device)
    out = calibrate(args.model, args.out, cfg, calib_dir=args.calib)
    qm = load_model_dir(out).model
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
        job = SampleJob(num=args.num, batch=args.batch, seed=args.seed, device=device, sampler=_sampler_config(args),
                        d2=args.d2, d2_granularity=args.d2_granularity,
                        d2_stats=None if args.d2_stats is None else str(args.d2_stats), d2_force=args.d2_force,
                        engine=None if engine is None else str(engine))
        res = sample_model(args.model if args.model is not None else engine, args.out, job)
    if res is not None:  # rank 0 (or the only process)
        print(f"{len(res.images)} samples in {res.seconds:.1f} s -> {res.out_dir}/samples.npz, grid.png")
    return 0


def _run_d2_stats(args: argparse.Namespace) -> int:
    from tdqrt.tools.d2 import D2StatsJob, collect_to_dir

    job = D2StatsJob(sampler=_sampler_config(args), num=args.num, batch=args.batch, seed=args.seed,
                     outlier_sigma=args.outlier_sigma, device=args.device)
    collect_to_dir(args.fp, args.quant, args.out, job)
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
                      cfg=False if args.no_cfg else None)
    out, card = build_engine(args.bundle, cfg, args.out)
    runtime, batch, report = card["runtime"], card["profile"]["sample"], card["report"]
    where = f" on {runtime['gpu']}" if runtime["gpu"] else ""
    print(f"{args.backend} engine written to {out} ({runtime['name']} {runtime['version']}{where}; batch "
          f"{batch['min'][0]}/{batch['opt'][0]}/{batch['max'][0]} min/opt/max; engine.json beside it)")
    if "precision_counts" in report:
        counts = ", ".join(f"{k} {v}" for k, v in report["precision_counts"].items())
        print(f"{report['layers']} layers ({counts}); {len(report['unfused_qdq'])} unfused Q/DQ; "
              f"per-layer report in {out.parent / LAYERS_FILE}")
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

    cfg = DemoConfig.create(quick=args.quick, retrain=args.retrain, num=args.num, batch=args.batch, steps=args.steps,
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
    from tdqrt.calibration.quant.calib_set import CalibSetConfig
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
            model=str(args.model), batches=tuple(args.batch), sampler=_sampler_config(args), d2=args.d2,
            d2_granularity=args.d2_granularity, d2_stats=path(args.d2_stats), d2_force=args.d2_force,
            warmup=args.warmup, seed=args.seed, **common)
    options: dict = {}
    for item in args.option:
        method, sep, pair = item.partition(":")
        if not sep or not method:
            raise ConfigError(f"--option {item!r} must look like METHOD:KEY=VALUE (e.g. brecq:iters_w=50)")
        options.setdefault(method, {}).update(_parse_options([pair]))
    calib_set = CalibSetConfig(num=args.calib_num, keep_steps=args.calib_keep,
                               sampler=SamplerConfig(kind="ddim", steps=args.calib_steps))
    d2 = D2StatsJob(sampler=SamplerConfig(steps=args.d2_steps), num=args.d2_num) if args.d2_num else None
    return bench.bench_calibrate, bench.CalibrateBenchConfig(
        model=str(args.model), methods=tuple(args.methods), wbits=args.wbits, abits=args.abits, options=options,
        calib=path(args.calib), calib_set=calib_set, d2=d2, work_dir=path(args.work), **common)


def _run_bench(args: argparse.Namespace) -> int:
    from tdqrt.tools.bench import format_report, save_report

    run, cfg = _bench_config(args)
    report = run(cfg, command=args.command_line, progress=True)
    for line in format_report(report):
        print(line)
    if args.out is not None:
        print(f"report written to {save_report(report, args.out)} (and {args.out.with_suffix('.png').name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["tdqrt", *map(str, sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except TdqrtError as exc:
        print(f"tdqrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
