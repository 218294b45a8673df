"""Correction hooks (S-D², D-D², PTQD) run through the real ``sample()`` loop against the FP trajectories.

The synthetic pairs (``SyntheticPair`` of test_d2_stats) behave like a model with an O(1) error in x0 space:
u = sqrt(1 − ᾱ_t)·x/(1 − b) + sqrt(ᾱ_t)·(m + v·η), so the FP ε is the exact ε of N(0, I) data plus noise and x stays
O(1). Their error obeys the D² model exactly (Δ = a + b·ε̂ + s·ξ, ξ independent of ε̂) whatever the trajectory, so
a correction fitted on FP trajectories must restore the FP statistics on the corrected trajectory. Statistics are
collected with seed 0, the compared runs use seed 1 (64 samples × 64 elements per channel).
"""
import math
import warnings

import numpy as np
import pytest
import torch
from test_d2_stats import SyntheticPair, table_from_moments

from tdqrt.calibration.d2_stats import collect_d2_stats
from tdqrt.engines.errors import ConfigError
from tdqrt.runtime import NoiseSchedule, NoiseSource, Sampler, SamplerConfig, ScheduleConfig, StepInfo, sample
from tdqrt.runtime.corrections import (
    DeterministicD2,
    EpsCorrection,
    PTQDCorrection,
    StochasticD2,
    make_correction,
)

SCHEDULE = NoiseSchedule()
SHAPE = (3, 8, 8)
N = 64
STEPS = 6


def model_like_pair(m, v, a, b, s, base="quant"):
    """Per-channel constants scaled like a model with O(1) x0 error (see module doc); arrays [T, C]."""
    ab = SCHEDULE.alphas_cumprod.numpy()[:, None]
    full = lambda vals: np.tile(np.asarray(vals, dtype=float), (len(ab), 1))  # noqa: E731
    b = full(b)
    lam = np.sqrt(1 - ab) / (1 - b) if base == "quant" else np.sqrt(1 - ab)
    return SyntheticPair(m=full(m) * np.sqrt(ab), v=full(v) * np.sqrt(ab), a=full(a) * np.sqrt(ab), b=b,
                         s=full(s) * np.sqrt(ab), lam=lam, base=base)


D2_PAIR = model_like_pair(m=[0.3, -0.2, 0.1], v=[1.0, 0.8, 1.2], a=[0.3, -0.3, 0.2], b=[-0.2, -0.3, 0.2],
                          s=[0.9, 1.0, 1.1])
UNIFORM_PAIR = model_like_pair(m=[0.3] * 3, v=[1.0] * 3, a=[0.3] * 3, b=[-0.2] * 3, s=[0.9] * 3)
PTQD_PAIR = model_like_pair(m=[0.05, -0.05, 0.0], v=[1.0, 0.8, 1.2], a=[0.3, -0.3, 0.2], b=[0.25] * 3,
                            s=[0.5, 0.6, 0.7], base="fp")


def _collect(pair, cfg):
    return collect_d2_stats(pair.fp, pair.quant, SCHEDULE, cfg, num=N, batch=N, seed=0, shape=SHAPE, progress=False)


def _trajectory(denoiser, cfg, hook=None, seed=1, indices=range(N)):
    """x_t at every step plus the final x, ``[STEPS + 1, B, C, H, W]``, from the real sampling loop."""
    seen = []

    def recording(info, x, eps, noise):
        seen.append(x.clone())
        return hook(info, x, eps, noise) if hook is not None else (eps, info.sigma)

    final = sample(denoiser, SCHEDULE, cfg, sample_indices=list(indices), seed=seed, shape=SHAPE, hook=recording)
    return torch.stack(seen + [final])


def _mean_deviation(run, ref):
    """Mean over steps and channels of |per-channel mean of x − that of the FP trajectory|."""
    return (run.mean(dim=(1, 3, 4)) - ref.mean(dim=(1, 3, 4))).abs().mean().item()


def _variance_ratio(run, ref):
    """Per-channel variance of the final samples relative to the FP ones."""
    return (run[-1].var(dim=(0, 2, 3)) / ref[-1].var(dim=(0, 2, 3))).numpy()


@pytest.fixture(scope="module", params=[0.0, 1.0], ids=["eta0", "eta1"])
def d2_case(request):
    cfg = SamplerConfig(steps=STEPS, eta=request.param)
    return cfg, _collect(D2_PAIR, cfg), _trajectory(D2_PAIR.fp, cfg), _trajectory(D2_PAIR.quant, cfg)


# ----------------------------------------------------------------------------------------------- what they claim


