"""How far apart ``tdqrt validate``'s end-to-end INT8 error ratio puts good and broken bundles (reported beside its
teacher-forced per-layer verdict, and the verdict for a TensorRT plan).

For every quantized checkpoint given: export a bundle of ``--target`` (no lint, no Polygraphy), validate it, then
validate copies of its ``unet.onnx`` in which one activation QuantizeLinear — the first, the middle or the last
one — quantizes on a grid ``factor`` times coarser (x4) or finer (x1/4) than the one its DequantizeLinear reads
(a miscalibrated layer). Per timestep it records, for torch fake-quant vs ORT INT8, the median over the samples
of the relative L2 error, the cosine and the error ratio ``‖ort − fake-quant‖ / ‖fake-quant − FP‖``, and the
relative L2 error of the fake-quant model itself against FP.

    python scripts/validate_margins.py runs/calib-table/models/minmax-w8a8 runs/calib-table/models/tdq-ptq-w4a8 \\
        --out runs/validate-margins.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.artifacts import versions, write_json_atomic
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.engines.bundle import open_bundle
from tdqrt.tools.validate import ValidateConfig, recorded_output_grids, validate_models

FACTORS = (4.0, 0.25)


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes whose scale is an initializer (activations; weights are stored as int8 + DQ)."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits]


def tamper(src: Path, dst: Path, index: int, factor: float) -> str:
    """Copy ``src`` to ``dst`` with the scale of activation quantizer ``index`` multiplied by ``factor`` (a fresh
    initializer, so the DequantizeLinear after it keeps the original scale); returns the node's name."""
    model = onnx.load(str(src))
    node = activation_quantizers(model)[index]
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
    model.graph.initializer.append(numpy_helper.from_array((scale * factor).astype(scale.dtype), "tampered_scale"))
    node.input[1] = "tampered_scale"
    onnx.save(model, str(dst))
    return node.name


def summarize(report) -> list[dict]:
    pair = report.pairs["torch_quant vs ort_int8"]["per_timestep"]
    quant = report.pairs["ort_fp vs ort_int8"]["per_timestep"]
    return [{"t": p["timestep"], "median_rel_l2": p["median_sample_rel_l2"], "median_cosine": p["median_sample_cosine"],
             "median_error_ratio": p["median_sample_error_ratio"], "quant_rel_l2": q["median_sample_rel_l2"]}
            for p, q in zip(pair, quant)]


def margins(quant_dir: Path, target: str, config: ValidateConfig) -> dict:
    rec = load_model_dir(quant_dir)
    fp = load_model_dir(rec.card["fp_model"]["path"])
    calib = rec.card["calibration"]["path"]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(quant_dir, Path(tmp) / "bundle",
                               ExportConfig(target=target, lint=False, polygraphy=False))

        grids = recorded_output_grids(open_bundle(bundle).manifest)

        def run(onnx_path: Path) -> list[dict]:
            return summarize(validate_models(bundle / "unet_fp.onnx", onnx_path, fp.model, rec.model, calib, config,
                                             target=target, output_grids=grids))

        out = {"good": run(bundle / "unet.onnx"), "broken": []}
        count = len(activation_quantizers(onnx.load(str(bundle / "unet.onnx"))))
        for index in sorted({0, count // 2, count - 1}):
            for factor in FACTORS:
                bad = Path(tmp) / "bad.onnx"
                name = tamper(bundle / "unet.onnx", bad, index, factor)
                out["broken"].append({"node": name, "factor": factor, "per_timestep": run(bad)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quant_dirs", nargs="+", type=Path)
    parser.add_argument("--target", default="trt")
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--per-timestep", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = ValidateConfig(timesteps=args.timesteps, per_timestep=args.per_timestep)
    result = {"kind": "validate-margins", "title": f"`tdqrt validate` on good and broken {args.target} bundles",
              "target": args.target, "config": config.to_dict(),
              "models": {str(q): margins(q, args.target, config) for q in args.quant_dirs},
              "meta": {"command": "python scripts/validate_margins.py " + " ".join(sys.argv[1:]),
                       "machine": f"{platform.machine()} {platform.node()}", "versions": versions()}}
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
