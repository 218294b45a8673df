"""The ``ort-cpu`` export flavour: uint8 Q/DQ with an output Q/DQ after every quantized conv, which ONNX Runtime's
x86 CPU provider fuses into QLinearConv (README, "The ort-cpu flavour").

On the tiny model, for a static method (minmax) and a per-timestep one (TDQ): the graph has the ort-cpu shape and
lints clean, ORT fuses every quantized conv (counted in its optimized graph), the input codes are exactly the
torch model's (uint8 = int8 + 128, ratio trick included), the graph computes what its torch export module computes,
the fused graph stays within the end-to-end error-ratio bound of the torch fake-quant model, planted violations are
caught (by the linter, and by ``tdqrt validate``'s per-layer check naming the layer: an output grid x4 in the first
and the last layer, a dropped output Q/DQ, an input scale x1/4), and ``tdqrt export --target ort-cpu`` +
``tdqrt validate`` work end to end.

Weights: 8-bit where ONNX Runtime's x86 U8S8 kernels are exact (a CPU with VNNI), else 7-bit
(``U8S8_SAFE_WEIGHT_BITS``): without VNNI those kernels saturate int16 pair sums of 8-bit weights, which moves the
fused graph's output by several times the quantization error (tdqrt.engines.ort, and the saturation test below).

Tolerances (measured on the tiny 6-step digits model, see the tests):

* input codes: 0 mismatches (``div`` ratio op: bit-exact, as for trt);
* unoptimized ORT (``ORT_DISABLE_ALL``: plain Q/DQ math) vs the torch export module with the same output grids:
  median per-sample rel-L2 ≤ 1e-5 (the same float32 math; a rare near-tie flip cascades, hence the median);
* fused ORT vs torch fake-quant: the validate bound, median per-sample error ratio ≤ 2 per timestep
  (``ValidateConfig.ort_cpu_max_error_ratio``; see tdqrt.tools.validate for the measurements behind it).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.intmath import quantize_codes
from tdqrt.engines.bundle import open_bundle
from tdqrt.engines.errors import ConfigError
from tdqrt.engines.ort import U8S8_SAFE_WEIGHT_BITS, OrtDenoiser, saturation_warning, u8s8_saturates
from tdqrt.export.exporter import ExportConfig, export_quantized, save_onnx, with_debug_outputs
from tdqrt.export.lint import FLAVOURS, lint_model, lint_qdq_rules, optimized_op_counts
from tdqrt.export.qdq import apply_output_grids, build_qdq_module
from tdqrt.tools.cli import main
from tdqrt.tools.validate import ValidateConfig, error_ratio, recorded_output_grids, validate_models

ORT_CPU = ExportConfig(target="ort-cpu", polygraphy=False, calib_samples=40)
METHODS = ("minmax", "tdq-ptq", "linear")  # "linear": minmax with the Linear layers (temb MLP) quantized too
WBITS = U8S8_SAFE_WEIGHT_BITS if u8s8_saturates() else 8


FAST_TDQ = {"iters_w": 0, "iters_a": 0, "batch": 8, "num_samples": 16, "hidden": 16, "layers": 1, "fit_steps": 5}


@pytest.fixture(scope="module")
def quant_dirs(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    configs = {"minmax": CalibrateConfig(quant=QuantConfig(method="minmax", wbits=WBITS)),
               "tdq-ptq": CalibrateConfig(quant=QuantConfig(method="tdq-ptq", wbits=WBITS), options=FAST_TDQ),
               "linear": CalibrateConfig(quant=QuantConfig(method="minmax", wbits=WBITS,
                                                           keep_float=("*conv_in", "*conv_out", "*class_embed*")))}
    return {m: calibrate(tiny_digits_model, tmp_path_factory.mktemp(f"q_{m}"), configs[m],
                         calib_dir=tiny_calib_set.path, progress=False) for m in METHODS}


@pytest.fixture(scope="module")
def exports(quant_dirs, tiny_calib_set):
    out = {}
    for m in METHODS:
        qm = load_model_dir(quant_dirs[m]).model
        out[m] = (qm, export_quantized(qm, ORT_CPU, calib=tiny_calib_set))
    return out


@pytest.fixture(scope="module")
def bundle_dir(quant_dirs, tmp_path_factory):
    """``tdqrt export --target ort-cpu`` of the minmax model (polygraphy lint included)."""
    out = tmp_path_factory.mktemp("bundles") / "minmax-ort-cpu"
    assert main(["export", "--quant", str(quant_dirs["minmax"]), "--out", str(out), "--target", "ort-cpu",
                 "--calib-samples", "40"]) == 0
    return out


def _session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _calib_feeds(qm, calib, per_timestep: int = 4):
    """``(timestep, x, t, y, feed)`` for every timestep of the calibration set (``per_timestep`` samples each)."""
    rng = np.random.default_rng(0)
    for ts in calib.timesteps:
        rows = rng.choice(np.flatnonzero(calib.t == ts), per_timestep, replace=False)
        x, t, y = calib.get(rows)
        y = y if y is not None else torch.full((len(t),), qm.null_label)
        yield ts, x, t, y, {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}


def _init(model, name):
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Graph shape, lint, fusion


@pytest.mark.parametrize("method", METHODS)
def test_graph_shape_lints_clean_and_fuses(exports, method):
    qm, e = exports[method]
    assert e.plan.per_timestep == (method == "tdq-ptq")
    nodes = {n.name: n for n in e.model.graph.node}
    layers = dict(qm.layers())
    assert (method == "linear") == any(layer.kind == "linear" for layer in layers.values())
    for j, name in enumerate(e.plan.layer_names):
        op = layers[name].kind.replace("linear", "matmul")
        bias_inside = e.plan.static[j] and op == "conv"  # else added after the output DQ (and the ratio Mul)
        ratio = [] if e.plan.static[j] else ["ratio_div"]
        tail = ([] if e.plan.static[j] else ["ratio_unscale"]) + ([] if bias_inside else ["bias_add"])
        seq = ratio + ["act_quantize", "act_dequantize", op, "output_quantize", "output_dequantize"] + tail
        assert [r for r in seq if f"{name}/{r}" not in nodes] == [], name
        q, oq = nodes[f"{name}/act_quantize"], nodes[f"{name}/output_quantize"]
        assert _init(e.model, q.input[2]).dtype == np.uint8 and int(_init(e.model, q.input[2])) == 128
        grid = e.plan.output_grids[name]
        assert _init(e.model, oq.input[2]).dtype == np.uint8 and int(_init(e.model, oq.input[2])) == grid["zero_point"]
        assert float(_init(e.model, oq.input[1])) == pytest.approx(grid["scale"])
        assert grid["min"] <= 0 <= grid["max"] and grid["scale"] == pytest.approx((grid["max"] - grid["min"]) / 255)
        assert nodes[f"{name}/{op}"].output[0] == oq.input[0]
        assert len(nodes[f"{name}/{op}"].input) == (3 if bias_inside else 2)
    report = lint_model(e.model, "ort-cpu", polygraphy=False)
    assert report and not report.warnings, report.format()
    assert report.checks["ort-fusion"] == "passed"
    counts = optimized_op_counts_of(e.model)
    fused = {op: sum(c for k, c in counts.items() if k.split(":")[-1] == op) for op in ("QLinearConv", "QLinearMatMul")}
    kinds = [layer.kind for layer in layers.values()]
    assert fused == {"QLinearConv": kinds.count("conv"), "QLinearMatMul": kinds.count("linear")}, counts
    assert not lint_qdq_rules(e.model, "trt")  # uint8 activations are an error for TensorRT


def optimized_op_counts_of(model):
    """``optimized_op_counts`` of an in-memory model."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        save_onnx(model, path)
        return optimized_op_counts(path)


