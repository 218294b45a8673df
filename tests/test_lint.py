"""``tdqrt lint``: the TensorRT Q/DQ rules catch each planted violation and name the node and the fix; clean exports
(built-in tiny UNet, a tiny diffusers UNet2DModel with attention, quantized with minmax) pass, polygraphy included."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tdqrt.export.lint import LintReport, lint_model, lint_qdq_rules

C_IN, C_OUT = 4, 8


def _build(variant: str = "clean", opset: int = 17):
    """x -> Q -> DQ -> Conv(DQ(W_int8, per-channel axis 0), bias) -> y, with one planted violation."""
    rng = np.random.default_rng(0)
    inits = {
        "a_scale": np.array(0.05, np.float32),
        "a_zero": np.array(0, np.int8),
        "w_int8": rng.integers(-127, 128, (C_OUT, C_IN, 3, 3)).astype(np.int8),
        "w_scale": rng.uniform(0.001, 0.01, C_OUT).astype(np.float32),
        "w_zero": np.zeros(C_OUT, np.int8),
        "bias": rng.standard_normal(C_OUT).astype(np.float32),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C_IN, 8, 8])]
    nodes = []
    q_inputs, w_axis, weight = ["x", "a_scale", "a_zero"], 0, "w_dq"
    if variant == "runtime_scale":  # scale gathered from a table by a graph input
        inits["table"] = np.linspace(0.01, 0.1, 10).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("t", TensorProto.INT64, []))
        nodes.append(helper.make_node("Gather", ["table", "t"], ["s_rt"], name="scale_gather"))
        q_inputs[1] = "s_rt"
    elif variant == "nonzero_zp":
        inits["a_zero"] = np.array(3, np.int8)
    elif variant == "uint8_zp":
        inits["a_zero"] = np.array(0, np.uint8)
    elif variant == "no_zp":
        q_inputs = q_inputs[:2]
    elif variant == "negative_scale":
        inits["a_scale"] = np.array(-0.05, np.float32)
    elif variant == "per_channel_act":
        inits["a_scale"] = np.full(C_IN, 0.05, np.float32)
        inits["a_zero"] = np.zeros(C_IN, np.int8)
    elif variant == "weight_axis":
        w_axis = 1
        inits["w_scale"] = inits["w_scale"][:C_IN]
        inits["w_zero"] = inits["w_zero"][:C_IN]
    elif variant == "weight_without_dq":
        inits["w_float"] = rng.standard_normal((C_OUT, C_IN, 3, 3)).astype(np.float32)
        weight = "w_float"
    elif variant == "float_weight_into_dq":  # weights quantized at run time from a float initializer
        inits["w_float"] = rng.standard_normal((C_OUT, C_IN, 3, 3)).astype(np.float32)
        nodes.append(helper.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_int8_rt"], axis=0,
                                      name="weight_quantize"))
    elif variant == "int32_weight":
        inits["w_int8"] = inits["w_int8"].astype(np.int32)
        inits["w_zero"] = inits["w_zero"].astype(np.int32)
    q_axis = {"axis": 1} if variant == "per_channel_act" else {}
    nodes.append(helper.make_node("QuantizeLinear", q_inputs, ["x_q"], name="act_quantize", **q_axis))
    nodes.append(helper.make_node("DequantizeLinear", ["x_q", *q_inputs[1:]], ["x_dq"], name="act_dequantize",
                                  **q_axis))
    if weight == "w_dq":
        w_src = "w_int8_rt" if variant == "float_weight_into_dq" else "w_int8"
        nodes.append(helper.make_node("DequantizeLinear", [w_src, "w_scale", "w_zero"], ["w_dq"], axis=w_axis,
                                      name="weight_dequantize"))
    nodes.append(helper.make_node("Conv", ["x_dq", weight, "bias"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    if variant == "unsupported_op":
        nodes.append(helper.make_node("LpNormalization", ["y"], ["y2"], name="lpnorm"))
    out = "y2" if variant == "unsupported_op" else "y"
    graph = helper.make_graph(nodes, variant, inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", C_OUT, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_clean_handmade_model_passes_everything(tmp_path):
    path = tmp_path / "clean.onnx"
    onnx.save(_build(), str(path))
    report = lint_model(path)  # our rules + onnx.checker + shape inference + polygraphy check lint
    assert report, report.format()
    assert report.checks == {"qdq-rules": "passed", "onnx-checker": "passed", "shape-inference": "passed",
                             "polygraphy-lint": "passed"}
    data = json.loads(report.to_json())
    assert data["clean"] and data["errors"] == 0
    report.save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "tdqrt-lint"


@pytest.mark.parametrize("variant,rule,node,fix", [
    ("runtime_scale", "runtime-scale", "act_quantize", "constant scale"),
    ("nonzero_zp", "zero-point", "act_quantize", "symmetric"),
    ("uint8_zp", "zero-point", "act_quantize", "int8"),
    ("no_zp", "zero-point", "act_quantize", "zero-point initializer"),
    ("negative_scale", "scale-positive", "act_quantize", "> 0"),
    ("per_channel_act", "per-channel-activation", "act_quantize", "one scale"),
    ("weight_axis", "weight-axis", "weight_dequantize", "axis=0"),
    ("weight_without_dq", "weight-without-dq", "conv", "int8 codes"),
    ("float_weight_into_dq", "weight-not-int8-initializer", "weight_dequantize", "int8 weight codes"),
    ("int32_weight", "weight-not-int8-initializer", "weight_dequantize", "int8"),
    ("unsupported_op", "unsupported-op", "lpnorm", "rewrite"),
])
def test_planted_violations_are_caught(variant, rule, node, fix):
    report = lint_qdq_rules(_build(variant))
    assert not report
    hits = [f for f in report.errors if f.rule == rule]
    assert hits, report.format()
    assert any(f.node == node and fix in f.fix for f in hits), [str(f) for f in hits]


def test_opset_and_ir_rules():
    report = lint_qdq_rules(_build(opset=13))
    assert "opset" in report.rules("error")
    m = _build()
    m.ir_version = 11
    assert "ir-version" in lint_qdq_rules(m).rules("error")


def test_checker_and_shape_inference_failures_are_errors(tmp_path):
    m = _build()
    m.graph.node[-1].input[1] = "does_not_exist"  # conv reads an undefined tensor
    report = lint_model(m, polygraphy=False)
    assert not report and "onnx-checker" in report.rules("error")


def test_report_is_truthy_only_without_errors():
    r = LintReport(target="trt")
    assert r
    r.add("warning", "x", "n", "m", "f")
    assert r and len(r.warnings) == 1
    r.add("error", "y", "n", "m", "f")
    assert not r and "ERROR [y] n: m Fix: f" in r.format()


def test_tiny_builtin_export_is_clean(tiny_digits_model, tiny_calib_set, tmp_path):
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
    from tdqrt.calibration.quant.config import QuantConfig
    from tdqrt.export.exporter import ExportConfig, export_quantized

    out = calibrate(tiny_digits_model, tmp_path / "q", CalibrateConfig(quant=QuantConfig(method="minmax")),
                    calib_dir=tiny_calib_set.path, progress=False)
    report = lint_model(export_quantized(load_model_dir(out).model, ExportConfig(polygraphy=False)).model,
                        polygraphy=False)
    assert report, report.format()
    assert not report.warnings, report.format()


def test_tiny_diffusers_unet_export_is_clean(tmp_path):
    """A diffusers UNet2DModel with attention (Linear to_q/k/v/out on [B, N, C] inputs) quantized with minmax."""
    from tdqrt.calibration.checkpoint import FPCheckpoint
    import tdqrt.calibration.quant.static  # noqa: F401  (registers minmax)
    from tdqrt.calibration.models import DiffusersUNet
    from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
    from tdqrt.calibration.quant.config import QuantConfig
    from tdqrt.calibration.quant.methods import CalibrationJob, method_spec, options_from_dict
    from tdqrt.export.exporter import ExportConfig, export_quantized, save_onnx
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

    torch.manual_seed(0)
    model = DiffusersUNet.from_config({
        "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 8,
    }, num_classes=3).eval()
    schedule = ScheduleConfig()
    calib = collect_calibration_set(model, NoiseSchedule(schedule), CalibSetConfig(
        num=4, keep_steps=4, batch=4, sampler=SamplerConfig(steps=4)), tmp_path / "calib", progress=False)
    spec = method_spec("minmax")
    job = CalibrationJob(FPCheckpoint(model, schedule, {}, tmp_path, "0" * 64), NoiseSchedule(schedule), calib,
                         QuantConfig(method="minmax"), options_from_dict(spec.options_cls, {}), tmp_path / "work",
                         progress=False)
    qm = spec.run(job)
    qm.freeze()
    exported = export_quantized(qm, ExportConfig(polygraphy=False))
    assert any(n.endswith("to_q") for n in exported.layers)
    matmuls = [n for n in exported.model.graph.node if n.name.endswith("/matmul")]
    assert len(matmuls) >= 8  # q, k, v, out of every attention block run as int8 MatMul
    save_onnx(exported.model, tmp_path / "unet.onnx")
    report = lint_model(tmp_path / "unet.onnx")
    assert report, report.format()
    assert report.checks["polygraphy-lint"] == "passed"
    from tdqrt.engines.ort import create_session

    sess = create_session(tmp_path / "unet.onnx", ["CPUExecutionProvider"])
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 3])
    out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()})[0]
    with torch.no_grad():
        ref = qm(x, t, y).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-2  # flips aside, ~3e-7 (see test_export)


def test_cli_lint_exit_status(tmp_path, capsys):
    from tdqrt.tools.cli import main

    onnx.save(_build("nonzero_zp"), str(tmp_path / "bad.onnx"))
    onnx.save(_build(), str(tmp_path / "good.onnx"))
    assert main(["lint", str(tmp_path / "bad.onnx"), "--no-polygraphy", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "zero-point" in out and "act_quantize" in out
    assert json.loads((tmp_path / "r.json").read_text())["errors"] >= 1
    assert main(["lint", str(tmp_path / "good.onnx"), "--no-polygraphy"]) == 0
    assert main(["lint", str(tmp_path / "missing.onnx"), "--no-polygraphy"]) == 2
