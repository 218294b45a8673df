"""Export to ONNX Q/DQ (export.qdq / export.exporter), the bundle (export.bundle / engines.bundle) and the ONNX
Runtime engine (engines.ort).

Tolerances (all measured on the tiny 6-step digits model, batch 2, six timesteps spread over [0, T)):

* Activation codes, *teacher-forced*: the int8 output of every activation QuantizeLinear in ONNX Runtime is compared
  with ``Q(x; s_t)`` computed in torch from ORT's own layer input ``x``. With the default ``ratio_op="div"``
  (``x / (s_t/s_ref)`` with a power-of-two ``s_ref``) the float arithmetic is bit-identical to the torch model's
  ``x / s_t``, so we require **0 mismatches**. With ``ratio_op="mul"`` (``x · r_t``, ``r_t`` rounded) 2 of 2.3 M codes
  differed, both within 1e-4 of a tie; we require every mismatch to be such a near tie and ≤ 1e-5 of the codes.
* Layer outputs from those codes vs float64 ``conv(q·s_t, W) + b``: ≤ 1e-5 relative (measured ≤ 3e-7: float32
  accumulation over C_in·k² ≤ 432 products, in a different order than torch's).
* Whole network with the torch model's activations forced to ORT's codes: ≤ 1e-5 relative (measured ~2e-7; the
  same summation-order noise through GroupNorm/attention, no quantizer left to amplify it).
* Free-running whole network (torch fake-quant vs ORT): ~2e-7 relative as long as no activation lands within
  ~1e-7·|code| of a rounding boundary; one such near-tie flip (about one per 10⁵–10⁶ activations, caused by the
  summation-order noise above) shifts that value by one step and cascades through later quantizers. On this barely
  trained model a cascade reaches 1e-2..1e-1 of ‖eps‖ (the quantization error itself is ~0.16), so the free-running
  check only bounds it loosely; exactness is established by the teacher-forced checks.
* FP ONNX vs torch FP: ≤ 1e-5 relative (measured 2e-7).
* FP16 graphs: FP model within 2e-3 of FP32 (measured 4e-4); INT8 Q/DQ model within 0.25 of its FP32 graph
  (measured ~0.10: FP16 activations move codes near rounding boundaries, an error of the order of the INT8
  quantization error itself).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tdqrt.calibration.checkpoint import load_fp_checkpoint
from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.intmath import quantize_codes
from tdqrt.engines.bundle import open_bundle
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.ort import OrtDenoiser
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig, export_fp, export_quantized, save_onnx, with_debug_outputs
from tdqrt.export.lint import lint_model
from tdqrt.export.qdq import reference_scale
from tdqrt.runtime.d2 import D2Settings, D2Table
from tdqrt.runtime.sampling import SamplerConfig, make_timesteps, sample
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

FAST = ExportConfig(polygraphy=False)  # polygraphy runs in the bundle and lint tests only (≈3 s per model)
PAIRS = ((0, 999), (249, 750), (499, 500))  # six timesteps spread over [0, T), two per call (per-sample ratios)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inputs(qm, k: int, dtype=np.float32):
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(2, qm.in_channels, qm.image_size, qm.image_size, generator=g)
    t = torch.tensor(PAIRS[k])
    y = torch.tensor([k % qm.num_classes, qm.null_label]) if qm.num_classes else None
    feed = {"sample": x.numpy().astype(dtype), "timestep": t.numpy()}
    if y is not None:
        feed["class_labels"] = y.numpy()
    return x, t, y, feed


def _set_varying_table(qm, static_layers=(0,)):
    """A legitimate per-timestep model: smooth positive tables (layer 0 left static to mix both kinds)."""
    T = qm.num_train_timesteps
    phase = torch.arange(T, dtype=torch.float32) * (2 * math.pi / T)
    for j, (_, layer) in enumerate(qm.layers()):
        if j in static_layers:
            continue
        base = float(layer.act_quant.table.mean())
        layer.act_quant.table = base * torch.exp(0.5 * torch.sin(phase + j))
    return qm


def _roundtrip(qm, exported, *, ratio_op: str = "div") -> dict:
    """Teacher-forced code and layer checks plus the forced and free-running whole-network comparisons."""
    sess = _session(with_debug_outputs(exported))
    names = [o.name for o in sess.get_outputs()]
    stats = {"codes": 0, "mismatch": 0, "near_tie": 0, "layer_rel": 0.0, "forced_rel": 0.0, "free_rel": []}
    layers = dict(qm.layers())
    assert set(exported.layers) == set(layers)
    for k in range(len(PAIRS)):
        x, t, y, feed = _inputs(qm, k)
        outs = dict(zip(names, sess.run(None, feed)))
        forced, hooks = {}, []
        for name, layer in layers.items():
            xi = torch.from_numpy(outs[f"{name}:input"])
            s_t = layer.act_quant.table[t].reshape([-1] + [1] * (xi.ndim - 1))
            codes = outs[f"{name}:codes"]
            ref = quantize_codes(xi, s_t, -128, 127).to(torch.int8).numpy()
            bad = ref != codes
            stats["codes"] += codes.size
            stats["mismatch"] += int(bad.sum())
            if bad.any():
                v = (xi.double() / s_t.double()).numpy()[bad]
                stats["near_tie"] += int((np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-4).sum())
            wq = layer.weight_quant
            w = wq.codes.double() * wq.scale.detach().double().reshape([-1] + [1] * (wq.codes.ndim - 1))
            xq = torch.from_numpy(codes.astype(np.float64)) * s_t.double()
            b = None if layer.bias is None else layer.bias.detach().double()
            with torch.no_grad():
                y_ref = (torch.nn.functional.conv2d(xq, w, b, **layer.conv_args) if layer.kind == "conv"
                         else torch.nn.functional.linear(xq, w, b))
            stats["layer_rel"] = max(stats["layer_rel"], _rel(outs[f"{name}:output"], y_ref.numpy()))
            forced[name] = (torch.from_numpy(codes.astype(np.float32)) * s_t).float()
            hooks.append(layer.act_quant.register_forward_hook(lambda m, a, o, name=name: forced[name]))
        try:
            with torch.no_grad():
                eps_forced = qm(x, t, y).numpy()
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            eps_free = qm(x, t, y).numpy()
        stats["forced_rel"] = max(stats["forced_rel"], _rel(outs["eps"], eps_forced))
        stats["free_rel"].append(_rel(outs["eps"], eps_free))
    if ratio_op == "div":
        assert stats["mismatch"] == 0, stats
    else:
        assert stats["mismatch"] == stats["near_tie"] and stats["mismatch"] <= 1e-5 * stats["codes"], stats
    assert stats["layer_rel"] <= 1e-5, stats
    assert stats["forced_rel"] <= 1e-5, stats
    assert max(stats["free_rel"]) <= 0.5, stats  # cascades of near-tie flips only (see the module docstring)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def quant_dirs(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    out = {}
    for method in ("minmax", "mse"):
        cfg = CalibrateConfig(quant=QuantConfig(method=method))
        out[method] = calibrate(tiny_digits_model, tmp_path_factory.mktemp(f"q_{method}"), cfg,
                                calib_dir=tiny_calib_set.path, progress=False)
    # Linear layers quantized too (time embedding MLP and per-ResBlock projections): MatMul with [K, N] weights.
    cfg = CalibrateConfig(quant=QuantConfig(method="minmax", keep_float=("*conv_in", "*conv_out", "*class_embed*")))
    out["linear"] = calibrate(tiny_digits_model, tmp_path_factory.mktemp("q_linear"), cfg,
                              calib_dir=tiny_calib_set.path, progress=False)
    return out


@pytest.fixture(scope="module")
def d2_dir(quant_dirs, tmp_path_factory):
    """A small synthetic but valid D² table recorded for the minmax model."""
    rec = load_model_dir(quant_dirs["minmax"])
    rng = np.random.default_rng(0)
    timesteps = make_timesteps(rec.schedule.num_train_timesteps, 6, "uniform").numpy()  # DDIM-6
    K, C = len(timesteps), rec.model.in_channels
    m = np.zeros((K, C, 9))
    for k in range(K):
        for c in range(C):
            e = rng.standard_normal(200)
            q = e + 0.1 * rng.standard_normal(200)
            d = q - e
            m[k, c] = [200, q.sum(), d.sum(), e.sum(), (q * q).sum(), (d * d).sum(), (e * e).sum(), (q * d).sum(),
                       (e * d).sum()]
    settings = D2Settings(sampler=SamplerConfig(steps=6), schedule=rec.schedule, num_samples=8, seed=0,
                          outlier_sigma=None, fp_model_sha256=rec.card["fp_model"]["sha256"],
                          quant_model_sha256=rec.sha256)
    out = tmp_path_factory.mktemp("d2")
    D2Table(timesteps, m, m, m, settings).save(out)
    return out


@pytest.fixture(scope="module")
def bundle_dir(quant_dirs, d2_dir, tmp_path_factory):
    """The full path once: export (with polygraphy lint of both graphs) + D² statistics."""
    out = tmp_path_factory.mktemp("bundles") / "minmax"
    return export_bundle(quant_dirs["minmax"], out, ExportConfig(), d2_stats=d2_dir)


# ---------------------------------------------------------------------------------------------------------------
# The ratio trick and the s_ref choice


def test_ratio_trick_codes_are_exact():
    """Q(x / (s_t/s_ref); s_ref) == Q(x; s_t) bit for bit (power-of-two s_ref), ties included; the Mul(r_t) form
    differs only within float rounding of a tie. Checked in torch and with ORT's QuantizeLinear."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    s_t = torch.exp(torch.empty(n).uniform_(-6, 1, generator=g)).float()  # scales over ~3 decades
    x = torch.randn(n, generator=g) * 80 * s_t  # codes spread over the whole int8 range (and beyond)
    # Exact ties x/s_t = k + 1/2: scales with a short mantissa make (k + 1/2)·s_t and the division exact.
    s_t[:400] = (1 + torch.randint(0, 64, (400,), generator=g) / 64) * 2.0 ** -torch.randint(3, 9, (400,), generator=g)
    ties = torch.arange(-200, 200, dtype=torch.float32) + 0.5
    x[:400] = ties * s_t[:400]
    assert bool(((x[:400] / s_t[:400]) == ties).all())  # they really are ties in float32
    s_ref = torch.tensor(reference_scale(s_t))
    assert math.log2(float(s_ref)).is_integer()
    ref = quantize_codes(x, s_t, -128, 127)
    rho = s_t / s_ref  # exact: division by a power of two
    assert bool((rho * s_ref == s_t).all())
    div = quantize_codes(x / rho, s_ref, -128, 127)
    assert int((div != ref).sum()) == 0
    r = (s_ref.double() / s_t.double()).float()
    mul = quantize_codes(x * r, s_ref, -128, 127)
    bad = mul != ref
    v = (x.double() / s_t.double())[bad]
    assert int(bad.sum()) <= 1e-3 * n  # measured: ~0.5% of the exact ties flip, nothing else
    assert bool(((v - v.floor() - 0.5).abs() < 1e-4).all())  # every mismatch is at (or within float noise of) a tie
    # The same in ONNX Runtime: Div -> QuantizeLinear(s_ref) equals QuantizeLinear with the per-element s_t.
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Div", ["x", "rho"], ["xr"]),
             helper.make_node("QuantizeLinear", ["xr", "s", "z"], ["q"])]
    graph = helper.make_graph(nodes, "ratio", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n]),
                                               helper.make_tensor_value_info("rho", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("q", TensorProto.INT8, [n])],
                              [numpy_helper.from_array(s_ref.numpy().astype(np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    q = _session(model).run(None, {"x": x.numpy(), "rho": rho.numpy()})[0]
    assert np.array_equal(q, ref.to(torch.int8).numpy())


def test_reference_scale_is_power_of_two_geometric_mean():
    col = torch.tensor([0.01, 0.04, 0.16])  # geometric mean 0.04 -> 2^round(log2 0.04) = 2^-5
    assert reference_scale(col) == 2.0 ** -5
    with pytest.raises(ConfigError):
        reference_scale(torch.tensor([0.1, 0.0]))


# ---------------------------------------------------------------------------------------------------------------
# Round trips torch fake-quant -> ONNX -> ORT


@pytest.mark.parametrize("method", ["minmax", "mse", "linear"])
def test_static_export_matches_fake_quant(quant_dirs, method):
    qm = load_model_dir(quant_dirs[method]).model
    exported = export_quantized(qm, FAST)
    names = {n.name for n in exported.model.graph.node}
    assert not any("ratio" in n for n in names)  # static tables: plain Q/DQ with s_t, no ratio nodes
    assert not any(i.name.endswith("ratio_table") for i in exported.model.graph.initializer)
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in exported.model.graph.initializer}
    for name, layer in qm.layers():
        q = next(n for n in exported.model.graph.node if n.name == f"{name}/act_quantize")
        assert float(scales[q.input[1]]) == float(layer.act_quant.table[0])
    if method == "linear":
        mm = [n for n in exported.model.graph.node if n.name.endswith("/matmul")]
        assert mm, "the quantized Linear layers must export as MatMul"
        for n in mm:
            wdq = next(d for d in exported.model.graph.node if d.output[0] == n.input[1])
            assert next(a.i for a in wdq.attribute if a.name == "axis") == 1
            assert scales[wdq.input[0]].dtype == np.int8
    assert lint_model(exported.model, polygraphy=False)
    _roundtrip(qm, exported)


@pytest.mark.parametrize("ratio_op", ["div", "mul"])
def test_per_timestep_export_matches_fake_quant(quant_dirs, ratio_op):
    qm = _set_varying_table(load_model_dir(quant_dirs["minmax"]).model)
    exported = export_quantized(qm, ExportConfig(polygraphy=False, ratio_op=ratio_op))
    plan = exported.plan
    assert plan.static[0] and not any(plan.static[1:])
    nodes = {n.name: n for n in exported.model.graph.node}
    first, second = plan.layer_names[0], plan.layer_names[1]
    assert f"{first}/ratio_{ratio_op}" not in nodes
    # Node sequence of a per-timestep conv: ratio -> Q -> DQ -> Conv(no bias) <- DQ(W) -> Mul(1/r) -> Add(bias)
    seq = [f"{second}/{r}" for r in (f"ratio_{ratio_op}", "act_quantize", "act_dequantize", "weight_dequantize",
                                     "conv", "ratio_unscale", "bias_add")]
    assert all(s in nodes for s in seq), sorted(n for n in nodes if n.startswith(second))
    assert [nodes[s].op_type for s in seq] == [ratio_op.capitalize(), "QuantizeLinear", "DequantizeLinear",
                                               "DequantizeLinear", "Conv", "Mul", "Add"]
    assert len(nodes[f"{second}/conv"].input) == 2  # bias moved after the 1/r_t Mul
    gathers = [n for n in exported.model.graph.node if n.op_type == "Gather" and n.input[1] == "timestep"
               and n.input[0].endswith("ratio_table")]
    assert len(gathers) == (2 if ratio_op == "mul" else 1)
    s_ref = plan.scales[1]
    assert math.log2(s_ref).is_integer()
    assert lint_model(exported.model, polygraphy=False)
    stats = _roundtrip(qm, exported, ratio_op=ratio_op)
    assert stats["codes"] > 500_000


# Loads a quantized checkpoint in a process that imports nothing of tdqrt but the checkpoint module: the method
# registry must be complete whatever was imported before (no registration by side-effect imports).
LOAD_ALONE = """
import sys, torch
from tdqrt.calibration.quant.checkpoint import load_quant_checkpoint
qm = load_quant_checkpoint(sys.argv[1]).model
torch.save(qm.scale_table(), sys.argv[2])
print(sorted(sys.modules["tdqrt.calibration.quant.methods"].METHODS))
"""


@pytest.mark.parametrize("method", ["brecq", "tdq-ptq"])
def test_learned_methods_export(tiny_digits_model, tiny_calib_set, tmp_path, method):
    # No reconstruction iterations (the export does not care how good the rounding is): AdaRound hardens its
    # initialisation, TDQ fits its generators to the per-timestep scales, the checkpoints go through the methods'
    # own save/load paths.
    options = {"iters_w": 0, "iters_a": 0, "batch": 8, "num_samples": 16, "hidden": 16, "layers": 1, "fit_steps": 5}
    cfg = CalibrateConfig(quant=QuantConfig(method=method), options=options)
    out = calibrate(tiny_digits_model, tmp_path / method, cfg, calib_dir=tiny_calib_set.path, progress=False)
    qm = load_model_dir(out).model
    exported = export_quantized(qm, FAST)
    assert exported.plan.per_timestep == (method == "tdq-ptq")
    assert lint_model(exported.model, polygraphy=False)
    _roundtrip(qm, exported)
    alone = subprocess.run([sys.executable, "-c", LOAD_ALONE, str(out), str(tmp_path / "table.pt")],
                           capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert alone.stdout.split("\n")[-2] == str(sorted(["minmax", "mse", "brecq", "tdq-ptq", "tdq-qat"]))
    assert torch.equal(torch.load(tmp_path / "table.pt"), qm.scale_table())


def test_fp_export_matches_torch(tiny_digits_model):
    fp = load_fp_checkpoint(tiny_digits_model)
    exported = export_fp(fp.model, fp.schedule.num_train_timesteps, FAST)
    assert [i["name"] for i in exported.signature["inputs"]] == ["sample", "timestep", "class_labels"]
    assert exported.signature["inputs"][1]["dtype"] == "int64"
    assert exported.signature["outputs"][0]["shape"] == ["batch", 1, 16, 16]
    sess = _session(exported.model)
    for k in range(len(PAIRS)):
        x, t, y, feed = _inputs(_fp_like(fp), k)
        with torch.no_grad():
            ref = fp.model(x, t, y).numpy()
        assert _rel(sess.run(None, feed)[0], ref) <= 1e-5


def _fp_like(fp):
    """The attributes _inputs needs, for an FP model."""

    class Like:
        in_channels, image_size = fp.model.in_channels, fp.model.image_size
        num_classes, null_label = fp.model.num_classes, fp.model.null_label
        num_train_timesteps = fp.schedule.num_train_timesteps

    return Like


def test_dynamic_batch(quant_dirs):
    qm = load_model_dir(quant_dirs["minmax"]).model
    sess = _session(export_quantized(qm, FAST).model)
    for b in (1, 3, 5):
        x = torch.randn(b, 1, 16, 16)
        t = torch.full((b,), 10)
        y = torch.zeros(b, dtype=torch.long)
        out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()})[0]
        assert out.shape == (b, 1, 16, 16)


def test_fp16_export_lints_and_runs(quant_dirs, tiny_digits_model, tmp_path):
    qm = _set_varying_table(load_model_dir(quant_dirs["minmax"]).model)
    cfg16 = ExportConfig(dtype="fp16", polygraphy=False)
    assert cfg16.resolved_opset == 19
    e16, e32 = export_quantized(qm, cfg16), export_quantized(qm, FAST)
    assert e16.signature["inputs"][0]["dtype"] == "float16" and e16.signature["outputs"][0]["dtype"] == "float16"
    floats = [i for i in e16.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not floats, [i.name for i in floats]  # the whole graph is FP16 (int8 codes and zero points stay int8)
    save_onnx(e16.model, tmp_path / "unet16.onnx")
    report = lint_model(tmp_path / "unet16.onnx", polygraphy=False)
    assert report, report.format()
    s16, s32 = _session(e16.model), _session(e32.model)
    fp = load_fp_checkpoint(tiny_digits_model)
    f16 = _session(export_fp(fp.model, 1000, cfg16).model)
    f32 = _session(export_fp(fp.model, 1000, FAST).model)
    for k in (0, 2):
        _, _, _, feed = _inputs(qm, k)
        feed16 = dict(feed, sample=feed["sample"].astype(np.float16))
        a = s32.run(None, feed)[0]
        b = s16.run(None, feed16)[0]
        assert b.dtype == np.float16 and np.isfinite(b).all()
        assert _rel(b, a) <= 0.25
        assert _rel(f16.run(None, feed16)[0], f32.run(None, feed)[0]) <= 2e-3


def test_export_refuses_unsupported_settings(quant_dirs):
    with pytest.raises(ConfigError, match="unknown"):
        ExportConfig(target="ort-gpu")
    with pytest.raises(ConfigError, match="fp32"):
        ExportConfig(target="ort-cpu", dtype="fp16")  # QLinearConv takes float32 scales
    with pytest.raises(ConfigError, match="opset"):
        ExportConfig(dtype="fp16", opset=17)
    with pytest.raises(ConfigError):
        ExportConfig(dtype="bf16")
    qm = load_model_dir(quant_dirs["minmax"]).model
    layer = next(layer for _, layer in qm.layers())
    layer.act_quant.bits = 4
    with pytest.raises(ConfigError, match="8-bit activations"):
        export_quantized(qm, FAST)


# ---------------------------------------------------------------------------------------------------------------
# Bundle


def test_bundle_contents_and_manifest(bundle_dir, quant_dirs, d2_dir):
    b = open_bundle(bundle_dir)
    m = b.manifest
    assert set(m["files"]) == {"unet.onnx", "unet_fp.onnx", "lint.json", "d2.npz", "d2.json", "tdqrt_data_loader.py",
                               "validation_inputs.npz", "fake_quant_outputs.json"}
    rec = load_model_dir(quant_dirs["minmax"])
    assert m["sources"]["quant_model"]["sha256"] == rec.sha256
    assert m["sources"]["fp_model"]["sha256"] == rec.card["fp_model"]["sha256"]
    assert (b.num_classes, b.null_label, b.image_size, b.in_channels) == (10, 10, 16, 1)
    assert m["schedule"] == rec.schedule.to_dict()
    assert m["export"]["opset"] == 17 and m["export"]["target"] == "trt"
    assert m["quant"]["config"]["method"] == "minmax"
    assert m["d2"]["settings"]["quant_model_sha256"] == rec.sha256
    assert all(v["clean"] for v in m["lint"].values())
    assert m["lint"]["unet.onnx"]["checks"]["polygraphy-lint"] == "passed"
    table = D2Table.load(b.d2_dir)
    assert table.timesteps.tolist() == D2Table.load(d2_dir).timesteps.tolist()
    assert not list(bundle_dir.parent.glob(".*tmp*"))  # no temp directory left behind
    report = json.loads((bundle_dir / "lint.json").read_text())
    assert report["clean"] and report["errors"] == 0


def _copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle_dir, dst)
    return dst


def test_tampered_truncated_or_missing_files_are_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    data = bytearray((b / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    (b / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"unet\.onnx.*sha256.*re-export"):
        open_bundle(b)
    with pytest.raises(ArtifactError, match=r"unet\.onnx"):
        OrtDenoiser(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    fp = b / "unet_fp.onnx"
    fp.write_bytes(fp.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"unet_fp\.onnx.*truncated.*re-export"):
        open_bundle(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    (b / "d2.npz").unlink()
    with pytest.raises(ArtifactError, match=r"d2\.npz is missing.*re-export"):
        open_bundle(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="version"):
        open_bundle(b)
    (b / "manifest.json").write_text("{ truncated")
    with pytest.raises(ArtifactError, match="manifest.json"):
        open_bundle(b)


def test_corrupt_or_truncated_onnx_is_a_clear_error(bundle_dir, tmp_path):
    good = (bundle_dir / "unet.onnx").read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good[: len(good) // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    for path in (trunc, garbage):
        with pytest.raises(ArtifactError, match=rf"{path.name}.*re-export"):
            OrtDenoiser(path)
        with pytest.raises(ArtifactError, match=path.name):
            lint_model(path, polygraphy=False)
    with pytest.raises(ArtifactError, match="does not exist"):
        OrtDenoiser(tmp_path / "missing.onnx")


def test_bundle_is_written_atomically(quant_dirs, tmp_path, monkeypatch):
    import tdqrt.export.bundle as bundle_mod

    target = tmp_path / "b"

    def boom(*a, **k):
        raise RuntimeError("simulated crash while exporting the FP reference")

    monkeypatch.setattr(bundle_mod, "export_fp", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(quant_dirs["minmax"], target, FAST)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # A non-bundle directory is never replaced; an existing bundle is, once the new one is complete.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a tdqrt bundle"):
        export_bundle(quant_dirs["minmax"], other, FAST)
    assert (other / "keep.txt").read_text() == "mine"
    export_bundle(quant_dirs["minmax"], target, FAST)
    first = open_bundle(target).sha256
    export_bundle(quant_dirs["mse"], target, FAST)
    second = open_bundle(target)
    assert second.sha256 != first and second.manifest["quant"]["config"]["method"] == "mse"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "other"]


def test_reexport_says_what_it_replaces(quant_dirs, tmp_path, capsys):
    """Re-exporting into a bundle replaces it and what was made from it there (engines, validation reports, built
    for the old graphs) - and says so, in one line naming them; a first export says nothing."""
    import warnings

    from tdqrt.tools.cli import main

    target = tmp_path / "b"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh target: no warning at all
        export_bundle(quant_dirs["minmax"], target, FAST)
    for sub in ("ort", "trt", "validation"):
        (target / sub).mkdir()
        (target / sub / "x.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"replacing the existing bundle at .*: ort/, trt/, validation/") as caught:
        export_bundle(quant_dirs["mse"], target, FAST)
    assert len(caught) == 1
    assert not any((target / sub).exists() for sub in ("ort", "trt", "validation"))
    assert main(["export", "--quant", str(quant_dirs["mse"]), "--out", str(target), "--no-polygraphy"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tdqrt export: warning: replacing the existing bundle at {target} (export elsewhere with "
                   "another --out to keep them)"]


def test_export_fails_on_lint_errors(quant_dirs, tmp_path, monkeypatch):
    import tdqrt.export.bundle as bundle_mod
    from tdqrt.export.lint import LintReport

    def failing_lint(path, target, **kwargs):
        report = LintReport(target=target, files=[Path(path).name])
        report.add("error", "runtime-scale", "some/act_quantize", "planted", "fix it", Path(path).name)
        return report

    monkeypatch.setattr(bundle_mod, "lint_model", failing_lint)
    target = tmp_path / "b"
    with pytest.raises(ArtifactError, match=r"(?s)fails lint.*runtime-scale.*some/act_quantize"):
        export_bundle(quant_dirs["minmax"], target, FAST)
    assert not target.exists()
    failed = json.loads((tmp_path / "b.lint-failed.json").read_text())
    assert failed["errors"] == 1 and not failed["clean"]


def test_export_checks_its_inputs(quant_dirs, tiny_digits_model, d2_dir, tmp_path):
    with pytest.raises(ConfigError, match="FP checkpoint"):
        export_bundle(tiny_digits_model, tmp_path / "x", FAST)
    with pytest.raises(ConfigError, match="another quantized model"):
        export_bundle(quant_dirs["mse"], tmp_path / "y", FAST, d2_stats=d2_dir)
    moved = tmp_path / "fp_moved"
    shutil.copytree(tiny_digits_model, moved)
    out = export_bundle(quant_dirs["minmax"], tmp_path / "z", FAST, fp_dir=moved)
    assert open_bundle(out).manifest["sources"]["fp_model"]["path"] == str(moved.resolve())


def test_external_data_above_threshold(quant_dirs, tmp_path):
    out = export_bundle(quant_dirs["minmax"], tmp_path / "ext", ExportConfig(polygraphy=False, external_data_mb=0.01))
    b = open_bundle(out)
    assert "unet.onnx.data" in b.files and "unet_fp.onnx.data" in b.files
    assert (out / "unet.onnx").stat().st_size < (out / "unet.onnx.data").stat().st_size
    d = OrtDenoiser(b)
    x = torch.randn(2, 1, 16, 16)
    assert d(x, torch.tensor([5, 900]), torch.tensor([1, 2])).shape == x.shape
    (out / "unet.onnx.data").write_bytes((out / "unet.onnx.data").read_bytes()[:-8])
    with pytest.raises(ArtifactError, match=r"unet\.onnx\.data"):
        open_bundle(out)


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime engine


def test_ort_denoiser_protocol(bundle_dir, quant_dirs):
    from tdqrt.engines.denoiser import Denoiser

    d = OrtDenoiser(bundle_dir)
    assert isinstance(d, Denoiser) and d.providers[-1] == "CPUExecutionProvider"
    assert (d.num_classes, d.null_label, d.image_size, d.in_channels) == (10, 10, 16, 1)
    qm = load_model_dir(quant_dirs["minmax"]).model
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor([0, 500, 999])
    out = d(x, t, None)  # y=None -> null label, like the torch model
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        ref = qm(x, t, None)
    assert _rel(out.numpy(), ref.numpy()) <= 0.5
    bare = OrtDenoiser(bundle_dir / "unet.onnx")  # a bare file: attributes from the ONNX metadata
    assert (bare.num_classes, bare.null_label, bare.image_size, bare.in_channels) == (10, 10, 16, 1)
    torch.testing.assert_close(bare(x, t, None), out)
    fp = OrtDenoiser(bundle_dir, role="unet_fp")
    assert fp(x, t, torch.tensor([1, 2, 3])).shape == x.shape
    with pytest.raises(Exception, match="timesteps must lie"):
        d(x, torch.tensor([0, 1, 1000]), None)


def test_ort_denoiser_samples_like_the_torch_model(bundle_dir, quant_dirs):
    d = OrtDenoiser(bundle_dir)
    qm = load_model_dir(quant_dirs["minmax"]).model
    schedule = NoiseSchedule(ScheduleConfig.from_dict(open_bundle(bundle_dir).schedule))
    idx = list(range(4))
    y = torch.tensor([1, 3, 5, 7])
    cfg = SamplerConfig(kind="ddim", steps=4, guidance_scale=2.0)  # CFG: one 2B batch with null labels per step
    kw = dict(sample_indices=idx, seed=3, shape=(1, 16, 16), y=y, null_label=d.null_label)
    a = sample(d, schedule, cfg, **kw)
    b = sample(qm, schedule, cfg, **kw)
    assert torch.isfinite(a).all()
    # Measured over seeds 0-5 (4 samples each): relative L2 5e-4 - 1.3e-2. Within a sample, a near-tie code flip
    # (see the module docstring) cascades: the 6-step model's samples are far from converged (|x| up to ~60 after 4
    # steps) and its quantized sampling is chaotic, so a sample with a flip drifts by 1e-3 - 0.24 (median |diff|)
    # while one without stays within 1e-4 (every seed had such a sample); FP ONNX vs FP torch stays at 1e-7.
    assert _rel(a.numpy(), b.numpy()) <= 5e-2, _rel(a.numpy(), b.numpy())
    per_sample = (a - b).abs().flatten(1).median(dim=1).values
    assert float(per_sample.min()) <= 1e-4, per_sample


def test_sample_model_from_a_bundle_with_its_d2_statistics(bundle_dir, tmp_path):
    """``tdqrt sample --model BUNDLE [--d2 d --d2-stats BUNDLE]``: ONNX Runtime + the bundle's own D² table."""
    from tdqrt.tools.sample import SampleJob, sample_model

    sampler = SamplerConfig(kind="ddim", steps=6)
    plain = sample_model(bundle_dir, tmp_path / "plain", SampleJob(num=2, batch=2, sampler=sampler), progress=False)
    job = SampleJob(num=2, batch=2, sampler=sampler, d2="d", d2_stats=str(bundle_dir))
    corrected = sample_model(bundle_dir, tmp_path / "d2", job, progress=False)
    assert plain.images.shape == corrected.images.shape == (2, 16, 16, 1)
    meta = json.loads((tmp_path / "d2" / "sample.json").read_text())
    assert meta["model_sha256"] == open_bundle(bundle_dir).manifest["sources"]["quant_model"]["sha256"]


def test_sample_d2_defaults_to_the_bundles_statistics(bundle_dir, tmp_path, capsys):
    """``tdqrt sample --model BUNDLE --d2 d`` without --d2-stats uses the statistics the bundle ships; a model
    directory without them is refused in one line."""
    from tdqrt.tools.cli import main

    common = ["sample", "--num", "2", "--batch", "2", "--steps", "6"]
    assert main([*common, "--model", str(bundle_dir), "--d2", "d", "--d2-stats", str(bundle_dir), "--out",
                 str(tmp_path / "explicit")]) == 0
    assert main([*common, "--model", str(bundle_dir), "--d2", "d", "--out", str(tmp_path / "default")]) == 0
    assert main([*common, "--model", str(bundle_dir), "--out", str(tmp_path / "off")]) == 0
    arrays = {name: np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("explicit", "default", "off")}
    np.testing.assert_array_equal(arrays["default"], arrays["explicit"])
    assert not np.array_equal(arrays["default"], arrays["off"])
    meta = json.loads((tmp_path / "default" / "sample.json").read_text())
    assert meta["job"]["d2_stats"] == str(bundle_dir)
    capsys.readouterr()
    fp_dir = open_bundle(bundle_dir).manifest["sources"]["fp_model"]["path"]
    assert main([*common, "--model", fp_dir, "--d2", "d", "--out", str(tmp_path / "fp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--d2-stats" in err and "ships" in err, err


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_export_and_lint(quant_dirs, tmp_path, capsys):
    from tdqrt.tools.cli import main

    out = tmp_path / "cli_bundle"
    assert main(["export", "--quant", str(quant_dirs["mse"]), "--out", str(out), "--no-polygraphy"]) == 0
    assert open_bundle(out).manifest["quant"]["config"]["method"] == "mse"
    assert main(["lint", str(out), "--no-polygraphy", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["clean"]
    assert main(["lint", str(out / "unet.onnx"), "--no-polygraphy"]) == 0
    assert main(["export", "--quant", str(quant_dirs["mse"]), "--out", str(tmp_path / "o"), "--target",
                 "ort-gpu"]) == 2
    assert "unknown" in capsys.readouterr().err
