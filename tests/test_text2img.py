"""The text side of text-to-image UNets (tdqrt.calibration.models.text, the Stable Diffusion folders of
tdqrt.calibration.models.sources, the CLI prompt options) against diffusers' StableDiffusionPipeline on the tiny SD
pipeline folder: prompt embeddings equal ``encode_prompt``'s; those embeddings, a plain classifier-free-guided DDIM
loop over the diffusers UNet and tdqrt's LatentDecoder reproduce the pipeline's images (the conventions tdqrt's
sampler follows); records and the one-line refusals of bad input."""
from __future__ import annotations

import argparse
import json
import shutil
import warnings

import pytest
import torch
from _cli import refused
from safetensors.torch import load_file, save_file

from tdqrt.calibration.models.sources import source_layout
from tdqrt.calibration.models.text import PromptSet, TextEncoder, text_encoder_record, tokenizer_sha256
from tdqrt.engines.artifacts import sha256_file
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.tools.cli import _add_prompt_args, _HelpFormatter, _prompts_from_args

PROMPTS = ["a photo of a cat", "a red car in the city at night"]
NEGATIVE = "blurry low quality"
GUIDANCE = 3.0
STEPS = 4
# The same modules on the same inputs in the same batch grouping: identical here (measured 0); the tolerance is for
# float rounding where another torch reorders a reduction.
ATOL = 1e-5


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_v_pipeline_dir(tmp_path_factory):
    """The tiny SD pipeline with a v_prediction scheduler (Stable Diffusion 2.x's convention)."""
    from _scripts import load_script

    return load_script("tiny_pipelines").build("sd-v", tmp_path_factory.mktemp("sd_v_pipeline"))


def test_text_encoder_record_describes_the_pipelines_text_encoder(sd_pipeline_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    record = text_encoder_record(sd_pipeline_dir)
    folder, tok = sd_pipeline_dir.resolve() / "text_encoder", sd_pipeline_dir.resolve() / "tokenizer"
    model = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(tok, local_files_only=True)
    assert record == {"class": "CLIPTextModel", "path": str(folder), "weights": "model.safetensors",
                      "sha256": sha256_file(folder / "model.safetensors"), "tokenizer_path": str(tok),
                      "tokenizer_sha256": tokenizer_sha256(tok), "max_length": tokenizer.model_max_length,
                      "hidden_size": model.config.hidden_size}
    assert (record["max_length"], record["hidden_size"]) == (16, 16)
    files = sorted(p.name for p in tok.iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    from tdqrt.engines.artifacts import sha256_json

    assert record["tokenizer_sha256"] == sha256_json({f: sha256_file(tok / f) for f in files})


def test_encode_equals_the_pipelines_encode_prompt(sd_pipeline_dir):
    pipe = _pipeline(sd_pipeline_dir)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=True,
                                          negative_prompt=[NEGATIVE] * len(PROMPTS))
        _, empty = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=True)
    encoder = TextEncoder.from_record(text_encoder_record(sd_pipeline_dir))
    ours, ours_uncond = encoder.encode_set(PromptSet(tuple(PROMPTS), NEGATIVE))
    assert ours.shape == cond.shape == (2, 16, 16) and ours.dtype == torch.float32
    assert ours_uncond.shape == (16, 16)
    torch.testing.assert_close(ours, cond, rtol=0, atol=1e-6)
    for row in uncond:
        torch.testing.assert_close(ours_uncond, row, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.encode_set(PromptSet(tuple(PROMPTS)))[1], empty[0], rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3) and not torch.allclose(ours_uncond, empty[0], atol=1e-3)


