"""D² / PTQD statistics: collection on FP trajectories, streaming moments, the 4σ filter, the fit, the artifact.

Known answers come from :class:`SyntheticPair`, a pair of denoisers whose error obeys the D² model exactly:
per timestep t and channel c, u = λ·x + m + v·η, Δ = a + b·u + s·ξ with η, ξ ~ N(0, 1) independent, and
(base "quant") ε̂ = u, ε = u − Δ, so E[Δ | ε̂] = a + b·ε̂ and the residual std is s; or (base "fp", PTQD's model)
ε = u, ε̂ = u + Δ. η and ξ come from a generator seeded by a hash of (x, t) of each sample, so both denoisers see
the same draws for the same input, pass 2 sees what pass 1 saw, and batching does not matter. With λ = 0 the
marginal of ε̂ is N(m, v²) exactly, so every moment of the fit has a closed-form truth.
"""
import hashlib
import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

from tdqrt.calibration.d2_stats import MomentAccumulator, collect_d2_stats
from tdqrt.engines.artifacts import sha256_file
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.runtime import NoiseSchedule, Sampler, SamplerConfig, ScheduleConfig, sample
from tdqrt.runtime.d2 import (
    JSON_FILE,
    NPZ_FILE,
    STATUS_CONST_Y,
    STATUS_FEW,
    STATUS_OK,
    D2Settings,
    D2Table,
    GaussianFit,
    check_settings,
)

T_TRAIN = 1000
SHAPE = (3, 8, 8)  # 64 elements per channel and sample


class SyntheticPair:
    """FP / quantized denoisers with a planted error model; parameters are arrays [T_train, C] (see module doc).

    ``outlier_frac`` of the elements get Δ shifted by ±``outlier_size``·std(Δ | t, c); the shift rides on ε̂ only,
    so the FP trajectories (and hence every clean pair) are the same with and without outliers.
    """

    def __init__(self, m, v, a, b, s, lam=None, base="quant", outlier_frac=0.0, outlier_size=50.0):
        lam = np.zeros_like(m) if lam is None else lam
        self.p = {k: torch.as_tensor(val, dtype=torch.float64) for k, val in
                  dict(m=m, v=v, a=a, b=b, s=s, lam=lam).items()}
        self.base, self.outlier_frac, self.outlier_size = base, outlier_frac, outlier_size

    def _outputs(self, x, t):
        hats, fps = [], []
        for xb, tb in zip(x, t.tolist()):
            key = hashlib.blake2b(xb.cpu().numpy().tobytes() + tb.to_bytes(8, "little"), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key, "little"))
            eta, xi = (torch.randn(xb.shape, generator=g, dtype=torch.float64) for _ in range(2))
            pick, sign = (torch.rand(xb.shape, generator=g, dtype=torch.float64) for _ in range(2))
            p = {k: v[tb].view(-1, 1, 1) for k, v in self.p.items()}
            u = p["lam"] * xb.double() + p["m"] + p["v"] * eta
            delta = p["a"] + p["b"] * u + p["s"] * xi
            spread = torch.sqrt(p["b"] ** 2 * p["v"] ** 2 + p["s"] ** 2)
            outlier = torch.where(pick < self.outlier_frac, torch.where(sign < 0.5, -1.0, 1.0), 0.0)
            shift = outlier * self.outlier_size * spread
            eps_hat, eps = (u + shift, u - delta) if self.base == "quant" else (u + delta + shift, u)
            hats.append(eps_hat)
            fps.append(eps)
        return torch.stack(hats).float(), torch.stack(fps).float()

    def quant(self, x, t, y=None):
        return self._outputs(x, t)[0]

    def fp(self, x, t, y=None):
        return self._outputs(x, t)[1]


def random_params(seed, C=3):
    rng = np.random.default_rng(seed)
    draw = lambda lo, hi: rng.uniform(lo, hi, (T_TRAIN, C))  # noqa: E731
    return dict(m=draw(-0.3, 0.3), v=draw(0.8, 1.2), a=draw(-0.2, 0.2), b=draw(-0.3, 0.3), s=draw(0.2, 0.4))


def d2_truth(p, t):
    """Exact (ε̂, Δ) Gaussian per channel for λ = 0 and base "quant"."""
    m, v, a, b, s = (p[k][t] for k in ("m", "v", "a", "b", "s"))
    return dict(mu_x=m, mu_y=a + b * m, cov00=v**2, cov01=b * v**2, cov11=b**2 * v**2 + s**2, beta=b,
                a=a, sigma_cond=s)