def test_d_d2_restores_the_fp_mean(d2_case):
    """D-D² (channel-wise) brings the per-step, per-channel mean of x ≥ 5× closer to FP than no correction
    (measured: 0.0068 vs 0.156 for η = 0, 0.0111 vs 0.172 for η = 1, i.e. 23× and 15×)."""
    cfg, table, fp, plain = d2_case
    corrected = _trajectory(D2_PAIR.quant, cfg, DeterministicD2(table, Sampler(SCHEDULE, cfg), "channel"))
    assert _mean_deviation(corrected, fp) * 5 <= _mean_deviation(plain, fp)


def test_tensor_wise_d_d2_restores_the_mean_when_channels_agree():
    """Tensor-wise D-D² on a pair whose channels share one error model: ≥ 5× closer (measured 0.0054 vs 0.179, 33×)."""
    cfg = SamplerConfig(steps=STEPS, eta=1.0)
    table = _collect(UNIFORM_PAIR, cfg)
    fp, plain = _trajectory(UNIFORM_PAIR.fp, cfg), _trajectory(UNIFORM_PAIR.quant, cfg)
    corrected = _trajectory(UNIFORM_PAIR.quant, cfg, make_correction("d", "tensor", table, Sampler(SCHEDULE, cfg)))
    assert _mean_deviation(corrected, fp) * 5 <= _mean_deviation(plain, fp)


def test_s_d2_restores_the_fp_variance(d2_case):
    """S-D² reproduces the FP variance of the final samples: each channel's ratio within 1 ± 0.1 (the sampling error
    of a ratio of two 4096-element variances is ~3 % and the fit adds ~1 %, so 0.1 ≈ 3 SE; measured 0.94–1.05).
    Uncorrected (measured |ratio − 1| up to 3.45 / 0.43 at η = 0 / 1) and D-D² (0.34 / 0.43; it has no term for the
    residual variance at η = 0) miss it by more than 0.2 on some channel."""
    cfg, table, fp, plain = d2_case
    sampler = Sampler(SCHEDULE, cfg)
    stochastic = _trajectory(D2_PAIR.quant, cfg, StochasticD2(table, sampler, "channel"))
    assert np.all(np.abs(_variance_ratio(stochastic, fp) - 1) < 0.1), _variance_ratio(stochastic, fp)
    assert _mean_deviation(stochastic, fp) * 5 <= _mean_deviation(plain, fp)
    deterministic = _trajectory(D2_PAIR.quant, cfg, DeterministicD2(table, sampler, "channel"))
    for run in (plain, deterministic):
        assert np.max(np.abs(_variance_ratio(run, fp) - 1)) > 0.2, _variance_ratio(run, fp)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ptqd_reduces_the_error_of_an_eps_correlated_biased_pair(eta):
    """ε̂ = 1.25·ε + b_c + noise: PTQD brings the mean ≥ 5× closer (measured 0.0058 vs 0.150 at η = 0, 26×;
    0.0129 vs 0.149 at η = 1, 11×) and recovers k = 0.25."""
    cfg = SamplerConfig(steps=STEPS, eta=eta)
    table = _collect(PTQD_PAIR, cfg)
    fp, plain = _trajectory(PTQD_PAIR.fp, cfg), _trajectory(PTQD_PAIR.quant, cfg)
    corrected = _trajectory(PTQD_PAIR.quant, cfg, PTQDCorrection(table, Sampler(SCHEDULE, cfg)))
    assert _mean_deviation(corrected, fp) * 5 <= _mean_deviation(plain, fp)
    np.testing.assert_allclose(table.ptqd.k, 0.25, atol=0.03)


# ----------------------------------------------------------------------------------------------- variance absorption


def _gaussian_moments(n, mu_x, mu_y, c00, c01, c11):
    """Sums [.., 9] of n pairs with exactly these means and unbiased covariances (ε = ε̂ − Δ follows)."""
    sq, sd = n * mu_x, n * mu_y
    sqq, sdd, sqd = (n - 1) * c00 + n * mu_x**2, (n - 1) * c11 + n * mu_y**2, (n - 1) * c01 + n * mu_x * mu_y
    return np.stack(np.broadcast_arrays(n, sq, sd, sq - sd, sqq, sdd, sqq - 2 * sqd + sdd, sqd, sqd - sdd), axis=-1)


