"""Shared fixtures: a tiny FP checkpoint trained once per session (seconds on CPU)."""
import pytest

from tdqrt.calibration.training import TrainConfig, train


@pytest.fixture(scope="session")
def tiny_digits_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_digits")
    cfg = TrainConfig(data="digits", model="tiny", steps=6, batch_size=16, warmup_steps=2, checkpoint_every=100)
    return train(cfg, out, progress=False)
