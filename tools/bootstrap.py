"""KID that is right for class-balanced samples, and bootstrap intervals of FID and KID from features computed once.

Why the demo's KID was negative (about -0.27 in every row at 200 samples): ``tdqrt sample`` draws class-conditional
samples with label ``index % num_classes``, so 200 samples hold exactly 20 of each digit. The unbiased MMD²
estimator behind KID (torch-fidelity's ``mmd2``, from Binkowski et al., https://arxiv.org/abs/1801.01401) assumes
i.i.d. draws: it averages the kernel over the distinct pairs of one set, where an i.i.d. set of 200 has a
same-class pair with probability about 1/10 but the balanced set only 19/199. The extractor is a digit classifier,
so same-class pairs have a kernel value several times that of other pairs, and the missing same-class pairs pull
the within-set term, and KID with it, down by a fixed amount - the demo's -0.26/-0.23/-0.25 were that offset, not
a quality signal (``tests/test_metrics.py`` reproduces it with 20 digits per class against held-out digits, and
``tests/test_bootstrap.py`` on synthetic classes). torch-fidelity's subsets did not help: with
``kid_subset_size`` = all 200 samples every subset held the same 200 images, so its "std" only measured which
reference images were drawn, never the uncertainty of the estimate. (The size of KID - tenths rather than the
thousandths of Inception KID - is the feature scale: the CNN's embeddings are long vectors for the cubic kernel
``(x·y/d + 1)^3``; KIDs are comparable only with the same extractor.)

The estimator here: for a set that was balanced by design, the within-set term is the class-stratified
U-statistic - the kernel averaged within and between classes separately and weighted by the class shares
``n_c / n`` - unbiased for the class mixture the set was drawn from. A labelled set counts as balanced by design
when its class counts are more even than i.i.d. draws would make them (Pearson's chi² of the counts against equal
shares below its ``BALANCED_P`` quantile): ``tdqrt sample``'s exactly equal counts, and sklearn's digits (174-183
per class). Every other set - no labels (image folders without class
subfolders, arrays), labels drawn at random, a class of fewer than ``MIN_CLASS`` images - is taken as i.i.d.
draws: the plain U-statistic, unbiased for them (stratifying a set with random class counts would compare its
drawn class shares instead, a bias of its own). The kernel is torch-fidelity's ``kernel_poly`` with its defaults
(degree 3, gamma 1/d, coef0 1), over all images (no subsets).

Uncertainty: a bootstrap over the images. Each set is resampled with replacement - within each class where it is
stratified (the design it was drawn with) - ``resamples`` times from one seeded generator (the same seed gives the
same intervals); FID and KID are recomputed from the features each time (never re-extracted). Copies of
one image in a resample count as the same image, so the KID U-statistic skips those pairs exactly as it skips a
pair of an image with itself (otherwise every duplicate would add a self-pair and bias the resamples upward). The
interval is the normal bootstrap interval ``value ± z · se`` (se: standard deviation of the resampled values,
``z`` for ``CI_LEVEL``). Two values are distinguishable at that sample count when their difference exceeds
``z · sqrt(se_a² + se_b²)`` (``distinguishable``) - conservative for sets drawn with the same seeds and labels,
whose errors are positively correlated.

Written here, not taken from torch-fidelity, because torch-fidelity has neither a stratified KID nor a bootstrap;
the kernel and the FID formula (``fid_statistics_to_metric``) are its own. Cost: ``O((n + m)² (d + resamples))``
for KID (kernel blocks of ``BLOCK`` rows, never an ``m x m`` matrix at once) and one ``d x d`` eigen-decomposition
per FID resample (cheap for the 128-wide tdqrt CNN; for 2048-wide Inception features each resample decomposes a
2048 x 2048 matrix - lower ``resamples`` there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kernel_poly

CI_LEVEL = 0.95
Z = 1.959963984540054  # two-sided normal quantile for CI_LEVEL
MIN_CLASS = 10  # fewer samples of a class: the stratified U-statistic's resamples can collapse to one image
BALANCED_P = 0.01  # class counts more even than 1% of i.i.d. draws would give: balanced by design
BLOCK = 2048
KERNEL = {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1.0}


@dataclass(frozen=True)
class Estimate:
    """A metric value with its bootstrap standard error and ``CI_LEVEL`` interval."""

    value: float
    se: float
    resamples: int

    @property
    def lo(self) -> float:
        return self.value - Z * self.se

    @property
    def hi(self) -> float:
        return self.value + Z * self.se


def strata(labels: np.ndarray | None, n: int) -> tuple[np.ndarray, bool]:
    """Group index per image: the class labels when the set was balanced by design (module docstring) and every
    class has ``MIN_CLASS`` images, else one group. Returns the groups and whether they are the labels."""
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape == (n,) and labels.dtype.kind in "iu" and (labels >= 0).all():
            _, groups, counts = np.unique(labels, return_inverse=True, return_counts=True)
            if len(counts) > 1 and counts.min() >= MIN_CLASS:
                expected = n / len(counts)
                spread = float(((counts - expected) ** 2 / expected).sum())  # Pearson's chi² against equal shares
                if chi2.cdf(spread, len(counts) - 1) < BALANCED_P:
                    return groups.reshape(-1), True
    return np.zeros(n, np.int64), False


def resample_counts(groups: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 1 + resamples]`` multiplicities: column 0 all ones (the data as they are), then bootstrap resamples
    drawn with replacement within each group (group sizes kept)."""
    counts = np.ones((len(groups), 1 + resamples))
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        counts[idx, 1:] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=resamples).T
    return counts


