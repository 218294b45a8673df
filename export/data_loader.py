"""The bundle's Polygraphy data-loader script: validate a bundle with Polygraphy's own CLI, as TensorRT users do.

``tdqrt export`` writes three files into the bundle (all listed in the manifest with their sha256):

* ``validation_inputs.npz``: the calibration inputs ``tdqrt validate`` compares on (by default 5 timesteps spread
  over the calibration set x 5 samples, seed 0: :func:`tdqrt.calibration.quant.calib_set.calibration_feeds`), one
  feed dict per timestep, in the graph's dtypes;
* ``tdqrt_data_loader.py``: a script that needs only numpy; its ``load_data()`` yields those feed dicts (after
  checking the npz against the sha256 it embeds), which is what ``polygraphy run --data-loader-script`` calls;
* ``fake_quant_outputs.json``: the fake-quant torch model's ε on those inputs, saved as Polygraphy ``RunResults``
  (what ``--save-outputs`` writes), the reference ``tdqrt validate`` checks the INT8 graph against::

      cd BUNDLE
      polygraphy run unet.onnx --onnxrt --graph-optimization-level ORT_ENABLE_BASIC \
          --data-loader-script tdqrt_data_loader.py --load-outputs fake_quant_outputs.json \
          --compare snr --snr-threshold S
      polygraphy run unet_fp.onnx --onnxrt --data-loader-script tdqrt_data_loader.py --save-outputs fp.json
      polygraphy run unet.onnx --onnxrt --graph-optimization-level ORT_ENABLE_BASIC \
          --data-loader-script tdqrt_data_loader.py --load-outputs fp.json --compare snr --snr-threshold F

  (``--trt`` instead of ``--onnxrt ...`` runs the same comparisons in TensorRT on a GPU.)

``--graph-optimization-level ORT_ENABLE_BASIC`` (:data:`ONNXRT_ARGS`, for the ``trt`` flavour's int8 Q/DQ pairs)
gives Polygraphy's ``SessionFromOnnx`` the session tdqrt runs: ONNX Runtime's default level rewrites int8 Q/DQ
pairs to uint8 and fuses them into integer kernels that saturate on x86 CPUs without VNNI
(:data:`tdqrt.engines.ort.DISABLED_OPTIMIZERS` says why), and those rewrites are extended-level optimizations, so
the basic level computes the Q/DQ math as written, as :func:`tdqrt.engines.ort.create_session` does by switching the
rewrite off (Polygraphy's CLI cannot name single optimizers). The ``ort-cpu`` flavour's uint8 pairs are not
rewritten and tdqrt runs them fused at the default level, so their command keeps Polygraphy's default.

``S`` is ``tdqrt validate``'s end-to-end INT8 rule in Polygraphy's terms (the verdict validate gives a TensorRT
plan; for ONNX Runtime it reports the rule and decides with its teacher-forced per-layer check, which Polygraphy's
CLI cannot express: a network that amplifies float rounding can miss ``S`` with a right graph). The rule passes an
INT8 graph whose deviation from the fake-quant model is at most ``int8_max_error_ratio`` (0.5) times that model's
own quantization error ``e = ‖quant − fp‖``, or whose relative L2 deviation is at most ``int8_negligible_rel_l2``
(0.005). Polygraphy's SNR is ``10·log10(mean(ref²) / mean((ref − out)²))`` per output and iteration (the whole
batch of one timestep, where validate takes the median sample), so the first condition reads
``SNR ≥ SQNR(quant; fp) + 20·log10(1/0.5)`` and the second ``SNR ≥ −20·log10(0.005)`` = 46.0 dB; one threshold
holds for all iterations, so ``S`` is the lowest of those bounds over the feeds.

``F`` checks the INT8 graph against the FP graph: by the triangle inequality a graph that passes the rule is within
``(1 + 0.5)·e`` of the FP outputs, so ``F = min over the feeds of SQNR(fp; quant) − 20·log10(1.5)``. It is the
quantization error with headroom — a broken scale whose damage stays below that headroom (measured: the first
activation scale x4 on the tiny test model) passes ``F`` and fails ``S``; tests/test_data_loader.py runs both.
"""
from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tdqrt.calibration.quant.calib_set import CalibrationSet, calibration_feeds
from tdqrt.engines.denoiser import feed_conditioning

SCRIPT_FILE = "tdqrt_data_loader.py"  # a distinctive module name: Polygraphy imports the script by its file name
INPUTS_FILE = "validation_inputs.npz"
REFERENCE_FILE = "fake_quant_outputs.json"
# `tdqrt validate`'s defaults (tools/validate.py ValidateConfig; tests/test_data_loader.py checks they agree)
TIMESTEPS, PER_TIMESTEP, SEED, INT8_MAX_ERROR_RATIO, INT8_NEGLIGIBLE_REL_L2 = 5, 5, 0, 0.5, 0.005

# `polygraphy run --onnxrt` options per export target (see the module docstring)
ONNXRT_ARGS = {"trt": ["--graph-optimization-level", "ORT_ENABLE_BASIC"], "ort-cpu": []}

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}

