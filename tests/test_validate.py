"""``tdqrt validate``: torch FP / fake-quant vs the bundle's ONNX graphs through Polygraphy's Comparator.

A good tiny minmax W8A8 bundle passes; a copy of its ``unet.onnx`` with one activation QuantizeLinear scale
multiplied by 4 (x quantized on a 4x coarser grid but dequantized with the original scale: a miscalibrated layer)
fails, naming the pair and the timesteps. The tampered graph is passed to the library function
``validate_models`` as a bare file, so the bundle's own integrity check stays meaningful: the same file dropped
into the bundle makes ``tdqrt validate`` refuse it (exit 2) before comparing anything.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _scripts import load_script

from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.tools.cli import main
from tdqrt.tools.validate import ValidateConfig, check_metrics, compare_arrays, tensorrt_status, validate_models

SMALL = ValidateConfig(timesteps=3, per_timestep=3)


@pytest.fixture(scope="module")
def quant_dir(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    return calibrate(tiny_digits_model, tmp_path_factory.mktemp("q_minmax"), CalibrateConfig(quant=QuantConfig()),
                     calib_dir=tiny_calib_set.path, progress=False)


@pytest.fixture(scope="module")
def bundle_dir(quant_dir, tmp_path_factory):
    return export_bundle(quant_dir, tmp_path_factory.mktemp("bundles") / "minmax", ExportConfig(polygraphy=False))


def _tamper(src, dst) -> str:
    """Copy ``src`` to ``dst`` with the first activation quantizer's scale x4 (scripts/validate_margins.py, the
    script that measured the tolerances on such graphs); returns the Q node's name."""
    return load_script("validate_margins").tamper(src, dst, index=0, factor=4.0)


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
    """The trt-bundle rule on per-timestep medians measured with scripts/validate_margins.py."""
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


def test_tampered_scale_fails(bundle_dir, quant_dir, tmp_path):
    bad = tmp_path / "unet_tampered.onnx"
    node = _tamper(bundle_dir / "unet.onnx", bad)
    q = load_model_dir(quant_dir)
    fp = load_model_dir(q.card["fp_model"]["path"])
    report = validate_models(bundle_dir / "unet_fp.onnx", bad, fp.model, q.model, q.card["calibration"]["path"], SMALL)
    assert not report.passed, (node, report.pairs["torch_quant vs ort_int8"]["overall"])
    assert report.pairs["torch_quant vs ort_int8"]["passed"] is False
    assert report.pairs["torch_fp vs ort_fp"]["passed"] is True
    assert report.failures and all(f.startswith("torch_quant vs ort_int8 at t=") for f in report.failures)
    assert f"at t={max(report.timesteps)}: " in report.failures[-1]  # the error grows with t on this model
    # the same file inside the bundle breaks its sha256: validate refuses before comparing (exit 2)
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    shutil.copy(bad, broken / "unet.onnx")
    assert main(["validate", str(broken), "--timesteps", "1", "--per-timestep", "1"]) == 2


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
