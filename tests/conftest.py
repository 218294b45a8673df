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
