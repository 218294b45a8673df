"""``tdqrt validate``: check a bundle's ONNX graphs against the torch models they were exported from, on real
calibration inputs, with Polygraphy's ``Comparator``.

Runners (all driven by ``polygraphy.comparator.Comparator.run`` over the same feed dicts)::

    torch_fp     the FP torch model                 (custom Polygraphy runner, :class:`TorchRunner`)
    torch_quant  the fake-quant torch model         (custom Polygraphy runner)
    ort_fp       unet_fp.onnx in ONNX Runtime (CPU) (OnnxrtRunner)
    ort_int8     unet.onnx in ONNX Runtime (CPU)    (OnnxrtRunner)
    trt_int8     the TensorRT plan ``tdqrt build`` made of unet.onnx (TrtRunner over EngineFromBytes; TensorRT or
                 TensorRT-RTX, the library its engine.json names) — only with ``--engine``; a plan that does not
                 exist, cannot run here (no library, no GPU of its class) or whose engine.json does not match this
                 library, GPU or bundle fails the validation with the reason

Inputs: the calibration set's ``(x_t, t, y)`` (the quant card records its path) at ``timesteps`` timesteps spread
over the ones it holds, ``per_timestep`` samples each; one feed dict (one Polygraphy iteration) per timestep.

Verdict (the tolerances are :class:`ValidateConfig`'s fields): FAIL iff the FP pair fails, or the teacher-forced
per-layer check of the INT8 graph (:mod:`tdqrt.tools.layer_check`) finds a layer whose activation codes, output
or input disagree with the fake-quant model beyond rounding ties and float32 summation order — each failure line
names the layer (and its position) and the timesteps. Why per layer and not end to end: the end-to-end difference
of a right graph is a cascade of rounding-tie flips (ORT and torch sum in different orders), as large as the
network's own sensitivity makes it — on an untrained ``ddpm-cifar10-32``-architecture model a relative 1e-6 input
perturbation moves the fake-quant ε by several percent, about its whole quantization error, so an error-ratio rule
fails that right graph at every timestep while it cannot see a wrong scale in a layer that hardly matters.

Pairs (reference first), per timestep:

* ``torch_fp`` vs ``ort_fp``: max-abs ≤ ``fp_max_abs`` (checked). Both compute the same float32 function and
  differ only in the summation order of convolutions/GroupNorm/attention, orders of magnitude below the bound,
  while a wrong weight, op or input dtype shows up far above it.
* ``torch_quant`` vs ``ort_int8``: reported. Beside the metrics, ``median_sample_error_ratio`` (the median over
  the samples of ``‖ort_int8 − torch_quant‖ / ‖torch_quant − torch_fp‖``) and ``beyond_error_ratio_rule``: whether
  the former end-to-end rule (:func:`check_metrics`) would have failed it — trt: ratio > ``int8_max_error_ratio``
  and median rel-L2 > ``int8_negligible_rel_l2``; ort-cpu (whose fused output requantization is an approximation
  the torch model does not have): ratio > ``ort_cpu_max_error_ratio``. What these ratios come to on good and
  broken bundles is measured in docs/results.md (``scripts/validate_margins.py``).
* ``ort_fp`` vs ``ort_int8``: the quantization error itself — reported.
* ``torch_quant`` vs ``trt_int8`` (when TensorRT ran): checked by the end-to-end trt rule above — a built plan has
  no per-layer outputs to force; its graph is the one the per-layer check passed.

Beside them, ``sensitivity`` per timestep (:func:`tdqrt.tools.layer_check.sensitivity`): how far a relative
``sensitivity_perturbation`` of the input moves the fake-quant ε, alone and in units of its quantization error —
the end-to-end differences float rounding alone can cause on this network.

Metrics: max-abs, relative L2 ``‖a-b‖/‖ref‖``, SQNR dB ``10·log10(‖ref‖²/‖a-b‖²)``, cosine similarity.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.calibration.quant.calib_set import calibration_feeds as select_feeds
from tdqrt.calibration.quant.checkpoint import QUANT_FORMAT
from tdqrt.calibration.resolve import open_recorded
from tdqrt.engines.artifacts import write_json_atomic
from tdqrt.engines.bundle import open_bundle
from tdqrt.engines.config import check_int, check_real
from tdqrt.engines.denoiser import feed_conditioning
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.engines.ort import saturation_warning
from tdqrt.engines.polygraphy_log import quiet_polygraphy_colors
from tdqrt.tools.layer_check import LayerCheck, sensitivity

REPORT_FILE = "validate.json"
PLOT_FILE = "validate.png"
VALIDATION_DIR = "validation"

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class ValidateConfig:
    """How many inputs, and the tolerances (see the module docstring for why these values)."""

    timesteps: int = 5  # timesteps spread over those in the calibration set
    per_timestep: int = 5  # samples (batch) per timestep; odd, so the median is one sample
    fp_max_abs: float = 1e-4  # torch FP vs ORT FP
    int8_max_error_ratio: float = 0.5  # end-to-end rule (TensorRT's verdict, reported for ORT INT8) ...
    int8_negligible_rel_l2: float = 0.005  # ... unless the deviation is this small anyway
    ort_cpu_max_error_ratio: float = 2.0  # ort-cpu end-to-end rule (reported), relative to the quant error
    code_tie: float = 1e-4  # per-layer check: a code may flip only this close (in code units) to a rounding tie
    output_tie: float = 1e-3  # ... an ort-cpu output code only this close to a tie of its output grid
    layer_rel_l2: float = 1e-4  # ... a trt layer output vs op(codes·s_t, W) + b in float64
    forced_rel_l2: float = 1e-4  # ... layer inputs and eps with every layer output forced to ORT's
    sensitivity_perturbation: float = 1e-6  # relative input perturbation for the reported sensitivity
    seed: int = 0  # which samples of a timestep are picked

    def __post_init__(self) -> None:
        check_int("ValidateConfig.timesteps", self.timesteps, 1, flag="--timesteps")
        check_int("ValidateConfig.per_timestep", self.per_timestep, 1, flag="--per-timestep")
        for name in ("fp_max_abs", "int8_max_error_ratio", "int8_negligible_rel_l2", "ort_cpu_max_error_ratio",
                     "code_tie", "output_tie", "layer_rel_l2", "forced_rel_l2", "sensitivity_perturbation"):
            check_real(f"ValidateConfig.{name}", getattr(self, name), above=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def compare_arrays(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """max-abs, relative L2 (to ``ref``), SQNR in dB and cosine similarity of two arrays (float64 math)."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(out, np.float64).ravel()
    if a.shape != b.shape:
        raise DataError(f"outputs of shapes {np.shape(ref)} and {np.shape(out)} cannot be compared")
    diff = b - a
    n_ref, n_diff, n_out = float(np.linalg.norm(a)), float(np.linalg.norm(diff)), float(np.linalg.norm(b))
    sqnr = 200.0 if n_diff == 0 else (10.0 * math.log10(max(n_ref, 1e-30) ** 2 / n_diff ** 2))
    cos = float(a @ b / (n_ref * n_out)) if n_ref > 0 and n_out > 0 else float(n_ref == n_out)
    return {"max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
            "rel_l2": n_diff / max(n_ref, 1e-30), "sqnr_db": min(sqnr, 200.0), "cosine": cos}


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _session_inputs(onnx_path: Path) -> tuple[dict[str, tuple[Any, tuple]], str]:
    """ONNX input name -> (numpy dtype, shape with None for dynamic dims), and the first output's name."""
    from tdqrt.engines.ort import create_session

    sess = create_session(onnx_path, ["CPUExecutionProvider"], threads=1)
    inputs = {}
    for i in sess.get_inputs():
        shape = tuple(d if isinstance(d, int) else None for d in i.shape)
        inputs[i.name] = (_ORT_DTYPES.get(i.type, np.float32), shape)
    if "sample" not in inputs or "timestep" not in inputs:
        raise ArtifactError(f"{onnx_path} does not have the tdqrt signature (sample, timestep[, conditioning]) -> eps;"
                            f" its inputs are {sorted(inputs)}")
    return inputs, sess.get_outputs()[0].name


