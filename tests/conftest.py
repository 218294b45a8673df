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
