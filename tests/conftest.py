"""Shared fixtures: a tiny FP checkpoint trained once per session (seconds on CPU).

The suite runs torch on one thread: its models are tiny, and with two threads a second process on the same two
cores (a build, another test run) slows small ops down by 10-40x through OpenMP spin-waiting.
"""
import pytest
import torch

from tdqrt.calibration.training import TrainConfig, train

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_digits_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_digits")
    cfg = TrainConfig(data="digits", model="tiny", steps=6, batch_size=16, warmup_steps=2, checkpoint_every=100)
    return train(cfg, out, progress=False)


@pytest.fixture(scope="session")
def tiny_calib_set(tiny_digits_model, tmp_path_factory):
    """A small time-stamped calibration set of the tiny model (8 trajectories x 5 kept steps of DDIM-10)."""
    from tdqrt.calibration.checkpoint import load_fp_checkpoint
    from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.runtime.schedules import NoiseSchedule

    fp = load_fp_checkpoint(tiny_digits_model)
    cfg = CalibSetConfig(num=8, keep_steps=5, batch=4, sampler=SamplerConfig(steps=10), null_fraction=0.25)
    return collect_calibration_set(fp.model, NoiseSchedule(fp.schedule), cfg, tmp_path_factory.mktemp("calib"),
                                   progress=False)


