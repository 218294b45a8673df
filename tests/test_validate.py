"""``tdqrt validate``: torch FP / fake-quant vs the bundle's ONNX graphs through Polygraphy's Comparator, and the
teacher-forced per-layer check (tools/layer_check.py) that decides the INT8 verdict.

Good bundles pass: the tiny minmax W8A8 model, and the ``ddpm-cifar10-32`` architecture with random weights, whose
chaotic network fails the end-to-end error-ratio rule (reported only) although every layer is right. Planted
graph errors fail naming the layer: one activation QuantizeLinear scale x4 or x1/4 (quantized on a coarser / finer
grid than its DequantizeLinear reads: a miscalibrated layer) in the first, a middle and the last layer; a wrong
weight scale; an extra op before a layer; and for ort-cpu (tests/test_ort_cpu.py) a wrong or dropped output Q/DQ.
The tampered graph is passed to the library function ``validate_models`` as a bare file, so the bundle's own
integrity check stays meaningful: the same file dropped into the bundle makes ``tdqrt validate`` refuse it (exit 2)
before comparing anything.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _scripts import load_script

from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.engines.bundle import open_bundle
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.ort import saturation_warning
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.tools.cli import main
from tdqrt.tools.validate import (ValidateConfig, check_metrics, compare_arrays, tensorrt_status, validate_bundle,
                                  validate_models)

SMALL = ValidateConfig(timesteps=3, per_timestep=3)
TINY = ValidateConfig(timesteps=2, per_timestep=1)


@pytest.fixture(scope="module")
def quant_dir(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    return calibrate(tiny_digits_model, tmp_path_factory.mktemp("q_minmax"), CalibrateConfig(quant=QuantConfig()),
                     calib_dir=tiny_calib_set.path, progress=False)


@pytest.fixture(scope="module")
def bundle_dir(quant_dir, tmp_path_factory):
    return export_bundle(quant_dir, tmp_path_factory.mktemp("bundles") / "minmax", ExportConfig(polygraphy=False))


def _tamper(src, dst, index: int = 0, factor: float = 4.0) -> str:
    """Copy ``src`` to ``dst`` with activation quantizer ``index``'s scale times ``factor``
    (scripts/validate_margins.py); returns the Q node's name (``<layer>/act_quantize``)."""
    return load_script("validate_margins").tamper(src, dst, index=index, factor=factor)


def _validate_file(bundle, onnx_path, config=TINY):
    """``validate_models`` on a bare (possibly tampered) INT8 graph of ``bundle`` with the bundle's own models."""
    from tdqrt.tools.validate import recorded_output_grids

    b = open_bundle(bundle)
    q = load_model_dir(b.manifest["sources"]["quant_model"]["path"])
    fp = load_model_dir(b.manifest["sources"]["fp_model"]["path"])
    return validate_models(bundle / "unet_fp.onnx", onnx_path, fp.model, q.model, q.card["calibration"]["path"],
                           config, target=b.manifest["export"]["target"],
                           output_grids=recorded_output_grids(b.manifest))


def _layer_failures(report) -> list[str]:
    return [f for f in report.failures if f.startswith("per-layer check")]


def _assert_fails_at(report, layer: str, what: str) -> None:
    """The report fails, on the per-layer check only, and every per-layer failure names ``layer``."""
    assert not report.passed
    bad = _layer_failures(report)
    assert bad and all(f" {layer} (" in f and what in f for f in bad), (layer, report.failures)
    assert report.pairs["torch_fp vs ort_fp"]["passed"] is True
    assert not report.layers["passed"]


def _input_quantizers(onnx_path) -> list[tuple[int, str]]:
    """``(index for _tamper, layer)`` of every layer's input QuantizeLinear, in graph order."""
    import onnx

    nodes = load_script("validate_margins").activation_quantizers(onnx.load(str(onnx_path)))
    return [(k, n.name.split("/")[0]) for k, n in enumerate(nodes) if n.name.endswith("/act_quantize")]