def calibration_feeds(calib: CalibrationSet, inputs: dict[str, tuple[Any, tuple]], config: ValidateConfig, *,
                      null_label: Optional[int] = None) -> list[tuple[int, "OrderedDict[str, np.ndarray]"]]:
    """One Polygraphy feed dict per timestep (``config.timesteps`` of them, ``config.per_timestep`` samples each):
    :func:`tdqrt.calibration.quant.calib_set.calibration_feeds`."""
    return select_feeds(calib, inputs, timesteps=config.timesteps, per_timestep=config.per_timestep,
                        seed=config.seed, null_label=null_label)


# ---------------------------------------------------------------------------------------------------------------
# Runners


def _base_runner():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


class _TorchRunnerMixin:
    """Shared body of :class:`TorchRunner` (built lazily so that importing this module does not import polygraphy)."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, tuple[Any, tuple]], output_name: str,
                 name: str) -> None:
        super().__init__(name=name, prefix="torch-runner")
        self.model = model
        self.inputs = inputs
        self.output_name = output_name

    def activate_impl(self) -> None:
        self.model.eval()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name, (dtype, shape) in self.inputs.items():
            meta.add(name, dtype, shape)
        return meta

    def infer_impl(self, feed_dict):
        import time

        x = torch.from_numpy(np.asarray(feed_dict["sample"], np.float32))
        t = torch.from_numpy(np.asarray(feed_dict["timestep"], np.int64))
        y = feed_conditioning(feed_dict)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(x, t, y)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(self.output_name, out.detach().cpu().float().numpy())])

    def deactivate_impl(self) -> None:
        pass


_TORCH_RUNNER_CLS = None


def TorchRunner(model: torch.nn.Module, inputs: dict[str, tuple[Any, tuple]], output_name: str, *, name: str):
    """A Polygraphy runner (a ``BaseRunner`` subclass) that calls ``model(x, t, y)`` in torch."""
    global _TORCH_RUNNER_CLS
    if _TORCH_RUNNER_CLS is None:
        _TORCH_RUNNER_CLS = type("TorchRunner", (_TorchRunnerMixin, _base_runner()), {})
    return _TORCH_RUNNER_CLS(model, inputs, output_name, name)


def tensorrt_status(engine: Optional[Union[str, os.PathLike]]) -> dict:
    """``{"ran": False, ...}`` when no ``--engine`` is given; with one, the plan must be able to run here — a missing
    plan or card, or no TensorRT library / GPU for it, raises (the validation fails, it is never skipped)."""
    if engine is None:
        return {"ran": False, "engine": None, "reason": "no --engine given; TensorRT runner skipped"}
    from tdqrt.engines.engine_card import read_card
    from tdqrt.engines.trt import require_plan_runtime

    card = read_card(engine)  # a missing plan or engine.json: ArtifactError
    require_plan_runtime(card, engine)  # no library / GPU for it: DependencyError
    return {"ran": True, "engine": str(engine), "library": card["runtime"]["name"], "reason": None}


# ---------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class ValidationReport:
    passed: bool
    failures: list[str]
    timesteps: list[int]
    samples_per_timestep: list[int]
    pairs: dict[str, dict]
    config: dict
    tensorrt: dict
    sources: dict = field(default_factory=dict)
    target: str = "trt"  # the bundle's export flavour (decides the per-layer check and the error-ratio note)
    layers: dict = field(default_factory=dict)  # the teacher-forced per-layer check (the INT8 verdict)
    sensitivity: list = field(default_factory=list)  # per timestep: how far 1e-6 of input noise moves ε
    warnings: list = field(default_factory=list)  # what the verdict does not cover (e.g. saturating ORT kernels)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, out_dir: Union[str, os.PathLike]) -> Path:
        """Write ``validate.json`` and ``validate.png`` (relative L2 error vs timestep, one line per pair)."""
        from tdqrt.tools.plots import save_curve

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / REPORT_FILE, self.to_dict())
        series = {name: (self.timesteps, [max(r["rel_l2"], 1e-12) for r in p["per_timestep"]])
                  for name, p in self.pairs.items()}
        save_curve(out_dir / PLOT_FILE, series, xlabel="timestep t", ylabel="relative L2 error of ε",
                   title="bundle validation: " + ("PASS" if self.passed else "FAIL"), logy=True)
        return out_dir / REPORT_FILE

    def format(self) -> list[str]:
        lines = []
        for name, p in self.pairs.items():
            o = p["overall"]
            verdict = "info" if p["checked"] is None else ("ok" if p["passed"] else "FAIL")
            ratio = f"  error ratio {o['error_ratio']:.3g}" if "error_ratio" in o else ""
            lines.append(f"{name:<28} max-abs {o['max_abs']:.3g}  rel-L2 {o['rel_l2']:.3g}  SQNR {o['sqnr_db']:.1f} dB"
                         f"  cosine {o['cosine']:.6f}{ratio}  [{verdict}]")
        if self.layers:
            lc = self.layers
            lines.append(f"{'per-layer (teacher-forced)':<28} {lc['layers_checked']} layers: {lc['code_errors']} wrong "
                         f"of {lc['codes']} codes ({lc['code_ties']} tie flips), output rel-L2 ≤ "
                         f"{lc['max_output_rel_l2']:.2g}, forced input rel-L2 ≤ {lc['max_input_rel_l2']:.2g}  "
                         f"[{'ok' if lc['passed'] else 'FAIL'}]")
        if self.sensitivity:
            worst = max(self.sensitivity, key=lambda r: r["median_of_quant_error"])
            lines.append(f"{'sensitivity (info)':<28} input x(1±{self.config['sensitivity_perturbation']:g}) moves "
                         f"fake-quant ε by rel-L2 ≤ {max(r['median_rel_l2'] for r in self.sensitivity):.3g} "
                         f"(≤ {worst['median_of_quant_error']:.3g} of its quantization error, "
                         f"at t={worst['timestep']})")
        lines.append(f"TensorRT: {'ran' if self.tensorrt['ran'] else self.tensorrt['reason']}")
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"FAIL: {f}" for f in self.failures]
        return lines


def error_ratio(fp: np.ndarray, quant: np.ndarray, out: np.ndarray) -> float:
    """Median over the samples (first axis) of ``‖out − quant‖ / ‖quant − fp‖``: the deviation of ``out`` from the
    fake-quant model in units of that model's own quantization error."""
    n = len(quant)
    added = np.linalg.norm((np.asarray(out, np.float64) - quant).reshape(n, -1), axis=1)
    own = np.linalg.norm((np.asarray(quant, np.float64) - fp).reshape(n, -1), axis=1)
    return float(np.median(added / np.maximum(own, 1e-30)))


