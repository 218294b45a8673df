"""Issue-3 results table: every calibration method at W8A8 / W4A8 / W8A4 on one FP model.

For each row: calibrate (sharing one calibration set), sample ``--num`` images with DDIM ``--steps`` and the
same seeds as the FP row, FID/KID with the project's digits feature extractor, and the mean per-step ε error
against the FP model along FP trajectories. Writes ``results.json`` and ``results.md`` into ``--out``; rows that
already have results are reused, so the script can be stopped and resumed.

    OMP_NUM_THREADS=2 python scripts/calibration_table.py --model runs/digits-small --out runs/calib-table
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.methods import METHODS
from tdqrt.engines.artifacts import versions, write_bytes_atomic, write_json_atomic
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.runtime.schedules import NoiseSchedule
from tdqrt.tools.metrics import EvalConfig, evaluate
from tdqrt.tools.quality import eps_error_per_step, markdown_table
from tdqrt.tools.sample import SampleJob, sample_model

BITS = ((8, 8), (4, 8), (8, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num", type=int, default=500, help="samples per row")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--err-num", type=int, default=64, help="trajectories for the per-step eps error")
    ap.add_argument("--calib-num", type=int, default=128)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--bits", nargs="*", default=[f"W{w}A{a}" for w, a in BITS])
    ap.add_argument("--variant", nargs=3, action="append", default=[], metavar=("NAME", "METHOD", "OPTIONS_JSON"),
                    help="an extra row per --bits: METHOD with these method options, e.g. "
                         "lsq-qat tdq-qat '{\"act_scale\": \"static\"}'")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    sampler = SamplerConfig(kind="ddim", steps=args.steps, eta=0.0)
    fp = load_model_dir(args.model)
    schedule = NoiseSchedule(fp.schedule)
    m = fp.model
    shape = (m.in_channels, m.image_size, m.image_size)
    calib_dir = out / "calib"
    if not (calib_dir / "calib.json").exists():
        collect_calibration_set(m, schedule, CalibSetConfig(num=args.calib_num, keep_steps=20,
                                                            sampler=SamplerConfig(steps=args.steps)), calib_dir)
    eval_cfg = EvalConfig(metrics=("fid", "kid"))

    def run_row(name: str, model_dir: Path, calib_s: float | None) -> None:
        if name in results["rows"]:
            return
        job = SampleJob(num=args.num, batch=100, seed=0, sampler=sampler)
        res = sample_model(model_dir, out / "samples" / name, job, progress=False)
        metrics = evaluate(out / "samples" / name / "samples.npz", "digits", eval_cfg)["metrics"]
        q = load_model_dir(model_dir).model
        err = eps_error_per_step(m, q, schedule, sampler, num=args.err_num, batch=args.err_num, seed=7, shape=shape,
                                 num_classes=m.num_classes, null_label=m.null_label)
        results["rows"][name] = {"metrics": metrics, "eps_mse_mean": float(err.mean()),
                                 "eps_mse_per_step": err.tolist(), "sample_s": round(res.seconds, 1),
                                 "calibrate_s": calib_s}
        write_json_atomic(results_path, results)
        print(name, results["rows"][name]["metrics"], f"eps_mse={err.mean():.3g}", flush=True)

    run_row("FP", args.model, None)
    for bits in args.bits:
        w, a = int(bits[1]), int(bits[3])
        rows = [(m, m, {}) for m in args.methods] + [(n, m, json.loads(o)) for n, m, o in args.variant]
        for label, method, options in rows:
            name = f"{label} W{w}A{a}"
            qdir = out / "models" / f"{label}-w{w}a{a}"
            t0 = time.perf_counter()
            if name not in results["rows"] and not (qdir / "quant.json").exists():
                cfg = CalibrateConfig(quant=QuantConfig(method=method, wbits=w, abits=a), options=options)
                calibrate(args.model, qdir, cfg, calib_dir=calib_dir, progress=False)
            run_row(name, qdir, round(time.perf_counter() - t0, 1))
    results["meta"] = {"command": "python scripts/calibration_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
        for k, v in vars(args).items() if k != "variant") + "".join(
        f" --variant {n} {m} '{o}'" for n, m, o in args.variant),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.node()}", "versions": versions(),
        "sampler": sampler.to_dict()}
    write_json_atomic(results_path, results)
    key = lambda r, k: next(v for kk, v in r["metrics"].items() if kk.startswith(k + "["))
    rows = [[n, key(r, "FID"), key(r, "KID"), r["eps_mse_mean"], r["calibrate_s"] or "-"]
            for n, r in results["rows"].items()]
    fe = next(k for k in results["rows"]["FP"]["metrics"] if k.startswith("FID["))[4:-1]
    table = markdown_table(["model", f"FID [{fe}]", f"KID [{fe}]", "mean per-step ε MSE vs FP", "calibration s"], rows)
    write_bytes_atomic(out / "results.md", (table + "\n").encode())
    print(table)


if __name__ == "__main__":
    main()