def pooled_truth(p, t):
    """Moments of the equal-weight mixture over channels (what the tensor-wise fit estimates)."""
    c = d2_truth(p, t)
    mx, my = c["mu_x"].mean(), c["mu_y"].mean()
    c00 = (c["cov00"] + c["mu_x"] ** 2).mean() - mx**2
    c11 = (c["cov11"] + c["mu_y"] ** 2).mean() - my**2
    c01 = (c["cov01"] + c["mu_x"] * c["mu_y"]).mean() - mx * my
    beta = c01 / c00
    return dict(mu_x=mx, mu_y=my, cov00=c00, cov01=c01, cov11=c11, beta=beta, a=my - beta * mx,
                sigma_cond=math.sqrt(c11 - c01**2 / c00))


def standard_errors(tr, n):
    """Large-sample standard errors of each estimate for n i.i.d. bivariate-normal pairs."""
    c00, c01, c11, sc = tr["cov00"], tr["cov01"], tr["cov11"], tr["sigma_cond"]
    return dict(mu_x=np.sqrt(c00 / n), mu_y=np.sqrt(c11 / n), cov00=c00 * np.sqrt(2 / n), cov11=c11 * np.sqrt(2 / n),
                cov01=np.sqrt((c00 * c11 + c01**2) / n), beta=sc / np.sqrt(c00 * n),
                a=sc * np.sqrt((1 + tr["mu_x"] ** 2 / c00) / n), sigma_cond=sc / np.sqrt(2 * n))


def collect(pair, cfg=SamplerConfig(steps=4), num=64, batch=16, seed=0, **kw):
    return collect_d2_stats(pair.fp, pair.quant, NoiseSchedule(), cfg, num=num, batch=batch, seed=seed, shape=SHAPE,
                            progress=False, **kw)


def table_from_moments(moments, cfg=SamplerConfig(steps=4), timesteps=None):
    """A table with hand-made sums (the same for all three moment sets) for ``cfg``'s timesteps."""
    timesteps = Sampler(NoiseSchedule(), cfg).timesteps.numpy() if timesteps is None else timesteps
    settings = D2Settings(sampler=cfg, schedule=ScheduleConfig(), num_samples=8, seed=0, outlier_sigma=4.0)
    return D2Table(timesteps, moments, moments, moments, settings)


# ----------------------------------------------------------------------------------------------- the fit


@pytest.fixture(scope="module")
def params():
    return random_params(0)


@pytest.fixture(scope="module")
def table(params):
    return collect(SyntheticPair(**params), fp_model_sha256="fp-sha", quant_model_sha256="q-sha")


def _assert_within(fit, truth, se, k, label, n_se=5.0):
    for name, want in truth.items():
        got = getattr(fit, name)[k]
        assert np.all(np.abs(got - want) <= n_se * se[name]), (
            f"{label} {name}: fitted {got}, truth {want}, |error|/SE = {np.abs(got - want) / se[name]}")


def test_channel_fit_recovers_the_planted_gaussian(table, params):
    """Every fitted μ, Σ, β, a, σ_cond per (t, c) within 5 standard errors of the truth (measured worst: 2.5 SE)."""
    n = 64 * 8 * 8
    assert table.channel.status.tolist() == [[STATUS_OK] * 3] * 4
    for k, t in enumerate(table.timesteps):
        truth = d2_truth(params, t)
        _assert_within(table.channel, truth, standard_errors(truth, n), k, f"t={t}")
        np.testing.assert_allclose(table.channel.rho[k], truth["cov01"] / np.sqrt(truth["cov00"] * truth["cov11"]),
                                   atol=0.05)


def test_tensor_fit_recovers_the_pooled_gaussian(table, params):
    """The tensor-wise fit estimates the moments of the mixture over channels (measured worst: 1.8 SE)."""
    n = 3 * 64 * 8 * 8
    for k, t in enumerate(table.timesteps):
        truth = pooled_truth(params, t)
        # The pooled data are a Gaussian mixture, not a Gaussian: allow 6 normal-theory SEs for its heavier tails.
        _assert_within(table.tensor, truth, standard_errors(truth, n), k, f"pooled t={t}", n_se=6.0)