def _replace_zero_point(model, node_name: str, value: np.ndarray):
    """A copy of ``model`` whose node ``node_name`` and its DequantizeLinear partner use zero point ``value``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    q = next(n for n in m.graph.node if n.name == node_name)
    m.graph.initializer.append(numpy_helper.from_array(value, node_name + "_zp"))
    for n in m.graph.node:
        if n is q or (n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]):
            n.input[2] = node_name + "_zp"
    return m


def _drop_output_qdq(model, layer: str):
    """A copy of ``model`` whose ``layer`` conv output skips its output Q/DQ (what a trt-style graph has)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = {n.name: n for n in m.graph.node}
    conv, odq = nodes[f"{layer}/conv"], nodes[f"{layer}/output_dequantize"]
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == odq.output[0]:
                n.input[k] = conv.output[0]
    keep = [n for n in m.graph.node if n.name not in (f"{layer}/output_quantize", f"{layer}/output_dequantize")]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def test_planted_violations_are_caught(exports, quant_dirs):
    qm, e = exports["tdq-ptq"]
    layer = e.plan.layer_names[1]
    # (model, severity, rule, node, what ORT's fusion check says)
    cases = {
        "no output Q": (_drop_output_qdq(e.model, layer), "error", "output-not-quantized", f"{layer}/conv",
                        "failed"),
        # ORT's S8->U8 rewrite rescues this simple pair (one Q, one DQ); the flavour still requires uint8
        "int8 activations": (_replace_zero_point(e.model, f"{layer}/act_quantize", np.array(0, np.int8)), "error",
                             "zero-point", f"{layer}/act_quantize", "passed"),
        "input zero point 100": (_replace_zero_point(e.model, f"{layer}/act_quantize", np.array(100, np.uint8)),
                                 "warning", "input-zero-point", f"{layer}/act_quantize", "passed"),
    }
    for what, (model, severity, rule, node, fusion) in cases.items():
        report = lint_model(model, "ort-cpu", polygraphy=False)
        hits = [f for f in report.findings if f.rule == rule and f.severity == severity]
        assert any(f.node == node for f in hits), (what, report.format())
        assert bool(report) == (severity == "warning"), (what, report.format())
        assert report.checks["ort-fusion"] == fusion, (what, report.format())
    assert "ort-fusion" in lint_model(cases["no output Q"][0], "ort-cpu", polygraphy=False).rules("error")
    trt_graph = export_quantized(load_model_dir(quant_dirs["tdq-ptq"]).model, ExportConfig(polygraphy=False))
    report = lint_qdq_rules(trt_graph.model, "ort-cpu")  # the TensorRT flavour is not an ort-cpu graph
    assert {"zero-point", "output-not-quantized"} <= report.rules("error")


