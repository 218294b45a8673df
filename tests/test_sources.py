"""Diffusers folders as models (tdqrt.calibration.models.sources): pipeline folders of each kind, bare UNet2DModel
folders (safetensors and .bin), `tdqrt import` directories, the CLI from a pipeline folder to a linted bundle, and
the one-line refusals of what does not fit."""
import json
import shutil

import pytest
import torch
from _cli import refused
from safetensors.torch import load_file, save_file

from tdqrt.calibration.checkpoint import load_fp_checkpoint
from tdqrt.calibration.models.sources import SOURCE_FORMAT, autoencoder_record
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.engines.artifacts import sha256_file, sha256_files
from tdqrt.runtime.schedules import ScheduleConfig
from tdqrt.tools.cli import main

PIPELINES = {"ddpm_pipeline_dir": ("DDPMPipeline", None), "ddim_pipeline_dir": ("DDIMPipeline", None),
             "ldm_pipeline_dir": ("LDMPipeline", "vqvae"), "kl_pipeline_dir": ("LDMPipeline", "vae")}
SAFETENSORS = "diffusion_pytorch_model.safetensors"


def _diffusers_output(unet_dir, model):
    """The diffusers UNet2DModel's own output next to tdqrt's, on the same random input and timesteps."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=generator)
    t = torch.tensor([7, 613])
    with torch.no_grad():
        return model(x, t), unet(x, t).sample


def _scheduler(path):
    return ScheduleConfig.from_diffusers(json.loads(path.read_text()))


@pytest.mark.parametrize("fixture", list(PIPELINES))
def test_pipeline_folders_load_as_their_unet_and_scheduler(fixture, request):
    root = request.getfixturevalue(fixture)
    fp = load_model_dir(root)
    ours, theirs = _diffusers_output(root / "unet", fp.model)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert fp.schedule == _scheduler(root / "scheduler" / "scheduler_config.json")
    pipeline, ae_key = PIPELINES[fixture]
    weights = root / "unet" / SAFETENSORS
    assert fp.path == root and fp.sha256 == sha256_file(weights)
    assert fp.card["format"] == SOURCE_FORMAT and fp.card["model"] == fp.model.spec()
    assert fp.card["schedule"] == fp.schedule.to_dict()
    assert fp.card["source"] == {"kind": "pipeline", "path": str(root.resolve()), "pipeline": pipeline,
                                 "unet": {"file": f"unet/{SAFETENSORS}", "sha256": fp.sha256},
                                 "scheduler": "scheduler/scheduler_config.json"}
    if ae_key is None:
        assert fp.card["autoencoder"] is None
    else:
        assert fp.card["autoencoder"] == autoencoder_record(root / ae_key)
        assert fp.card["autoencoder"]["latent_channels"] == fp.model.in_channels


@pytest.mark.parametrize("fixture,cls,channels,scaling", [("ldm_pipeline_dir", "VQModel", 3, 0.18215),
                                                          ("kl_pipeline_dir", "AutoencoderKL", 4, 0.5)])
def test_autoencoder_record_describes_what_diffusers_decodes(fixture, cls, channels, scaling, request, tmp_path):
    import diffusers

    folder = request.getfixturevalue(fixture) / ("vqvae" if cls == "VQModel" else "vae")
    record = autoencoder_record(folder)
    ae = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        image = ae.decode(torch.randn(1, channels, 8, 8)).sample  # the UNet's 8×8 latents
    assert record == {"class": cls, "path": str(folder.resolve()), "weights": SAFETENSORS,
                      "sha256": sha256_file(folder / SAFETENSORS), "scaling_factor": ae.config.scaling_factor,
                      "latent_channels": ae.config.latent_channels, "image_size": image.shape[-1],
                      "out_channels": image.shape[1]}
    assert (record["scaling_factor"], record["latent_channels"], record["image_size"]) == (scaling, channels, 16)
    # a config saved without scaling_factor (older diffusers) means what diffusers loads for it: the class default,
    # which its pipelines and tdqrt's decoder divide by
    copy = shutil.copytree(folder.parent, tmp_path / "pipe")
    config = json.loads((copy / folder.name / "config.json").read_text())
    del config["scaling_factor"]
    (copy / folder.name / "config.json").write_text(json.dumps(config))
    reloaded = getattr(diffusers, cls).from_pretrained(copy / folder.name, local_files_only=True)
    assert autoencoder_record(copy / folder.name)["scaling_factor"] == reloaded.config.scaling_factor == 0.18215


@pytest.fixture
def bare_unet_bin(tmp_path):
    """A UNet2DModel folder saved with .bin weights (safe_serialization=False) and no scheduler config."""
    from diffusers import UNet2DModel

    torch.manual_seed(7)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    return tmp_path / "unet"


def test_bare_unet_folder_with_bin_weights_and_a_scheduler_config_beside_it(bare_unet_bin, capsys, tmp_path):
    from diffusers import DDPMScheduler

    assert (bare_unet_bin / "diffusion_pytorch_model.bin").is_file() and not (bare_unet_bin / SAFETENSORS).exists()
    refused(capsys, ["calibrate", "--model", str(bare_unet_bin), "--out", str(tmp_path / "q")], tmp_path / "q",
            "scheduler_config.json", "tdqrt import")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample").save_config(bare_unet_bin)
    fp = load_fp_checkpoint(bare_unet_bin)
    ours, theirs = _diffusers_output(bare_unet_bin, fp.model)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert fp.schedule == _scheduler(bare_unet_bin / "scheduler_config.json")
    assert fp.card["source"]["kind"] == "unet-folder" and fp.card["source"]["pipeline"] is None
    assert fp.card["source"]["unet"] == {"file": "diffusion_pytorch_model.bin",
                                         "sha256": sha256_file(bare_unet_bin / "diffusion_pytorch_model.bin")}
    assert fp.card["autoencoder"] is None


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(7)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8).eval()


def _with_scheduler(folder):
    from diffusers import DDPMScheduler

    DDPMScheduler().save_config(folder)
    return folder


def test_a_sharded_unet_loads_and_its_sha256_covers_the_index_and_every_shard(tmp_path, capsys):
    unet = _tiny_unet()
    folder = tmp_path / "unet"
    unet.save_pretrained(folder, max_shard_size="20KB")
    index, shards = folder / (SAFETENSORS + ".index.json"), sorted(folder.glob("diffusion_pytorch_model-*"))
    assert index.is_file() and len(shards) > 2 and not (folder / SAFETENSORS).exists()
    fp = load_fp_checkpoint(_with_scheduler(folder))
    state = fp.model.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    ours, theirs = _diffusers_output(folder, fp.model)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert fp.card["source"]["unet"] == {"file": index.name, "sha256": sha256_files([index, *shards])}

    imported = tmp_path / "imported"
    assert main(["import", str(folder), "--out", str(imported)]) == 0
    capsys.readouterr()  # (diffusers' own loading bar above)
    tensors = load_file(shards[1])  # one shard retrained after the import
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] + 0.01}, shards[1], metadata={"format": "pt"})
    out = tmp_path / "q"
    refused(capsys, ["calibrate", "--model", str(imported), "--out", str(out)], out, str(index),
            "changed since `tdqrt import`")


def test_an_fp16_variant_loads_upcast_a_standard_file_wins_and_several_variants_are_refused(tmp_path, capsys):
    unet = _tiny_unet()
    folder = tmp_path / "unet"
    fp32 = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.half().save_pretrained(folder, variant="fp16")
    variant = folder / "diffusion_pytorch_model.fp16.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", variant.name]
    fp = load_fp_checkpoint(_with_scheduler(folder))
    state = fp.model.unet.state_dict()
    for k, v in fp32.items():  # the fp16-rounded weights, upcast
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v.half().float()), k
    assert fp.card["source"]["unet"] == {"file": variant.name, "sha256": sha256_file(variant)}

    shutil.copy(variant, folder / "diffusion_pytorch_model.ema.safetensors")
    out = tmp_path / "q"
    refused(capsys, ["calibrate", "--model", str(folder), "--out", str(out)], out, "several diffusers variants",
            "ema, fp16")
    unet.float().load_state_dict(fp32)
    unet.save_pretrained(folder)  # a standard file beside the variants: diffusers' default load, and tdqrt's
    fp = load_fp_checkpoint(folder)
    state = fp.model.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fp32.items())
    assert fp.card["source"]["unet"]["file"] == SAFETENSORS


def test_a_pipelines_unet_folder_takes_the_scheduler_beside_it(ddim_pipeline_dir):
    fp = load_fp_checkpoint(ddim_pipeline_dir / "unet")
    assert fp.schedule == _scheduler(ddim_pipeline_dir / "scheduler" / "scheduler_config.json")
    assert fp.schedule.prediction_type == "v_prediction" and fp.card["source"]["kind"] == "unet-folder"


def test_import_references_the_folder_and_refuses_changed_weights(kl_pipeline_dir, tmp_path, capsys):
    src = shutil.copytree(kl_pipeline_dir, tmp_path / "pipe")
    imported = tmp_path / "imported"
    assert main(["import", str(src), "--out", str(imported)]) == 0
    assert sorted(p.name for p in imported.iterdir()) == ["import_config.json", "model.json"]  # nothing copied
    card = json.loads((imported / "model.json").read_text())
    assert card["source"]["unet"]["sha256"] == sha256_file(src / "unet" / SAFETENSORS)
    assert card["autoencoder"]["sha256"] == sha256_file(src / "vae" / SAFETENSORS)
    assert card["scheduler_config"] == json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    direct, fp = load_fp_checkpoint(src), load_model_dir(imported)
    assert fp.path == imported and fp.sha256 == direct.sha256 and fp.schedule == direct.schedule
    assert fp.card["autoencoder"] == direct.card["autoencoder"]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(fp.model(x, t), direct.model(x, t))

    for part in ("vae", "unet"):  # retrained weights in the source folder after the import
        weights = src / part / SAFETENSORS
        tensors = load_file(weights)
        name = sorted(tensors)[0]
        save_file({**tensors, name: tensors[name] + 0.01}, weights)
        out = tmp_path / f"q_{part}"
        line = refused(capsys, ["calibrate", "--model", str(imported), "--out", str(out)], out,
                        str(weights), "changed since `tdqrt import`", "re-run `tdqrt import")
        assert ("autoencoder" if part == "vae" else "UNet") in line
        shutil.copy(kl_pipeline_dir / part / SAFETENSORS, weights)
    assert load_fp_checkpoint(imported).sha256 == direct.sha256


def test_import_supplies_the_schedule_of_a_bare_unet_folder(bare_unet_bin, tmp_path):
    from diffusers import DDIMScheduler

    config = tmp_path / "sched" / "scheduler_config.json"
    DDIMScheduler(prediction_type="v_prediction", clip_sample=False).save_config(config.parent)
    assert main(["import", str(bare_unet_bin), "--scheduler-config", str(config), "--out", str(tmp_path / "m")]) == 0
    fp = load_fp_checkpoint(tmp_path / "m")
    assert fp.schedule == _scheduler(config) and fp.card["source"]["scheduler"] == str(config)
    assert fp.sha256 == sha256_file(bare_unet_bin / "diffusion_pytorch_model.bin")


def test_calibrate_export_lint_validate_from_a_pipeline_folder(ddpm_pipeline_dir, tmp_path):
    quant, bundle = tmp_path / "q", tmp_path / "bundle"
    assert main(["calibrate", "--model", str(ddpm_pipeline_dir), "--method", "minmax", "--out", str(quant),
                 "--calib-num", "2", "--calib-keep", "2", "--calib-steps", "2"]) == 0
    card = json.loads((quant / "quant.json").read_text())
    assert card["fp_model"] == {"path": str(ddpm_pipeline_dir),
                                "sha256": sha256_file(ddpm_pipeline_dir / "unet" / SAFETENSORS)}
    assert card["autoencoder"] is None
    assert card["schedule"] == _scheduler(ddpm_pipeline_dir / "scheduler" / "scheduler_config.json").to_dict()
    assert main(["export", "--quant", str(quant), "--out", str(bundle), "--no-polygraphy"]) == 0
    assert main(["lint", str(bundle)]) == 0
    assert main(["validate", str(bundle)]) == 0  # reloads the FP model from the pipeline folder, checks its sha256


def test_a_latent_models_quantized_card_names_its_autoencoder(ldm_pipeline_dir, tmp_path):
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
    from tdqrt.calibration.quant.calib_set import CalibSetConfig
    from tdqrt.runtime.sampling import SamplerConfig

    calib = CalibSetConfig(num=2, keep_steps=2, batch=2, sampler=SamplerConfig(steps=2))
    quant = calibrate(ldm_pipeline_dir, tmp_path / "q", CalibrateConfig(calib_set=calib), progress=False)
    assert load_model_dir(quant).card["autoencoder"] == autoencoder_record(ldm_pipeline_dir / "vqvae")


# ------------------------------------------------------------------------------------------------- bad input


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def test_a_folder_without_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command in (["calibrate", "--model"], ["import"]):
        out = tmp_path / "out"
        refused(capsys, [*command, str(tmp_path / "empty"), "--out", str(out)], out, "model_index.json",
                "config.json")


def test_transformer_pipelines_are_refused(ddpm_pipeline_dir, tmp_path, capsys):
    pipe = tmp_path / "dit"
    shutil.copytree(ddpm_pipeline_dir / "scheduler", pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    out = tmp_path / "out"
    refused(capsys, ["calibrate", "--model", str(pipe), "--out", str(out)], out, "DiTPipeline has no unet",
            "transformer=DiTTransformer2DModel", "supported: ")


def test_a_missing_autoencoder_folder_is_refused(kl_pipeline_dir, tmp_path, capsys):
    pipe = shutil.copytree(kl_pipeline_dir, tmp_path / "pipe")
    shutil.rmtree(pipe / "vae")
    out = tmp_path / "out"
    for argv in (["calibrate", "--model", str(pipe)], ["import", str(pipe)]):
        refused(capsys, [*argv, "--out", str(out)], out, f"{pipe.resolve() / 'vae'} is missing", "AutoencoderKL")


def test_an_unsupported_scheduler_option_is_refused(ddpm_pipeline_dir, tmp_path, capsys):
    pipe = shutil.copytree(ddpm_pipeline_dir, tmp_path / "pipe")
    _edit_json(pipe / "scheduler" / "scheduler_config.json", thresholding=True)
    out = tmp_path / "out"
    for argv in (["calibrate", "--model", str(pipe)], ["import", str(pipe)]):
        refused(capsys, [*argv, "--out", str(out)], out,
                f"{pipe.resolve() / 'scheduler' / 'scheduler_config.json'} thresholding", "True")


def test_a_unet_that_does_not_fit_the_autoencoder_is_refused(ldm_pipeline_dir, ddim_pipeline_dir, tmp_path,
                                                             capsys):
    pipe = shutil.copytree(ldm_pipeline_dir, tmp_path / "pipe")
    shutil.rmtree(pipe / "unet")
    shutil.copytree(ddim_pipeline_dir / "unet", pipe / "unet")  # 1 channel; the VQModel's latents have 3
    out = tmp_path / "out"
    refused(capsys, ["calibrate", "--model", str(pipe), "--out", str(out)], out, "in_channels=1",
            "latent_channels=3")