def _limits(kind: Optional[str], cfg: ValidateConfig) -> Optional[dict]:
    if kind == "fp":
        return {"max_abs": cfg.fp_max_abs}
    if kind == "int8":
        return {"median_sample_error_ratio_max": cfg.int8_max_error_ratio,
                "or_median_sample_rel_l2_max": cfg.int8_negligible_rel_l2}
    if kind == "ort-cpu":
        return {"median_sample_error_ratio_max": cfg.ort_cpu_max_error_ratio}
    return None


def check_metrics(kind: Optional[str], m: dict, cfg: ValidateConfig) -> list[str]:
    """The violated limits of metrics ``m`` for a pair of kind ``"fp"``/``"int8"``/``"ort-cpu"`` (None:
    informational). ``"int8"`` / ``"ort-cpu"`` are the end-to-end error-ratio rules: the verdict of the TensorRT
    pair, reported (``beyond_error_ratio_rule``) for ONNX Runtime INT8, whose verdict is the per-layer check."""
    bad = []
    if kind == "fp" and not m["max_abs"] <= cfg.fp_max_abs:
        bad.append(f"max-abs {m['max_abs']:.3g} > {cfg.fp_max_abs:g}")
    if kind == "int8" and not (m["median_sample_error_ratio"] <= cfg.int8_max_error_ratio
                               or m["median_sample_rel_l2"] <= cfg.int8_negligible_rel_l2):
        bad.append(f"median per-sample error ratio {m['median_sample_error_ratio']:.3g} > {cfg.int8_max_error_ratio:g}"
                   f" and median per-sample rel-L2 {m['median_sample_rel_l2']:.3g} > {cfg.int8_negligible_rel_l2:g} "
                   "(the INT8 graph is not the fake-quant model: a wrong scale, zero point or op?)")
    if kind == "ort-cpu" and not m["median_sample_error_ratio"] <= cfg.ort_cpu_max_error_ratio:
        bad.append(f"median per-sample error ratio {m['median_sample_error_ratio']:.3g} > "
                   f"{cfg.ort_cpu_max_error_ratio:g} (the ORT graph adds more than that many times the quantization "
                   "error of the torch model)")
    return bad