# ---------------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("method", METHODS)
def test_input_codes_exact_and_layers_follow_their_output_grid(exports, tiny_calib_set, method):
    """Teacher-forced, in plain Q/DQ math (ORT_DISABLE_ALL: the debug outputs stop fusion anyway): every input code
    is ``Q(x; s_t) + 128`` bit for bit, and every layer output is ``DQ(Q(conv(codes) / ρ_t; s_out, z)) · ρ_t + b``
    recomputed in float64 from those codes, up to output codes that sit on a rounding tie (float32 vs float64)."""
    qm, e = exports[method]
    sess = _session(with_debug_outputs(e), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    names = [o.name for o in sess.get_outputs()]
    layers = dict(qm.layers())
    codes_total = mismatches = out_total = flips = 0
    for _, _, t, _, feed in _calib_feeds(qm, tiny_calib_set, per_timestep=2):
        outs = dict(zip(names, sess.run(None, feed)))
        for j, name in enumerate(e.plan.layer_names):
            layer = layers[name]
            xi = torch.from_numpy(outs[f"{name}:input"]).double()
            s_t = layer.act_quant.table[t].double().reshape([-1] + [1] * (xi.ndim - 1))
            codes = outs[f"{name}:codes"]
            assert codes.dtype == np.uint8
            ref = quantize_codes(xi.float(), s_t.float(), -128, 127).numpy().astype(np.int64) + 128
            codes_total += codes.size
            mismatches += int((ref != codes).sum())
            rho = (s_t / e.plan.scales[j])  # s_t / s_ref (1 for a static layer)
            wq = layer.weight_quant
            w = wq.codes.double() * wq.scale.detach().double().reshape([-1] + [1] * (wq.codes.ndim - 1))
            xq = (torch.from_numpy(codes.astype(np.float64)) - 128) * s_t / rho
            conv = layer.kind == "conv"
            y = torch.nn.functional.conv2d(xq, w, **layer.conv_args) if conv else torch.nn.functional.linear(xq, w)
            b = layer.bias.detach().double().reshape([1, -1] + [1] * (y.ndim - 2))
            grid = e.plan.output_grids[name]
            bias_inside = e.plan.static[j] and conv
            q = torch.clamp(torch.round((y + b if bias_inside else y) / grid["scale"]) + grid["zero_point"], 0, 255)
            expect = (q - grid["zero_point"]) * grid["scale"] * rho + (0 if bias_inside else b)
            step = grid["scale"] * (1.0 if e.plan.static[j] else rho)
            diff = (torch.from_numpy(outs[f"{name}:output"]).double() - expect).abs() / step
            out_total += diff.numel()
            flips += int((diff > 1e-3).sum())
            assert float(diff.max()) <= 1.0 + 1e-3, name  # at most one output step, and only at a tie
    assert mismatches == 0, (mismatches, codes_total)
    assert flips <= 1e-4 * out_total, (flips, out_total)


@pytest.mark.parametrize("method", METHODS)
def test_fused_graph_within_validate_tolerance(exports, tiny_digits_model, tiny_calib_set, method):
    """The fused ORT graph vs the torch fake-quant model: the output quantization adds an error of the order of the
    quantization error itself (measured error ratio 0.34-1.42 per timestep on this model), within the validate
    bound (2); the plain Q/DQ math of the same graph agrees with the torch export module to float noise."""
    qm, e = exports[method]
    fp = load_model_dir(tiny_digits_model).model
    fused = _session(e.model)
    plain = _session(e.model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sim, _ = build_qdq_module(qm, "div", FLAVOURS["ort-cpu"])
    apply_output_grids(sim, e.plan.output_grids)
    bound = ValidateConfig().ort_cpu_max_error_ratio
    agree = []
    for ts, x, t, y, feed in _calib_feeds(qm, tiny_calib_set):
        with torch.no_grad():
            tq, tf, ts_ = qm(x, t, y).numpy(), fp(x, t, y).numpy(), sim(x, t, y).numpy()
        assert error_ratio(tf, tq, fused.run(None, feed)[0]) <= bound, ts
        out = plain.run(None, feed)[0]
        agree += list(np.linalg.norm((out - ts_).reshape(len(t), -1), axis=1)
                      / np.linalg.norm(ts_.reshape(len(t), -1), axis=1))
    # measured ~2e-7 per sample, except near-tie cascades (4 of 20 samples at t=900 on minmax): median
    assert np.median(agree) <= 1e-5, agree


# ---------------------------------------------------------------------------------------------------------------
# Bundle, CLI, validate


def test_cli_bundle_records_target_and_runs(bundle_dir, tiny_calib_set):
    b = open_bundle(bundle_dir)
    m = b.manifest
    assert m["export"]["target"] == "ort-cpu" and m["export"]["calib_samples"] == 40
    assert "Q(s_out)" in m["export"]["graph"]
    grids = m["quant"]["qdq"]["output_grid"]
    assert len(grids) == len(m["quant"]["qdq"]["layers"]) and all(g["scale"] > 0 for g in grids)
    assert m["sources"]["output_grid_calibration"] == str(tiny_calib_set.path.resolve())
    assert all(v["clean"] for v in m["lint"].values())
    assert m["lint"]["unet.onnx"]["checks"]["ort-fusion"] == "passed"
    assert m["lint"]["unet.onnx"]["checks"]["polygraphy-lint"] == "passed"
    d = OrtDenoiser(bundle_dir)  # the ONNX Runtime engine runs it unchanged
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])
    out = d(x, t, None)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert main(["lint", str(bundle_dir), "--no-polygraphy"]) == 0  # the manifest's target picks the rules


