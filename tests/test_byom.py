"""Bring your own model, end to end through the CLI: diffusers pipeline folders (built by scripts/tiny_pipelines.py
with random weights; nothing downloaded) go through calibrate → d2-stats → export → lint → validate → sample, and
the README's walkthrough runs exactly as written."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_ok
from _scripts import load_script


ROOT = Path(__file__).resolve().parents[1]
FAST_CALIB = ["--calib-num", "4", "--calib-keep", "2", "--calib-steps", "4"]
FAST_SAMPLER = ["--steps", "4", "--spacing", "scheduler"]


def _walkthrough() -> list[str]:
    """The command lines of the README's bring-your-own-model walkthrough (its first bash block)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Bring your own diffusers model"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def _planted_scale_fails(bundle: Path, tmp_path: Path) -> None:
    """The bundle's INT8 graph with one activation scale ×4 fails validation (per-layer verdict)."""
    from tdqrt.calibration.resolve import open_model
    from tdqrt.tools.validate import ValidateConfig, validate_models

    sources = json.loads((bundle / "manifest.json").read_text())["sources"]
    q = open_model(sources["quant_model"]["path"], decoder=False)
    fp = open_model(sources["fp_model"]["path"], decoder=False)
    bad = tmp_path / "unet_tampered.onnx"
    load_script("validate_margins").tamper(bundle / "unet.onnx", bad, index=1, factor=4.0)
    report = validate_models(bundle / "unet_fp.onnx", bad, fp.model, q.model, q.card["calibration"]["path"],
                             ValidateConfig(timesteps=2, per_timestep=1), null_label=None)
    assert not report.passed and any(f.startswith("per-layer check") for f in report.failures), report.failures


def test_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = _walkthrough()
    assert lines[0].startswith("python3 scripts/tiny_pipelines.py ")
    assert all(line.startswith("tdqrt ") for line in lines[1:])
    argv = shlex.split(lines[0], comments=True)
    subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], check=True, capture_output=True)
    for line in lines[1:]:
        run_ok(shlex.split(line, comments=True)[1:], capsys)
    bundle = tmp_path / "runs" / "ldm-bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quant"]["config"]["method"] == "tdq-ptq" and manifest["d2"] is not None
    assert manifest["sources"]["fp_model"]["path"] == str((tmp_path / "runs" / "ldm").resolve())
    assert json.loads((bundle / "validation" / "validate.json").read_text())["passed"] is True
    with np.load(tmp_path / "runs" / "ldm-samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8  # pixels, not 8×8 latents
    meta = json.loads((tmp_path / "runs" / "ldm-samples" / "sample.json").read_text())
    assert meta["decoder"]["kind"] == "onnx" and meta["job"]["d2"] == "d"
    _planted_scale_fails(bundle, tmp_path)


@pytest.mark.parametrize("fixture", ["ddpm_pipeline_dir", "kl_pipeline_dir"])
def test_pipeline_folder_as_model_through_every_stage(fixture, request, tmp_path, capsys):
    """A pipeline folder given directly as --model: minmax and a learned method (tdq-ptq) calibrate and export; the
    minmax model goes on through d2-stats, lint, validate (passes; a planted scale fails) and sampling from the
    bundle, whose images have the pipeline's pixel size and equal the diffusers autoencoder's decode of the INT8
    UNet's latents."""
    from tdqrt.engines.bundle import open_bundle
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.runtime.sampling import SamplerConfig, sample
    from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

    folder = request.getfixturevalue(fixture)
    q, d2, bundle = tmp_path / "q", tmp_path / "d2", tmp_path / "bundle"
    run_ok(["calibrate", "--model", str(folder), "--method", "minmax", "--out", str(q), *FAST_CALIB], capsys)
    tdq = tmp_path / "q_tdq"
    run_ok(["calibrate", "--model", str(folder), "--method", "tdq-ptq", "--calib", str(q / "calib"), "--out", str(tdq),
          "--option", "iters_w=0", "--option", "iters_a=0", "--option", "num_samples=8", "--option", "hidden=16",
          "--option", "layers=1", "--option", "fit_steps=5"], capsys)
    run_ok(["export", "--quant", str(tdq), "--out", str(tmp_path / "bundle_tdq"), "--no-polygraphy"], capsys)
    run_ok(["d2-stats", "--quant", str(q), "--num", "4", "--batch", "4", *FAST_SAMPLER, "--out", str(d2)], capsys)
    run_ok(["export", "--quant", str(q), "--d2-stats", str(d2), "--out", str(bundle), "--no-polygraphy"], capsys)
    run_ok(["lint", str(bundle), "--no-polygraphy"], capsys)
    run_ok(["validate", str(bundle), "--timesteps", "2", "--per-timestep", "1"], capsys)
    _planted_scale_fails(bundle, tmp_path)

    samples = tmp_path / "samples"
    run_ok(["sample", "--model", str(bundle), "--num", "3", "--batch", "3", *FAST_SAMPLER, "--d2", "off",
          "--seed", "7", "--out", str(samples)], capsys)
    with np.load(samples / "samples.npz") as npz:
        images = npz["arr_0"]
    assert images.shape == (3, 16, 16, 3)  # the pipeline's pixel size and channels
    b = open_bundle(bundle)
    latent = b.decoder is not None
    assert latent == (fixture == "kl_pipeline_dir")
    x = sample(OrtDenoiser(b), NoiseSchedule(ScheduleConfig.from_dict(b.schedule)),
               SamplerConfig(steps=4, spacing="scheduler"), sample_indices=range(3), seed=7,
               shape=(b.in_channels, b.image_size, b.image_size))
    if latent:  # the diffusers pipeline's decode: autoencoder.decode(latents / scaling_factor), then to [0, 1]
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
        with torch.no_grad():
            x = vae.decode(x / vae.config.scaling_factor).sample
    expected = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # ONNX Runtime vs torch decoder: float rounding may move a value to the neighbouring uint8 level
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
