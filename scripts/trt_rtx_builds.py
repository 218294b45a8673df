"""TensorRT-RTX build time and plan size of three bundle sizes, on this (GPU-less) machine:

    python scripts/trt_rtx_builds.py [--work DIR] [--out docs/data/40-trt-rtx-builds.json]

* ``tiny``: the tiny preset trained for a few steps on digits (the test suite's model), min-max W8A8;
* ``small``: the shipped ``tools/assets/digits-small`` model, min-max W8A8 (the demo's architecture);
* ``ddpm-cifar10-32``: that architecture with random weights, min-max W8A8.

Each bundle is exported in the TensorRT flavour (fp32) and built with ``tdqrt build --backend trt-rtx`` settings
(``BuildConfig(backend="trt-rtx")``: the library's portable compute capabilities, max batch 16, opt level 3). The
calibration sets are tiny: the build does not depend on how good the scales are. Rows record the build seconds
(``engine.json``), the plan size and the parsed network's Q/DQ and quantized Conv/MatMul counts; ``python
scripts/results_doc.py`` renders them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from tdqrt.calibration.checkpoint import save_fp_checkpoint
from tdqrt.calibration.models import model_from_preset
from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.calib_set import CalibSetConfig
from tdqrt.calibration.training import TrainConfig, train
from tdqrt.engines.artifacts import versions
from tdqrt.engines.build import BuildConfig, build_engine
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.runtime.schedules import ScheduleConfig
from tdqrt.tools.bench import machine_info

ROOT = Path(__file__).resolve().parents[1]
CALIB = CalibSetConfig(num=4, keep_steps=2, batch=4, sampler=SamplerConfig(steps=4))


def fp_models(work: Path) -> dict[str, Path]:
    tiny = work / "tiny-fp"
    if not (tiny / "model.json").is_file():
        train(TrainConfig(data="digits", model="tiny", steps=6, batch_size=16, warmup_steps=2, checkpoint_every=100),
              tiny, progress=False)
    cifar = work / "cifar-fp"
    if not (cifar / "model.json").is_file():
        torch.manual_seed(0)
        model = model_from_preset("ddpm-cifar10-32", image_size=32, in_channels=3, num_classes=0).eval()
        save_fp_checkpoint(cifar, model, ScheduleConfig(), data={"name": "random"},
                           training={"preset": "ddpm-cifar10-32", "steps": 0}, ema=False)
    return {"tiny": tiny, "small": ROOT / "tools" / "assets" / "digits-small", "ddpm-cifar10-32": cifar}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/trt-rtx-builds"), help="models and bundles go here")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "40-trt-rtx-builds.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for name, fp in fp_models(args.work).items():
        bundle = args.work / f"{name}-bundle"
        if not (bundle / "manifest.json").is_file():
            quant = calibrate(fp, args.work / f"{name}-w8a8", CalibrateConfig(calib_set=CALIB), progress=False)
            export_bundle(quant, bundle, ExportConfig(polygraphy=False, fp_reference=False, calib_samples=4))
        t0 = time.perf_counter()
        plan, card = build_engine(bundle, BuildConfig(backend="trt-rtx"), args.work / name / "unet.trt.plan")
        network = card["report"]["network"]
        rows[name] = {"build_s": card["build"]["seconds"], "wall_s": round(time.perf_counter() - t0, 2),
                      "plan_mib": round(card["plan"]["bytes"] / 2**20, 2), "max_batch": card["profile"]["sample"]["max"][0],
                      "layers": network["layers"], "quantize": network["quantize"],
                      "dequantize": network["dequantize"], "quantized_conv": network["quantized_conv"],
                      "quantized_matmul": network["quantized_matmul"], "library": card["runtime"]["name"],
                      "library_version": card["runtime"]["version"]}
        print(name, rows[name], flush=True)
    machine = machine_info("cpu")
    library = {rows["tiny"]["library"]: rows["tiny"]["library_version"]}
    doc = {"kind": "trt-build", "title": "TensorRT-RTX builds on a CPU-only machine",
           "notes": ("Ahead-of-time builds with no GPU (TensorRT-RTX's default), min-max W8A8 bundles in the TensorRT "
                     "flavour, `BuildConfig(backend=\"trt-rtx\")`: portable compute capabilities, batch profile "
                     "1/16/16 (doubled for the class-conditional digits models), opt level 3. Running these plans "
                     "needs an RTX-class GPU, which this machine does not have."),
           "rows": rows,
           "meta": {"command": shlex.join(["python", "scripts/trt_rtx_builds.py", *sys.argv[1:]]),
                    "machine": f"{machine['cpu']}, {machine['cores']} cores, no GPU, 1-min load "
                               f"{machine['load_average_1m']:.1f} at the end",
                    "versions": versions() | library}}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