def _kernel_sums(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, same: bool) -> tuple[np.ndarray, ...]:
    """Per column ``j``: ``a_jᵀ K(x, y) b_j`` and, when ``x is y``, the diagonal part ``Σ_i a_ij b_ij K_ii``."""
    total, diag = np.zeros(a.shape[1]), np.zeros(a.shape[1])
    for s in range(0, len(x), BLOCK):
        k = kernel_poly(x[s:s + BLOCK], y, **KERNEL)
        total += np.einsum("ij,ij->j", a[s:s + BLOCK], k @ b)
        if same:
            rows = np.arange(k.shape[0])
            diag += (a[s:s + BLOCK] * b[s:s + BLOCK] * k[rows, s + rows][:, None]).sum(0)
    return total, diag


def _within(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the kernel over pairs of distinct images of ``x`` (copies of one image are one image: NaN when a
    resample holds a single image), and the sum over all pairs."""
    total, diag = _kernel_sums(x, x, w, w, same=True)
    n = w.sum(0)
    pairs = n * n - (w * w).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (total - diag) / np.where(pairs > 0, pairs, 1), np.nan), total


def _set_term(f: np.ndarray, groups: np.ndarray, w: np.ndarray) -> np.ndarray:
    """E k(x, x') over distinct draws of one set, per column of ``w``: class-stratified when ``groups`` has
    several groups (within- and between-class means weighted by the class shares), else the plain U-statistic."""
    n = w.sum(0)
    labels = np.unique(groups)
    term = _kernel_sums(f, f, w, w, same=False)[0] / (n * n) if len(labels) > 1 else np.zeros(w.shape[1])
    for g in labels:
        idx = np.nonzero(groups == g)[0]
        share = w[idx].sum(0) / n
        within, total = _within(f[idx], w[idx])
        if len(labels) > 1:
            term -= total / (n * n)  # the between-class pairs stay, the within-class sum is replaced by its mean
        term += share * share * within
    return term


def kid_columns(fx: np.ndarray, fy: np.ndarray, gx: np.ndarray, gy: np.ndarray, wx: np.ndarray,
                wy: np.ndarray) -> np.ndarray:
    """KID (unbiased MMD², class-stratified where ``gx`` / ``gy`` hold several groups; module docstring) for every
    column of the multiplicities ``wx`` ``[n, k]`` (samples) and ``wy`` ``[m, k]`` (reference)."""
    xy = _kernel_sums(fx, fy, wx, wy, same=False)[0] / (wx.sum(0) * wy.sum(0))
    return _set_term(fx, gx, wx) + _set_term(fy, gy, wy) - 2.0 * xy


def _weighted_stats(f: np.ndarray, w: np.ndarray) -> dict:
    n = w.sum()
    mu = f.T @ w / n
    sigma = ((f * w[:, None]).T @ f - n * np.outer(mu, mu)) / (n - 1.0)
    return {"mu": mu, "sigma": sigma}


def fid_columns(fx: np.ndarray, fy: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """FID (torch-fidelity's formula) for every column of the multiplicities ``wx``, ``wy``."""
    return np.array([fid_statistics_to_metric(_weighted_stats(fx, wx[:, j]), _weighted_stats(fy, wy[:, j]),
                                              False)["frechet_inception_distance"] for j in range(wx.shape[1])])


def bootstrap(fx: np.ndarray, fy: np.ndarray, *, labels_x: np.ndarray | None = None,
              labels_y: np.ndarray | None = None, fid: bool = True, kid: bool = True, resamples: int = 200,
              seed: int = 0) -> tuple[dict[str, Estimate], dict]:
    """FID and/or KID of features ``fx`` (samples) vs ``fy`` (reference), each with optional class labels, and
    their bootstrap intervals; returns ``({"FID": Estimate, "KID": Estimate}, how)``, ``how`` saying how."""
    fx, fy = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
    (gx, strat_x), (gy, strat_y) = strata(labels_x, len(fx)), strata(labels_y, len(fy))
    rng = np.random.default_rng([seed, 17])
    wx, wy = resample_counts(gx, resamples, rng), resample_counts(gy, resamples, rng)
    values = {}
    if fid:
        values["FID"] = fid_columns(fx, fy, wx, wy)
    if kid:
        values["KID"] = kid_columns(fx, fy, gx, gy, wx, wy)
    out = {}
    for name, v in values.items():
        boot = v[1:][np.isfinite(v[1:])]
        out[name] = Estimate(float(v[0]), float(np.std(boot, ddof=1)) if len(boot) > 1 else math.nan, len(boot))
    by = {True: "within each class label (balanced by design)", False: "as one set of i.i.d. draws"}
    how = {"method": "bootstrap over images (features extracted once)", "resamples": resamples, "seed": seed,
           "level": CI_LEVEL, "interval": f"value ± {Z:.2f} x bootstrap standard error",
           "samples": by[strat_x], "reference": by[strat_y],
           "kid_estimator": "unbiased MMD² (class-stratified where labelled), polynomial kernel (x·y/d + 1)^3"}
    return out, how


def distinguishable(a: Estimate, b: Estimate) -> bool:
    """Whether two estimates differ by more than ``Z`` standard errors of their difference (module docstring)."""
    return abs(a.value - b.value) > Z * math.hypot(a.se, b.se)


__all__ = ["CI_LEVEL", "Estimate", "bootstrap", "distinguishable", "fid_columns", "kid_columns", "resample_counts",
           "strata"]
