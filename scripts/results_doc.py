"""Regenerate ``docs/results.md`` from the JSON files the results scripts write.

    python scripts/results_doc.py runs/calib-table/results.json [more results.json ...] > docs/results.md
"""
from __future__ import annotations

import json
import sys

from tdqrt.tools.quality import markdown_table


def metric(row: dict, name: str) -> float:
    return next(v for k, v in row["metrics"].items() if k.startswith(name + "["))


def main(paths: list[str]) -> str:
    runs = [json.load(open(p)) for p in paths]
    rows, seen = [], set()
    for run in runs:
        for name, r in run["rows"].items():
            if name in seen:
                continue
            seen.add(name)
            rows.append([name, metric(r, "FID"), metric(r, "KID"), r["eps_mse_mean"], r["calibrate_s"] or "-"])
    order = lambda r: (r[0] != "FP", r[0].split()[-1] if " " in r[0] else "", r[0])
    rows.sort(key=order)
    fe = next(k for k in runs[0]["rows"]["FP"]["metrics"] if k.startswith("FID["))[4:-1]
    out = ["# Results", "", "## Calibration methods on the `small` digits model (issue 3)", "",
           markdown_table(["model", f"FID [{fe}]", f"KID [{fe}]", "mean per-step ε MSE vs FP", "calibration s"], rows),
           "", f"FID/KID use `{fe}`, the project's own digits CNN (not Inception); 300 samples per row vs the 1797 "
           "sklearn digits; KID is torch-fidelity's unbiased estimate (negative values mean 'indistinguishable at "
           "this sample size'). Sampler: DDIM 50 steps, eta 0, no guidance; the commands that made the rows:", ""]
    for path, run in zip(paths, runs):
        meta = run.get("meta")
        if meta is None:  # the script writes meta when it finishes; rows are saved as they complete
            out.append(f"- `{path}`: rows of a run that had not finished when this file was generated")
            continue
        out += [f"- `{meta['command']}` on {meta['machine']}, versions "
                + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1:]))
