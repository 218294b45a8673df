"""The bundle's Polygraphy data-loader script: ``polygraphy run`` with it compares the INT8 graph with the shipped
fake-quant outputs and with the FP graph's saved outputs, at the thresholds derived from ``tdqrt validate``'s rule —
a good bundle passes both; one with a tampered activation scale (scripts/validate_margins.py's ``tamper``) fails
the fake-quant comparison (and, as recorded here, stays within the FP comparison's headroom)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from _polygraphy import compare, polygraphy_run
from _scripts import load_script

from tdqrt.engines.bundle import open_bundle
from tdqrt.export import data_loader
from tdqrt.tools.validate import ValidateConfig


def test_the_script_uses_the_validate_defaults():
    cfg = ValidateConfig()
    assert (data_loader.TIMESTEPS, data_loader.PER_TIMESTEP, data_loader.SEED, data_loader.INT8_MAX_ERROR_RATIO,
            data_loader.INT8_NEGLIGIBLE_REL_L2) == \
        (cfg.timesteps, cfg.per_timestep, cfg.seed, cfg.int8_max_error_ratio, cfg.int8_negligible_rel_l2)


def test_polygraphy_run_with_the_bundle_script(trt_bundles, tmp_path):
    bundle = Path(trt_bundles["fp32"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    loader = manifest["data_loader"]
    script, inputs = bundle / loader["script"], bundle / loader["inputs"]
    reference = bundle / loader["reference_outputs"]
    for path in (script, inputs, reference):
        assert manifest["files"][path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    open_bundle(bundle)  # the new files verify with the rest
    text = script.read_text()
    assert "import numpy as np" in text and "tdqrt" not in text.split('"""')[2]  # numpy only, no tdqrt import
    assert f"--snr-threshold {loader['snr_threshold_db']:.2f}" in text
    assert f"--snr-threshold {loader['fp_snr_threshold_db']:.2f}" in text
    assert loader["onnxrt_args"] == ["--graph-optimization-level", "ORT_ENABLE_BASIC"]  # the trt flavour
    assert text.count("polygraphy run unet.onnx --onnxrt --graph-optimization-level ORT_ENABLE_BASIC \\\n") == 2
    assert len(loader["timesteps"]) == 5 and loader["per_timestep"] == 5
    sqnr = min(loader["fake_quant_sqnr_db"])
    assert loader["snr_threshold_db"] == pytest.approx(min(sqnr + 20 * np.log10(2), 46.0206), abs=1e-2)
    assert loader["fp_snr_threshold_db"] == pytest.approx(sqnr - 20 * np.log10(1.5), abs=1e-2)

    fp_ref = tmp_path / "fp.json"
    fp = polygraphy_run(str(bundle / "unet_fp.onnx"), "--onnxrt", "--data-loader-script", str(script),
                     "--save-outputs", str(fp_ref), cwd=tmp_path)
    assert fp.returncode == 0, fp.stdout[-3000:] + fp.stderr[-3000:]

    for ref, threshold in ((reference, loader["snr_threshold_db"]), (fp_ref, loader["fp_snr_threshold_db"])):
        good = compare(bundle, bundle / "unet.onnx", ref, threshold, tmp_path)
        assert good.returncode == 0 and "PASSED" in good.stdout, good.stdout[-3000:] + good.stderr[-3000:]

    bad = tmp_path / "unet_tampered.onnx"
    load_script("validate_margins").tamper(bundle / "unet.onnx", bad, index=0, factor=4.0)
    tampered = compare(bundle, bad, reference, loader["snr_threshold_db"], tmp_path)
    assert tampered.returncode != 0 and "FAILED" in tampered.stdout, tampered.stdout[-3000:]
    # against the FP outputs the same break hides inside the quantization-error headroom
    assert compare(bundle, bad, fp_ref, loader["fp_snr_threshold_db"], tmp_path).returncode == 0