def validate_models(fp_onnx: Union[str, os.PathLike], int8_onnx: Union[str, os.PathLike],
                    fp_model: torch.nn.Module, quant_model: torch.nn.Module, calib: Union[CalibrationSet, str, os.PathLike],
                    config: ValidateConfig = ValidateConfig(), *, engine: Optional[Union[str, os.PathLike]] = None,
                    null_label: Optional[int] = None, bundle_sha256: Optional[str] = None,
                    target: str = "trt", output_grids: Optional[dict] = None) -> ValidationReport:
    """Run the torch FP / fake-quant models and the two ONNX graphs (and a TensorRT engine when possible) on the
    calibration inputs with ``Comparator.run`` and check the pairs against ``config``'s tolerances. The engine must
    pass its ``engine.json`` checks (this TensorRT, this GPU and, when ``bundle_sha256`` is given, this bundle).
    ``target`` is the export flavour of ``int8_onnx``; ``output_grids`` (``ort-cpu``: ``{layer: {"scale",
    "zero_point"}}``, the grids the bundle records) what its output Q/DQ must follow. The INT8 graph is judged by
    the teacher-forced per-layer check (:mod:`tdqrt.tools.layer_check`); its end-to-end error is reported."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from tdqrt.engines.ort import create_session

    trt = tensorrt_status(engine)  # before any work: an engine that cannot run fails the validation
    quiet_polygraphy_colors()
    fp_onnx, int8_onnx = Path(fp_onnx), Path(int8_onnx)
    calib = calib if isinstance(calib, CalibrationSet) else CalibrationSet(calib)
    fp_inputs, fp_out = _session_inputs(fp_onnx)
    q_inputs, q_out = _session_inputs(int8_onnx)
    if set(fp_inputs) != set(q_inputs):
        raise ArtifactError(f"{fp_onnx.name} has inputs {sorted(fp_inputs)} and {int8_onnx.name} {sorted(q_inputs)}; "
                            "they must share the signature")
    if fp_out != q_out:
        raise ArtifactError(f"{fp_onnx.name} outputs {fp_out!r}, {int8_onnx.name} {q_out!r}; re-export the bundle")
    if null_label is None:
        null_label = getattr(quant_model, "null_label", None)
    feeds = calibration_feeds(calib, q_inputs, config, null_label=null_label)

    runners = [TorchRunner(fp_model, q_inputs, q_out, name="torch_fp"),
               TorchRunner(quant_model, q_inputs, q_out, name="torch_quant"),
               OnnxrtRunner(lambda: create_session(fp_onnx, ["CPUExecutionProvider"]), name="ort_fp"),
               OnnxrtRunner(lambda: create_session(int8_onnx, ["CPUExecutionProvider"]), name="ort_int8")]
    layer_check = LayerCheck(int8_onnx, quant_model, target=target, config=config, output_grids=output_grids)
    int8_kind = "ort-cpu" if target == "ort-cpu" else "int8"  # the end-to-end error-ratio rule, reported only
    pairs = [("torch_fp", "ort_fp", "fp"), ("torch_quant", "ort_int8", None), ("ort_fp", "ort_int8", None)]
    if trt["ran"]:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from tdqrt.engines.trt import read_verified_plan

        plan, _ = read_verified_plan(engine, bundle_sha256=bundle_sha256)
        runners.append(TrtRunner(EngineFromBytes(plan), name="trt_int8"))
        pairs.append(("torch_quant", "trt_int8", "int8"))

    results = Comparator.run(runners, data_loader=[feed for _, feed in feeds])
    outputs = {name: [np.asarray(it[q_out], np.float32) for it in iters] for name, iters in results.items()}

    timesteps = [ts for ts, _ in feeds]
    report_pairs, failures = {}, []
    for ref, other, kind in pairs:
        label = f"{ref} vs {other}"
        per_t, pair_bad = [], False
        for k, ts in enumerate(timesteps):
            m = compare_arrays(outputs[ref][k], outputs[other][k])
            per_sample = [compare_arrays(a, b) for a, b in zip(outputs[ref][k], outputs[other][k])]
            m |= {"median_sample_rel_l2": float(np.median([p["rel_l2"] for p in per_sample])),
                  "median_sample_cosine": float(np.median([p["cosine"] for p in per_sample])),
                  "max_sample_rel_l2": float(max(p["rel_l2"] for p in per_sample))}
            if ref == "torch_quant":
                m["median_sample_error_ratio"] = error_ratio(outputs["torch_fp"][k], outputs[ref][k],
                                                             outputs[other][k])
                if kind is None:  # the pre-per-layer rule, for information
                    m["beyond_error_ratio_rule"] = bool(check_metrics(int8_kind, m, config))
            bad = check_metrics(kind, m, config)
            m |= {"timestep": ts, "passed": None if kind is None else not bad}
            per_t.append(m)
            if bad:
                pair_bad = True
                failures.append(f"{label} at t={ts}: " + ", ".join(bad))
        flat = {name: np.concatenate([o.ravel() for o in outputs[name]]) for name in (ref, other, "torch_fp")}
        overall = compare_arrays(flat[ref], flat[other])
        if ref == "torch_quant":
            overall["error_ratio"] = error_ratio(flat["torch_fp"][None], flat[ref][None], flat[other][None])
        report_pairs[label] = {"reference": ref, "candidate": other, "checked": kind,
                               "passed": None if kind is None else not pair_bad, "limits": _limits(kind, config),
                               "overall": overall, "per_timestep": per_t}
    sens = []
    for k, (ts, feed) in enumerate(feeds):
        layer_check.run(feed, ts)
        sens.append({"timestep": ts} | sensitivity(quant_model, outputs["torch_fp"][k], feed, outputs["torch_quant"][k],
                                                    config.sensitivity_perturbation, seed=config.seed))
    layer_failures = layer_check.failures()
    failures += [f"per-layer check of {int8_onnx.name}: {f}" for f in layer_failures]
    return ValidationReport(passed=not failures, failures=failures, timesteps=timesteps,
                            samples_per_timestep=[len(f["timestep"]) for _, f in feeds], pairs=report_pairs,
                            config=config.to_dict(), tensorrt=trt, target=target, layers=layer_check.summary(),
                            sensitivity=sens,
                            sources={"fp_onnx": str(fp_onnx), "int8_onnx": str(int8_onnx), "calibration": str(calib.path)})


def recorded_output_grids(manifest: dict) -> Optional[dict]:
    """``{layer: grid}`` from a bundle manifest's ``quant.qdq`` (``ort-cpu``), or None."""
    qdq = (manifest.get("quant") or {}).get("qdq") or {}
    if not qdq.get("output_grid"):
        return None
    return dict(zip(qdq["layers"], qdq["output_grid"]))


