"""Schedules read from diffusers scheduler configs: every beta schedule × prediction type × clip_sample, the
timestep spacings, DDPM's variance types, against diffusers' own DDIMScheduler / DDPMScheduler (the oracle);
the config reader on real pipelines' configs and its refusals; ε conversion under CFG, in hooks and in D²."""
import math

import diffusers
import numpy as np
import pytest
import torch

from tdqrt.calibration.d2_stats import collect_d2_stats
from tdqrt.engines.errors import ConfigError
from tdqrt.runtime.d2 import D2Settings, D2Table, check_settings
from tdqrt.runtime import (
    EpsPrediction,
    NoiseSchedule,
    Sampler,
    SamplerConfig,
    ScheduleConfig,
    as_eps_denoiser,
    guided_eps,
    make_timesteps,
    sample,
)

SHAPE = (2, 3, 8, 8)
# float32-representable betas, so diffusers' float32 copy of them equals ours exactly (T = 1000, growing, jittered)
TRAINED = (torch.linspace(2e-4, 0.03, 1000, dtype=torch.float64)
           * (1 + 0.1 * torch.sin(torch.arange(1000.0, dtype=torch.float64)))).float().double().tolist()
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(beta_schedule="linear", trained_betas=TRAINED),
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SAMPLERS = {  # name: (tdqrt SamplerConfig kwargs, diffusers class, extra scheduler config)
    "ddim-eta0": (dict(kind="ddim", eta=0.0), diffusers.DDIMScheduler, {}),
    "ddim-eta1": (dict(kind="ddim", eta=1.0), diffusers.DDIMScheduler, {}),
    "ddpm-fixed_small": (dict(kind="ddpm"), diffusers.DDPMScheduler, dict(variance_type="fixed_small")),
    "ddpm-fixed_large": (dict(kind="ddpm"), diffusers.DDPMScheduler, dict(variance_type="fixed_large")),
}

