"""``tdqrt demo --model``: the quick demo on a user's diffusers pipeline (pixel DDPM and latent LDM) runs every
stage that needs only the model, skips the digits-only ones with their reason in the report, samples the pipeline's
image size (decoded images for the latent model) and reuses its stages on a rerun; bad ``--model`` use is refused
in one line with nothing written."""
import contextlib
import io
import json
import re

import numpy as np
import pytest
from _cli import refused
from PIL import Image

from tdqrt.engines.artifacts import sha256_file
from tdqrt.tools.cli import main
from tdqrt.tools.demo import DIGITS_ONLY, RUN_FILE, STAGES, DemoConfig, run_demo

RAN = [name for name in STAGES if name not in DIGITS_ONLY]


def _demo(model, out) -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["demo", "--quick", "--model", str(model), "--out", str(out)]) == 0


def _statuses(out) -> dict:
    return {name: s["status"] for name, s in json.loads((out / RUN_FILE).read_text())["stages"].items()}


@pytest.fixture(scope="module")
def ddpm_demo(ddpm_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_ddpm")
    _demo(ddpm_pipeline_dir, out)
    return out


@pytest.fixture(scope="module")
def ldm_demo(ldm_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_ldm")
    _demo(ldm_pipeline_dir, out)
    return out


def _samples(out, name) -> np.ndarray:
    return np.load(out / name / "samples.npz")["arr_0"]


def _check_report(out, model_dir) -> str:
    """Every model stage ran, the digits-only ones are listed as skipped with their reasons; returns report.md."""
    assert _statuses(out) == {name: "ran" for name in RAN}
    text = (out / "report" / "report.md").read_text()
    skipped = re.search(r"^## Skipped stages\n((?:- .*\n)+)", text, re.M)
    assert skipped, text
    assert skipped.group(1).splitlines() == [f"- {name}: {why}" for name, why in DIGITS_ONLY.items()]
    assert "reference image set" in DIGITS_ONLY["eval"]
    assert "FID [" not in text and "FID/KID: not computed" in text
    assert "guidance scale 1; an unconditional model: no class labels" in text
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["fid_kid"] is None and set(metrics["skipped"]) == set(DIGITS_ONLY)
    assert metrics["validation"]["passed"] is True
    saved = DemoConfig.from_dict(json.loads((out / "report" / "demo.json").read_text()))
    assert saved == DemoConfig.create(quick=True, model=str(model_dir.resolve()))
    # the model is recorded by path and the sha256 of the UNet weights, nothing copied
    record = json.loads((out / "model" / "stage.json").read_text())
    assert record["summary"]["dir"] == str(model_dir.resolve())
    assert record["summary"]["sha256"] == sha256_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert record["files"] == {}
    for name in ("samples.png", "scales.png", "d2.png", "validate.png", "eps_error.png"):
        with Image.open(out / "report" / name) as img:
            assert img.format == "PNG"
    return text


def test_ddpm_pipeline(ddpm_demo, ddpm_pipeline_dir):
    text = _check_report(ddpm_demo, ddpm_pipeline_dir)
    unet = json.loads((ddpm_pipeline_dir / "unet" / "config.json").read_text())
    size, channels = unet["sample_size"], unet["out_channels"]
    for name in ("samples-fp", "samples-int8", "samples-int8-d2"):
        images = _samples(ddpm_demo, name)
        assert images.shape == (20, size, size, channels) and images.dtype == np.uint8
    assert f"20 {size}×{size}×{channels} images per model" in text
    assert "latent model" not in text


def test_ldm_pipeline_samples_decoded_images(ldm_demo, ldm_pipeline_dir):
    """The UNet works on 8×8×3 latents; every sample set holds the 16×16×3 images the autoencoder decodes them
    to, the INT8 ones through the bundle's decoder.onnx, and the grid PNGs show those images."""
    text = _check_report(ldm_demo, ldm_pipeline_dir)
    assert json.loads((ldm_pipeline_dir / "unet" / "config.json").read_text())["sample_size"] == 8
    for name in ("samples-fp", "samples-int8", "samples-int8-d2"):
        images = _samples(ldm_demo, name)
        assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
        with Image.open(ldm_demo / name / "grid.png") as grid:
            assert grid.mode == "RGB" and grid.size[0] > 16
    decoder = json.loads((ldm_demo / "samples-int8" / "sample.json").read_text())["decoder"]
    assert decoder["path"] == str(ldm_demo / "export" / "bundle" / "decoder.onnx")
    assert "latent model: samples are decoded by its VQModel" in text and "16×16×3 images" in text


def test_rerun_reuses_every_stage(ddpm_demo, ddpm_pipeline_dir):
    run_demo(ddpm_demo, DemoConfig.create(quick=True, model=str(ddpm_pipeline_dir.resolve())), progress=False)
    assert _statuses(ddpm_demo) == {name: "reused" for name in RAN}


def _refused(capsys, args, out) -> str:
    return refused(capsys, ["demo", "--quick", *args, "--out", out], out)


def test_model_with_retrain_refused(tmp_path, ddpm_pipeline_dir, capsys):
    err = _refused(capsys, ["--model", str(ddpm_pipeline_dir), "--retrain"], tmp_path / "out")
    assert "--model and --retrain exclude each other" in err


def test_path_that_is_no_fp_model_refused(tmp_path, ddpm_demo, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    assert "holds no model" in _refused(capsys, ["--model", str(tmp_path / "notes")], tmp_path / "o1")
    assert "not a model directory" in _refused(capsys, ["--model", str(tmp_path / "missing")], tmp_path / "o2")
    for quantized in (ddpm_demo / "w4a8", ddpm_demo / "export" / "bundle"):
        assert "is a quantized model or an exported bundle" in _refused(capsys, ["--model", str(quantized)],
                                                                         tmp_path / "o3")