def _planted(onnx_path, dst, where: str, factor: float) -> str:
    """Tamper the input scale of the first, a middle or the last layer; returns the layer's name."""
    layers = _input_quantizers(onnx_path)
    index, layer = layers[{"first": 0, "middle": len(layers) // 2, "last": -1}[where]]
    assert _tamper(onnx_path, dst, index, factor) == f"{layer}/act_quantize"
    return layer


def _scale_weights(src, dst, layer: str, factor: float) -> None:
    """Copy ``src`` to ``dst`` with ``layer``'s per-channel weight scale times ``factor`` (its DequantizeLinear)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.name == f"{layer}/weight_dequantize")
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(dst))


def test_config_is_validated():
    with pytest.raises(ConfigError):
        ValidateConfig(timesteps=0)
    with pytest.raises(ConfigError):
        ValidateConfig(per_timestep=0)
    with pytest.raises(ConfigError, match="int8_max_error_ratio"):
        ValidateConfig(int8_max_error_ratio=0)
    with pytest.raises(ConfigError, match="int8_negligible_rel_l2"):
        ValidateConfig(int8_negligible_rel_l2=float("nan"))
    with pytest.raises(ConfigError):
        ValidateConfig(fp_max_abs=0)


@pytest.mark.parametrize("rel_l2,ratio,passes", [
    (0.078, 0.16, True),  # good tdq-ptq W4A8 bundle at t=0: a tie cascade, small against the quantization error
    (0.004, 0.26, True),  # good bundle at t=260: the largest ratio measured on a good bundle
    (0.004, 0.9, True),  # any deviation this small is negligible, whatever the quantization error
    (0.012, 1.34, False),  # a middle layer's scale x4 (minmax W8A8, t=260)
    (0.029, 1.92, False),  # the first layer's scale x4 (tdq-ptq W4A8, t=520)
])
def test_int8_rule(rel_l2, ratio, passes):
    """The end-to-end error-ratio rule for trt bundles (reported beside the per-layer verdict) on per-timestep
    medians measured with scripts/validate_margins.py."""
    metrics = {"median_sample_rel_l2": rel_l2, "median_sample_error_ratio": ratio}
    bad = check_metrics("int8", metrics, ValidateConfig())
    assert (not bad) == passes
    if bad:
        assert "error ratio" in bad[0] and "rel-L2" in bad[0]


def test_compare_arrays():
    a = np.array([1.0, 2.0, 3.0])
    m = compare_arrays(a, a)
    assert m["max_abs"] == 0 and m["rel_l2"] == 0 and m["cosine"] == pytest.approx(1.0) and m["sqnr_db"] == 200
    m = compare_arrays(a, a * 1.1)
    assert m["rel_l2"] == pytest.approx(0.1) and m["sqnr_db"] == pytest.approx(20.0)
    assert m["max_abs"] == pytest.approx(0.3)


def test_good_bundle_passes_and_writes_report(bundle_dir, tmp_path, capsys, monkeypatch):
    import sys

    import polygraphy.logger.logger as poly_logger

    # As on a machine without the optional `colored` module, before Polygraphy has logged anything: its
    # "'colored' module is not installed" line must not reach the user.
    monkeypatch.setitem(sys.modules, "colored", None)
    monkeypatch.setattr(poly_logger, "COLORED_MODULE_PRESENT", None)
    monkeypatch.setattr(poly_logger.G_LOGGER, "colors", True)
    out = tmp_path / "report"
    rc = main(["validate", str(bundle_dir), "--timesteps", "3", "--per-timestep", "3", "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0, text
    assert "PASSED" in text
    assert "colored" not in captured.out + captured.err
    report = json.loads((out / "validate.json").read_text())
    assert (out / "validate.png").stat().st_size > 0
    assert report["passed"] is True and report["failures"] == []
    assert len(report["timesteps"]) == 3 and report["samples_per_timestep"] == [3, 3, 3]
    assert set(report["pairs"]) == {"torch_fp vs ort_fp", "torch_quant vs ort_int8", "ort_fp vs ort_int8"}
    for name, pair in report["pairs"].items():
        assert set(pair["overall"]) >= {"max_abs", "rel_l2", "sqnr_db", "cosine"}
        assert [r["timestep"] for r in pair["per_timestep"]] == report["timesteps"]
        for r in pair["per_timestep"]:
            assert set(r) >= {"max_abs", "rel_l2", "sqnr_db", "cosine", "passed"}
    assert report["pairs"]["ort_fp vs ort_int8"]["checked"] is None  # informational
    assert report["pairs"]["torch_quant vs ort_int8"]["checked"] is None  # the end-to-end error: reported
    layers = report["layers"]
    assert layers["passed"] and layers["layers_checked"] == len(load_model_dir(
        report["sources"]["quant_model"]).model.layer_names)
    # div ratio trick: every code of every layer is Q(input; s_t), bit for bit (tests/test_export.py)
    assert layers["code_errors"] == 0 and layers["code_ties"] == 0 and layers["codes"] > 0
    assert layers["max_output_rel_l2"] <= 1e-5 and layers["max_input_rel_l2"] <= 1e-5
    assert [r["timestep"] for r in report["sensitivity"]] == report["timesteps"]
    assert all(np.isfinite(r["median_rel_l2"]) and r["median_of_quant_error"] >= 0 for r in report["sensitivity"])
    assert "per-layer (teacher-forced)" in text and "sensitivity (info)" in text
    assert report["pairs"]["torch_fp vs ort_fp"]["overall"]["max_abs"] <= 1e-4
    # the typical sample of the INT8 graph matches the fake-quant torch model to float noise (bit-identical codes),
    # while the quantization error itself (informational) is orders of magnitude larger
    for r, e in zip(report["pairs"]["torch_quant vs ort_int8"]["per_timestep"],
                    report["pairs"]["ort_fp vs ort_int8"]["per_timestep"]):
        assert r["median_sample_rel_l2"] <= 1e-5 and r["median_sample_cosine"] >= 0.999999
        assert e["median_sample_rel_l2"] > 1e-3
    assert report["config"]["int8_max_error_ratio"] == 0.5
    assert report["tensorrt"]["ran"] is False and report["tensorrt"]["reason"]
    assert report["sources"]["bundle_sha256"]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("factor", [4.0, 0.25])
def test_planted_activation_scale_fails_naming_the_layer(bundle_dir, tmp_path, where, factor):
    bad = tmp_path / "unet_tampered.onnx"
    layer = _planted(bundle_dir / "unet.onnx", bad, where, factor)
    report = _validate_file(bundle_dir, bad)
    _assert_fails_at(report, layer, "activation codes are not Q(input; s_t)")


def test_wrong_weight_scale_fails_naming_the_layer(bundle_dir, tmp_path):
    layer = _input_quantizers(bundle_dir / "unet.onnx")[3][1]
    bad = tmp_path / "unet_w.onnx"
    _scale_weights(bundle_dir / "unet.onnx", bad, layer, 1.02)  # 2 %: far below what ε shows end to end
    report = _validate_file(bundle_dir, bad)
    _assert_fails_at(report, layer, "the output differs from op(codes·s_t, W) + b")


def test_wrong_op_before_a_layer_fails_naming_it(bundle_dir, tmp_path):
    """An extra Mul(1.5) on a middle layer's input (a wrong op between layers): the layer's own codes and output
    follow its (wrong) input, but that input is not the torch model's — the forced check names the layer."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(bundle_dir / "unet.onnx"))
    layer = _input_quantizers(bundle_dir / "unet.onnx")[len(_input_quantizers(bundle_dir / "unet.onnx")) // 2][1]
    first = next(n for n in model.graph.node if n.name in (f"{layer}/ratio_div", f"{layer}/act_quantize"))
    k = list(model.graph.node).index(first)
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "planted_factor"))
    model.graph.node.insert(k, helper.make_node("Mul", [first.input[0], "planted_factor"], ["planted_input"],
                                                name="planted_mul"))
    first.input[0] = "planted_input"
    bad = tmp_path / "unet_op.onnx"
    onnx.save(model, str(bad))
    _assert_fails_at(_validate_file(bundle_dir, bad), layer, "its input differs from the torch model's")


def test_tampered_bundle_is_refused(bundle_dir, tmp_path):
    """The same tampered file inside the bundle breaks its sha256: validate refuses before comparing (exit 2)."""
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    _tamper(bundle_dir / "unet.onnx", broken / "unet.onnx")
    assert main(["validate", str(broken), "--timesteps", "1", "--per-timestep", "1"]) == 2


@pytest.fixture(scope="module")
def cifar_validation_bundle(cifar_bundle, tmp_path_factory):
    """The session's ``ddpm-cifar10-32`` bundle plus the FP reference graph it was exported without."""
    from tdqrt.export.exporter import export_fp, save_onnx

    out = tmp_path_factory.mktemp("cifar_validate") / "bundle"
    shutil.copytree(cifar_bundle, out)
    fp = load_model_dir(open_bundle(out).manifest["sources"]["fp_model"]["path"])
    save_onnx(export_fp(fp.model, fp.schedule.num_train_timesteps).model, out / "unet_fp.onnx")
    return out


def test_random_weight_cifar_architecture_ort_cpu_passes(cifar_validation_bundle, tmp_path):
    """The same model exported for ort-cpu: every layer's input codes are exact and its outputs follow the recorded
    output grids (up to tie flips within ``output_tie``) although the end-to-end error is several times the
    quantization error; where ORT's fused u8s8 kernels saturate (8-bit weights, no VNNI) the report warns."""
    quant = open_bundle(cifar_validation_bundle).manifest["sources"]["quant_model"]["path"]
    out = export_bundle(quant, tmp_path / "ort_cpu", ExportConfig(target="ort-cpu", polygraphy=False, lint=False,
                                                                  calib_samples=4))
    report = validate_bundle(out, ValidateConfig(timesteps=1, per_timestep=2), save=False)
    assert report.passed, report.failures
    # 8-bit weights: on a CPU without VNNI ORT's fused kernels saturate; the graph is right, the report warns
    assert report.warnings == ([w] if (w := saturation_warning(open_bundle(out))) else [])
    assert report.layers["code_errors"] == 0 and report.layers["output_errors"] == 0
    assert report.layers["max_output_tie_distance"] <= ValidateConfig().output_tie
    assert report.layers["max_input_rel_l2"] <= 1e-5


def test_random_weight_cifar_architecture_passes_and_a_planted_error_fails(cifar_validation_bundle, tmp_path):
    """The chaotic random-weight network: its end-to-end error may exceed the error-ratio rule (reported), the
    per-layer check passes; a middle layer's input scale x4 fails naming that layer."""
    good = _validate_file(cifar_validation_bundle, cifar_validation_bundle / "unet.onnx")
    assert good.passed, good.failures
    assert good.layers["code_errors"] == 0 and good.layers["layers_checked"] > 60
    assert good.layers["max_input_rel_l2"] <= 1e-5
    pair = good.pairs["torch_quant vs ort_int8"]
    assert pair["checked"] is None and all("beyond_error_ratio_rule" in r for r in pair["per_timestep"])
    # chaotic: a 1e-6 relative input perturbation moves the fake-quant ε by far more (measured 5.7 % at t=500)
    assert max(r["median_rel_l2"] for r in good.sensitivity) > 1e-4, good.sensitivity
    bad = tmp_path / "unet_bad.onnx"
    layer = _planted(cifar_validation_bundle / "unet.onnx", bad, "middle", 4.0)
    report = _validate_file(cifar_validation_bundle, bad, ValidateConfig(timesteps=1, per_timestep=1))
    _assert_fails_at(report, layer, "activation codes are not Q(input; s_t)")


def test_cli_exit_1_on_failure(bundle_dir, tmp_path, capsys, monkeypatch):
    """With an FP tolerance nothing meets, the CLI prints the failing pair and timestep and exits 1."""
    import functools

    import tdqrt.tools.validate as validate_mod

    monkeypatch.setattr(validate_mod, "ValidateConfig", functools.partial(ValidateConfig, fp_max_abs=1e-30))
    out = tmp_path / "r"
    assert main(["validate", str(bundle_dir), "--timesteps", "1", "--per-timestep", "1", "--out", str(out)]) == 1
    assert "FAIL: torch_fp vs ort_fp at t=" in capsys.readouterr().out
    assert json.loads((out / "validate.json").read_text())["passed"] is False


def test_an_engine_that_cannot_run_fails_the_validation(bundle_dir, tmp_path, capsys):
    """``--engine`` is a request to compare the plan: a plan that does not exist, has no engine.json, or cannot run
    here fails (exit 2, the reason on one line) — it is never reported as skipped next to PASSED."""
    assert tensorrt_status(None)["ran"] is False
    missing = tmp_path / "trt" / "unet.trt.plan"
    with pytest.raises(ArtifactError, match="does not exist"):
        tensorrt_status(missing)
    args = ["validate", str(bundle_dir), "--timesteps", "1", "--per-timestep", "1", "--out", str(tmp_path / "r")]
    assert main(args + ["--engine", str(missing)]) == 2
    err = capsys.readouterr()
    assert "does not exist" in err.err and "PASSED" not in err.out
    missing.parent.mkdir()
    missing.write_bytes(b"plan")  # no engine.json beside it
    assert main(args + ["--engine", str(missing)]) == 2
    assert "has no engine.json" in capsys.readouterr().err