def test_fit_identities_and_settings(table):
    for fit in (table.tensor, table.channel):
        np.testing.assert_allclose(fit.a, fit.mu_y - fit.beta * fit.mu_x, rtol=1e-12)
        np.testing.assert_allclose(fit.sigma_cond, fit.sigma_y * np.sqrt(1 - fit.rho**2), rtol=1e-12)
        np.testing.assert_allclose(fit.beta, fit.cov01 / fit.cov00, rtol=1e-12)  # |ρ| < 0.9999: no clamp here
    s = table.settings
    assert (s.num_samples, s.seed, s.outlier_sigma, s.fp_model_sha256, s.quant_model_sha256) == (
        64, 0, 4.0, "fp-sha", "q-sha")
    assert table.timesteps.dtype == np.int64 and table.timesteps.tolist() == [750, 500, 250, 0]
    plot = table.plot_data()
    assert set(plot["tensor"]) >= {"mu_y", "sigma_y", "rho", "beta", "sigma_cond"}
    assert plot["channel"]["sigma_cond"].shape == (4, 3) and plot["tensor"]["beta"].shape == (4,)


def test_rho_is_clamped():
    """Δ = 0.5·ε̂ exactly (ρ = 1): ρ is clamped to 0.9999, so σ_cond = σ_Y·sqrt(1 − 0.9999²) > 0 and β < 0.5."""
    n, var = 100.0, 2.0
    row = [n, 0, 0, 0, (n - 1) * var, (n - 1) * var / 4, (n - 1) * var / 4, (n - 1) * var / 2, (n - 1) * var / 4]
    fit = GaussianFit.from_moments(np.array([row]))
    assert fit.rho[0] == 0.9999 and fit.beta[0] == pytest.approx(0.5 * 0.9999, rel=1e-12)
    assert fit.sigma_cond[0] == pytest.approx(math.sqrt(var / 4 * (1 - 0.9999**2)), rel=1e-9)


def ptqd_truth(p, t):
    """PTQD's pooled regression for base "fp" (λ = 0): Δ = a_c + k·ε + s_c·ξ with ε ~ N(m_c, v_c²) per channel.

    Pooled over channels the slope also picks up the channel means: k̃ = k + cov_c(m, a)/(mean v² + var m). The
    residual Δ − k̃ε − b_c (b_c = a_c + k·m_c) is (k − k̃)·v·η + s·ξ − k̃·m_c, so σ_q² = mean((k − k̃)²v² + s²) +
    var(k̃·m) (population moments over the equal-sized channels).
    """
    m, v, a, k, s = (p[key][t] for key in ("m", "v", "a", "b", "s"))
    k_pooled = k.mean() + np.cov(m, a, bias=True)[0, 1] / ((v**2).mean() + m.var())
    sigma_q = math.sqrt(((k - k_pooled) ** 2 * v**2 + s**2).mean() + (k_pooled * m).var())
    return k_pooled, a + k * m, sigma_q


def test_ptqd_fit_recovers_the_planted_regression():
    """PTQD model ε̂ = (1 + k)ε + a_c + s_c·ξ: pooled slope k̃, bias b_c = mean Δ_c, pooled residual std σ_q."""
    p = random_params(1)
    p["b"][:] = 0.25  # PTQD's k is one number per step
    tab = collect(SyntheticPair(**p, base="fp"))
    n = 3 * 64 * 8 * 8
    for k, t in enumerate(tab.timesteps):
        k_true, bias, sigma_q = ptqd_truth(p, t)
        v, s = p["v"][t], p["s"][t]
        assert abs(tab.ptqd.k[k] - k_true) <= 5 * sigma_q / math.sqrt((v**2).mean() * n)
        np.testing.assert_array_less(np.abs(tab.ptqd.bias[k] - bias), 5 * np.sqrt((0.25**2 * v**2 + s**2) / (n / 3)))
        assert abs(tab.ptqd.sigma_q[k] - sigma_q) <= 5 * sigma_q / math.sqrt(2 * n)
    np.testing.assert_array_equal(tab.ptqd.k_plus, np.maximum(tab.ptqd.k, 0))