def _tdqrt_images(folder, latents, prompts: PromptSet) -> torch.Tensor:
    """tdqrt's FP sampling of the pipeline folder from ``latents``: the model resolver, the prompts encoded by the
    text encoder the model records, DDIM on the scheduler's grid with classifier-free guidance against the negative
    prompt (:func:`tdqrt.runtime.sampling.sample`), and the decoder; mapped to [0, 1] as the pipeline does."""
    from tdqrt.calibration.models.text import prompt_embeddings
    from tdqrt.calibration.resolve import open_model
    from tdqrt.runtime.sampling import SamplerConfig, sample
    from tdqrt.runtime.schedules import NoiseSchedule

    m = open_model(folder)
    cond, uncond = prompt_embeddings(m.model, m.card, prompts)
    idx = torch.arange(len(latents))
    cfg = SamplerConfig(kind="ddim", steps=STEPS, spacing="scheduler", guidance_scale=GUIDANCE)
    x = sample(m.model, NoiseSchedule(m.schedule), cfg, sample_indices=idx, seed=0, shape=m.sample_shape,
               y=cond[idx % len(cond)], null_label=uncond, x_T=latents)
    return (m.decode(x) / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("fixture", ["sd_pipeline_dir", "sd_v_pipeline_dir"])
def test_tdqrt_fp_sampling_reproduces_the_pipeline(fixture, request):
    """Same prompts, negative prompt and initial latents: tdqrt's DDIM with CFG equals StableDiffusionPipeline's
    images (SD 1.x-style epsilon and SD 2.x-style v-prediction folders)."""
    folder = request.getfixturevalue(fixture)
    pipe = _pipeline(folder)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), guidance_scale=GUIDANCE,
                   num_inference_steps=STEPS, latents=latents.clone(), output_type="pt").images
    ours = _tdqrt_images(folder, latents, PromptSet(tuple(PROMPTS), NEGATIVE))
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    assert ref.std() > 0.01 and not torch.allclose(ref[0], ref[1], atol=1e-3)  # two different images
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    # the guidance is what makes them: without it (g = 1, the conditional ε alone) the images differ
    with torch.no_grad():
        plain = pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=STEPS, latents=latents.clone(),
                     output_type="pt").images
    assert (plain - ref).abs().max() > 10 * ATOL


def test_long_prompts_are_truncated_with_a_warning(sd_pipeline_dir):
    encoder = TextEncoder.from_record(text_encoder_record(sd_pipeline_dir))
    long = "a photo of a cat with a dog in the red house on the tree in the big city"  # 19 words
    cut = "a photo of a cat with a dog in the red house on the"  # the first 14: 16 tokens with start and end
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = encoder.encode(["a cat", long])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "prompt 1 has 5 token(s) more than" in messages[0], messages
    assert "16" in messages[0] and "dropped" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(out[1], encoder.encode([cut])[0], rtol=0, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, uncond = encoder.encode_set(PromptSet(("a cat",), long))
    assert [str(w.message).split(" has ")[0] for w in caught] == ["the negative prompt"]
    torch.testing.assert_close(uncond, out[1], rtol=0, atol=1e-6)


def test_changed_or_missing_text_encoder_files_are_refused(sd_pipeline_dir, tmp_path):
    pipe = shutil.copytree(sd_pipeline_dir, tmp_path / "pipe")
    record = text_encoder_record(pipe)
    weights = pipe / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] + 0.01}, weights)
    with pytest.raises(ArtifactError, match="text encoder weights .*model.safetensors changed after the model"):
        TextEncoder.from_record(record)
    shutil.copy(sd_pipeline_dir / "text_encoder" / "model.safetensors", weights)
    config = pipe / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 12}))
    with pytest.raises(ArtifactError, match="tokenizer folder .*tokenizer changed after the model was made"):
        TextEncoder.from_record(record)
    shutil.rmtree(pipe / "tokenizer")
    with pytest.raises(ArtifactError, match="tokenizer folder .*tokenizer is missing"):
        TextEncoder.from_record(record)
    with pytest.raises(ArtifactError, match="lacks some of"):
        TextEncoder.from_record({k: v for k, v in record.items() if k != "tokenizer_sha256"})