@pytest.fixture(scope="session")
def tiny_w4_model(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    """The tiny model quantized to W4A8 (min-max) on the tiny calibration set."""
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
    from tdqrt.calibration.quant.config import QuantConfig

    return calibrate(tiny_digits_model, tmp_path_factory.mktemp("w4"), CalibrateConfig(quant=QuantConfig(wbits=4)),
                     calib_dir=tiny_calib_set.path, progress=False)


@pytest.fixture(scope="session")
def tiny_w4_d2_stats(tiny_digits_model, tiny_w4_model, tmp_path_factory):
    """D² statistics of the W4 model for DDIM-5, eta 1, guidance 2 (what corrected sampling in tests uses)."""
    from tdqrt.tools.cli import main

    out = tmp_path_factory.mktemp("d2")
    assert main(["d2-stats", "--fp", str(tiny_digits_model), "--quant", str(tiny_w4_model), "--out", str(out),
                 "--num", "6", "--batch", "3", "--steps", "5", "--eta", "1", "--guidance", "2"]) == 0
    return out


@pytest.fixture
def tiny_diffusers_unet():
    """Makes a tiny random diffusers UNet2DModel with attention (1×8×8, blocks of 8 and 16 channels, seed 0):
    ``make(num_classes=None)``."""
    from tdqrt.calibration.models import DiffusersUNet

    def make(num_classes=None):
        torch.manual_seed(0)
        return DiffusersUNet.from_config({
            "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
            "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 8,
        }, num_classes=num_classes).eval()

    return make


# ---------------------------------------------------------------------------------------------------------------
# Exported bundles shared by the TensorRT-RTX build tests (tests/test_trt_rtx.py) and the data-loader script test


@pytest.fixture(scope="session")
def minmax_quant_dir(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    """The tiny (class-conditional) model quantized W8A8 with min-max."""
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate

    return calibrate(tiny_digits_model, tmp_path_factory.mktemp("q_minmax_s"), CalibrateConfig(),
                     calib_dir=tiny_calib_set.path, progress=False)


@pytest.fixture(scope="session")
def trt_bundles(minmax_quant_dir, tiny_digits_model, tiny_calib_set, tmp_path_factory):
    """Exported trt-flavour bundles: ``fp32`` (tiny minmax W8A8, class-conditional), ``fp16`` (the same model
    exported in FP16), ``tdq`` (tdq-ptq W4A8 with per-timestep ratio tables; no reconstruction iterations — the
    build does not care how good the rounding is)."""
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
    from tdqrt.calibration.quant.config import QuantConfig
    from tdqrt.export.bundle import export_bundle
    from tdqrt.export.exporter import ExportConfig

    root = tmp_path_factory.mktemp("trt_bundles")
    options = {"iters_w": 0, "iters_a": 0, "batch": 8, "num_samples": 16, "hidden": 16, "layers": 1, "fit_steps": 5}
    tdq = calibrate(tiny_digits_model, root / "q_tdq", CalibrateConfig(quant=QuantConfig(method="tdq-ptq", wbits=4),
                                                                       options=options),
                    calib_dir=tiny_calib_set.path, progress=False)
    return {"fp32": export_bundle(minmax_quant_dir, root / "fp32", ExportConfig(polygraphy=False)),
            "fp16": export_bundle(minmax_quant_dir, root / "fp16", ExportConfig(dtype="fp16", polygraphy=False)),
            "tdq": export_bundle(tdq, root / "tdq", ExportConfig(polygraphy=False))}


@pytest.fixture(scope="session")
def cifar_bundle(tmp_path_factory):
    """The ``ddpm-cifar10-32`` architecture (random weights, 35.7 M parameters), min-max W8A8 on a tiny
    calibration set (2 trajectories x 2 kept steps), exported without the FP reference graph."""
    from tdqrt.calibration.checkpoint import save_fp_checkpoint
    from tdqrt.calibration.models import model_from_preset
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
    from tdqrt.calibration.quant.calib_set import CalibSetConfig
    from tdqrt.export.bundle import export_bundle
    from tdqrt.export.exporter import ExportConfig
    from tdqrt.runtime.sampling import SamplerConfig
    from tdqrt.runtime.schedules import ScheduleConfig

    root = tmp_path_factory.mktemp("cifar")
    torch.manual_seed(0)
    model = model_from_preset("ddpm-cifar10-32", image_size=32, in_channels=3, num_classes=0).eval()
    fp = save_fp_checkpoint(root / "fp", model, ScheduleConfig(), data={"name": "random"},
                            training={"preset": "ddpm-cifar10-32", "steps": 0}, ema=False)
    calib = CalibSetConfig(num=2, keep_steps=2, batch=2, sampler=SamplerConfig(steps=2))
    quant = calibrate(fp, root / "q", CalibrateConfig(calib_set=calib), progress=False)
    return export_bundle(quant, root / "bundle", ExportConfig(polygraphy=False, fp_reference=False,
                                                              calib_samples=4))


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders (random weights, saved with save_pretrained; nothing downloaded), read by
# tdqrt.calibration.models.sources: tests/test_sources.py and the latent-decoding and resolver tests use them.

def _pipeline(kind, tmp_path_factory):
    from _scripts import load_script

    return load_script("tiny_pipelines").build(kind, tmp_path_factory.mktemp(f"{kind}_pipeline"))


@pytest.fixture(scope="session")
def ddpm_pipeline_dir(tmp_path_factory):
    """A ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/): 3-channel 16×16 pixels, attention, default
    DDPMScheduler (scripts/tiny_pipelines.py says exactly what)."""
    return _pipeline("ddpm", tmp_path_factory)


@pytest.fixture(scope="session")
def ddim_pipeline_dir(tmp_path_factory):
    """A ``DDIMPipeline`` folder: 1-channel 16×16 pixels, v_prediction, cosine betas, trailing spacing."""
    return _pipeline("ddim", tmp_path_factory)


@pytest.fixture(scope="session")
def ldm_pipeline_dir(tmp_path_factory):
    """An ``LDMPipeline`` folder (vqvae/, unet/, scheduler/): a VQModel, 8×8×3 latents <-> 16×16×3 pixels."""
    return _pipeline("ldm", tmp_path_factory)


@pytest.fixture(scope="session")
def kl_pipeline_dir(tmp_path_factory):
    """A latent pipeline folder with an AutoencoderKL under vae/ (8×8×4 latents <-> 16×16×3 pixels, scaling_factor
    0.5); diffusers' LDMPipeline cannot load this layout itself (it takes ``vqvae``), each component loads alone."""
    return _pipeline("kl", tmp_path_factory)


@pytest.fixture(scope="session")
def sd_pipeline_dir(tmp_path_factory):
    """A ``StableDiffusionPipeline`` folder (text_encoder/ CLIPTextModel, tokenizer/ CLIPTokenizer with 16 tokens per
    prompt, unet/ UNet2DConditionModel with 16-wide cross-attention, vae/ AutoencoderKL, scheduler/ DDIMScheduler):
    8×8×4 latents <-> 16×16×3 pixels, epsilon prediction, no safety checker."""
    return _pipeline("sd", tmp_path_factory)


@pytest.fixture(scope="session")
def sd_bundle(sd_pipeline_dir, tmp_path_factory):
    """The tiny SD folder calibrated min-max on CFG trajectories of two prompts (``q``), with D² statistics (``d2``),
    exported (``bundle``), through the CLI."""
    from _cli import CALIB, NEGATIVE, PROMPTS, SAMPLER

    from tdqrt.tools.cli import main

    root = tmp_path_factory.mktemp("sd_cli")
    for argv in (["calibrate", "--model", sd_pipeline_dir, "--method", "minmax", "--out", root / "q", *CALIB, *PROMPTS],
                 ["d2-stats", "--quant", root / "q", "--num", "4", "--batch", "4", *SAMPLER, *PROMPTS, *NEGATIVE,
                  "--out", root / "d2"],
                 ["export", "--quant", root / "q", "--d2-stats", root / "d2", "--out", root / "bundle",
                  "--no-polygraphy"]):
        assert main([str(a) for a in argv]) == 0, argv
    return root