def test_degenerate_entries_get_no_correction_and_no_nan():
    """Δ ≡ 0 (quantized = FP), a single pair, no pairs: status says why, every fitted value is 0, nothing is NaN."""
    pair = SyntheticPair(**random_params(2))
    tab = collect_d2_stats(pair.fp, pair.fp, NoiseSchedule(), SamplerConfig(steps=2), num=4, batch=4, seed=0,
                           shape=SHAPE, progress=False)
    assert (tab.channel.status == STATUS_CONST_Y).all() and (tab.tensor.status == STATUS_CONST_Y).all()
    one = np.zeros((2, 1, 9))
    one[0, 0] = [1, 0.5, 0.1, 0.4, 0.25, 0.01, 0.16, 0.05, 0.04]  # n = 1 at step 0, n = 0 at step 1
    fit = GaussianFit.from_moments(one)
    assert fit.status[:, 0].tolist() == [STATUS_FEW, STATUS_FEW]
    for f in (tab.channel, tab.tensor, fit, tab.ptqd):
        for name, value in vars(f).items():
            assert np.isfinite(value).all(), name
            if name != "status":
                assert not value.any() or f is tab.ptqd, name
    assert (tab.ptqd.k == 0).all() and (tab.ptqd.bias == 0).all() and (tab.ptqd.sigma_q == 0).all()


# ----------------------------------------------------------------------------------------------- collection


def test_streaming_equals_one_shot_and_np_cov():
    """Batches of 3 vs everything at once vs np.cov on the concatenated raw data: same fit to 1e-10."""
    g = torch.Generator().manual_seed(0)
    N, K, C = 20, 2, 3
    q = torch.randn(K, N, C, 4, 4, generator=g) * 1.3 + 0.4
    e = q * 0.8 - 0.1 + 0.3 * torch.randn(K, N, C, 4, 4, generator=g)
    one, streamed = MomentAccumulator(K, C), MomentAccumulator(K, C)
    for k in range(K):
        one.add(k, q[k], e[k])
        for start in range(0, N, 3):
            streamed.add(k, q[k, start:start + 3], e[k, start:start + 3])
    fits = [GaussianFit.from_moments(acc.numpy()) for acc in (one, streamed)]
    for k in range(K):
        for c in range(C):
            x = q[k, :, c].double().flatten().numpy()
            y = x - e[k, :, c].double().flatten().numpy()
            cov = np.cov(np.stack([x, y]))
            for fit in fits:
                np.testing.assert_allclose([fit.mu_x[k, c], fit.mu_y[k, c]], [x.mean(), y.mean()], rtol=1e-10)
                np.testing.assert_allclose([fit.cov00[k, c], fit.cov01[k, c], fit.cov11[k, c]],
                                           [cov[0, 0], cov[0, 1], cov[1, 1]], rtol=1e-10)
                beta = cov[0, 1] / cov[0, 0]
                np.testing.assert_allclose([fit.beta[k, c], fit.sigma_cond[k, c]],
                                           [beta, math.sqrt(cov[1, 1] - beta * cov[0, 1])], rtol=1e-10)


def test_collection_does_not_depend_on_batching(params):
    pair = SyntheticPair(**params)
    small, whole = collect(pair, num=10, batch=3), collect(pair, num=10, batch=10)
    for name in ("moments_raw", "moments_tensor", "moments_channel"):
        np.testing.assert_allclose(getattr(small, name), getattr(whole, name), rtol=1e-10, atol=1e-12)


def test_state_does_not_grow_with_num(params):
    """The accumulator is one [K, C, 9] tensor whatever N is; the table has the same shapes for N = 8 and 64."""
    pair = SyntheticPair(**params)
    sizes = []
    for num in (8, 64):
        acc = MomentAccumulator(4, 3)
        for start in range(0, num, 8):
            acc.add(0, torch.randn(8, *SHAPE), torch.randn(8, *SHAPE))
        sizes.append(acc.sums.numel())
        tab = collect(pair, num=num, batch=8)
        assert tab.moments_raw.shape == tab.moments_channel.shape == (4, 3, 9)
    assert sizes == [4 * 3 * 9] * 2


@pytest.mark.parametrize("cfg", [SamplerConfig(steps=3, eta=1.0), SamplerConfig(steps=3, guidance_scale=2.0)],
                         ids=["eta1", "eta0-cfg"])