def validate_bundle(bundle_dir: Union[str, os.PathLike], config: ValidateConfig = ValidateConfig(), *,
                    quant_dir: Optional[Union[str, os.PathLike]] = None, fp_dir: Optional[Union[str, os.PathLike]] = None,
                    calib_dir: Optional[Union[str, os.PathLike]] = None, out: Optional[Union[str, os.PathLike]] = None,
                    engine: Optional[Union[str, os.PathLike]] = None, save: bool = True) -> ValidationReport:
    """Validate the (hash-verified) bundle against the torch models it was exported from; write the report into
    ``out`` (default ``BUNDLE/validation``) unless ``save=False``.

    ``quant_dir`` / ``fp_dir`` / ``calib_dir`` override the recorded paths (manifest ``sources``, quant card
    ``calibration.path``); the models must still have the sha256 the manifest records.
    """
    bundle = open_bundle(bundle_dir)
    fp_onnx, int8_onnx = bundle.onnx_path("unet_fp"), bundle.onnx_path("unet")
    if fp_onnx is None:
        raise ArtifactError(f"bundle {bundle.path} has no unet_fp.onnx (exported without the FP reference); "
                            "re-export it with `tdqrt export`")
    sources = bundle.manifest.get("sources") or {}
    models = {role: open_recorded(sources.get(role), override, role.replace("_", " "), f"bundle {bundle.path}", flag)
              for role, override, flag in (("quant_model", quant_dir, "--quant"), ("fp_model", fp_dir, "--fp"))}
    if models["quant_model"].card.get("format") != QUANT_FORMAT:
        raise ConfigError(f"{models['quant_model'].path} is not a quantized checkpoint; pass one with --quant")
    if calib_dir is None:
        calib_dir = (models["quant_model"].card.get("calibration") or {}).get("path")
        if calib_dir is None:
            raise ConfigError(f"{models['quant_model'].path} records no calibration set; pass one with --calib")
    if not Path(calib_dir).is_dir():
        raise ArtifactError(f"calibration set {calib_dir} does not exist; pass one with --calib")
    report = validate_models(fp_onnx, int8_onnx, models["fp_model"].model, models["quant_model"].model, calib_dir,
                             config, engine=engine, null_label=bundle.null_label, bundle_sha256=bundle.sha256,
                             target=bundle.manifest.get("export", {}).get("target", "trt"),
                             output_grids=recorded_output_grids(bundle.manifest))
    if warning := saturation_warning(bundle):  # the graph may be right while the fused kernels here are not
        report.warnings.append(warning)
    report.sources |= {"bundle": str(bundle.path), "bundle_sha256": bundle.sha256,
                       "quant_model": str(models["quant_model"].path), "fp_model": str(models["fp_model"].path)}
    if save:
        report.save(Path(out) if out is not None else bundle.path / VALIDATION_DIR)
    return report
