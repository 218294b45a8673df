"""The headline CPU number: one UNet step of the ``ddpm-cifar10-32`` architecture (35.7 M parameters, random weights)
in torch FP32, ONNX Runtime FP32, and INT8 on ONNX Runtime in both export flavours, measured in one run:

    python scripts/cpu_headline.py [--work DIR] [--batch 1 4 16] [--threads 1 2] [--repeats 15]
                                   [--out docs/data/49-cpu-headline.json]

Weights are random (``torch.manual_seed(0)``): speed does not depend on them, and nothing is trained or downloaded.
The model is calibrated min-max W8A8 on a tiny calibration set (scales only have to be plausible) and exported as a
TensorRT-flavour bundle and an ``ort-cpu`` bundle. On an x86 CPU without VNNI
(:func:`tdqrt.engines.ort.u8s8_saturates`) the ``ort-cpu`` bundle is calibrated with 7-bit weights instead, so that
its results are right there (README, "The ort-cpu flavour"); it runs the same integer kernels either way, and the
notes say which was used. ``tdqrt bench unet`` (:func:`tdqrt.tools.bench.bench_unet`) then measures every variant at
every batch size and thread count round robin, with speedups against ONNX Runtime FP32 at the same batch and thread
count. The JSON (kind ``bench``, rendered by ``python scripts/results_doc.py``) and a bar chart (``.png`` beside it)
go to ``--out``; models and bundles are kept in ``--work`` and reused by a rerun.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from tdqrt.calibration.checkpoint import CARD_FILE, load_fp_checkpoint, save_fp_checkpoint
from tdqrt.calibration.models import model_from_preset
from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
from tdqrt.calibration.quant.checkpoint import QUANT_CARD
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.engines.bundle import is_bundle_dir
from tdqrt.engines.ort import U8S8_SAFE_WEIGHT_BITS, u8s8_saturates
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig
from tdqrt.tools.bench import UnetBenchConfig, bench_unet, format_report, save_report

ROOT = Path(__file__).resolve().parents[1]
PRESET = "ddpm-cifar10-32"
CALIB = CalibSetConfig(num=4, keep_steps=2, batch=4, sampler=SamplerConfig(steps=4))
BASELINE = "ort-fp[ort-cpu]"  # ONNX Runtime FP32: the FP reference graph of the ort-cpu bundle


def random_model(work: Path) -> Path:
    """The FP checkpoint of the architecture with seeded random weights (written once)."""
    out = work / f"{PRESET}-random"
    if not (out / CARD_FILE).is_file():
        torch.manual_seed(0)
        model = model_from_preset(PRESET, image_size=32, in_channels=3, num_classes=0).eval()
        save_fp_checkpoint(out, model, ScheduleConfig(), data={"name": "random"},
                           training={"preset": PRESET, "steps": 0}, ema=False)
    return out


def bundles(work: Path, fp: Path) -> dict[str, tuple[Path, int]]:
    """``{target: (bundle, weight bits)}`` for ort-cpu then trt, calibrated min-max on one shared calibration set."""
    calib = work / "calib"
    if not (calib / "calib.json").is_file():
        model = load_fp_checkpoint(fp)
        collect_calibration_set(model.model, NoiseSchedule(model.schedule), CALIB, calib, progress=False)
    ort_wbits = U8S8_SAFE_WEIGHT_BITS if u8s8_saturates() else 8
    out = {}
    for target, wbits in (("ort-cpu", ort_wbits), ("trt", 8)):
        quant = work / f"minmax-w{wbits}a8"
        if not (quant / QUANT_CARD).is_file():
            calibrate(fp, quant, CalibrateConfig(quant=QuantConfig(wbits=wbits, abits=8), calib_set=CALIB),
                      calib_dir=calib, progress=False)
        bundle = work / f"{target}-w{wbits}a8"
        if not is_bundle_dir(bundle):
            # one FP32 ONNX Runtime variant is enough: only the ort-cpu bundle carries the FP reference graph
            export_bundle(quant, bundle, ExportConfig(target=target, polygraphy=False, calib_samples=8,
                                                      fp_reference=target == "ort-cpu"), calib_dir=calib)
        out[target] = (bundle, wbits)
    return out


def notes(wbits: int, params: int, plot: str) -> str:
    why = (f"this CPU has no VNNI, where ONNX Runtime's U8S8 kernels saturate with 8-bit weights, so the ort-cpu "
           f"bundle has {wbits}-bit weights: the same kernels at the same speed, with correct results" if wbits < 8
           else "this CPU has VNNI, so the ort-cpu bundle has 8-bit weights too")
    return (f"`scripts/cpu_headline.py`: the `{PRESET}` architecture ({params / 1e6:.1f} M parameters, 32×32, random "
            "weights), "
            f"min-max W8A8 ({why}). One `tdqrt bench unet` run: torch FP32, ONNX Runtime FP32 (`ort-fp`, the ort-cpu "
            "bundle's FP reference graph), the TensorRT-flavour INT8 graph and the ort-cpu INT8 graph on ONNX "
            "Runtime, every variant at every batch size and thread count interleaved round by round; speedups are "
            f"against ONNX Runtime FP32 (`{BASELINE}`) at the same batch and thread count.\n\n"
            f"![images per second per variant, batch and thread count](data/{plot})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/cpu-headline"), help="models and bundles go here")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="batch sizes")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "49-cpu-headline.json")
    args = parser.parse_args()
    command = shlex.join(["python", "scripts/cpu_headline.py", *sys.argv[1:]])
    settings = dict(batches=args.batch, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    UnetBenchConfig(preset=PRESET, **settings)  # refuses bad settings before anything is built
    fp = random_model(args.work)
    made = bundles(args.work, fp)
    cfg = UnetBenchConfig(model=str(fp), bundles=tuple(str(b) for b, _ in made.values()),
                          backends=("torch-fp32", "ort-fp", "ort-int8"), baseline=BASELINE, **settings)
    report = bench_unet(cfg, command=command, progress=True)
    report |= {"kind": "bench", "title": f"CPU headline: UNet step of the `{PRESET}` architecture, INT8 on ONNX "
                                         "Runtime vs FP32",
               "notes": notes(made["ort-cpu"][1], sum(p.numel() for p in load_fp_checkpoint(fp).model.parameters()),
                              args.out.with_suffix(".png").name)}
    print("\n".join(format_report(report)))
    print(f"wrote {save_report(report, args.out)} and {args.out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