def test_trajectories_are_those_of_the_fp_sampler(params, cfg):
    """Collection visits exactly the x_t of ``sample(fp, ...)`` without a hook (same seed, per-sample streams, FP
    update), and the quantized model is evaluated on those same x_t. With η = 0 the collection's hook makes
    ``sample()`` draw a z per step that the update multiplies by σ = 0: the trajectory must not change."""
    pair = SyntheticPair(**params)
    labels = dict(num_classes=3, null_label=3) if cfg.guidance_scale != 1.0 else {}

    def spy(model, log):
        def denoiser(x, t, y=None):
            log.append(x.clone())
            return model(x, t, y)
        return denoiser

    seen, quant_seen, ref = [], [], []
    collect_d2_stats(spy(pair.fp, seen), spy(pair.quant, quant_seen), NoiseSchedule(), cfg, num=4, batch=4, seed=5,
                     shape=SHAPE, progress=False, outlier_sigma=None, **labels)
    y = torch.arange(4) % 3 if labels else None
    sample(spy(pair.fp, ref), NoiseSchedule(), cfg, sample_indices=range(4), seed=5, shape=SHAPE, y=y,
           null_label=labels.get("null_label"))
    assert len(seen) == len(quant_seen) == len(ref) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen, ref))
    assert all(torch.equal(a, b) for a, b in zip(quant_seen, ref))
    assert not torch.equal(ref[1], ref[2])  # the steps moved x: the comparison is not between constants


def test_pass_two_replays_pass_one(params):
    """With limits too wide to drop anything, the filtered sums of pass 2 equal the pass-1 sums bit for bit."""
    tab = collect(SyntheticPair(**params), outlier_sigma=1e6)
    np.testing.assert_array_equal(tab.moments_channel, tab.moments_raw)
    np.testing.assert_array_equal(tab.moments_tensor, tab.moments_raw)


def test_statistics_are_of_cfg_combined_outputs():
    """quant = fp + (0.3 conditional, 0.1 unconditional): with scale 3 every Δ is 0.1 + 3·(0.3 − 0.1) = 0.7."""
    null = 9

    def fp(x, t, y):
        return 0.1 * x + 0.01 * y.float().view(-1, 1, 1, 1)

    def quant(x, t, y):
        return fp(x, t, y) + torch.where(y == null, 0.1, 0.3).view(-1, 1, 1, 1)

    tab = collect_d2_stats(fp, quant, NoiseSchedule(), SamplerConfig(steps=2, guidance_scale=3.0), num=4, batch=2,
                           seed=0, shape=SHAPE, num_classes=3, null_label=null, progress=False, outlier_sigma=None)
    m = tab.moments_raw
    np.testing.assert_allclose(m[..., 2] / m[..., 0], 0.7, rtol=1e-6)


def test_bad_arguments_are_refused(params):
    pair = SyntheticPair(**params)
    for kw, word in ((dict(num=1), "num"), (dict(batch=0), "batch"), (dict(outlier_sigma=0.0), "outlier_sigma")):
        with pytest.raises(ConfigError, match=word):
            collect(pair, **{**dict(num=4, batch=4), **kw})


# ----------------------------------------------------------------------------------------------- outlier filter


def test_outlier_filter_removes_planted_outliers(params):
    """0.5 % of Δ shifted by ±50σ: the 4σ-filtered fit equals the clean fit within one standard error (measured:
    ≤ 0.22 SE), the unfiltered one is far off (σ_Y ×3.0–4.5, β and σ_cond 87–314 SE away)."""
    clean = collect(SyntheticPair(**params))
    dirty = collect(SyntheticPair(**params, outlier_frac=0.005))
    n = 64 * 8 * 8
    dropped = 1 - dirty.moments_channel[..., 0] / dirty.moments_raw[..., 0]
    assert np.all((dropped > 0.002) & (dropped < 0.01)), dropped  # ~0.5 % planted (+ ~6e-5 of Gaussian tails)
    unfiltered = GaussianFit.from_moments(dirty.moments_raw)
    for k, t in enumerate(clean.timesteps):
        se = standard_errors(d2_truth(params, t), n)
        for name in ("mu_x", "mu_y", "cov00", "cov01", "cov11", "beta", "a", "sigma_cond"):
            err = np.abs(getattr(dirty.channel, name)[k] - getattr(clean.channel, name)[k])
            assert np.all(err <= se[name]), (name, t, err / se[name])
        assert np.all(unfiltered.sigma_y[k] > 2.5 * clean.channel.sigma_y[k])
        for name in ("beta", "sigma_cond"):
            assert np.all(np.abs(getattr(unfiltered, name)[k] - getattr(clean.channel, name)[k]) > 50 * se[name])
    pooled_se = standard_errors(pooled_truth(params, 0), 3 * n)
    for name in ("mu_y", "cov11", "beta", "sigma_cond"):
        assert np.all(np.abs(getattr(dirty.tensor, name) - getattr(clean.tensor, name)) <= pooled_se[name]), name
    assert np.all(GaussianFit.from_moments(dirty.moments_raw.sum(1)).sigma_y > 2.5 * clean.tensor.sigma_y)


