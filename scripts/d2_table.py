"""Issue-4 results table: D² / PTQD corrections on quantized models, per sampler setting.

For every quantized model and sampler setting (steps × eta, CFG scale ``--guidance``): collect the D² statistics
for exactly that setting (``tdqrt d2-stats``), then sample ``--num`` images with the FP model and with the
quantized model under each correction (off, PTQD, S-D²/D-D² tensor- and channel-wise), all from the same per-sample
noise streams. Each row records FID/KID against the digits data (the project's digits extractor), the per-step
trajectory error ``E‖x_i − x_i^FP‖²`` (per element, at the input of every step i, and at the final x0), and the
sampling time. ``results.json`` is updated after every row, so a stopped run resumes where it was.

    OMP_NUM_THREADS=1 python scripts/d2_table.py --fp tools/assets/digits-small \
        --quant W4A8=runs/calib-table/models/tdq-qat-w4a8 W8A4=runs/calib-table/models/tdq-qat-w8a4 --out runs/d2-table
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tdqrt.calibration.data.images import to_uint8_nhwc
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.artifacts import versions, write_bytes_atomic, write_json_atomic
from tdqrt.runtime.corrections import make_correction
from tdqrt.runtime.d2 import D2Table
from tdqrt.runtime.sampling import NoiseSource, Sampler, SamplerConfig, as_eps_denoiser, guided_eps, sample
from tdqrt.runtime.schedules import NoiseSchedule
from tdqrt.tools.d2 import D2StatsJob, collect_to_dir
from tdqrt.tools.metrics import EvalConfig, evaluate
from tdqrt.tools.quality import markdown_table
from tdqrt.tools.sample import write_samples

VARIANTS = (("off", None), ("ptqd", None), ("s", "tensor"), ("d", "tensor"), ("s", "channel"), ("d", "channel"))


def variant_name(kind: str, granularity) -> str:
    return {"off": "no correction", "ptqd": "PTQD"}.get(kind) or f"{kind.upper()}-D² {granularity}"


def run_sampling(model, schedule, cfg: SamplerConfig, correction, *, num: int, batch: int, seed: int):
    """Sample ``num`` images; return (images float32 [N, C, H, W], trajectory [K+1, N, C, H, W], seconds).

    Every run, FP included, goes through a step hook so that all runs draw the same per-sample noise (the loop
    draws z every step once a hook is set); the hook records x at the input of each step."""
    m = model
    shape = (m.in_channels, m.image_size, m.image_size)
    K = len(Sampler(schedule, cfg))
    traj = np.zeros((K + 1, num, *shape), np.float32)
    images = []
    seconds = 0.0
    for start in range(0, num, batch):
        idx = torch.arange(start, min(num, start + batch))
        y = idx % m.num_classes if m.num_classes else None

        def hook(info, x, eps, noise):
            traj[info.index, start:start + len(idx)] = x.numpy()
            return correction(info, x, eps, noise) if correction is not None else (eps, info.sigma)

        t0 = time.perf_counter()
        x = sample(m, schedule, cfg, sample_indices=idx, seed=seed, shape=shape, y=y, null_label=m.null_label,
                   hook=hook)
        seconds += time.perf_counter() - t0
        traj[K, start:start + len(idx)] = x.numpy()
        images.append(x)
    return torch.cat(images), traj, seconds


def correction_cost(model, schedule, cfg: SamplerConfig, table: D2Table, batch: int, repeats: int = 20) -> dict:
    """Median time of one guided UNet evaluation and of each correction's step update, at ``batch`` samples."""
    m = as_eps_denoiser(model, schedule)  # the corrections work on ε, whatever the model predicts
    shape = (m.in_channels, m.image_size, m.image_size)
    sampler = Sampler(schedule, cfg)
    x = torch.randn(batch, *shape)
    y = torch.arange(batch) % m.num_classes if m.num_classes else None
    info = sampler.info(len(sampler) // 2)
    t = torch.full((batch,), info.t, dtype=torch.long)
    noise = NoiseSource(0, range(batch))

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.inference_mode():
        eps = guided_eps(m, x, t, y, m.null_label, cfg.guidance_scale)
        unet = median_s(lambda: guided_eps(m, x, t, y, m.null_label, cfg.guidance_scale))
        out = {"batch": batch, "unet_s": unet}
        for kind, gran in VARIANTS[1:]:
            corr = make_correction(kind, gran or "tensor", table, sampler)
            out[variant_name(kind, gran)] = median_s(lambda: corr(info, x, eps, noise)) / unet
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp", type=Path, required=True)
    ap.add_argument("--quant", nargs="+", required=True, help="LABEL=QUANT_DIR")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", nargs="+", type=int, default=[50, 20])
    ap.add_argument("--etas", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--num", type=int, default=300, help="samples per row")
    ap.add_argument("--stats-num", type=int, default=256, help="trajectories for the D² statistics")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}, "cost": {}}
    results["meta"] = {"command": "python scripts/d2_table.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()} {platform.node()}", "versions": versions(),
        "threads": torch.get_num_threads()}
    fp = load_model_dir(args.fp)
    schedule = NoiseSchedule(fp.schedule)
    quants = dict(q.split("=", 1) for q in args.quant)
    eval_cfg = EvalConfig(metrics=("fid", "kid"))

    def record(name: str, images: torch.Tensor, traj: np.ndarray, fp_traj: np.ndarray, seconds: float) -> None:
        sdir = out / "samples" / name.replace(" ", "_").replace("²", "2")
        labels = (np.arange(args.num) % fp.model.num_classes).astype(np.int64)
        write_samples(sdir, to_uint8_nhwc(images), labels, {"format": "tdqrt-samples", "version": 1, "row": name})
        metrics = evaluate(sdir / "samples.npz", "digits", eval_cfg)["metrics"]
        err = ((traj - fp_traj) ** 2).mean(axis=tuple(range(1, traj.ndim)))
        results["rows"][name] = {"metrics": metrics, "traj_mse_per_step": err[:-1].tolist(),
                                 "traj_mse_mean": float(err[:-1].mean()), "x0_mse": float(err[-1]),
                                 "sample_s": round(seconds, 1)}
        write_json_atomic(results_path, results)
        print(name, {k: round(v, 4) for k, v in metrics.items()}, f"traj={err[:-1].mean():.4g} x0={err[-1]:.4g}",
              flush=True)

    for steps in args.steps:
        for eta in args.etas:
            cfg = SamplerConfig(kind="ddim", steps=steps, eta=eta, guidance_scale=args.guidance)
            setting = f"DDIM{steps} eta{eta:g}"
            fp_name = f"FP | {setting}"
            fp_traj_path = out / "fp_trajectories" / f"ddim{steps}-eta{eta:g}.npy"
            if fp_name not in results["rows"] or not fp_traj_path.exists():
                fp_images, fp_traj, fp_s = run_sampling(fp.model, schedule, cfg, None, num=args.num,
                                                        batch=args.batch, seed=args.seed)
                fp_traj_path.parent.mkdir(exist_ok=True)
                np.save(fp_traj_path, fp_traj)
                record(fp_name, fp_images, fp_traj, fp_traj, fp_s)
            fp_traj = np.load(fp_traj_path)
            for label, qdir in quants.items():
                q = load_model_dir(qdir)
                stats_dir = out / "stats" / f"{label}-ddim{steps}-eta{eta:g}"
                if not (stats_dir / "d2.json").exists():
                    t0 = time.perf_counter()
                    collect_to_dir(args.fp, qdir, stats_dir, D2StatsJob(sampler=cfg, num=args.stats_num, batch=64),
                                   progress=False)
                    results.setdefault("stats_s", {})[f"{label} | {setting}"] = round(time.perf_counter() - t0, 1)
                table = D2Table.load(stats_dir)
                for kind, gran in VARIANTS:
                    if gran == "channel" and table.num_channels == 1:
                        continue  # one image channel: the channel-wise fit is the tensor-wise one
                    name = f"{label} {variant_name(kind, gran)} | {setting}"
                    if name in results["rows"]:
                        continue
                    corr = None if kind == "off" else make_correction(kind, gran or "tensor", table,
                                                                        Sampler(schedule, cfg))
                    images, traj, secs = run_sampling(q.model, schedule, cfg, corr, num=args.num, batch=args.batch,
                                                      seed=args.seed)
                    record(name, images, traj, fp_traj, secs)
                cost_key = f"{label} | {setting}"
                if cost_key not in results["cost"]:
                    results["cost"][cost_key] = correction_cost(q.model, schedule, cfg, table, args.batch)
                    write_json_atomic(results_path, results)
    write_json_atomic(results_path, results)
    fe = next(k for k in next(iter(results["rows"].values()))["metrics"] if k.startswith("FID["))[4:-1]
    key = lambda r, k: next(v for kk, v in r["metrics"].items() if kk.startswith(k + "["))
    rows = [[n, key(r, "FID"), key(r, "KID"), r["traj_mse_mean"], r["x0_mse"]] for n, r in results["rows"].items()]
    table_md = markdown_table(["row", f"FID [{fe}]", f"KID [{fe}]", "mean per-step traj. MSE vs FP",
                               "x0 MSE vs FP"], rows)
    write_bytes_atomic(out / "results.md", (table_md + "\n").encode())
    print(table_md)


if __name__ == "__main__":
    main()
