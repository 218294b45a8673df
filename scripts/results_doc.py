"""Regenerate ``docs/results.md`` from the result JSON files in ``docs/data/`` (one command, no arguments):

    python scripts/results_doc.py            # writes docs/results.md

Each JSON file is one section. Its ``kind`` picks the table layout:

* ``calibration`` — rows ``{name: {metrics, eps_mse_mean, calibrate_s}}`` from ``scripts/calibration_table.py``;
* ``d2`` — rows ``{name: {metrics, traj_mse_mean, x0_mse}}`` and ``cost`` from ``scripts/d2_table.py``;
* ``bench`` — the JSON ``tdqrt bench`` writes (``results``: one entry per measured variant);
* ``validate-margins`` — good and deliberately broken bundles through ``tdqrt validate``'s end-to-end INT8 rule
  (reported beside its per-layer verdict), from ``scripts/validate_margins.py``;
* ``trt-build`` — TensorRT-RTX build time and plan size per bundle, from ``scripts/trt_rtx_builds.py``;
* ``calib-memory`` — peak memory per calibration job on small Stable-Diffusion-shaped UNets and its extrapolation
  to Stable Diffusion 1.5's, from ``scripts/text2img_measure.py memory``.

``title`` and ``notes`` (Markdown) say what the section shows; ``meta`` (or ``runs``, a list of metas when rows come
from several runs) holds the command, machine and versions, printed under every table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tdqrt.tools.quality import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA, OUT = ROOT / "docs" / "data", ROOT / "docs" / "results.md"


def metric(row: dict, name: str) -> float:
    return next(v for k, v in row["metrics"].items() if k.startswith(name + "["))


def extractor(rows: dict) -> str:
    return next(k for k in next(iter(rows.values()))["metrics"] if k.startswith("FID["))[4:-1]


def calibration_table(doc: dict) -> str:
    fe = extractor(doc["rows"])
    rows = [[n, metric(r, "FID"), metric(r, "KID"), r["eps_mse_mean"], r.get("calibrate_s") or "-"]
            for n, r in doc["rows"].items()]
    rows.sort(key=lambda r: (r[0] != "FP", r[0].split()[-1] if " " in r[0] else "", r[0]))
    return markdown_table(["model", f"FID [{fe}]", f"KID [{fe}]", "mean per-step ε MSE vs FP", "calibration s"], rows)


def d2_table(doc: dict) -> str:
    fe = extractor(doc["rows"])
    rows = []
    for name, r in doc["rows"].items():
        model, setting = (s.strip() for s in name.split("|"))
        rows.append([setting, model, metric(r, "FID"), metric(r, "KID"), r["traj_mse_mean"], r["x0_mse"]])
    rows.sort(key=lambda r: (r[0], r[1].split()[0] != "FP", r[1].split()[0]))
    table = markdown_table(["sampler", "model / correction", f"FID [{fe}]", f"KID [{fe}]",
                            "mean per-step trajectory MSE vs FP", "x0 MSE vs FP"], rows)
    cost = doc.get("cost", {})
    if cost:
        kinds = [k for k in next(iter(cost.values())) if k not in ("batch", "unet_s")]
        crow = [[key, c["batch"], c["unet_s"] * 1e3, *(c[k] for k in kinds)] for key, c in cost.items()]
        table += "\n\nPer-step cost of the correction relative to one (guided) UNet call:\n\n" + markdown_table(
            ["model | sampler", "batch", "UNet call ms", *(f"{k} / UNet" for k in kinds)], crow)
    return table


def bench_table(doc: dict) -> str:
    """Latency rows (``tdqrt bench unet``/``loop``); loop rows add the overhead and D²-update fractions."""
    if any("peak_rss_mb" in r for r in doc["results"]):  # tdqrt bench calibrate: wall time and peak memory per job
        rows = [[r["variant"], r["seconds"]["median"], r["peak_rss_mb"], r["peak_increase_mb"]] for r in doc["results"]]
        return markdown_table(["job", "median s", "peak RSS MB", "RSS increase MB"], rows)
    loop = any("loop_overhead" in r for r in doc["results"])
    threaded = any("threads" in r for r in doc["results"])  # bench unet rows since it takes several thread counts
    header = ["variant", "batch", *(["threads"] if threaded else []), "median ms", "IQR ms", "images/s",
              f"speedup vs {doc['method']['baseline']}"]
    header += ["loop overhead %", "D² update % of step"] if loop else []
    rows = []
    for r in doc["results"]:
        s = r["seconds"]
        row = [r["variant"], r["batch"], *([r["threads"]] if threaded else []), s["median"] * 1e3, s["iqr"] * 1e3,
               r["images_per_s"], r["speedup_vs_baseline"]]
        if loop:
            row += [100 * r["loop_overhead"]["median"], 100 * r["d2_update"]["median"] if r.get("d2_update") else "-"]
        rows.append(row)
    table = markdown_table(header, rows)
    for skipped in doc.get("skipped", []):
        table += f"\n\n*{skipped['variant']} skipped:* {skipped['reason']}"
    m = doc["machine"]
    counts = lambda key: "/".join(map(str, c)) if isinstance(c := doc["threads"].get(key), list) else c
    return table + (f"\n\nMachine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, 1-min load "
                    f"{m.get('load_average_1m', 0):.1f} during the run; threads: torch {counts('torch_intra_op')}, "
                    f"ONNX Runtime {counts('onnxruntime_intra_op')}.")


def validate_margins_table(doc: dict) -> str:
    """Per model and graph (good, or one activation quantizer on a wrong grid): the error ratio per timestep and
    whether ``tdqrt validate``'s end-to-end error-ratio rule for the bundle's target (:func:`check_metrics`; the
    verdict for a TensorRT plan, reported for ONNX Runtime) fails it."""
    from tdqrt.tools.validate import ValidateConfig, check_metrics

    config, kind = ValidateConfig(**doc["config"]), "ort-cpu" if doc["target"] == "ort-cpu" else "int8"

    def row(model: str, graph: str, per_t: list) -> list:
        medians = [{"median_sample_error_ratio": r["median_error_ratio"], "median_sample_rel_l2": r["median_rel_l2"]}
                   for r in per_t]
        failed = [r["t"] for r, m in zip(per_t, medians) if check_metrics(kind, m, config)]
        ratios = " / ".join(f"{r['median_error_ratio']:.2f}" for r in per_t)
        return [model, graph, ratios, f"{max(r['quant_rel_l2'] for r in per_t):.3g}",
                "fails at t=" + ",".join(map(str, failed)) if failed else "passes"]

    rows = []
    for path, m in doc["models"].items():
        name = Path(path).name
        rows.append(row(name, "good", m["good"]))
        rows += [row(name, f"{b['node'].split('/')[0]} x{b['factor']:g}", b["per_timestep"]) for b in m["broken"]]
    timesteps = "/".join(str(r["t"]) for r in next(iter(doc["models"].values()))["good"])
    return markdown_table(["model", "graph", f"median error ratio at t = {timesteps}", "max quant. rel-L2",
                           "end-to-end rule"], rows)


def trt_build_table(doc: dict) -> str:
    """One row per bundle built by ``scripts/trt_rtx_builds.py``: build time, plan size, the parsed network."""
    rows = [[name, r["build_s"], r["plan_mib"], r["max_batch"], r["layers"], f"{r['quantize']} / {r['dequantize']}",
             f"{r['quantized_conv']} + {r['quantized_matmul']}"] for name, r in doc["rows"].items()]
    return markdown_table(["bundle", "build s", "plan MiB", "max batch", "network layers", "Q / DQ layers",
                           "quantized Conv + MatMul"], rows)


def calib_memory_table(doc: dict) -> str:
    """Per calibration job: the measured peak-RSS increase at each small config, the fitted bytes per parameter and
    the extrapolated peak for Stable Diffusion 1.5 at 32² and 64² latents."""
    configs = list(next(iter(doc["rows"].values()))["measured_mb"])
    rows = [[job, *(r["measured_mb"][c] for c in configs), r["bytes_per_parameter"],
             r["sd15_32_gb"], r["sd15_64_gb"]] for job, r in doc["rows"].items()]
    return markdown_table(["job", *(f"MB at {c}" for c in configs), "bytes / parameter",
                           "SD 1.5 at 32² GB (est.)", "SD 1.5 at 64² GB (est.)"], rows)


RENDERERS = {"calibration": calibration_table, "d2": d2_table, "bench": bench_table,
             "validate-margins": validate_margins_table, "trt-build": trt_build_table,
             "calib-memory": calib_memory_table}


def provenance(doc: dict) -> list[str]:
    metas = doc.get("runs") or ([doc["meta"]] if "meta" in doc else [])
    if doc["kind"] == "bench":
        metas = [{"command": doc["command"], "machine": doc["machine"]["cpu"], "versions": doc["versions"]}]
    lines = []
    for meta in metas:
        versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
        lines.append(f"- `{meta['command']}` — {meta.get('machine', '?')}; {versions}")
    return lines


def render(paths: list[Path]) -> str:
    out = ["# Results", "", "Regenerated by `python scripts/results_doc.py` from the JSON files in `docs/data/`.", ""]
    for path in paths:
        doc = json.loads(path.read_text())
        out += [f"## {doc['title']}", "", RENDERERS[doc["kind"]](doc), ""]
        if doc.get("notes"):
            out += [doc["notes"].strip(), ""]
        out += [f"Data: `docs/data/{path.name}`. Commands:", "", *provenance(doc), ""]
    return "\n".join(out)


def main() -> None:
    paths = sorted(DATA.glob("*.json"))
    if not paths:
        sys.exit(f"no result files in {DATA}; the results scripts write them (see scripts/)")
    OUT.write_text(render(paths))
    print(f"wrote {OUT} from {len(paths)} files")


if __name__ == "__main__":
    main()