# What diffusers' hub folders hold (scheduler/scheduler_config.json of each pipeline).
DDPM_CIFAR10 = {  # google/ddpm-cifar10-32
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_large",
}
LDM_CELEBAHQ = {  # CompVis/ldm-celebahq-256
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.0.4", "beta_end": 0.0195, "beta_schedule": "scaled_linear",
    "beta_start": 0.0015, "clip_sample": False, "num_train_timesteps": 1000, "trained_betas": None,
}
SD2 = {  # stabilityai/stable-diffusion-2
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD15_PNDM = {  # runwayml/stable-diffusion-v1-5: a PNDM config; its beta/prediction fields define the model
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


def _randn(seed, shape=SHAPE, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _oracle(cls, config):
    """diffusers' scheduler for ``config``, doing its math in float64 (as tests/test_sampling.py's ``_float64``:
    its float32 ᾱ table alone would exceed the 1e-5 budget at small t; every formula is still diffusers')."""
    ref = cls.from_config(config)
    ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if ref.config.set_alpha_to_one \
            else ref.alphas_cumprod[0]
    return ref


def _output(kind, eps, x, a):
    """The network output of prediction type ``kind`` whose ε is ``eps`` at x_t = x (ᾱ_t = a), float64."""
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return {"epsilon": eps, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0, "sample": x0}[kind]


def _compare(config, sampler_kwargs, cls, steps=10, atol=1e-5):
    """tdqrt's sampler (schedule from ``config`` by ScheduleConfig.from_diffusers, spacing "scheduler") against
    ``cls.from_config(config)`` step for step on the same model outputs and noise; returns how often x0 was clipped.

    The toy network is tests/test_sampling.py's: ε = sqrt(1 − ᾱ_t)·x + 0.5·sqrt(ᾱ_t)·n_i (x stays O(1)), given in
    the config's prediction type. Per step our update runs on diffusers' x and model output (float32, converted to
    ε by EpsPrediction); our own chained float32 trajectory is compared too. z of step i is the same on both sides.
    """
    schedule = NoiseSchedule(ScheduleConfig.from_diffusers(config))
    ours = Sampler(schedule, SamplerConfig(steps=steps, spacing="scheduler", **sampler_kwargs))
    ref = _oracle(cls, config)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    kind, eta = config.get("prediction_type", "epsilon"), sampler_kwargs.get("eta", 1.0)
    abar = schedule.alphas_cumprod
    x_ref = _randn(7)
    x_ours = x_ref.float()
    clipped = 0
    for i, t in enumerate(ours.timesteps.tolist()):
        a = float(abar[t])

        def model(x, t_batch, y=None):  # the toy in the config's prediction type, in x's dtype
            eps = math.sqrt(1 - a) * x.double() + 0.5 * math.sqrt(a) * _randn(2000 + i)
            return _output(kind, eps, x.double(), a).to(x.dtype)

        tb = torch.full((SHAPE[0],), t)
        out_ref, z = model(x_ref, tb), _randn(1000 + i)
        if cls is diffusers.DDIMScheduler:
            res = ref.step(out_ref, t, x_ref, eta=eta, variance_noise=z)
        else:
            res = ref.step(out_ref, t, x_ref, generator=torch.Generator().manual_seed(1000 + i))
        unclipped = _output("sample", _output_eps(kind, out_ref, x_ref, a), x_ref, a)
        clipped += int(((res.pred_original_sample - unclipped).abs() > 1e-6).sum())
        step_in = EpsPrediction(lambda x, tt, y=None: out_ref.float(), schedule)(x_ref.float(), tb)
        got = ours.step(i, x_ref.float(), step_in, z.float())
        torch.testing.assert_close(got.double(), res.prev_sample, atol=atol, rtol=0,
                                   msg=lambda m: f"step {i} t={t}: {m}")
        x_ours = ours.step(i, x_ours, as_eps_denoiser(model, schedule)(x_ours, tb), z.float())
        torch.testing.assert_close(x_ours.double(), res.prev_sample, atol=atol, rtol=0,
                                   msg=lambda m: f"chain {i} t={t}: {m}")
        x_ref = res.prev_sample
    return clipped


def _output_eps(kind, out, x, a):
    """ε of a float64 output (the reference's own conversion, to see whether diffusers clipped x0)."""
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return math.sqrt(a) * out + math.sqrt(1 - a) * x
    return (x - math.sqrt(a) * out) / math.sqrt(1 - a)


# ----------------------------------------------------------------------------------------------- the oracle matrix


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("betas", list(BETAS))
def test_steps_match_diffusers(betas, prediction, clip, sampler):
    kwargs, cls, extra = SAMPLERS[sampler]
    config = {"_class_name": cls.__name__, "num_train_timesteps": 1000, **BETAS[betas], "prediction_type": prediction,
              "clip_sample": clip, "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, **extra}
    clipped = _compare(config, kwargs, cls)
    assert (clipped > 0) == clip  # clipping really happened (and only) where it was asked for


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("spacing, offset, steps", [
    ("leading", 0, 10), ("leading", 1, 7), ("trailing", 0, 10), ("trailing", 0, 7), ("linspace", 0, 10),
    ("linspace", 1, 6),
])
def test_spacings_match_diffusers(spacing, offset, steps, sampler):
    kwargs, cls, extra = SAMPLERS[sampler]
    config = {"_class_name": cls.__name__, **BETAS["scaled_linear"], "prediction_type": "v_prediction",
              "clip_sample": True, "clip_sample_range": 1.5, "timestep_spacing": spacing, "steps_offset": offset,
              **extra}
    _compare(config, kwargs, cls, steps=steps)


@pytest.mark.parametrize("cls", [diffusers.DDIMScheduler, diffusers.DDPMScheduler])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_scheduler_grids_match_diffusers(cls, spacing, offset):
    config = {"_class_name": cls.__name__, "timestep_spacing": spacing, "steps_offset": offset}
    schedule = ScheduleConfig.from_diffusers(config)
    for steps in (1, 3, 7, 10, 50, 333, 997):
        ref = cls.from_config(config)
        ref.set_timesteps(steps)
        assert torch.equal(make_timesteps(1000, steps, "scheduler", schedule), ref.timesteps), (steps, spacing)


def test_scheduler_grid_refusals():
    with pytest.raises(ConfigError, match="spacing 'scheduler' needs the model's ScheduleConfig"):
        make_timesteps(1000, 10, "scheduler")
    with pytest.raises(ConfigError, match="not 1000 distinct timesteps below 1000"):  # leading + offset overflows T
        make_timesteps(1000, 1000, "scheduler", ScheduleConfig(steps_offset=1))
    with pytest.raises(ConfigError, match="same num_train_timesteps"):
        make_timesteps(500, 10, "scheduler", ScheduleConfig())


def test_full_ddpm_chain_fixed_large_matches_diffusers():
    # All T steps of google/ddpm-cifar10-32's own sampler (DDPMPipeline: DDPMScheduler, t -> t-1), first and last few.
    schedule = NoiseSchedule(ScheduleConfig.from_diffusers(DDPM_CIFAR10))
    ours = Sampler(schedule, SamplerConfig(kind="ddpm", steps=1000, spacing="scheduler"))
    ref = _oracle(diffusers.DDPMScheduler, DDPM_CIFAR10)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[-1] == 0.0 and ours.sigmas[0] == pytest.approx(math.sqrt(float(schedule.betas[999])))
    for i in (0, 1, 997, 998, 999):
        t = int(ours.timesteps[i])
        x, eps = _randn(50 + i), 0.8 * _randn(100 + i)
        res = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i))  # draws z = _randn(i)
        got = ours.step(i, x.float(), eps.float(), _randn(i).float())
        torch.testing.assert_close(got.double(), res.prev_sample, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- the reader


def test_reader_ddpm_cifar10():
    cfg = ScheduleConfig.from_diffusers(DDPM_CIFAR10)
    assert cfg == ScheduleConfig(kind="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True,
                                 variance_type="fixed_large")  # prediction epsilon, leading, offset 0 (defaults)
    torch.testing.assert_close(NoiseSchedule(cfg).alphas_cumprod,
                               diffusers.DDPMScheduler.from_config(DDPM_CIFAR10).alphas_cumprod.double(),
                               atol=1e-6, rtol=0)


def test_reader_ldm_celebahq():
    cfg = ScheduleConfig.from_diffusers(LDM_CELEBAHQ)
    assert cfg == ScheduleConfig(kind="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    torch.testing.assert_close(NoiseSchedule(cfg).alphas_cumprod,
                               diffusers.DDIMScheduler.from_config(LDM_CELEBAHQ).alphas_cumprod.double(),
                               atol=1e-6, rtol=0)


def test_reader_sd2_and_sd15_pndm():
    cfg = ScheduleConfig.from_diffusers(SD2)
    assert cfg == ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction", clip_sample=False, steps_offset=1,
                                 timestep_spacing="leading", set_alpha_to_one=False)
    sampler = Sampler(NoiseSchedule(cfg), SamplerConfig(steps=50, spacing="scheduler"))
    assert sampler.timesteps[0] == 981 and sampler.timesteps[-1] == 1
    assert float(sampler.alpha_bar_prev[-1]) == float(NoiseSchedule(cfg).alphas_cumprod[0])  # set_alpha_to_one=False
    pndm = ScheduleConfig.from_diffusers(SD15_PNDM)
    assert pndm == ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                  set_alpha_to_one=False)
    # as DDIMScheduler.from_config would read it: a config without clip_sample means diffusers' default, True
    assert ScheduleConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler"}).clip_sample is True
    assert ScheduleConfig.from_diffusers({"trained_betas": TRAINED}).kind == "trained"
    assert ScheduleConfig.from_diffusers({"variance_type": "fixed_small_log"}).variance_type == "fixed_small"


@pytest.mark.parametrize("config, fragment", [
    ({"thresholding": True}, "scheduler config thresholding: expected False, got True; fix: dynamic thresholding"),
    ({"rescale_betas_zero_snr": True}, "scheduler config rescale_betas_zero_snr: expected False, got True; fix: zero"),
    ({"variance_type": "learned"},
     "scheduler config variance_type: expected fixed_small or fixed_large, got 'learned'"),
    ({"variance_type": "learned_range"}, "variance_type: expected fixed_small or fixed_large, got 'learned_range'"),
    ({"beta_schedule": "sigmoid"}, "scheduler config beta_schedule: expected one of linear, scaled_linear, "
                                   "squaredcos_cap_v2, got 'sigmoid'"),
    ({"prediction_type": "flow_prediction"}, "scheduler config prediction_type: expected one of epsilon, "
                                             "v_prediction, sample, got 'flow_prediction'"),
    ({"timestep_spacing": "karras"}, "scheduler config timestep_spacing: expected one of leading, trailing, linspace"),
    ({"timestep_type": "continuous"}, "scheduler config timestep_type: expected 'discrete', got 'continuous'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "scheduler config _class_name: expected one of DDPMScheduler"),
    ({"trained_betas": [0.01] * 10}, r"trained_betas: expected num_train_timesteps=1000 numbers in \(0, 1\), got '10 "),
    ({"num_train_timesteps": 1}, "num_train_timesteps: expected an integer >= 2, got 1;"),
])
def test_reader_refusals_one_line(config, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        ScheduleConfig.from_diffusers(config)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- old configs


def test_old_config_dicts_keep_their_meaning():
    """Dicts saved before the scheduler fields existed load with defaults that reproduce the old sampler."""
    old_schedule = {"kind": "cosine", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    old_sampler = {"kind": "ddim", "steps": 10, "eta": 0.5, "spacing": "uniform", "guidance_scale": 1.0}
    schedule, sampler_cfg = ScheduleConfig.from_dict(old_schedule), SamplerConfig.from_dict(old_sampler)
    assert schedule == ScheduleConfig(kind="cosine") and ScheduleConfig.from_dict(schedule.to_dict()) == schedule
    sampler = Sampler(NoiseSchedule(schedule), sampler_cfg)
    assert sampler.timesteps.tolist() == list(range(900, -1, -100))  # the old "uniform" grid
    ab = NoiseSchedule(schedule).alphas_cumprod
    assert torch.equal(sampler.alpha_bar_prev,
                       torch.cat([ab[sampler.timesteps[1:]], torch.ones(1, dtype=torch.float64)]))
    assert torch.equal(sampler.sigmas, 0.5 * torch.sqrt((1 - sampler.alpha_bar_prev) / (1 - sampler.alpha_bar)
                                                        * (1 - sampler.alpha_bar / sampler.alpha_bar_prev)))

    def toy(x, t, y=None):
        return 0.1 * x + torch.sin(t.float()).view(-1, 1, 1, 1)

    got = sample(toy, NoiseSchedule(schedule), sampler_cfg, sample_indices=[0, 1], seed=3, shape=(3, 4, 4))
    # the old update written out: DDIM eq. 12 with the same noise order (x_T, then one z per step), in float64
    from tdqrt.runtime import NoiseSource
    noise = NoiseSource(3, [0, 1])
    x = noise.randn((3, 4, 4)).double()
    for i, t in enumerate(sampler.timesteps.tolist()):
        eps = toy(x.float(), torch.full((2,), t)).double()
        a, a_p, s = float(sampler.alpha_bar[i]), float(sampler.alpha_bar_prev[i]), float(sampler.sigmas[i])
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - s * s) * eps + s * noise.randn((3, 4, 4)).double()
    torch.testing.assert_close(got, x.float(), atol=1e-5, rtol=1e-5)


def test_trained_betas_config_round_trips():
    cfg = ScheduleConfig.from_diffusers({"trained_betas": TRAINED, "prediction_type": "sample"})
    assert isinstance(cfg.trained_betas, tuple) and ScheduleConfig.from_dict(cfg.to_dict()) == cfg
    assert torch.equal(NoiseSchedule(cfg).betas, torch.tensor(TRAINED, dtype=torch.float64))
    with pytest.raises(ConfigError, match="trained_betas: expected a list of betas exactly when kind='trained'"):
        ScheduleConfig(kind="trained")
    with pytest.raises(ConfigError, match="trained_betas: expected a list of betas exactly when kind='trained'"):
        ScheduleConfig(trained_betas=TRAINED)


# ----------------------------------------------------------------------------------------------- ε everywhere


def _v_model(eps_model, schedule):
    """A v-predicting network whose ε is ``eps_model``'s (the synthetic denoiser of the tests below)."""
    def v(x, t, y=None):
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = eps_model(x.double(), t, y).double()
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)
    return v


def _eps_toy(x, t, y=None):
    eps = 0.3 * x + 0.01 * torch.cos(t.to(x.dtype) / 50).view(-1, 1, 1, 1)
    return eps if y is None else eps + 0.05 * y.to(x.dtype).view(-1, 1, 1, 1)


def quant_eps(x, t, y=None):
    """A "quantized" ε of ``_eps_toy``: scaled, biased, rounded."""
    return torch.round(_eps_toy(x, t, y) * 1.1 * 64) / 64 + 0.02


V_SCHEDULE = NoiseSchedule(ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction"))
EPS_SCHEDULE = NoiseSchedule(ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012))


def test_cfg_convert_first_equals_combine_first():
    """EpsPrediction converts each (CFG-doubled) model call before the combination; combining the raw v outputs
    first and converting once gives the same ε (the conversion is affine, weights 1 − g and g sum to 1)."""
    v = _v_model(_eps_toy, V_SCHEDULE)
    x, t, y = _randn(0).float(), torch.tensor([600, 600]), torch.tensor([2, 3])
    convert_first = guided_eps(as_eps_denoiser(v, V_SCHEDULE), x, t, y, null_label=9, scale=4.0)
    combined_v = guided_eps(v, x, t, y, null_label=9, scale=4.0)
    combine_first = V_SCHEDULE.eps_from_output(combined_v, x, t)
    torch.testing.assert_close(convert_first, combine_first, atol=2e-6, rtol=0)
    reference = guided_eps(_eps_toy, x, t, y, null_label=9, scale=4.0)  # the ε the v network stands for
    torch.testing.assert_close(convert_first, reference, atol=2e-6, rtol=0)
    wrapped = as_eps_denoiser(v, V_SCHEDULE)
    assert as_eps_denoiser(wrapped, V_SCHEDULE) is wrapped and as_eps_denoiser(_eps_toy, EPS_SCHEDULE) is _eps_toy


def test_v_model_samples_and_hooks_on_eps():
    """sample() on a v-predicting network equals sample() on its ε network, and the step hook sees that ε."""
    v = _v_model(_eps_toy, V_SCHEDULE)
    cfg = SamplerConfig(steps=8, eta=1.0, guidance_scale=2.0)
    kw = dict(sample_indices=[0, 1, 2], seed=5, shape=(3, 4, 4), y=torch.tensor([0, 1, 2]), null_label=3)
    seen = {}

    def spy(name):
        def hook(info, x, eps, noise):
            seen.setdefault(name, []).append((x.clone(), eps.clone()))
            return eps, info.sigma
        return hook

    got = sample(v, V_SCHEDULE, cfg, hook=spy("v"), **kw)
    want = sample(_eps_toy, EPS_SCHEDULE, cfg, hook=spy("eps"), **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for (x_v, eps_v), (x_e, eps_e) in zip(seen["v"], seen["eps"]):
        torch.testing.assert_close(eps_v, eps_e, atol=1e-5, rtol=0)


def test_d2_statistics_of_v_model_are_on_eps():
    """D² moments collected on a v-predicting FP/quantized pair (denoisers given as ε-predictors) equal those of the
    ε pair they stand for."""
    kw = dict(num=6, batch=3, seed=0, shape=(3, 4, 4), progress=False, outlier_sigma=None)
    cfg = SamplerConfig(steps=4, eta=1.0)
    on_v = collect_d2_stats(as_eps_denoiser(_v_model(_eps_toy, V_SCHEDULE), V_SCHEDULE),
                            as_eps_denoiser(_v_model(quant_eps, V_SCHEDULE), V_SCHEDULE), V_SCHEDULE, cfg, **kw)
    on_eps = collect_d2_stats(_eps_toy, quant_eps, EPS_SCHEDULE, cfg, **kw)
    np.testing.assert_allclose(on_v.moments_raw, on_eps.moments_raw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(on_v.tensor.beta, on_eps.tensor.beta, rtol=1e-3, atol=1e-4)
    assert on_v.settings.schedule.prediction_type == "v_prediction"


def test_d2_settings_carry_the_scheduler_fields(tmp_path):
    """A table's settings hold the new schedule fields through save/load, a table saved before they existed reads
    back with the old meaning, and a trained-betas mismatch is refused in one short line."""
    schedule = NoiseSchedule(ScheduleConfig.from_diffusers({"trained_betas": TRAINED, "prediction_type": "sample"}))
    cfg = SamplerConfig(steps=2, spacing="scheduler")
    table = collect_d2_stats(as_eps_denoiser(_eps_toy, schedule), as_eps_denoiser(quant_eps, schedule), schedule, cfg,
                             num=2, batch=2, seed=0, shape=(3, 4, 4), progress=False, outlier_sigma=None)
    loaded = D2Table.load(table.save(tmp_path))
    assert loaded.settings == table.settings and loaded.settings.schedule == schedule.config
    check_settings(loaded, cfg, schedule.config)
    other = ScheduleConfig.from_diffusers({"trained_betas": TRAINED[::-1], "prediction_type": "sample"})
    with pytest.raises(ConfigError, match=r"schedule.trained_betas: saved \[.*, \.\.\., .*\] \(1000 values\)") as err:
        check_settings(loaded, cfg, other)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    old = {"sampler": {"kind": "ddim", "steps": 4, "eta": 0.0, "spacing": "uniform", "guidance_scale": 1.0},
           "schedule": {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
           "num_samples": 8, "seed": 0, "outlier_sigma": 4.0}
    assert D2Settings.from_dict(old).schedule == ScheduleConfig()


@pytest.mark.parametrize("kind, eta", [("ddim", 0.0), ("ddim", 0.6), ("ddpm", 1.0)])
def test_scheduler_spacing_of_a_native_schedule_is_uniform(kind, eta):
    """tdqrt's own schedules (leading, no offset, ᾱ → 1) walk the same steps with "scheduler" as with "uniform"."""
    for steps in (1, 7, 50):
        a, b = (Sampler(NoiseSchedule(), SamplerConfig(kind=kind, steps=steps, eta=eta, spacing=s))
                for s in ("uniform", "scheduler"))
        for name in ("timesteps", "alpha_bar", "alpha_bar_prev", "sigmas", "direction_scale"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (name, steps)