def test_validate_passes_good_bundle_and_fails_a_broken_one(bundle_dir, quant_dirs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["validate", str(bundle_dir), "--timesteps", "3", "--per-timestep", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "error ratio" in text and "PASSED" in text and "per-layer (teacher-forced)" in text
    report = json.loads((out / "validate.json").read_text())
    assert report["target"] == "ort-cpu" and report["passed"]
    pair = report["pairs"]["torch_quant vs ort_int8"]
    assert pair["checked"] is None  # the end-to-end error is reported; the per-layer check decides
    assert all("beyond_error_ratio_rule" in r for r in pair["per_timestep"])
    layers = report["layers"]
    assert layers["passed"] and layers["code_errors"] == 0 and layers["output_errors"] == 0
    assert layers["layers_checked"] == len(open_bundle(bundle_dir).manifest["quant"]["qdq"]["layers"])
    assert report["pairs"]["torch_fp vs ort_fp"]["passed"]


def _broken(bundle_dir, quant_dirs, path):
    rec = load_model_dir(quant_dirs["minmax"])
    fp = load_model_dir(rec.card["fp_model"]["path"])
    return validate_models(bundle_dir / "unet_fp.onnx", path, fp.model, rec.model, rec.card["calibration"]["path"],
                           ValidateConfig(timesteps=2, per_timestep=1), target="ort-cpu",
                           output_grids=recorded_output_grids(open_bundle(bundle_dir).manifest))


def _fails_naming(report, layer: str, what: str) -> None:
    assert not report.passed
    assert report.failures and all(f.startswith("per-layer check") and f" {layer} (" in f and what in f
                                   for f in report.failures), (layer, report.failures)


@pytest.mark.parametrize("where", ["first", "last"])
def test_validate_fails_a_wrong_output_grid_naming_the_layer(bundle_dir, quant_dirs, tmp_path, where):
    """An output QuantizeLinear on a 4x coarser grid than the recorded one (its DequantizeLinear unchanged)."""
    bad, layer = _rescaled_quantizer(bundle_dir, tmp_path, "/output_quantize", 0 if where == "first" else -1, 4.0)
    _fails_naming(_broken(bundle_dir, quant_dirs, bad), layer, "recorded output grid")


def _rescaled_quantizer(bundle_dir, tmp_path, role: str, index: int, factor: float):
    """``unet.onnx`` with the scale of the ``index``-th QuantizeLinear named ``*<role>`` times ``factor`` (a fresh
    initializer, so its DequantizeLinear keeps the recorded scale); returns the file and the layer's name."""
    model = onnx.load(str(bundle_dir / "unet.onnx"))
    q = [n for n in model.graph.node if n.name.endswith(role)][index]
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == q.input[1]))
    model.graph.initializer.append(numpy_helper.from_array((scale * factor).astype(np.float32), "tampered"))
    q.input[1] = "tampered"
    bad = tmp_path / "unet_bad.onnx"
    onnx.save(model, str(bad))
    return bad, q.name.split("/")[0]