# ----------------------------------------------------------------------------------------------- artifact


def test_save_load_round_trip_is_exact(table, tmp_path):
    table.save(tmp_path)
    back = D2Table.load(tmp_path)
    for name in ("timesteps", "moments_raw", "moments_tensor", "moments_channel"):
        np.testing.assert_array_equal(getattr(back, name), getattr(table, name))
    for fit in ("tensor", "channel", "ptqd"):
        for key, value in vars(getattr(table, fit)).items():
            np.testing.assert_array_equal(getattr(getattr(back, fit), key), value)
    assert back.settings == table.settings


def _replace_npz(path, data: bytes):
    """Put ``data`` in d2.npz and keep d2.json's sha256 in step, so the reader's own checks must catch it."""
    (path / NPZ_FILE).write_bytes(data)
    card = json.loads((path / JSON_FILE).read_text())
    card["npz"]["sha256"] = sha256_file(path / NPZ_FILE)
    (path / JSON_FILE).write_text(json.dumps(card))


def _rewrite_npz(path, **changes):
    """Rewrite d2.npz with some arrays replaced (a well-formed file with bad content)."""
    with np.load(path / NPZ_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _replace_npz(path, buffer.getvalue())


@pytest.mark.parametrize("field", ["channel.beta", "moments.raw"])
def test_nan_in_saved_table_is_refused(table, tmp_path, field):
    table.save(tmp_path)
    with np.load(tmp_path / NPZ_FILE) as z:
        bad = z[field].copy()
    bad.flat[1] = np.nan
    _rewrite_npz(tmp_path, **{field: bad})
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        D2Table.load(tmp_path)


def test_truncated_or_missing_or_edited_files_are_refused(table, tmp_path):
    table.save(tmp_path)
    data = (tmp_path / NPZ_FILE).read_bytes()
    (tmp_path / NPZ_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):  # caught by the sha256 in d2.json
        D2Table.load(tmp_path)
    _replace_npz(tmp_path, data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cannot be read as npz"):  # caught by the zip reader
        D2Table.load(tmp_path)
    (tmp_path / NPZ_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        D2Table.load(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        D2Table.load(tmp_path / "nowhere")
    table.save(tmp_path)
    with np.load(tmp_path / NPZ_FILE) as z:
        edited = z["tensor.beta"] + 0.1
    _rewrite_npz(tmp_path, **{"tensor.beta": edited})
    with pytest.raises(ArtifactError, match="tensor.beta"):
        D2Table.load(tmp_path)


# ----------------------------------------------------------------------------------------------- settings check


def test_check_settings_names_the_difference_and_force_warns(table):
    check_settings(table, SamplerConfig(steps=4), ScheduleConfig())
    with pytest.raises(ConfigError, match=r"steps: saved 4, requested 5.*force=True"):
        check_settings(table, SamplerConfig(steps=5), ScheduleConfig())
    with pytest.raises(ConfigError, match=r"guidance_scale: saved 1\.0, requested 3\.0"):
        check_settings(table, SamplerConfig(steps=4, guidance_scale=3.0), ScheduleConfig())
    with pytest.raises(ConfigError, match=r"schedule\.kind: saved 'linear', requested 'cosine'"):
        check_settings(table, SamplerConfig(steps=4), ScheduleConfig(kind="cosine"))
    both = r"spacing: saved 'uniform', requested 'quadratic'; eta: saved 0\.0, requested 1\.0"
    with pytest.raises(ConfigError, match=both):
        check_settings(table, SamplerConfig(steps=4, eta=1.0, spacing="quadratic"), ScheduleConfig())
    with pytest.warns(UserWarning, match="eta: saved 0.0, requested 1.0"):
        check_settings(table, SamplerConfig(steps=4, eta=1.0), ScheduleConfig(), force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_settings(table, SamplerConfig(steps=4), ScheduleConfig(), force=True)
