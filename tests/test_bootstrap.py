"""FID/KID bootstrap intervals and the class-stratified KID, on synthetic class-structured features (known answers).

Features: 10 Gaussian clusters ("classes") in 16 dimensions, far apart as a classifier's embeddings are, so pairs of
one class have a much larger kernel value than pairs of two - the situation of the demo's digits CNN.
"""
import numpy as np
import pytest
from torch_fidelity.metric_kid import kernel_poly, mmd2

from tdqrt.tools.bootstrap import Estimate, bootstrap, distinguishable, kid_columns, resample_counts, strata

CENTRES = np.random.default_rng(100).normal(0.0, 3.0, (10, 16))


def draw(labels, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return CENTRES[labels] + rng.normal(0.0, 1.0, (len(labels), 16)) + shift


def balanced(per_class):
    return np.repeat(np.arange(10), per_class)


def iid_labels(n, seed):
    return np.random.default_rng(seed).integers(0, 10, n)


def test_kid_of_unlabelled_sets_is_torch_fidelitys_unbiased_mmd2():
    x, y = draw(iid_labels(300, 1), 2), draw(iid_labels(300, 3), 4)
    kw = dict(kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    expected = mmd2(kernel_poly(x, x, **kw), kernel_poly(x, y, **kw), kernel_poly(y, y, **kw))
    one, ones = np.zeros(300, np.int64), np.ones((300, 1))
    assert kid_columns(x, y, one, one, ones, ones)[0] == pytest.approx(expected, rel=1e-10)


def test_balanced_labels_bias_the_iid_estimator_and_the_stratified_one_is_unbiased():
    """20 per class vs an i.i.d. reference of the same distribution, over 30 draws: read as i.i.d. the KID sits
    far below 0 (the demo's negative KID); class-stratified it averages 0 within its scatter."""
    lx = balanced(20)
    plain, stratified = [], []
    for seed in range(30):
        ly = iid_labels(600, 1000 + seed)
        x, y = draw(lx, seed), draw(ly, 500 + seed)
        plain.append(bootstrap(x, y, fid=False, resamples=0)[0]["KID"].value)
        stratified.append(bootstrap(x, y, labels_x=lx, labels_y=ly, fid=False, resamples=0)[0]["KID"].value)
    plain, stratified = np.array(plain), np.array(stratified)
    print(f"KID of 20/class vs i.i.d.: as i.i.d. {plain.mean():.4g} ± {plain.std():.3g}, stratified "
          f"{stratified.mean():.4g} ± {stratified.std():.3g}")
    assert plain.mean() < -4 * plain.std() / np.sqrt(len(plain)) and (plain < 0).mean() > 0.9
    assert abs(stratified.mean()) < 3 * stratified.std() / np.sqrt(len(stratified))


def test_intervals_contain_0_for_one_distribution_and_exclude_it_for_another():
    lx, ly = balanced(20), iid_labels(600, 7)
    x, y = draw(lx, 1), draw(ly, 2)
    same, how = bootstrap(x, y, labels_x=lx, labels_y=ly, resamples=100, seed=0)
    other, _ = bootstrap(draw(lx, 1, shift=0.5), y, labels_x=lx, labels_y=ly, resamples=100, seed=0)
    print({k: (v.lo, v.value, v.hi) for k, v in same.items()}, {k: (v.lo, v.value, v.hi) for k, v in other.items()})
    assert same["KID"].lo < 0 < same["KID"].hi
    assert other["KID"].lo > 0 and other["FID"].lo > same["FID"].hi
    assert distinguishable(other["KID"], same["KID"]) and distinguishable(other["FID"], same["FID"])
    assert how["samples"].startswith("within each class") and how["reference"] == "as one set of i.i.d. draws"
    assert how["resamples"] == 100
    assert same["KID"].resamples == 100 and same["KID"].se > 0


def test_bootstrap_is_deterministic_for_a_seed():
    lx = balanced(12)
    x, y = draw(lx, 1), draw(iid_labels(200, 2), 3)
    first = bootstrap(x, y, labels_x=lx, resamples=30, seed=5)
    assert bootstrap(x, y, labels_x=lx, resamples=30, seed=5) == first
    assert bootstrap(x, y, labels_x=lx, resamples=30, seed=6)[0]["KID"].se != first[0]["KID"].se


def test_resamples_keep_class_sizes_and_duplicates_do_not_bias_kid():
    """Stratified resamples keep every class's size; copies of one image are not counted as a pair of distinct
    images, so the resampled KIDs centre on the estimate instead of moving up by the self-similarity."""
    lx = balanced(20)
    groups, stratified = strata(lx, len(lx))
    assert stratified
    w = resample_counts(groups, 400, np.random.default_rng(0))
    assert (w[:, 0] == 1).all()
    for c in range(10):
        assert (w[lx == c].sum(0) == 20).all()
    ly = iid_labels(400, 9)
    gy, _ = strata(ly, 400)
    wy = resample_counts(gy, 400, np.random.default_rng(1))
    x, y = draw(lx, 1), draw(ly, 2)
    kid = kid_columns(x, y, groups, gy, w, wy)
    se = kid[1:].std()
    assert abs(kid[1:].mean() - kid[0]) < 0.25 * se


def test_only_sets_balanced_by_design_are_stratified():
    assert strata(balanced(20), 200)[1]  # tdqrt sample: index % num_classes
    digits_counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's digits
    assert strata(np.repeat(np.arange(10), digits_counts), 1797)[1]
    assert sum(strata(iid_labels(600, seed), 600)[1] for seed in range(50)) <= 3  # random labels: i.i.d.
    assert not strata(None, 5)[1]
    assert not strata(np.full(40, -1), 40)[1]  # unconditional samples carry -1
    assert not strata(balanced(3), 30)[1]  # a class of fewer than MIN_CLASS images
    assert strata(balanced(10), 100)[1]


def test_distinguishable_uses_the_standard_error_of_the_difference():
    a = Estimate(1.0, 0.1, 100)
    assert not distinguishable(a, Estimate(1.25, 0.1, 100))  # 0.25 < 1.96 * 0.141
    assert distinguishable(a, Estimate(1.3, 0.1, 100))
    assert a.lo == pytest.approx(1.0 - 0.196, abs=1e-3) and a.hi == pytest.approx(1.196, abs=1e-3)
