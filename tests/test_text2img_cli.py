"""A Stable-Diffusion-style pipeline folder (scripts/tiny_pipelines.py ``sd``: CLIP text encoder and tokenizer,
UNet2DConditionModel, AutoencoderKL, DDIM; random weights) through the CLI: calibrate with prompts (minmax here,
tdq-ptq in the README walkthrough) → d2-stats → export → lint → TensorRT-RTX build → validate → sample with two
prompts and a negative prompt; and the one-line refusals of prompt input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _cli import NEGATIVE, PROMPTS, SAMPLER, refused, run_ok
from _scripts import load_script

from tdqrt.tools.cli import main


def test_text_to_image_pipeline_through_every_stage(sd_bundle, sd_pipeline_dir, tmp_path, capsys):
    from tdqrt.engines.bundle import open_bundle
    from tdqrt.runtime.d2 import D2Table

    bundle = sd_bundle / "bundle"
    b = open_bundle(bundle)
    assert b.cond_shape == (16, 16) and b.decoder is not None
    assert b.manifest["text_encoder"]["path"] == str((sd_pipeline_dir / "text_encoder").resolve())
    quant = json.loads((sd_bundle / "q" / "quant.json").read_text())
    assert quant["calibration"]["prompts"]["count"] == 2 and len(quant["calibration"]["prompts"]["sha256"]) == 64
    d2_prompts = D2Table.load(sd_bundle / "d2").settings.prompts  # two prompts and a negative one: another sha256
    assert d2_prompts["count"] == 2 and d2_prompts["sha256"] != quant["calibration"]["prompts"]["sha256"]
    # (a learned method, tdq-ptq, goes the same way in the README walkthrough test below)
    run_ok(["lint", bundle, "--no-polygraphy"], capsys)
    run_ok(["validate", bundle, "--timesteps", "2", "--per-timestep", "1"], capsys)
    # a planted activation scale fails the per-layer verdict
    from tdqrt.calibration.resolve import open_model
    from tdqrt.tools.validate import ValidateConfig, validate_models

    q = open_model(sd_bundle / "q", decoder=False)
    fp = open_model(sd_pipeline_dir, decoder=False)
    bad = tmp_path / "unet_bad.onnx"
    load_script("validate_margins").tamper(bundle / "unet.onnx", bad, index=1, factor=4.0)
    report = validate_models(bundle / "unet_fp.onnx", bad, fp.model, q.model, q.card["calibration"]["path"],
                             ValidateConfig(timesteps=2, per_timestep=1))
    assert not report.passed and any(f.startswith("per-layer check") for f in report.failures)

    samples = tmp_path / "samples"
    run_ok(["sample", "--model", bundle, "--num", "4", "--batch", "4", *SAMPLER, *PROMPTS, *NEGATIVE, "--d2", "d",
          "--out", samples], capsys)
    with np.load(samples / "samples.npz") as npz:
        assert npz["arr_0"].shape == (4, 16, 16, 3)  # decoded pixels of the pipeline's size
        assert npz["labels"].tolist() == [0, 1, 0, 1]  # sample n follows prompt n mod 2
        images = npz["arr_0"]
    assert (images[0] != images[1]).any()
    job = json.loads((samples / "sample.json").read_text())["job"]
    assert job["prompts"]["count"] == 2 and job["prompts"]["negative"] == "blurry"


def test_tensorrt_rtx_build_doubles_the_batch_for_cfg(sd_bundle, capsys):
    pytest.importorskip("tensorrt_rtx", reason="the test extra installs tensorrt-rtx; this environment lacks it")
    run_ok(["build", "--bundle", sd_bundle / "bundle", "--backend", "trt-rtx", "--max-batch", "2", "--opt-batch", "1"],
         capsys)
    profile = json.loads((sd_bundle / "bundle" / "trt" / "engine.json").read_text())["profile"]
    # the max batch doubled for classifier-free guidance, for the text embeddings as for the latents
    assert profile["encoder_hidden_states"] == {"min": [1, 16, 16], "opt": [2, 16, 16], "max": [4, 16, 16]}
    assert profile["sample"]["max"] == [4, 4, 8, 8]


def test_prompt_input_refusals(sd_bundle, sd_pipeline_dir, ddpm_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "s"
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    refused(capsys, ["sample", "--model", sd_bundle / "bundle", "--prompts", empty, *SAMPLER, "--out", out], out,
             str(empty))
    refused(capsys, ["sample", "--model", sd_bundle / "bundle", *SAMPLER, "--out", out], out, "--prompt")
    refused(capsys, ["sample", "--model", ddpm_pipeline_dir, "--prompt", "a cat", "--steps", "2", "--out", out], out,
             "not conditioned on text")
    assert not out.exists()
    # a bundle whose text encoder changed since export: refused before anything is sampled
    pipe = shutil.copytree(sd_pipeline_dir, tmp_path / "pipe")
    q, bundle = tmp_path / "q", tmp_path / "bundle"
    run_ok(["calibrate", "--model", pipe, "--method", "minmax", "--calib", sd_bundle / "q" / "calib", "--out", q],
         capsys)
    run_ok(["export", "--quant", q, "--out", bundle, "--no-polygraphy"], capsys)
    weights = next(p for p in (pipe / "text_encoder").iterdir() if p.suffix in (".safetensors", ".bin"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] + bytes(8))
    refused(capsys, ["sample", "--model", bundle, *SAMPLER, *PROMPTS, "--out", out], out, str(weights))
    assert not out.exists()


def test_long_prompt_is_truncated_with_a_warning(sd_bundle, tmp_path, capsys):
    long = " ".join(["red circle"] * 20)
    with pytest.warns(UserWarning, match="more than the text encoder.s 16 .* dropped"):
        assert main(["sample", "--model", str(sd_bundle / "bundle"), "--num", "1", "--batch", "1", *SAMPLER,
                     "--prompt", long, "--out", str(tmp_path / "s")]) == 0
    assert Path(tmp_path / "s" / "samples.npz").is_file()


def test_readme_text_to_image_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("**From prompts to INT8 images**"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    lines = [line for line in block[:block.index("```")].splitlines() if line.strip()]
    assert lines[0].startswith("python3 scripts/tiny_pipelines.py sd ")
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(lines[0], comments=True)
    subprocess.run([sys.executable, str(root / argv[1]), *argv[2:]], check=True, capture_output=True)
    for line in lines[1:]:
        assert line.startswith("tdqrt ")
        run_ok(shlex.split(line, comments=True)[1:], capsys)
    with np.load(tmp_path / "runs" / "sd-samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (4, 16, 16, 3) and npz["labels"].tolist() == [0, 1, 0, 1]
    assert json.loads((tmp_path / "runs" / "sd-bundle" / "validation" / "validate.json").read_text())["passed"]
    assert (tmp_path / "runs" / "sd-bundle" / "trt" / "unet.trt.plan").is_file()
