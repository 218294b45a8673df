"""Noise schedules: the tables equal diffusers' (the oracle), configs validate and round-trip."""
import diffusers
import pytest
import torch

from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 37])
def test_tables_match_diffusers(kind, T):
    cfg = ScheduleConfig(kind=kind, num_train_timesteps=T, beta_start=1e-4, beta_end=0.02)
    ours = NoiseSchedule(cfg)
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[kind], beta_start=1e-4, beta_end=0.02
    )
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert ours.betas.shape == ours.alphas_cumprod.shape == (T,)
    torch.testing.assert_close(ours.betas, ref.betas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)


def test_add_noise_matches_diffusers_and_keeps_dtype():
    ours = NoiseSchedule(ScheduleConfig(kind="cosine"))
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    out = ours.add_noise(x0, noise, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    assert ours.add_noise(x0.double(), noise.double(), t).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(kind="sigmoid"), "sigmoid"),
        (dict(num_train_timesteps=1), "num_train_timesteps: expected an integer >= 2, got 1;"),
        (dict(num_train_timesteps=10.0), "num_train_timesteps: expected an integer >= 2, got 10.0;"),
        (dict(beta_start=0.0), r"beta_start: expected .*\(0.0, 1.0\), got 0.0;"),
        (dict(beta_end=1.5), "beta_end: expected .*, got 1.5;"),
        (dict(beta_start=0.03, beta_end=0.02), "swap"),
    ],
)
def test_invalid_config_raises(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ScheduleConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    cfg = ScheduleConfig(kind="scaled_linear", num_train_timesteps=500, beta_start=0.00085, beta_end=0.012)
    assert ScheduleConfig.from_dict(cfg.to_dict()) == cfg
    assert ScheduleConfig.from_dict({}) == ScheduleConfig()
    with pytest.raises(ConfigError, match="beta_sched"):
        ScheduleConfig.from_dict({"kind": "linear", "beta_sched": "linear"})
