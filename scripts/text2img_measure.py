"""Speed and calibration memory of Stable-Diffusion-shaped UNets (random weights), for the text-to-image section of
docs/results.md:

    python scripts/text2img_measure.py speed  [--work DIR] [--out docs/data/54-text2img-speed.json]
    python scripts/text2img_measure.py memory [--work DIR] [--out docs/data/55-text2img-calib-memory.json]

The UNets are ``UNet2DConditionModel`` s with Stable Diffusion 1.5's layout (block widths 320/640/1280/1280 times a
``width`` factor, two layers per block, cross-attention in the first three levels, 8 heads, 77 × 768 text
embeddings) inside pipeline folders written by ``scripts/tiny_pipelines.py``'s :func:`stable_diffusion` (a one-layer
CLIP text encoder of width 768 and the tiny autoencoder: only the UNet is measured). ``width=1`` at 64 × 64 latents
is Stable Diffusion 1.5's UNet (859.5 M parameters). Weights are random (seeded): speed and memory do not depend on
them, and image quality cannot be measured on them.

* ``speed``: the ``width=0.5`` UNet (220 M parameters) at 32 × 32 latents, min-max calibrated on a tiny set of CFG
  trajectories of two prompts, exported as an ``ort-cpu`` bundle (7-bit weights on an x86 CPU without VNNI, see
  README "The ort-cpu flavour") and a TensorRT-flavour bundle. One ``tdqrt bench unet`` run times torch FP32, ONNX
  Runtime FP32 (the bundle's FP reference graph) and ONNX Runtime INT8 at UNet batch 1 and 2 (2 = one image's
  classifier-free-guidance pair) on random text embeddings; the TensorRT-flavour bundle is built with TensorRT-RTX
  (``tdqrt build --backend trt-rtx`` settings) and its build time recorded.
* ``memory``: ``tdqrt bench calibrate`` (every method, the calibration set and the D² statistics, each job in a
  fresh process, peak RSS) on three small configs — width 0.1 at 16 × 16 and 24 × 24 latents, width 0.15 at
  16 × 16 — with a few iterations (peak memory is reached in the first ones) and the methods' default batch sizes,
  except tdq-qat's: 8 instead of 64 (its training keeps every activation for the backward pass, a term that
  grows with the batch; the extrapolation scales it). Per job, the three points fix ``peak increase = a + b · parameters +
  c · width · latent area`` (weights, copies and optimizer state grow with the parameter count; activations and
  cached unit inputs with channels × positions), which extrapolates to Stable Diffusion 1.5's UNet at 32 × 32
  (256 px) and 64 × 64 (512 px) latents; tdq-qat's activation term grows with its batch (× 8 at the default 64).
  BRECQ/tdq-ptq are measured with 8 cached samples per unit; their default 512 adds ``512 × (largest unit's inputs
  + output) × 4 B`` (the cache formula of ``calibration/quant/brecq.py``), computed here from Stable Diffusion 1.5's
  own shapes on torch's meta device.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tdqrt.calibration.models.text import PromptSet
from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.calib_set import CalibSetConfig
from tdqrt.calibration.quant.checkpoint import QUANT_CARD
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.engines.artifacts import versions
from tdqrt.engines.build import BuildConfig, build_engine
from tdqrt.engines.bundle import is_bundle_dir
from tdqrt.engines.ort import U8S8_SAFE_WEIGHT_BITS, u8s8_saturates
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.tools.bench import (CALIBRATION_METHODS, CalibrateBenchConfig, UnetBenchConfig, bench_calibrate, bench_unet,
                               format_report, machine_info, save_report)
from tdqrt.tools.d2 import D2StatsJob

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from tiny_pipelines import stable_diffusion  # noqa: E402

SD15_WIDTHS = (320, 640, 1280, 1280)
TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 1, "num_attention_heads": 12,
        "max_position_embeddings": 77, "projection_dim": 768}
PROMPTS = PromptSet(("a photo of a cat", "a red car in the city at night"), negative="blurry low quality")
GUIDED = SamplerConfig(kind="ddim", steps=4, guidance_scale=7.5)
SPEED_WIDTH, SPEED_LATENT = 0.5, 32
MEMORY_GRID = ((0.1, 16), (0.15, 16), (0.1, 24))
SD15_LATENTS = (32, 64)
MEMORY_OPTIONS = {"brecq": {"iters_w": 2, "iters_a": 1, "num_samples": 8},
                  "tdq-ptq": {"iters_w": 2, "iters_a": 1, "num_samples": 8, "fit_steps": 20},
                  "tdq-qat": {"steps": 2, "warmup_steps": 0, "fit_steps": 20, "batch": 8}}
BRECQ_DEFAULT_SAMPLES = 512


def unet_config(width: float, latent: int) -> dict:
    """Stable Diffusion 1.5's UNet layout with block widths scaled by ``width``, for ``latent`` × ``latent``."""
    channels = [int(round(c * width)) for c in SD15_WIDTHS]
    return {"sample_size": latent, "in_channels": 4, "out_channels": 4, "block_out_channels": channels,
            "layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
            "attention_head_dim": 8, "norm_num_groups": min(32, channels[0] // 4)}


def pipeline(work: Path, width: float, latent: int) -> Path:
    out = work / f"sd-w{width}-{latent}"
    if not (out / "model_index.json").is_file():
        stable_diffusion(out, unet=unet_config(width, latent), text=TEXT)
    return out


def parameters(config: dict) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**config).parameters())


