"""How much of the quantization error the Gaussian D² model can remove, per statistics directory.

Per step, the error Δ = ε̂ − ε has E[Δ²] = μ_Δ² + σ_Δ²; the conditional-mean correction removes the mean and the
part linear in ε̂, μ_Δ² + ρ²σ_Δ² (D²-DPM's Gaussian model, arXiv 2501.08180). Their ratio, averaged over the steps,
bounds what D-D² can do to the per-step ε error; |ρ| and the mean's share say where it comes from (tensor-wise
fits).

    python scripts/d2_diagnostics.py runs/d2-table/stats/* > runs/d2-table/diagnostics.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tdqrt.runtime.d2 import D2Table


def removable(path: Path) -> dict:
    fit = D2Table.load(path).tensor
    mu, sy, rho = (np.asarray(getattr(fit, k), np.float64).ravel() for k in ("mu_y", "sigma_y", "rho"))
    total = mu**2 + sy**2
    return {"removable_fraction_mean": float(((mu**2 + rho**2 * sy**2) / total).mean()),
            "mean_share_mean": float((mu**2 / total).mean()),
            "abs_rho_median": float(np.median(np.abs(rho))), "abs_rho_max": float(np.abs(rho).max())}


if __name__ == "__main__":
    json.dump({Path(p).name: removable(Path(p)) for p in sys.argv[1:]}, sys.stdout, indent=1)
