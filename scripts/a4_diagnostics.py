"""Why a lower ε error need not give a lower FID at 4-bit activations: paired per-sample statistics of a
calibration-table run (``scripts/calibration_table.py``) and the timestep spread of the TDQ scale tables.

For every row with samples: the per-sample RMS difference to the FP sample drawn from the same noise (median,
90th/99th percentile, in uint8 grey levels), the mean intensity bias, and the fraction of samples the digits
extractor classifies as their conditioning label. For every TDQ model: max_t s(t) / min_t s(t) per layer.

    python scripts/a4_diagnostics.py runs/calib-a4-500 > runs/calib-a4-500/diagnostics.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from tdqrt.tools.extractor import default_extractor_dir, load_extractor


def paired_stats(run: Path) -> dict:
    extractor = load_extractor(default_extractor_dir("digits"))
    fp = np.load(run / "samples" / "FP" / "samples.npz")["arr_0"].astype(np.float64)
    out = {}
    for row in sorted(p for p in (run / "samples").iterdir() if (p / "samples.npz").exists()):
        z = np.load(row / "samples.npz")
        images = z["arr_0"]
        diff = images.astype(np.float64) - fp
        rms = np.sqrt((diff**2).reshape(len(diff), -1).mean(axis=1))
        with torch.inference_mode():
            logits = extractor.features(torch.from_numpy(images).permute(0, 3, 1, 2))["logits"]
        out[row.name] = {"rms_median": float(np.median(rms)), "rms_p90": float(np.percentile(rms, 90)),
                         "rms_p99": float(np.percentile(rms, 99)), "bias": float(diff.mean()),
                         "label_accuracy": float((logits.argmax(1).numpy() == z["labels"]).mean()),
                         "num": int(len(images))}
    return out


def scale_spread(run: Path) -> dict:
    out = {}
    for model in sorted((run / "models").iterdir()):
        tensors = load_file(model / "quant.safetensors")
        ratios = np.array([v.max() / v.min() for k, v in tensors.items() if k.endswith("act_quant.table")])
        if len(ratios):
            out[model.name] = {"layers": int(len(ratios)), "median": float(np.median(ratios)),
                               "p90": float(np.percentile(ratios, 90)), "max": float(ratios.max())}
    return out


if __name__ == "__main__":
    run = Path(sys.argv[1])
    json.dump({"paired_vs_fp": paired_stats(run), "tdq_scale_max_over_min": scale_spread(run)}, sys.stdout, indent=1)