def largest_unit_floats(config: dict) -> int:
    """Floats of the largest BRECQ unit's inputs + output for one sample: the outermost ``ResnetBlock2D`` /
    ``Attention`` blocks and the Linear/Conv2d layers outside them, from one forward pass on the meta device."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    with torch.device("meta"):
        model = UNet2DConditionModel(**config).eval()
    blocks = [n for n, m in model.named_modules() if isinstance(m, (ResnetBlock2D, Attention))]
    blocks = [n for n in blocks if not any(n.startswith(b + ".") for b in blocks)]
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and not any(n.startswith(b + ".") for b in blocks)]
    sizes = []

    def record(module, args, kwargs, output):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        sizes.append(sum(a.numel() for a in tensors) + output.numel())

    hooks = [model.get_submodule(n).register_forward_hook(record, with_kwargs=True) for n in blocks + layers]
    latent = config["sample_size"]
    with torch.no_grad():
        model(torch.zeros(1, 4, latent, latent, device="meta"), torch.tensor([500], device="meta"),
              torch.zeros(1, TEXT["max_position_embeddings"], TEXT["hidden_size"], device="meta"))
    for h in hooks:
        h.remove()
    return max(sizes)


def meta(command: str) -> dict:
    machine = machine_info("cpu")
    return {"command": command, "machine": f"{machine['cpu']}, {machine['cores']} cores, no GPU, 1-min load "
                                          f"{machine['load_average_1m']:.1f} at the end", "versions": versions()}


# ---------------------------------------------------------------------------------------------- speed


def speed(args: argparse.Namespace, command: str) -> None:
    work = args.work
    folder = pipeline(work, SPEED_WIDTH, SPEED_LATENT)
    calib = CalibSetConfig(num=2, keep_steps=2, batch=2, sampler=GUIDED)
    ort_wbits = U8S8_SAFE_WEIGHT_BITS if u8s8_saturates() else 8
    bundles = {}
    for target, wbits in (("ort-cpu", ort_wbits), ("trt", 8)):
        quant = work / f"minmax-w{wbits}a8"
        if not (quant / QUANT_CARD).is_file():
            print(f"calibrating {quant.name}", flush=True)
            calibrate(folder, quant, CalibrateConfig(quant=QuantConfig(wbits=wbits, abits=8), calib_set=calib),
                      prompts=PROMPTS, progress=False)
        bundle = work / f"{target}-bundle"
        if not is_bundle_dir(bundle):
            print(f"exporting {bundle.name}", flush=True)
            export_bundle(quant, bundle, ExportConfig(target=target, polygraphy=False, calib_samples=4,
                                                      fp_reference=target == "ort-cpu"))
        bundles[target] = bundle
    print("building the TensorRT-flavour bundle with TensorRT-RTX", flush=True)
    t0 = time.perf_counter()
    _, card = build_engine(bundles["trt"], BuildConfig(backend="trt-rtx", max_batch=2), work / "unet.trt.plan")
    network = card["report"]["network"]
    build = {"build_s": card["build"]["seconds"], "wall_s": round(time.perf_counter() - t0, 2),
             "plan_mib": round(card["plan"]["bytes"] / 2**20, 2), "layers": network["layers"],
             "quantized_conv": network["quantized_conv"], "quantized_matmul": network["quantized_matmul"],
             "library": card["runtime"]["name"], "library_version": card["runtime"]["version"],
             "profile": card["profile"]}
    cfg = UnetBenchConfig(model=str(folder), bundles=(str(bundles["ort-cpu"]),),
                          backends=("torch-fp32", "ort-fp", "ort-int8"), baseline="ort-fp[ort-cpu]",
                          batches=(1, 2), threads=tuple(args.threads), warmup=args.warmup, repeats=args.repeats)
    report = bench_unet(cfg, command=command, progress=True)
    params = parameters(unet_config(SPEED_WIDTH, SPEED_LATENT))
    profile = "/".join(str(card["profile"]["sample"][k][0]) for k in ("min", "opt", "max"))
    report |= {"kind": "bench", "title": "Text-to-image: UNet step of a Stable-Diffusion-shaped UNet, INT8 on ONNX "
                                         "Runtime vs FP32",
               "trt_rtx_build": build,
               "notes": (f"`scripts/text2img_measure.py speed`: Stable Diffusion 1.5's UNet layout at width "
                         f"{SPEED_WIDTH} ({params / 1e6:.1f} M parameters; SD 1.5: 859.5 M), {SPEED_LATENT}×"
                         f"{SPEED_LATENT} latents, 77×768 text embeddings, random weights and random embeddings "
                         f"(speed does not depend on them; quality cannot be measured on them). Min-max W"
                         f"{ort_wbits}A8 ort-cpu bundle{' (7-bit weights: this CPU has no VNNI)' if ort_wbits < 8 else ''}"
                         f". Batch 2 is one image's classifier-free-guidance pair. Speedups are against ONNX Runtime "
                         f"FP32 at the same batch and thread count. TensorRT-RTX built the TensorRT-flavour W8A8 "
                         f"bundle (batch profile {profile}: `--max-batch 2`, doubled for CFG) in {build['build_s']:.1f} s on this "
                         f"CPU, plan {build['plan_mib']:.0f} MiB ({network['quantized_conv']} quantized convolutions"
                         f", {network['quantized_matmul']} quantized matrix multiplications).\n\n"
                         f"![images per second per variant, batch and thread count](data/{args.out.with_suffix('.png').name})")}
    print("\n".join(format_report(report)))
    print(f"build: {build}")
    print(f"wrote {save_report(report, args.out)}")


# ---------------------------------------------------------------------------------------------- memory


def fit(points: list[tuple[float, float, float]]) -> np.ndarray:
    """``[a, b, c]`` of ``y = a + b·P + c·(w·A)`` through three ``(P, w·A, y)`` points."""
    design = np.array([[1.0, p, s] for p, s, _ in points])
    return np.linalg.solve(design, np.array([v for _, _, v in points]))


def memory(args: argparse.Namespace, command: str) -> None:
    runs = []
    calib = CalibSetConfig(num=16, keep_steps=4, batch=8, sampler=GUIDED)
    for width, latent in MEMORY_GRID:
        folder = pipeline(args.work, width, latent)
        print(f"bench calibrate: width {width}, {latent}x{latent} latents", flush=True)
        cfg = CalibrateBenchConfig(model=str(folder), methods=CALIBRATION_METHODS, options=MEMORY_OPTIONS,
                                   calib_set=calib, d2=D2StatsJob(num=4, batch=4, sampler=GUIDED),
                                   prompts=PROMPTS.to_dict(), threads=args.threads[0])
        report = bench_calibrate(cfg, command=command, progress=True)
        print("\n".join(format_report(report)), flush=True)
        runs.append({"width": width, "latent": latent, "parameters": parameters(unet_config(width, latent)),
                     "results": {r["variant"]: {"peak_increase_mb": r["peak_increase_mb"], "peak_rss_mb": r["peak_rss_mb"],
                                                "seconds": r["seconds"]["median"]} for r in report["results"]},
                     "machine": report["machine"]})
    sd15 = {latent: {"parameters": parameters(unet_config(1.0, latent)),
                     "brecq_cache_mb": BRECQ_DEFAULT_SAMPLES * largest_unit_floats(unet_config(1.0, latent)) * 4 / 2**20}
            for latent in SD15_LATENTS}
    rows = {}
    for job in runs[0]["results"]:
        points = [(r["parameters"], r["width"] * r["latent"] ** 2, r["results"][job]["peak_increase_mb"])
                  for r in runs]
        coef = fit(points)
        row = {"measured_mb": {f"w{r['width']}-{r['latent']}": r["results"][job]["peak_increase_mb"] for r in runs},
               "seconds": {f"w{r['width']}-{r['latent']}": r["results"][job]["seconds"] for r in runs},
               "bytes_per_parameter": coef[1] * 2**20}
        for latent, sd in sd15.items():
            est = coef[0] + coef[1] * sd["parameters"] + coef[2] * latent ** 2
            if job in ("brecq", "tdq-ptq"):
                est += sd["brecq_cache_mb"]
            row[f"sd15_{latent}_gb"] = est / 1024
        rows[job] = row
        if job == "tdq-qat":
            qat64 = {latent: (coef[0] + coef[1] * sd["parameters"] + 8 * coef[2] * latent ** 2) / 1024
                     for latent, sd in sd15.items()}
    doc = {"kind": "calib-memory", "title": "Text-to-image: calibration memory per method, extrapolated to Stable "
                                            "Diffusion 1.5's UNet",
           "notes": ("`scripts/text2img_measure.py memory` (module docstring: configs, options, the fit). Peak RSS "
                     "increase of each job in its own process (`tdqrt bench calibrate`) at three small configs (width × "
                     "latent: 0.1 × 16², 0.15 × 16², 0.1 × 24² of SD 1.5's UNet), default batch sizes except tdq-qat's (8, not 64), extrapolated with "
                     "`a + b·parameters + c·width·latent area` (three configs, three coefficients: an exact fit) to "
                     "SD 1.5 (859.5 M parameters). BRECQ/tdq-ptq rows add the cache of their default 512 samples per "
                     f"unit ({sd15[32]['brecq_cache_mb'] / 1024:.1f} GiB at 32², "
                     f"{sd15[64]['brecq_cache_mb'] / 1024:.1f} GiB at 64²). tdq-qat at its default batch 64: "
                     f"{qat64[32]:.0f} GB at 32², {qat64[64]:.0f} GB at 64² (activation term × 8)."),
           "rows": rows, "sd15": sd15, "options": MEMORY_OPTIONS, "calib_set": calib.to_dict(), "configs": runs,
           "meta": meta(command)}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("what", choices=("speed", "memory"))
    parser.add_argument("--work", type=Path, default=Path("runs/text2img"), help="pipelines, models, bundles go here")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts (memory: the first)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (speed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (speed)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default: docs/data/54-… or 55-…)")
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "docs" / "data" / ("54-text2img-speed.json" if args.what == "speed"
                                             else "55-text2img-calib-memory.json")
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "scripts/text2img_measure.py", *sys.argv[1:]])
    (speed if args.what == "speed" else memory)(args, command)


if __name__ == "__main__":
    main()
