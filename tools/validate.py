"""``tdqrt validate``: check a bundle's ONNX graphs against the torch models they were exported from, on real
calibration inputs, with Polygraphy's ``Comparator``.

Runners (all driven by ``polygraphy.comparator.Comparator.run`` over the same feed dicts)::

    torch_fp     the FP torch model                 (custom Polygraphy runner, :class:`TorchRunner`)
    torch_quant  the fake-quant torch model         (custom Polygraphy runner)
    ort_fp       unet_fp.onnx in ONNX Runtime (CPU) (OnnxrtRunner)
    ort_int8     unet.onnx in ONNX Runtime (CPU)    (OnnxrtRunner)
    trt_int8     the TensorRT plan ``tdqrt build`` made of unet.onnx (TrtRunner over EngineFromBytes) — only with
                 ``--engine``, when ``tensorrt`` imports and a CUDA device is there; a plan whose engine.json does not
                 match this TensorRT, GPU or bundle is refused

Inputs: the calibration set's ``(x_t, t, y)`` (the quant card records its path) at ``timesteps`` timesteps spread
over the ones it holds, ``per_timestep`` samples each; one feed dict (one Polygraphy iteration) per timestep.

Pairs (reference first) and tolerances, per timestep:

* ``torch_fp`` vs ``ort_fp``: max-abs ≤ ``fp_max_abs`` (1e-4). Both compute the same float32 function; the only
  difference is the summation order of convolutions/GroupNorm/attention (measured ~2e-7 relative, ~1e-6 absolute on
  unit-variance ε), so 1e-4 leaves ~100x headroom while a wrong weight, op or input dtype shows up at 1e-2 or more.
* ``torch_quant`` vs ``ort_int8`` of a **trt** bundle: with ``ratio_op="div"`` the activation codes are
  bit-identical, so a sample agrees to ~1e-7 — unless float summation-order noise flips one code that sits on a
  rounding tie and the flip cascades through later quantizers (tests/test_export.py). How far a cascade goes
  depends on the timestep: at t=0, where ε is least predictable and the model amplifies every perturbation (the
  quantization error itself is rel-L2 0.49-0.62 there), good small-model bundles show a median per-sample rel-L2
  of up to 0.078 (tdq-ptq W4A8), while at t ≥ 260 they stay ≤ 0.004. So a fixed rel-L2 bound either fails good
  bundles at t=0 or misses broken ones elsewhere; the check is relative to the quantization error, as for
  ort-cpu but tighter, because this graph is meant to be code-exact: the median over the samples of the error
  ratio ``‖ort_int8 − torch_quant‖ / ‖torch_quant − torch_fp‖`` ≤ ``int8_max_error_ratio`` (0.5), or a median
  per-sample rel-L2 ≤ ``int8_negligible_rel_l2`` (0.005: a deviation that small is negligible even where the
  quantization error is tiny, e.g. a near-lossless W8A8 model). Measured with ``scripts/validate_margins.py``
  (5 timesteps x 5 samples; small digits model; minmax W8A8, tdq-ptq, brecq and tdq-qat W4A8): good bundles
  0.00-0.26 (largest at t=260, rel-L2 0.004); the first or the last activation quantizer on a x4 or x1/4 grid
  1.7-76 at every t ≥ 260 and 2.4-3.9 at t=0; a middle one (``up.2.blocks.1.resblock.in_conv``, a layer that
  hardly matters) 0.54-1.34 at some timestep for x4 on all four models and x1/4 on minmax, but 0.40-0.48 at most
  for x1/4 on the other three — a break that small in units of the quantization noise is not separable by any
  output tolerance. The per-sample cosine and rel-L2 medians and the worst sample (``max_sample_rel_l2``) are
  reported too.
* ``torch_quant`` vs ``ort_int8`` of an **ort-cpu** bundle (the manifest's export target): that graph quantizes
  every conv (and Linear) output to uint8, an approximation the torch model does not have, and ONNX Runtime runs it
  as fused integer kernels. No code-exact agreement exists: a one-step difference in one output code (bias rounded
  to int32, fused requantization, float summation order) moves later input codes and cascades to the size of the
  quantization noise itself — the same ort-cpu graph run unoptimized (plain Q/DQ math, equal to its torch export
  module to 2e-7) and fused differs by rel-L2 0.0075 on the small model, as much as its whole W8A8 quantization
  error. So the check is relative: the median over the samples of the per-sample **error ratio** ``‖ort_int8 −
  torch_quant‖ / ‖torch_quant − torch_fp‖`` ≤ ``ort_cpu_max_error_ratio`` (2.0), i.e. the ORT graph may stray from
  the fake-quant model by at most twice that model's own quantization error. Measured per timestep on good bundles:
  0.97-1.37 (small digits model, minmax W8A8), 0.41-1.46 (small, tdq-ptq W4A8), 0.34-1.42 (tiny, minmax and
  tdq-ptq); a broken graph — one activation or output scale x4 or x1/4 in one conv — gives 2.7-15 on the small
  minmax model (first conv), 1.7-11 on the small TDQ model (fourth conv) and 1.1-34 on the tiny one (a middle or the
  last conv), so the bound fails it at some or all timesteps. Its blind spot: a conv that hardly matters (the first
  two of the barely trained tiny model stay at 1.1-1.3 with a x4 scale), which no tolerance can separate from the
  output-quantization noise. The cost itself, as the ε error against FP (relative L2, t ≥ 160; t=0 is the timestep
  where ε is least predictable and every error is large): minmax W8A8 0.0066-0.0114 with the TensorRT graph (= the
  fake-quant model) vs 0.0077-0.0153 with ort-cpu; tdq-ptq W4A8 0.0126-0.0190 vs 0.0135-0.0211 (README, "The ort-cpu
  flavour"). ``median_sample_error_ratio`` is reported for every pair whose reference is ``torch_quant`` (and the
  batch-wide ``error_ratio`` in ``overall``).
* ``ort_fp`` vs ``ort_int8``: the quantization error itself — reported, never checked.
* ``torch_quant`` vs ``trt_int8`` (when TensorRT ran): the trt-bundle rule above (TensorRT's integer convolutions
  are exact; its float layers sum in other orders, which makes the same tie cascades).

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

from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.calibration.quant.checkpoint import QUANT_FORMAT
from tdqrt.engines.artifacts import write_json_atomic
from tdqrt.engines.bundle import open_bundle
from tdqrt.engines.ort import saturation_warning
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError, DependencyError

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
    int8_max_error_ratio: float = 0.5  # trt bundles: torch fake-quant vs ORT INT8 (and TensorRT) ...
    int8_negligible_rel_l2: float = 0.005  # ... unless the deviation is this small anyway
    ort_cpu_max_error_ratio: float = 2.0  # ort-cpu bundles: torch fake-quant vs ORT INT8, relative to quant error
    seed: int = 0  # which samples of a timestep are picked

    def __post_init__(self) -> None:
        if int(self.timesteps) < 1:
            raise ConfigError(f"--timesteps must be ≥ 1, got {self.timesteps}")
        if int(self.per_timestep) < 1:
            raise ConfigError(f"--per-timestep must be ≥ 1, got {self.per_timestep}")
        if not (self.fp_max_abs > 0 and math.isfinite(self.fp_max_abs)):
            raise ConfigError(f"fp_max_abs must be a positive number, got {self.fp_max_abs}")
        for name in ("int8_max_error_ratio", "int8_negligible_rel_l2", "ort_cpu_max_error_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")

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
        raise ArtifactError(f"{onnx_path} does not have the tdqrt signature (sample, timestep[, class_labels]) -> eps;"
                            f" its inputs are {sorted(inputs)}")
    return inputs, sess.get_outputs()[0].name


def pick_timesteps(available: list[int], n: int) -> list[int]:
    """``n`` timesteps spread evenly over ``available`` (all of them when there are fewer)."""
    available = sorted(available)
    if n >= len(available):
        return available
    idx = np.unique(np.round(np.linspace(0, len(available) - 1, n)).astype(int))
    return [available[i] for i in idx]


def calibration_feeds(calib: CalibrationSet, inputs: dict[str, tuple[Any, tuple]], config: ValidateConfig, *,
                      null_label: Optional[int] = None) -> list[tuple[int, "OrderedDict[str, np.ndarray]"]]:
    """One Polygraphy feed dict per timestep: ``sample`` [B,C,H,W], ``timestep`` [B], ``class_labels`` [B] (only
    when the graph has that input), in the graph's dtypes."""
    if len(calib) == 0:
        raise DataError(f"calibration set {calib.path} is empty")
    rng = np.random.default_rng(config.seed)
    feeds = []
    for ts in pick_timesteps(calib.timesteps, config.timesteps):
        rows = np.flatnonzero(calib.t == ts)
        rows = np.sort(rng.choice(rows, size=min(config.per_timestep, len(rows)), replace=False))
        x = np.ascontiguousarray(calib.x[rows])
        shape = inputs["sample"][1]
        if len(shape) != x.ndim or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:])):
            raise DataError(f"calibration set {calib.path} holds samples of shape {list(x.shape[1:])}, the model "
                            f"takes {list(shape)}; pass the calibration set of this model with --calib")
        feed = OrderedDict(sample=x.astype(inputs["sample"][0]),
                           timestep=np.asarray(calib.t[rows]).astype(inputs["timestep"][0]))
        if "class_labels" in inputs:
            if calib.meta.get("conditional"):
                y = np.asarray(calib.y[rows])
            elif null_label is not None:
                y = np.full(len(rows), null_label)
            else:
                raise ConfigError("the model is class-conditional but the calibration set has no labels and the "
                                  "model records no null label")
            feed["class_labels"] = y.astype(inputs["class_labels"][0])
        feeds.append((int(ts), feed))
    return feeds


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
        y = feed_dict.get("class_labels")
        y = None if y is None else torch.from_numpy(np.asarray(y, np.int64))
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
    """Whether a TensorRT runner can run: ``{"ran": False, "reason": ...}`` when it cannot (no tensorrt, no CUDA
    device, no ``--engine``)."""
    from tdqrt.engines.trt import require_cuda, require_tensorrt

    try:
        require_tensorrt()
        require_cuda()
    except DependencyError as exc:
        return {"ran": False, "engine": None if engine is None else str(engine),
                "reason": f"{exc}; TensorRT runner skipped"}
    if engine is None:
        return {"ran": False, "engine": None, "reason": "no --engine given; TensorRT runner skipped"}
    if not Path(engine).is_file():
        raise ArtifactError(f"TensorRT engine {engine} does not exist")
    return {"ran": True, "engine": str(engine), "reason": None}


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
    target: str = "trt"  # the bundle's export flavour (decides the torch_quant vs ort_int8 check)

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
        lines.append(f"TensorRT: {'ran' if self.tensorrt['ran'] else self.tensorrt['reason']}")
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
    informational)."""
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
                    target: str = "trt") -> ValidationReport:
    """Run the torch FP / fake-quant models and the two ONNX graphs (and a TensorRT engine when possible) on the
    calibration inputs with ``Comparator.run`` and check the pairs against ``config``'s tolerances. The engine must
    pass its ``engine.json`` checks (this TensorRT, this GPU and, when ``bundle_sha256`` is given, this bundle).
    ``target`` is the export flavour of ``int8_onnx``: ``ort-cpu`` graphs are checked by their error ratio."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from tdqrt.engines.ort import create_session

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
    int8_kind = "ort-cpu" if target == "ort-cpu" else "int8"
    pairs = [("torch_fp", "ort_fp", "fp"), ("torch_quant", "ort_int8", int8_kind), ("ort_fp", "ort_int8", None)]
    trt = tensorrt_status(engine)
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
    return ValidationReport(passed=not failures, failures=failures, timesteps=timesteps,
                            samples_per_timestep=[len(f["timestep"]) for _, f in feeds], pairs=report_pairs,
                            config=config.to_dict(), tensorrt=trt, target=target,
                            sources={"fp_onnx": str(fp_onnx), "int8_onnx": str(int8_onnx), "calibration": str(calib.path)})


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
    models = {}
    for role, override, flag in (("quant_model", quant_dir, "--quant"), ("fp_model", fp_dir, "--fp")):
        src = sources.get(role) or {}
        path = override if override is not None else src.get("path")
        if path is None:
            raise ConfigError(f"bundle {bundle.path} records no {role} source; pass it with {flag}")
        if not Path(path).exists():
            raise ArtifactError(f"the {role.replace('_', ' ')} {path} recorded by the bundle does not exist; pass "
                                f"it with {flag}")
        rec = load_model_dir(path)
        if src.get("sha256") and rec.sha256 != src["sha256"]:
            raise ArtifactError(f"{path} (sha256 {rec.sha256[:12]}…) is not the {role.replace('_', ' ')} the bundle "
                                f"was exported from ({src['sha256'][:12]}…); pass the right one with {flag}")
        models[role] = rec
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
                             target=bundle.manifest.get("export", {}).get("target", "trt"))
    if not report.passed and (warning := saturation_warning(bundle)):
        report.failures.append(warning)
    report.sources |= {"bundle": str(bundle.path), "bundle_sha256": bundle.sha256,
                       "quant_model": str(models["quant_model"].path), "fp_model": str(models["fp_model"].path)}
    if save:
        report.save(Path(out) if out is not None else bundle.path / VALIDATION_DIR)
    return report
