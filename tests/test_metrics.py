"""Evaluation: the tdqrt CNN feature extractor, FID/KID/IS through torch-fidelity, errors, and `tdqrt eval`.

The extractor is trained once per session (120 steps, a few seconds on one CPU thread). Everything runs offline:
every test that loads weights first makes network downloads raise.
"""
import json
import time
from dataclasses import replace
import urllib.request
import warnings

import numpy as np
import pytest
import torch
import torch.hub

from tdqrt.calibration.data import load_dataset, to_uint8_nhwc
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.tools.cli import main
from tdqrt.tools.extractor import ExtractorConfig, load_extractor, train_extractor
from tdqrt.tools.metrics import EvalConfig, evaluate, read_npz_images, write_openai_npz

NAME = "tdqrt-digits-cnn"
FAST = dict(threads=1, bootstrap=0, verbose=False)  # intervals only where a test checks them


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to download (torch.hub, urllib) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setattr(inc, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="session")
def digits_extractor(tmp_path_factory):
    out = tmp_path_factory.mktemp("extractor")
    t0 = time.perf_counter()
    ext = train_extractor(ExtractorConfig(data="digits", steps=120, threads=1), out)
    ext.card["_wall_seconds"] = time.perf_counter() - t0
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity_cache")


@pytest.fixture(scope="session")
def digits_u8():
    return to_uint8_nhwc(load_dataset("digits").images)  # all 1797, [N, 16, 16, 1]


def _cfg(extractor, cache_dir, **kw):
    return EvalConfig(feature_extractor=extractor, cache_dir=cache_dir, **(FAST | kw))