def _hand_table(cfg, sigma_cond, beta=(0.1, -0.2, 0.3), mu_y=(0.05, -0.1, 0.2)):
    """Per-channel Gaussians with Var ε̂ = 1, the given β, μ_Y and σ_cond at every step (ρ well inside ±0.9999)."""
    beta, sigma_cond, mu_y = (np.asarray(v, dtype=float) for v in (beta, sigma_cond, mu_y))
    K = cfg.steps
    m = _gaussian_moments(np.full((K, 3), 1000.0), 0.0, mu_y, 1.0, beta, beta**2 + sigma_cond**2)
    return table_from_moments(m, cfg)


def test_channel_wise_absorption_uses_each_channels_own_sigma_cond():
    """σ'_c = sqrt(max(0, σ_t² − c_t(σ_t)²·σ_cond,c²)) from each channel's own σ_cond (hand computation), channel 2's
    huge residual leaves no noise at all, and a batch of one sample works (the original indexed batch by channel)."""
    cfg = SamplerConfig(steps=STEPS, eta=1.0)
    sampler = Sampler(SCHEDULE, cfg)
    table = _hand_table(cfg, sigma_cond=[0.001, 0.1, 50.0])
    hook = DeterministicD2(table, sampler, "channel")
    for i in range(STEPS - 1):  # the last step has σ_t = 0
        info = sampler.info(i)
        c = math.sqrt(1 - info.alpha_bar_prev - info.sigma**2) - math.sqrt(
            info.alpha_bar_prev * (1 - info.alpha_bar) / info.alpha_bar)
        want = [math.sqrt(max(0.0, info.sigma**2 - (c * s) ** 2)) for s in table.channel.sigma_cond[i]]
        eps = torch.randn(1, *SHAPE)
        out, sigma = hook(info, torch.zeros(1, *SHAPE), eps, None)
        np.testing.assert_allclose(sigma.flatten().numpy(), want, rtol=1e-12)
        assert sigma.shape == (1, 3, 1, 1) and want[0] > want[1] >= want[2] == 0.0
        beta, a = table.channel.beta[i], table.channel.a[i]
        torch.testing.assert_close(out, (1 - torch.tensor(beta).view(1, 3, 1, 1)).float() * eps
                                   - torch.tensor(a).view(1, 3, 1, 1).float())
    x = sample(D2_PAIR.quant, SCHEDULE, cfg, sample_indices=[0], seed=0, shape=SHAPE, hook=hook)
    assert x.shape == (1, *SHAPE) and torch.isfinite(x).all()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_s_d2_keeps_sigma_t_and_d_d2_has_no_noise_at_eta0(eta):
    cfg = SamplerConfig(steps=STEPS, eta=eta)
    sampler = Sampler(SCHEDULE, cfg)
    table = _hand_table(cfg, sigma_cond=[0.5, 0.5, 0.5])
    assert torch.equal(StochasticD2(table, sampler, "tensor").sigma, sampler.sigmas)
    absorbed = DeterministicD2(table, sampler, "channel").sigma
    assert (absorbed == 0).all() if eta == 0 else (absorbed.flatten(1) <= sampler.sigmas[:, None]).all()


# ----------------------------------------------------------------------------------------------- edge cases


def _run(cfg, hook=None, indices=(0, 1, 2)):
    return sample(D2_PAIR.quant, SCHEDULE, cfg, sample_indices=list(indices), seed=4, shape=SHAPE, hook=hook)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("shape", ["tensor", "channel"])
def test_all_zero_coefficients_reproduce_the_uncorrected_sampler_bit_for_bit(eta, shape):
    cfg = SamplerConfig(steps=STEPS, eta=eta)
    sampler = Sampler(SCHEDULE, cfg)
    ones = torch.ones(STEPS) if shape == "tensor" else torch.ones(STEPS, 1, 3, 1, 1)
    sigma = sampler.sigmas.reshape(-1, *[1] * (ones.dim() - 1)) * ones.double()
    hook = EpsCorrection(sampler.timesteps, ones, ones * 0, ones * 0, sigma)
    assert torch.equal(_run(cfg, hook), _run(cfg))