_SCRIPT = '''r"""Polygraphy data loader of a tdqrt bundle: the calibration inputs `tdqrt validate` compares on
({feeds} feeds: timesteps {timesteps}, {batch} samples each). Needs only numpy. Run from the bundle directory:

    polygraphy run unet.onnx --onnxrt{onnxrt} \\
        --data-loader-script {script} --load-outputs {reference} --compare snr --snr-threshold {snr:.2f}
    polygraphy run unet_fp.onnx --onnxrt --data-loader-script {script} --save-outputs fp.json
    polygraphy run unet.onnx --onnxrt{onnxrt} \\
        --data-loader-script {script} --load-outputs fp.json --compare snr --snr-threshold {fp_snr:.2f}

{reference} holds the fake-quant torch model's outputs; {snr:.2f} dB is `tdqrt validate`'s end-to-end INT8 rule in SNR
terms, {fp_snr:.2f} dB the same rule measured against the FP outputs. The INT8 graph runs with{onnxrt_why}: the
session tdqrt runs. tdqrt/export/data_loader.py says why, and how the thresholds are derived. Use --trt instead of
--onnxrt to check a TensorRT build on a GPU. Written by `tdqrt export`.
"""
import hashlib
import os

import numpy as np

INPUTS = {inputs!r}
SHA256 = {sha256!r}
NAMES = {names!r}
NUM_FEEDS = {num}


def load_data():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), INPUTS)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{{path}} does not match the sha256 this script was written with; re-export the bundle")
    with np.load(path) as data:
        for k in range(NUM_FEEDS):
            yield {{name: data[f"{{k}}/{{name}}"] for name in NAMES}}
'''


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    noise = float(np.mean((ref - out) ** 2))
    return 200.0 if noise == 0 else 10.0 * math.log10(max(float(np.mean(ref ** 2)), 1e-300) / noise)


@torch.no_grad()
def write_data_loader(out_dir: Path, calib: CalibrationSet, signature: dict, fp_model: torch.nn.Module,
                      quant_model: torch.nn.Module, *, target: str, null_label: Optional[int] = None) -> dict:
    """Write :data:`INPUTS_FILE`, :data:`SCRIPT_FILE` and :data:`REFERENCE_FILE` into ``out_dir`` for a bundle of
    export target ``target``; returns what the manifest records."""
    onnxrt = ONNXRT_ARGS[target]
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    inputs = {i["name"]: (_NP_DTYPES[i["dtype"]], tuple(d if isinstance(d, int) else None for d in i["shape"]))
              for i in signature["inputs"]}
    output = signature["outputs"][0]
    feeds = calibration_feeds(calib, inputs, timesteps=TIMESTEPS, per_timestep=PER_TIMESTEP, seed=SEED,
                              null_label=null_label)
    sqnr, results = [], RunResults()
    iterations = []
    for _, feed in feeds:
        x = torch.from_numpy(feed["sample"].astype(np.float32))
        t = torch.from_numpy(feed["timestep"]).long()
        y = feed_conditioning(feed)
        fp, quant = fp_model(x, t, y).numpy(), quant_model(x, t, y).numpy()
        sqnr.append(_sqnr_db(fp, quant))
        iterations.append(IterationResult({output["name"]: quant.astype(_NP_DTYPES[output["dtype"]])},
                                          runner_name="torch_quant"))
    results.append(("torch_quant", iterations))
    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # no "Saving inference results" line in the export's output
        results.save(str(out_dir / REFERENCE_FILE))
    ratio_db = 20.0 * math.log10(1.0 / INT8_MAX_ERROR_RATIO)
    snr = round(min(min(sqnr) + ratio_db, -20.0 * math.log10(INT8_NEGLIGIBLE_REL_L2)), 3)
    fp_snr = round(min(sqnr) - 20.0 * math.log10(1.0 + INT8_MAX_ERROR_RATIO), 3)
    buf = io.BytesIO()
    np.savez(buf, **{f"{k}/{name}": v for k, (_, feed) in enumerate(feeds) for name, v in feed.items()})
    data = buf.getvalue()
    (out_dir / INPUTS_FILE).write_bytes(data)
    (out_dir / SCRIPT_FILE).write_text(_SCRIPT.format(
        feeds=len(feeds), timesteps=", ".join(str(ts) for ts, _ in feeds), batch=len(feeds[0][1]["timestep"]),
        script=SCRIPT_FILE, onnxrt="".join(" " + a for a in onnxrt),
        onnxrt_why=" " + " ".join(onnxrt) if onnxrt else " ONNX Runtime's default options",
        reference=REFERENCE_FILE, snr=snr, fp_snr=fp_snr, inputs=INPUTS_FILE,
        sha256=hashlib.sha256(data).hexdigest(), names=list(feeds[0][1]), num=len(feeds)))
    return {"script": SCRIPT_FILE, "inputs": INPUTS_FILE, "reference_outputs": REFERENCE_FILE,
            "timesteps": [ts for ts, _ in feeds], "per_timestep": len(feeds[0][1]["timestep"]),
            "onnxrt_args": list(onnxrt), "snr_threshold_db": snr, "fp_snr_threshold_db": fp_snr,
            "fake_quant_sqnr_db": [round(v, 3) for v in sqnr]}