def _noisy(x, sigma, seed=0):
    noise = np.random.default_rng(seed).normal(0.0, sigma, x.shape)
    return np.clip(x.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------- extractor

def test_extractor_accuracy_card_and_offline_load(digits_extractor, digits_u8):
    card = json.loads((digits_extractor / "extractor.json").read_text())
    print(f"extractor held-out accuracy {card['accuracy']:.4f} on {card['holdout_count']} images, "
          f"{card['run']['seconds']:.1f} s training")
    assert card["accuracy"] >= 0.9
    assert card["name"] == NAME and card["dataset"] == "digits"
    assert card["image_size"] == 16 and card["channels"] == 1 and card["num_classes"] == 10
    ext = load_extractor(digits_extractor / "extractor.safetensors")  # the file alone is enough
    assert ext.sha256 == card["weights"]["sha256"]

    # Through torch-fidelity's own factory, exactly as calculate_metrics builds it (downloads are refused).
    from torch_fidelity.utils import create_feature_extractor

    fe = create_feature_extractor(NAME, ["embedding", "logits"], cuda=False,
                                  feature_extractor_weights_path=str(digits_extractor), verbose=False)
    x = torch.from_numpy(digits_u8[:256]).permute(0, 3, 1, 2)
    labels = load_dataset("digits").labels[:256]
    emb, logits = fe(x.expand(-1, 3, -1, -1).contiguous())  # torch-fidelity's convention: uint8, 3 channels
    assert emb.shape == (256, 128) and logits.shape == (256, 10)
    assert (logits.argmax(1) == labels).float().mean() > 0.9
    emb1, logits1 = fe(x)  # one channel gives the same numbers as three replicated channels
    assert torch.equal(emb1, emb) and torch.equal(logits1, logits)
    big = torch.nn.functional.interpolate(x.float(), scale_factor=2, mode="nearest").round().to(torch.uint8)
    assert (fe(big)[1].argmax(1) == labels).float().mean() > 0.8  # other sizes are resized to 16x16


def test_extractor_refuses_tampered_or_missing_weights(digits_extractor, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(digits_extractor, bad)
    with open(bad / "extractor.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256"):
        load_extractor(bad)
    with pytest.raises(ArtifactError, match="tdqrt extractor"):
        load_extractor(tmp_path / "nothing")


# -------------------------------------------------------------------------------------------- FID / KID / IS

def test_fid_zero_on_itself_and_monotone_in_corruption(digits_extractor, cache_dir, digits_u8):
    cfg = _cfg(digits_extractor, cache_dir, metrics=("fid", "kid"))
    same = evaluate(digits_u8, "digits", cfg)["metrics"]
    light = evaluate(_noisy(digits_u8, 30), "digits", cfg)["metrics"]
    heavy = evaluate(_noisy(digits_u8, 60), "digits", cfg)["metrics"]
    fid = f"FID[{NAME}]"
    kid = f"KID[{NAME}]"
    print(f"FID self {same[fid]:.3g}, noise30 {light[fid]:.4g}, noise60 {heavy[fid]:.4g}; "
          f"KID self {same[kid]:.3g}, noise30 {light[kid]:.4g}, noise60 {heavy[kid]:.4g}")
    assert abs(same[fid]) < 1e-3
    assert 0.5 < light[fid] < heavy[fid]
    assert 0 < light[kid] < heavy[kid]
    # the reference statistics were cached under a content-hash name and are reused
    assert any(p.name.startswith("tdqrt-ref-") and "-fe-" in p.name for p in cache_dir.iterdir())


def test_kid_is_unbiased_on_two_halves(digits_extractor, cache_dir, digits_u8):
    """Two disjoint halves of the same data: the unbiased KID scatters around 0 (either sign) over random
    splits, far below the biased (V-statistic) MMD² of the same halves and below a corrupted set's KID."""
    from torch_fidelity.metric_kid import kernel_poly, mmd2

    kids, biased = [], []
    ext = load_extractor(digits_extractor)
    for seed in range(4):
        perm = np.random.default_rng(seed).permutation(len(digits_u8))
        a, b = digits_u8[perm[:898]], digits_u8[perm[898:1796]]
        cfg = _cfg(digits_extractor, cache_dir, metrics=("kid",), seed=seed)
        kids.append(evaluate(a, b, cfg)["metrics"][f"KID[{NAME}]"])
        fa, fb = (ext.features(torch.from_numpy(h).permute(0, 3, 1, 2))["embedding"].double().numpy() for h in (a, b))
        kw = dict(kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
        biased.append(mmd2(kernel_poly(fa, fa, **kw), kernel_poly(fa, fb, **kw), kernel_poly(fb, fb, **kw),
                           mmd_est="biased"))
    corrupt = evaluate(_noisy(digits_u8[:898], 60), digits_u8[898:1796],
                       _cfg(digits_extractor, cache_dir, metrics=("kid",)))
    kid_corrupt = corrupt["metrics"][f"KID[{NAME}]"]
    kids = np.array(kids)
    print(f"KID halves over seeds: {np.round(kids, 4).tolist()} (biased V-statistic {np.round(biased, 4).tolist()}), "
          f"corrupted {kid_corrupt:.4g}")
    assert min(biased) > 0
    assert np.abs(kids).max() < 0.05 * kid_corrupt  # near 0 on the scale of a real difference
    assert abs(kids.mean()) < 0.25 * np.mean(biased)  # the bias the V-statistic has is gone
    assert kids.min() < 0.5 * np.mean(biased)  # not systematically positive: some split lands near/below 0


def test_kid_interval_contains_0_for_one_distribution_and_excludes_it_for_another(digits_extractor, cache_dir,
                                                                                 digits_u8):
    """Bootstrap intervals on real features: two disjoint random halves of the digits (one distribution) give a
    KID interval around 0; noisy digits vs clean ones give one far above 0; the same seed gives the same
    intervals. And the cause of the demo's negative KID: class-balanced samples (20 per class, as `tdqrt sample`
    draws) read as i.i.d. draws land far below 0; with their labels the interval contains 0 again."""
    labels = load_dataset("digits").labels.numpy()
    perm = np.random.default_rng(3).permutation(len(digits_u8))
    a, b = perm[:898], perm[898:1796]
    cfg = _cfg(digits_extractor, cache_dir, metrics=("fid", "kid"), bootstrap=50)
    kid = f"KID[{NAME}]"

    def interval(samples, ref, **kw):
        m = evaluate(samples, ref, replace(cfg, **kw) if kw else cfg)["metrics"]
        return m[f"KID_lo[{NAME}]"], m[kid], m[f"KID_hi[{NAME}]"]

    same = interval(digits_u8[a], digits_u8[b])
    noisy = interval(_noisy(digits_u8[a], 40), digits_u8[b])
    print(f"KID halves {np.round(same, 4).tolist()}, noisy {np.round(noisy, 4).tolist()}")
    assert same[0] < 0 < same[2]
    assert noisy[0] > 0 and noisy[0] > same[2]
    assert interval(digits_u8[a], digits_u8[b]) == same  # deterministic for a seed
    assert interval(digits_u8[a], digits_u8[b], seed=1) != same

    # 20 per class from one half, the other half as reference (with labels through the .npz, as tdqrt writes)
    rng = np.random.default_rng(0)
    balanced = np.concatenate([rng.choice(a[labels[a] == c], 20, replace=False) for c in range(10)])
    iid = interval(digits_u8[balanced], digits_u8[b])
    from tdqrt.tools.sample import write_samples

    out = cache_dir.parent / "balanced"
    write_samples(out, digits_u8[balanced], labels[balanced], {"format": "tdqrt-samples"})
    ref = cache_dir.parent / "ref_half.npz"
    write_openai_npz(ref, digits_u8[b], labels=labels[b], rgb=False)
    stratified = interval(out, ref)
    print(f"KID of 20 per class vs the other half: read as i.i.d. {np.round(iid, 4).tolist()}, "
          f"class-stratified {np.round(stratified, 4).tolist()}")
    assert stratified[0] < 0 < stratified[2]
    assert iid[1] < stratified[0]  # the bias the demo showed: larger than the stratified estimate's uncertainty


def test_inception_score_real_digits_beat_noise(digits_extractor, cache_dir, digits_u8):
    cfg = _cfg(digits_extractor, cache_dir, metrics=("isc",))
    real = evaluate(digits_u8, "digits", cfg)["metrics"][f"IS[{NAME}]"]
    noise = np.random.default_rng(0).integers(0, 256, digits_u8.shape, dtype=np.uint8)
    fake = evaluate(noise, "digits", cfg)["metrics"][f"IS[{NAME}]"]
    print(f"IS real digits {real:.3f}, uniform noise {fake:.3f}")
    assert real > 1.0 and real > fake + 2.0


# ---------------------------------------------------------------------------------------- Inception weights

def test_inception_weights_wrong_or_missing_file(digits_u8, tmp_path):
    junk = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    cfg = EvalConfig(metrics=("fid",), inception_weights=junk, cache=False)
    with pytest.raises(ArtifactError, match="pt_inception-2015-12-05"):
        evaluate(digits_u8[:8], digits_u8[8:16], cfg)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 4)}, other)
    with pytest.raises(ArtifactError, match="not the FID Inception-v3"):
        evaluate(digits_u8[:8], digits_u8[8:16], EvalConfig(metrics=("fid",), inception_weights=other))
    with pytest.raises(ConfigError, match="does not exist.*pt_inception-2015-12-05"):
        evaluate(digits_u8[:8], digits_u8[8:16], EvalConfig(metrics=("fid",), inception_weights=tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="needs --inception-weights"):
        evaluate(digits_u8[:8], digits_u8[8:16], EvalConfig(metrics=("fid",), feature_extractor="inception-v3-compat"))


@pytest.mark.slow
def test_inception_weights_file_is_used_locally(digits_u8, tmp_path):
    """A file with the FID Inception layout (random torchvision weights here) goes to torch-fidelity's
    inception-v3-compat without any download; the keys name that extractor."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(digits_u8[:3], digits_u8[3:6], EvalConfig(metrics=("fid",), inception_weights=path,
                                                                 cache=False, threads=1, bootstrap=0))
    assert list(res["metrics"]) == ["FID[inception-v3-compat]"]
    assert any("not comparable to published" in str(w.message) for w in caught)  # not the standard file's hash


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_eval_on_sample_npz(digits_extractor, digits_u8, tmp_path, monkeypatch, capsys):
    from tdqrt.tools.sample import write_samples

    monkeypatch.setenv("TDQRT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "samples"
    images = _noisy(digits_u8[:200], 20)
    write_samples(out, images, np.arange(200) % 10, {"format": "tdqrt-samples"})
    args = ["eval", "--samples", str(out / "samples.npz"), "--ref", "digits", "--metrics", "fid,kid,isc,prc",
            "--threads", "1", "--bootstrap", "20"]

    # No extractor given and none at the default location: refused, saying how to make one.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tdqrt extractor --data digits" in err and "never downloaded" in err

    assert main(args + ["--feature-extractor", str(digits_extractor)]) == 0
    printed = capsys.readouterr().out
    assert f"FID[{NAME}] = " in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["format"] == "tdqrt-eval" and result["extractor"]["name"] == NAME
    assert set(result["metrics"]) == {f"{m}[{NAME}]" for m in
                                      ("FID", "FID_se", "FID_lo", "FID_hi", "KID", "KID_se", "KID_lo", "KID_hi", "IS",
                                       "IS_std", "precision", "recall", "f_score")}
    assert all(NAME in key for key in result["metrics"])
    assert result["samples"]["count"] == 200 and result["ref"]["count"] == 1797
    assert result["uncertainty"]["resamples"] == 20  # labelled samples and reference: resampled per class
    assert result["uncertainty"]["samples"] == result["uncertainty"]["reference"] == ("within each class label "
                                                                                      "(balanced by design)")
    assert f"FID[{NAME}] = " in printed and "95% interval" in printed

    # The default location (tdqrt extractor's default --out) is found without --feature-extractor, and an
    # RGB evaluator npz written with write_openai_npz is accepted against the grey reference.
    import shutil

    shutil.copytree(digits_extractor, tmp_path / "cache" / "extractors" / NAME)
    rgb = write_openai_npz(tmp_path / "openai" / "samples.npz", images, labels=np.arange(200) % 10)
    assert read_npz_images(rgb).shape == (200, 16, 16, 3)
    assert main(["eval", "--samples", str(rgb), "--ref", "digits", "--metrics", "fid", "--threads", "1",
                 "--out", str(tmp_path / "rgb.json")]) == 0
    fid_rgb = json.loads((tmp_path / "rgb.json").read_text())["metrics"][f"FID[{NAME}]"]
    assert fid_rgb == pytest.approx(result["metrics"][f"FID[{NAME}]"], rel=1e-6)


def test_a_sample_folder_means_its_samples_npz(digits_extractor, cache_dir, digits_u8, tmp_path, capsys):
    """`tdqrt eval --samples OUT` on a `tdqrt sample` folder evaluates OUT/samples.npz, not grid.png or other
    PNGs lying there; a sample folder without samples.npz is refused, saying so."""
    from PIL import Image

    from tdqrt.tools.sample import write_samples

    out = tmp_path / "run"
    write_samples(out, _noisy(digits_u8[:60], 20), np.arange(60) % 10, {"format": "tdqrt-samples"})
    for i in range(5):  # stray images a user left there must not be evaluated either
        Image.fromarray(digits_u8[i, ..., 0]).save(out / f"stray{i}.png")
    cfg = _cfg(digits_extractor, cache_dir, metrics=("fid",))
    by_folder = evaluate(out, "digits", cfg)
    by_file = evaluate(out / "samples.npz", "digits", cfg)
    assert by_folder["samples"]["count"] == 60 and by_folder["samples"]["source"].endswith("samples.npz")
    assert by_folder["metrics"] == by_file["metrics"]
    assert main(["eval", "--samples", str(out), "--ref", "digits", "--metrics", "fid", "--threads", "1",
                 "--feature-extractor", str(digits_extractor), "--cache-dir", str(cache_dir)]) == 0
    assert "60 samples" in capsys.readouterr().out and (out / "eval.json").is_file()
    (out / "samples.npz").unlink()
    with pytest.raises(DataError, match="without samples.npz"):
        evaluate(out, "digits", cfg)


def test_cli_extractor_trains_and_reports(tmp_path, capsys):
    assert main(["extractor", "--data", "digits", "--out", str(tmp_path / "e"), "--steps", "3", "--threads", "1"]) == 0
    assert "tdqrt-digits-cnn" in capsys.readouterr().out
    assert (tmp_path / "e" / "extractor.safetensors").is_file() and (tmp_path / "e" / "extractor.json").is_file()


def test_retraining_with_the_same_settings_keeps_the_extractor_id(tmp_path):
    """The identity of an extractor is its weights and settings: a second run (other time, other folder)
    writes a byte-identical weights file, so eval.json and the demo keep the same sha256."""
    cfg = ExtractorConfig(data="digits", steps=3, threads=1)
    first, second = train_extractor(cfg, tmp_path / "a"), train_extractor(cfg, tmp_path / "b")
    again = train_extractor(cfg, tmp_path / "a")
    assert first.sha256 == second.sha256 == again.sha256 == load_extractor(tmp_path / "a").sha256
    card = json.loads((tmp_path / "a" / "extractor.json").read_text())
    assert card["weights"]["sha256"] == first.sha256 and card["run"]["seconds"] > 0  # the run is recorded beside it
    assert "seconds" not in first.card["training"] and "run" in first.card
    assert train_extractor(ExtractorConfig(data="digits", steps=3, threads=1, seed=1), tmp_path / "c").sha256 \
        != first.sha256  # other settings, another extractor


# ------------------------------------------------------------------------------------------------ refusals

def test_bad_inputs_are_refused_with_the_reason(digits_extractor, cache_dir, digits_u8, tmp_path):
    cfg = _cfg(digits_extractor, cache_dir, metrics=("fid",))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        evaluate(empty, "digits", cfg)
    colour = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="channel mismatch"):
        evaluate(colour, "digits", cfg)
    with pytest.raises(DataError, match="size mismatch"):
        evaluate(digits_u8[:20], to_uint8_nhwc(load_dataset("digits", image_size=8, num=20).images), cfg)
    nan = np.full((4, 16, 16, 1), np.nan, np.float32)
    np.savez(tmp_path / "nan.npz", arr_0=nan)
    with pytest.raises(DataError, match="NaN"):
        evaluate(tmp_path / "nan.npz", "digits", cfg)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 16, 16, 1), np.float32))
    with pytest.raises(DataError, match="dtype float32.*uint8"):
        evaluate(tmp_path / "float.npz", "digits", cfg)
    np.savez(tmp_path / "nokey.npz", images=digits_u8[:4])
    with pytest.raises(DataError, match="arr_0"):
        evaluate(tmp_path / "nokey.npz", "digits", cfg)
    with pytest.raises(ConfigError, match="metrics"):
        EvalConfig(metrics=("fid", "ppl"))
    with pytest.raises(ConfigError, match="bootstrap"):
        EvalConfig(bootstrap=1)