def test_validate_fails_a_dropped_output_qdq_naming_the_layer(bundle_dir, quant_dirs, tmp_path):
    """A middle layer's output Q/DQ removed (its conv output goes on in float): off the recorded output grid."""
    model = onnx.load(str(bundle_dir / "unet.onnx"))
    qs = [n for n in model.graph.node if n.name.endswith("/output_quantize")]
    q = qs[len(qs) // 2]
    layer = q.name.split("/")[0]
    dq = next(n for n in model.graph.node if n.name == f"{layer}/output_dequantize")
    for n in model.graph.node:
        n.input[:] = [q.input[0] if i == dq.output[0] else i for i in n.input]
    model.graph.node.remove(q)
    model.graph.node.remove(dq)
    bad = tmp_path / "unet_bad.onnx"
    onnx.save(model, str(bad))
    _fails_naming(_broken(bundle_dir, quant_dirs, bad), layer, "recorded output grid")


def test_validate_fails_a_wrong_input_scale_naming_the_layer(bundle_dir, quant_dirs, tmp_path):
    bad, layer = _rescaled_quantizer(bundle_dir, tmp_path, "/act_quantize", 0, 0.25)
    _fails_naming(_broken(bundle_dir, quant_dirs, bad), layer, "activation codes are not Q(input")


def test_eight_bit_weights_warn_where_u8s8_kernels_saturate(tiny_digits_model, tiny_calib_set, tmp_path, capsys):
    """An ort-cpu bundle with 8-bit weights: on a CPU without VNNI, export (one warning line) and the ONNX Runtime
    engine say that its integer kernels saturate and how to avoid it; elsewhere they say nothing."""
    import warnings

    q = calibrate(tiny_digits_model, tmp_path / "q8", CalibrateConfig(quant=QuantConfig(method="minmax")),
                  calib_dir=tiny_calib_set.path, progress=False)
    capsys.readouterr()
    assert main(["export", "--quant", str(q), "--out", str(tmp_path / "b8"), "--target", "ort-cpu",
                 "--calib-samples", "40", "--no-polygraphy"]) == 0
    exported = [line for line in capsys.readouterr().err.splitlines() if "VNNI" in line]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        OrtDenoiser(tmp_path / "b8")
    engine = [str(w.message) for w in record if "VNNI" in str(w.message)]
    expected = saturation_warning(open_bundle(tmp_path / "b8"))
    if u8s8_saturates():
        assert expected is not None and "--wbits 7" in expected
        assert exported == [f"tdqrt export: warning: {expected}"] and engine == [expected], (exported, engine)
    else:
        assert expected is None and exported == [] and engine == []


def test_ort_cpu_settings_are_checked(exports, tiny_calib_set):
    with pytest.raises(ConfigError, match="fp32"):
        ExportConfig(target="ort-cpu", dtype="fp16")
    with pytest.raises(ConfigError, match="unknown"):
        ExportConfig(target="tensorflow")
    with pytest.raises(ConfigError, match="calibration"):
        export_quantized(exports["minmax"][0], ORT_CPU)