@pytest.mark.parametrize("kind", ["s", "d", "ptqd"])
def test_quantized_equal_to_fp_is_no_correction(kind):
    """Δ ≡ 0: every D² entry is degenerate (one warning says so); PTQD's regression is well defined and gives k = 0,
    b = 0, σ_q = 0. Either way the run is the uncorrected one, bit for bit."""
    cfg = SamplerConfig(steps=STEPS, eta=1.0)
    table = collect_d2_stats(D2_PAIR.fp, D2_PAIR.fp, SCHEDULE, cfg, num=4, batch=4, seed=0, shape=SHAPE,
                             progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hook = make_correction(kind, "channel", table, Sampler(SCHEDULE, cfg))
    messages = [str(r.message) for r in record]
    assert len(messages) == (0 if kind == "ptqd" else 1) and all("Δ has zero variance" in m for m in messages)
    assert torch.equal(_run(cfg, hook), _run(cfg))


@pytest.mark.parametrize("kind", ["s", "d", "ptqd"])
def test_missing_timestep_warns_once_and_leaves_that_step_alone(kind):
    cfg = SamplerConfig(steps=STEPS, eta=1.0)
    sampler = Sampler(SCHEDULE, cfg)
    full = _hand_table(cfg, sigma_cond=[0.2, 0.3, 0.4])
    i = 2
    info = sampler.info(i)  # t = 498
    keep = [k for k in range(STEPS) if k != i]
    table = table_from_moments(full.moments_raw[keep], cfg, timesteps=full.timesteps[keep])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hook = make_correction(kind, "channel", table, sampler)
    assert len(record) == 1 and f"[{info.t}]" in str(record[0].message), [str(r.message) for r in record]
    eps = torch.randn(2, *SHAPE)
    out, sigma = hook(info, torch.zeros(2, *SHAPE), eps, None)
    assert torch.equal(out, eps) and (sigma == info.sigma).all()  # untouched: the sampler's own σ_t
    neighbour = sampler.info(i - 1)
    assert not torch.equal(hook(neighbour, torch.zeros(2, *SHAPE), eps, NoiseSource(0, [0, 1]))[0], eps)
    x = _run(cfg, hook)
    assert torch.isfinite(x).all()


def test_mismatched_settings_are_refused_unless_forced():
    table = _hand_table(SamplerConfig(steps=STEPS), sigma_cond=[0.2, 0.3, 0.4])
    other = Sampler(SCHEDULE, SamplerConfig(steps=STEPS, guidance_scale=2.0))
    with pytest.raises(ConfigError, match=r"guidance_scale: saved 1\.0, requested 2\.0.*--d2-force"):
        make_correction("d", "channel", table, other)
    with pytest.warns(UserWarning, match="guidance_scale"):
        hook = make_correction("d", "channel", table, other, force=True)
    y = torch.tensor([0, 1])
    x = sample(lambda x, t, y: D2_PAIR.quant(x, t), SCHEDULE, other.config, sample_indices=[0, 1], seed=0,
               shape=SHAPE, y=y, null_label=5, hook=hook)
    assert torch.isfinite(x).all()


def test_factory_and_hook_refuse_misuse():
    cfg = SamplerConfig(steps=STEPS)
    sampler = Sampler(SCHEDULE, cfg)
    table = _hand_table(cfg, sigma_cond=[0.2, 0.3, 0.4])
    assert make_correction("off", "tensor", None, sampler) is None
    for args, word in ((("x", "tensor", table), "correction"), (("d", "pixel", table), "granularity"),
                       (("s", "channel", None), "table")):
        with pytest.raises(ConfigError, match=word):
            make_correction(*args, sampler)
    hook = make_correction("d", "channel", table, sampler)
    wrong_t = StepInfo(index=0, t=3, t_prev=2, alpha_bar=0.5, alpha_bar_prev=0.6, sigma=0.0)
    with pytest.raises(ConfigError, match="timesteps"):
        hook(wrong_t, torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE), None)
    with pytest.raises(ConfigError, match="C=3"):
        hook(sampler.info(0), torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), None)


def test_hook_draws_leave_the_sampler_noise_unchanged():
    """A correction that samples (S-D²) draws from the hook streams, so at eta = 1 the sampler's own z per step is
    the same as in an uncorrected run: a hook that draws and discards noise changes nothing."""
    schedule = NoiseSchedule(ScheduleConfig())
    cfg = SamplerConfig(kind="ddim", steps=6, eta=1.0)
    denoiser = lambda x, t, y=None: 0.5 * x

    def quiet(info, x, eps, noise):
        return eps, info.sigma

    def drawing(info, x, eps, noise):
        noise.hook_noise.randn(x.shape[1:])
        return eps, info.sigma

    runs = [sample(denoiser, schedule, cfg, sample_indices=[3, 4], seed=1, shape=(1, 4, 4), hook=h)
            for h in (quiet, drawing)]
    assert torch.equal(runs[0], runs[1])
    hook_z = NoiseSource(1, [3, 4]).hook_noise.randn((1, 4, 4))
    assert not torch.equal(hook_z, NoiseSource(1, [3, 4]).randn((1, 4, 4)))