# ----------------------------------------------------------------------------------------- pipeline folders


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_stable_diffusion_folder_is_laid_out_as_a_text_to_image_pipeline(sd_pipeline_dir, tmp_path):
    layout = source_layout(sd_pipeline_dir)
    root = sd_pipeline_dir.resolve()
    assert layout.text and layout.pipeline == "StableDiffusionPipeline"
    assert (layout.unet_dir, layout.autoencoder_dir) == (root / "unet", root / "vae")
    assert layout.scheduler_file == root / "scheduler" / "scheduler_config.json"
    # an SD 1.5 folder as published also names a safety checker and a feature extractor: not used, not refused
    pipe = shutil.copytree(sd_pipeline_dir, tmp_path / "pipe")
    _edit_json(pipe / "model_index.json", safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"])
    assert source_layout(pipe).text


def test_sdxl_and_incomplete_text_to_image_folders_are_refused(sd_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    sdxl = shutil.copytree(sd_pipeline_dir, tmp_path / "sdxl")
    _edit_json(sdxl / "model_index.json", _class_name="StableDiffusionXLPipeline",
               text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
               tokenizer_2=["transformers", "CLIPTokenizer"])
    for argv in (["calibrate", "--model", str(sdxl)], ["import", str(sdxl)]):
        refused(capsys, [*argv, "--out", str(out)], out, "StableDiffusionXLPipeline",
                "Stable Diffusion XL", "not support", "Stable Diffusion 1.x/2.x pipeline folders are supported")
    added = shutil.copytree(sd_pipeline_dir, tmp_path / "added")  # SDXL's UNet conditioning without text_encoder_2
    _edit_json(added / "unet" / "config.json", addition_embed_type="text_time")
    refused(capsys, ["calibrate", "--model", str(added), "--out", str(out)], out, "Stable Diffusion XL")

    no_tokenizer = shutil.copytree(sd_pipeline_dir, tmp_path / "no_tokenizer")
    index = json.loads((no_tokenizer / "model_index.json").read_text())
    del index["tokenizer"]
    (no_tokenizer / "model_index.json").write_text(json.dumps(index))
    refused(capsys, ["calibrate", "--model", str(no_tokenizer), "--out", str(out)], out,
            "UNet2DConditionModel but no tokenizer")
    missing = shutil.copytree(sd_pipeline_dir, tmp_path / "missing")
    shutil.rmtree(missing / "text_encoder")
    refused(capsys, ["calibrate", "--model", str(missing), "--out", str(out)], out,
            f"{missing.resolve() / 'text_encoder'} is missing")
    refused(capsys, ["calibrate", "--model", str(sd_pipeline_dir / "unet"), "--out", str(out)], out,
            "UNet2DConditionModel (a text-to-image UNet) without its text encoder", "StableDiffusionPipeline folder")
    other = shutil.copytree(sd_pipeline_dir, tmp_path / "other")  # a UNet made for another text encoder
    _edit_json(other / "unet" / "config.json", cross_attention_dim=8)
    refused(capsys, ["calibrate", "--model", str(other), "--out", str(out)], out, "cross_attention_dim=8",
            "hidden_size=16")


# ---------------------------------------------------------------------------------------------------- prompts


def test_prompt_sets_record_count_and_sha256(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a red car\n\n   \n  a blue house  \n")
    prompts = PromptSet.from_sources(["a photo of a cat"], file, negative=NEGATIVE)
    assert prompts.prompts == ("a photo of a cat", "a red car", "a blue house") and prompts.count == 3
    assert prompts.record() == {"count": 3, "sha256": prompts.sha256}
    assert PromptSet.from_dict(json.loads(json.dumps(prompts.to_dict()))) == prompts
    others = [PromptSet(prompts.prompts), PromptSet(prompts.prompts[:2], NEGATIVE),
              PromptSet(("a photo of a cat", "a blue house", "a red car"), NEGATIVE)]
    assert len({prompts.sha256, *(o.sha256 for o in others)}) == 4  # negative prompt, count and order all count
    with pytest.raises(ArtifactError, match="recorded sha256"):
        PromptSet.from_dict({**prompts.to_dict(), "prompts": ["a red car"]})


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_a_prompt_file_without_prompts_is_refused(tmp_path, text):
    file = tmp_path / "prompts.txt"
    file.write_text(text)
    with pytest.raises(ConfigError, match=f"--prompts {file} holds no prompt"):
        PromptSet.from_sources((), file)
    with pytest.raises(ConfigError, match="no prompts"):
        PromptSet(())


def test_cli_prompt_options(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tdqrt sample", formatter_class=_HelpFormatter)
    _add_prompt_args(parser)
    assert _prompts_from_args(parser.parse_args([])) is None
    file = tmp_path / "prompts.txt"
    file.write_text("a red car\na blue house\n")
    args = parser.parse_args(["--prompt", "a cat", "--prompt", "a dog", "--prompts", str(file),
                              "--negative-prompt", NEGATIVE])
    assert _prompts_from_args(args) == PromptSet(("a cat", "a dog", "a red car", "a blue house"), NEGATIVE)
    assert _prompts_from_args(parser.parse_args(["--prompt", "a cat"])) == PromptSet(("a cat",), "")
    with pytest.raises(ConfigError, match="--negative-prompt needs prompts"):
        _prompts_from_args(parser.parse_args(["--negative-prompt", NEGATIVE]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="holds no prompt"):
        _prompts_from_args(parser.parse_args(["--prompts", str(tmp_path / "empty.txt")]))
    parser.print_help()
    help_text = " ".join(capsys.readouterr().out.split())
    assert '(default: "")' in help_text and "repeat for several" in help_text and "one a line" in help_text
