"""``tdqrt bench``: statistics and ratios on known inputs, config refusals, the report schema, and tiny end-to-end
runs of ``bench unet`` / ``bench loop`` / ``bench calibrate``. No absolute time is ever asserted."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

import pytest

from tdqrt.calibration.models.text import PromptSet
from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.calib_set import CalibrationSet, CalibSetConfig
from tdqrt.engines.errors import ConfigError
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.runtime.d2 import D2Table
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.tools.bench import (CalibrateBenchConfig, LoopBenchConfig, SpanTimer, UnetBenchConfig, bench_calibrate,
                               bench_loop, bench_unet, format_report, run_interleaved, save_report, speedup, summarize)
from tdqrt.tools.cli import main
from tdqrt.tools.d2 import D2StatsJob, collect_to_dir

STEPS = 4
SAMPLER = SamplerConfig(steps=STEPS, eta=1.0, guidance_scale=2.0)


@pytest.fixture(scope="module")
def quant_dir(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    return calibrate(tiny_digits_model, tmp_path_factory.mktemp("bench_q"), CalibrateConfig(),
                     calib_dir=tiny_calib_set.path, progress=False)


@pytest.fixture(scope="module")
def d2_dir(tiny_digits_model, quant_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_d2")
    collect_to_dir(tiny_digits_model, quant_dir, out, D2StatsJob(sampler=SAMPLER, num=4, batch=4), progress=False)
    return out


@pytest.fixture(scope="module")
def bundle_dir(quant_dir, d2_dir, tmp_path_factory):
    """A trt-flavour bundle that ships the D² statistics."""
    return export_bundle(quant_dir, tmp_path_factory.mktemp("bench_b") / "bundle", ExportConfig(polygraphy=False),
                         d2_stats=d2_dir)


def check_schema(report: dict, bench: str, repeats: int) -> None:
    """The keys and types every bench report carries."""
    top = {"format": str, "version": int, "bench": str, "command": str, "created": str, "machine": dict,
           "versions": dict, "threads": dict, "config": dict, "method": dict, "results": list, "skipped": list}
    for key, typ in top.items():
        assert isinstance(report[key], typ), key
    assert report["format"] == "tdqrt-bench" and report["bench"] == bench
    assert {"cpu", "cores", "gpu", "device"} <= set(report["machine"]) and report["machine"]["cores"] >= 1
    assert "torch" in report["versions"]
    if bench == "unet":  # one or more thread counts, each row measured at one of them
        counts = report["threads"]["torch_intra_op"]
        assert counts and all(isinstance(n, int) and n >= 1 for n in counts)
        assert {r["threads"] for r in report["results"]} == set(counts)
    else:
        assert isinstance(report["threads"]["torch_intra_op"], int)
    assert {"warmup", "repeats", "baseline"} <= set(report["method"])
    assert report["results"]
    for row in report["results"]:
        assert isinstance(row["variant"], str)
        assert set(row["seconds"]) == {"n", "median", "q1", "q3", "iqr", "min", "max", "mean"}
        assert row["seconds"]["n"] == repeats and len(row["samples_s"]) == repeats
        assert row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
        assert row["speedup_vs_baseline"] is None or row["speedup_vs_baseline"] > 0
    baseline = [r for r in report["results"] if r["variant"] == report["method"]["baseline"]]
    assert baseline and all(r["speedup_vs_baseline"] == 1.0 for r in baseline)
    json.dumps(report, allow_nan=False)  # plain JSON, no NaN


# ------------------------------------------------------------------------------------------- known inputs


def test_summarize_known_inputs():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s == {"n": 4, "median": 2.5, "q1": 1.75, "q3": 3.25, "iqr": 1.5, "min": 1.0, "max": 4.0, "mean": 2.5}
    assert summarize([0.5]) == {"n": 1, "median": 0.5, "q1": 0.5, "q3": 0.5, "iqr": 0.0, "min": 0.5, "max": 0.5,
                                "mean": 0.5}
    for bad in ([], [1.0, math.nan]):
        with pytest.raises(ConfigError):
            summarize(bad)


def test_speedup_known_inputs():
    ratio, paired = speedup([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert ratio == 2.0 and paired["median"] == 2.0 and paired["iqr"] == 0.0
    ratio, paired = speedup([1.0, 1.0, 1.0, 1.0], [2.0, 4.0, 1.0, 0.5])  # medians 1 and 1.5
    assert ratio == pytest.approx(1 / 1.5) and paired["min"] == 0.25 and paired["max"] == 2.0
    with pytest.raises(ConfigError, match="equally long"):
        speedup([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="positive"):
        speedup([1.0], [0.0])


def test_rounds_are_interleaved():
    calls = []
    out = run_interleaved(["a", "b"], lambda v: calls.append(v) or len(calls), warmup=1, repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert out == {"a": [3, 5], "b": [4, 6]}


def test_span_timer_counts_and_resets():
    timer = SpanTimer("cpu")
    f = timer.wrap(lambda x, y=1: x + y)
    assert f(1, y=2) == 3 and f(2) == 3 and timer.calls == 2 and timer.seconds() >= 0
    timer.reset()
    assert timer.calls == 0 and timer.seconds() == 0


# ------------------------------------------------------------------------------------------- config refusals


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="tiny", batches=(0,)), r"--batch \(batches\): expected one or more integers >= 1, got \(0,\)"),
    (dict(preset="tiny", batches=()), r"--batch \(batches\): expected one or more integers >= 1, got \(\)"),
    (dict(preset="tiny", backends=("torch-int4",)), r"--backends: expected one or more of .*, got \['torch-int4'\]"),
    (dict(preset="tiny", backends=("ort-int8",)), "needs --bundle"),
    (dict(preset="tiny", repeats=0), "repeats"),
    (dict(preset="tiny", warmup=-1), "warmup"),
    (dict(preset="tiny", threads=0), "threads"),
    (dict(preset="tiny", threads=(1, 1)), r"--threads: expected distinct values, got \[1, 1\]"),
    (dict(preset="tiny", threads=()), r"--threads: expected one or more integers >= 1"),
    (dict(preset="tiny", threads=(2, 1.5)), r"--threads: expected one or more integers >= 1"),
    (dict(preset="tiny", device="tpu"), "device"),
    (dict(preset="nope"), "--preset: expected one of .*tiny.*, got 'nope'"),
    (dict(), "nothing to measure"),
])
def test_unet_config_refusals(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UnetBenchConfig(**kwargs)


def test_config_refuses_missing_or_wrong_dirs(tmp_path, tiny_digits_model, quant_dir):
    with pytest.raises(ConfigError, match="not a bundle"):
        UnetBenchConfig(preset="tiny", bundles=(str(tmp_path / "missing"),))
    with pytest.raises(ConfigError, match="either --model"):
        UnetBenchConfig(model=str(tiny_digits_model), preset="tiny")
    with pytest.raises(ConfigError, match="not an FP checkpoint"):
        UnetBenchConfig(model=str(quant_dir))
    with pytest.raises(ConfigError, match="not a quantized checkpoint"):
        UnetBenchConfig(quant=str(tiny_digits_model))
    with pytest.raises(ConfigError, match="--d2-stats"):
        LoopBenchConfig(model=str(quant_dir))
    with pytest.raises(ConfigError, match="not a directory"):
        LoopBenchConfig(model=str(tmp_path / "missing"), d2="off")
    with pytest.raises(ConfigError, match="--method: expected one of .*, got 'gptq'"):
        CalibrateBenchConfig(model=str(tiny_digits_model), methods=("minmax", "gptq"))
    with pytest.raises(ConfigError, match="not among the methods"):
        CalibrateBenchConfig(model=str(tiny_digits_model), methods=("minmax",), options={"brecq": {"iters_w": 1}})
    with pytest.raises(ConfigError, match="unknown key"):
        CalibrateBenchConfig(model=str(tiny_digits_model), methods=("brecq",), options={"brecq": {"iterz": 1}})


def test_cli_refusals_exit_2(tmp_path, capsys):
    assert main(["bench", "unet", "--preset", "tiny", "--batch", "0"]) == 2
    assert "--batch (batches): expected one or more integers >= 1, got (0,)" in capsys.readouterr().err
    assert main(["bench", "unet", "--preset", "tiny", "--bundle", str(tmp_path)]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main(["bench", "unet", "--preset", "tiny", "--backends", "tensorrt"]) == 2
    assert "--backends: expected one or more of torch-fp32, " in capsys.readouterr().err
    assert main(["bench", "unet", "--preset", "tiny", "--threads", "2", "2"]) == 2
    assert "--threads: expected distinct values, got [2, 2]" in capsys.readouterr().err
    assert main(["bench", "calibrate", "--model", str(tmp_path), "--option", "iters_w=5"]) == 2
    assert "METHOD:KEY=VALUE" in capsys.readouterr().err


def test_unet_thread_counts_are_stored_as_a_tuple():
    assert UnetBenchConfig(preset="tiny", threads=2).threads == (2,)
    assert UnetBenchConfig(preset="tiny", threads=[2, 1]).threads == (2, 1)
    assert UnetBenchConfig(preset="tiny").threads is None


def test_configs_round_trip_through_json(tiny_digits_model, quant_dir, d2_dir):
    configs = [UnetBenchConfig(preset="tiny", batches=(1, 4), backends=("torch-fp32",), threads=(1, 2)),
               LoopBenchConfig(model=str(quant_dir), sampler=SAMPLER, d2_stats=str(d2_dir)),
               CalibrateBenchConfig(model=str(tiny_digits_model), methods=("minmax", "brecq"),
                                    options={"brecq": {"iters_w": 2}}, d2=D2StatsJob(num=2))]
    for cfg in configs:
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------------------------------- end to end


def test_bench_unet_end_to_end(tiny_digits_model, quant_dir, bundle_dir, tmp_path):
    cfg = UnetBenchConfig(model=str(tiny_digits_model), quant=str(quant_dir), bundles=(str(bundle_dir),),
                          batches=(1, 2), guidance=2.0, warmup=1, repeats=2, threads=1)
    report = bench_unet(cfg, command="test")
    check_schema(report, "unet", repeats=2)
    names = {r["variant"] for r in report["results"]}
    assert names == {"torch-fp32", "torch-fakequant", "ort-fp[trt]", "ort-int8[trt]"}
    assert [s["variant"] for s in report["skipped"]] == ["torch-fp16"]  # CPU: skipped with its reason
    assert "CUDA" in report["skipped"][0]["reason"]
    assert {(r["batch"], r["model_batch"]) for r in report["results"]} == {(1, 2), (2, 4)}  # CFG doubles the batch
    assert report["method"]["baseline"] == "torch-fp32" and report["threads"]["torch_intra_op"] == [1]
    assert all(r["providers"] == ["CPUExecutionProvider"] for r in report["results"] if r["backend"] == "onnxruntime")
    out = save_report(report, tmp_path / "unet.json")
    assert json.loads(out.read_text())["results"] == report["results"]
    assert (tmp_path / "unet.png").stat().st_size > 1000
    table = format_report(report)
    assert table[0].startswith("| variant |") and any("torch-fp16" in line for line in table)


def test_bench_unet_runs_each_variant_at_each_thread_count(tiny_digits_model, bundle_dir, monkeypatch, tmp_path):
    """Two thread counts in one run: every variant at both, torch's count set for each call and each ONNX Runtime
    session created with its own, speedups paired with the baseline of the same count, the caller's count restored,
    the rounds interleaved over variants and counts."""
    import torch

    from tdqrt.tools import bench

    calls = []
    real = bench.guided_eps

    def recording(denoiser, *args):
        calls.append((denoiser, torch.get_num_threads()))
        return real(denoiser, *args)

    monkeypatch.setattr(bench, "guided_eps", recording)
    before = torch.get_num_threads()
    out = tmp_path / "threads.json"
    assert main(["bench", "unet", "--model", str(tiny_digits_model), "--bundle", str(bundle_dir), "--backends",
                 "torch-fp32", "ort-int8", "--batch", "1", "--threads", "2", "1", "--warmup", "0", "--repeats", "2",
                 "--out", str(out)]) == 0
    assert torch.get_num_threads() == before
    report = json.loads(out.read_text())
    check_schema(report, "unet", repeats=2)
    assert report["config"]["threads"] == [2, 1] and report["threads"]["onnxruntime_intra_op"] == [2, 1]
    rows = {(r["variant"], r["threads"]): r for r in report["results"]}
    assert set(rows) == {(v, n) for v in ("torch-fp32", "ort-int8[trt]") for n in (1, 2)}
    for (name, n), row in rows.items():
        paired = [b / v for b, v in zip(rows[("torch-fp32", n)]["samples_s"], row["samples_s"])]
        assert row["speedup_spread"]["median"] == pytest.approx(float(np.median(paired)))
    # round robin: each round calls the 4 (variant, count) pairs once, counts in the order given
    assert [isinstance(den, torch.nn.Module) for den, _ in calls] == [True, False] * 4
    torch_counts = [n for den, n in calls if isinstance(den, torch.nn.Module)]
    assert torch_counts == [2, 1, 2, 1]
    sessions = [den for den, _ in calls if not isinstance(den, torch.nn.Module)]
    assert [s.session.get_session_options().intra_op_num_threads for s in sessions] == [2, 1, 2, 1]
    assert len({id(s) for s in sessions}) == 2  # one session per count, reused every round


def test_bench_loop_end_to_end_via_cli(quant_dir, d2_dir, tmp_path, capsys):
    out = tmp_path / "loop.json"
    args = ["bench", "loop", "--model", str(quant_dir), "--batch", "2", "--steps", str(STEPS), "--eta", "1",
            "--guidance", "2", "--d2", "d", "--d2-stats", str(d2_dir), "--warmup", "0", "--repeats", "2",
            "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    assert "loop overhead" in capsys.readouterr().out
    report = json.loads(out.read_text())
    check_schema(report, "loop", repeats=2)
    assert report["command"].startswith("tdqrt bench loop --model")
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"d2-off", "d2-d"} and report["method"]["baseline"] == "d2-off"
    for r in rows.values():
        assert r["unet_calls_per_loop"] == STEPS and r["model_batch"] == 4 and r["images_per_s"] > 0
        assert 0 < r["loop_overhead"]["median"] < 1 and r["unet_s"]["median"] > 0
    assert rows["d2-off"]["d2_update"] is None and 0 < rows["d2-d"]["d2_update"]["median"] < 1


def test_bench_loop_uses_the_bundles_d2(bundle_dir):
    cfg = LoopBenchConfig(model=str(bundle_dir), batches=(2,), sampler=SAMPLER, warmup=0, repeats=2, threads=1)
    report = bench_loop(cfg, command="test")
    check_schema(report, "loop", repeats=2)
    assert report["method"]["d2_stats"] == str(bundle_dir)
    assert [r["variant"] for r in report["results"]] == ["d2-off", "d2-d"]


@pytest.mark.slow
def test_bench_calibrate_end_to_end(tiny_digits_model, tiny_calib_set, tmp_path):
    """One method and the D² collection, each in its own spawn child (peak RSS read by the child)."""
    cfg = CalibrateBenchConfig(model=str(tiny_digits_model), methods=("minmax",), calib=str(tiny_calib_set.path),
                               d2=D2StatsJob(sampler=SamplerConfig(steps=2), num=2, batch=2), threads=1,
                               work_dir=str(tmp_path))
    report = bench_calibrate(cfg, command="test")
    check_schema(report, "calibrate", repeats=1)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"minmax", "d2-stats"}
    assert rows["d2-stats"]["speedup_vs_baseline"] is None
    for r in rows.values():
        assert r["peak_rss_mb"] > 0 and r["peak_increase_mb"] >= 0 and r["peak_rss_mb"] >= r["rss_before_mb"]
    assert (tmp_path / "minmax" / "r1" / "quant.json").is_file() and (tmp_path / "d2" / "d2.npz").is_file()


def _record_mmap_threshold(path: str) -> None:
    Path(path).write_text(os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset"))


def test_measuring_children_run_with_a_fixed_malloc_mmap_threshold(tmp_path, monkeypatch):
    """Each job's child starts with glibc's mmap threshold fixed (so its peak RSS follows live memory), a value the
    caller's environment sets wins, and the parent's own environment is left as it was."""
    from tdqrt.tools.bench import CHILD_MMAP_THRESHOLD, _run_child

    seen = tmp_path / "seen.txt"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    _run_child(_record_mmap_threshold, str(seen), threads=1, device="cpu")
    assert seen.read_text() == str(CHILD_MMAP_THRESHOLD) and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    _run_child(_record_mmap_threshold, str(seen), threads=1, device="cpu")
    assert seen.read_text() == "4096" and os.environ["MALLOC_MMAP_THRESHOLD_"] == "4096"


# ------------------------------------------------------------------------------------------- text-to-image


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_bench_unet_text_model_feeds_every_variant_the_same_embeddings(sd_pipeline_dir, sd_bundle, guidance,
                                                                       monkeypatch):
    """The tiny SD folder, its quantized checkpoint and its bundle in one run: every variant gets the same seeded
    random embeddings [B, L, D] (and, under CFG, the same unconditional [L, D]); the network sees cat([y, uncond])
    over the batch 2B that model_batch reports."""
    import torch

    from tdqrt.tools import bench

    seen = []  # (variant's denoiser, x, y, null, what the network itself was called with)
    real = bench.guided_eps

    def recording(denoiser, x, t, y, null, scale):
        calls = []

        def net(xx, tt, yy):
            calls.append((xx.shape[0], yy.clone()))
            return denoiser(xx, tt, yy)

        out = real(net, x, t, y, null, scale)
        seen.append((denoiser, x, y, null, calls))
        return out

    monkeypatch.setattr(bench, "guided_eps", recording)
    cfg = UnetBenchConfig(model=str(sd_pipeline_dir), quant=str(sd_bundle / "q"), bundles=(str(sd_bundle / "bundle"),),
                          batches=(1, 2), guidance=guidance, warmup=0, repeats=1, threads=1)
    report = bench_unet(cfg, command="test")
    check_schema(report, "unet", repeats=1)
    variants = ["torch-fp32", "torch-fakequant", "ort-fp[trt]", "ort-int8[trt]"]
    assert [r["variant"] for r in report["results"]] == variants * 2
    cfg_batch = 2 if guidance != 1.0 else 1
    assert [(r["batch"], r["model_batch"]) for r in report["results"]] == [(1, cfg_batch)] * 4 + [(2, 2 * cfg_batch)] * 4
    assert "random embeddings" in report["method"]["conditioning"]
    cond_shape = tuple(seen[0][0].cond_shape)  # the FP model's (L, D)
    assert len(seen) == 8 and len({id(d) for d, *_ in seen}) == 4  # one call per variant and batch
    for batch, calls in ((1, seen[:4]), (2, seen[4:])):
        _, x0, y0, null0, _ = calls[0]
        assert y0.shape == (batch, *cond_shape) and y0.is_floating_point()
        for _, x, y, null, net_calls in calls:
            assert torch.equal(x, x0) and torch.equal(y, y0)
            assert len(net_calls) == 1 and net_calls[0][0] == batch * cfg_batch
            if guidance != 1.0:
                assert null.shape == cond_shape and torch.equal(null, null0)
                assert torch.equal(net_calls[0][1], torch.cat([y0, null0.expand_as(y0)]))
            else:
                assert torch.equal(net_calls[0][1], y0)


def test_bench_unet_refuses_a_text_model_with_a_pixel_bundle(sd_pipeline_dir, bundle_dir):
    cfg = UnetBenchConfig(model=str(sd_pipeline_dir), bundles=(str(bundle_dir),), batches=(1,), warmup=0, repeats=1)
    with pytest.raises(ConfigError, match="text conditioning shape"):
        bench_unet(cfg, command="test")


def test_bench_calibrate_text_model_refusals(sd_pipeline_dir, tiny_digits_model, tmp_path, capsys):
    """A text model without prompts, prompts for a class model: refused before any job runs (nothing written)."""
    work = tmp_path / "work"
    with pytest.raises(ConfigError, match="--prompt"):
        bench_calibrate(CalibrateBenchConfig(model=str(sd_pipeline_dir), methods=("minmax",), work_dir=str(work)))
    prompts = PromptSet(("a red circle",)).to_dict()
    with pytest.raises(ConfigError, match="not conditioned on text"):
        bench_calibrate(CalibrateBenchConfig(model=str(tiny_digits_model), methods=("minmax",), prompts=prompts,
                                             work_dir=str(work)))
    with pytest.raises(ConfigError, match=r"--prompt \(prompts\): expected a prompt set"):
        CalibrateBenchConfig(model=str(sd_pipeline_dir), prompts={"negative": "blurry"})
    assert CalibrateBenchConfig(model=str(sd_pipeline_dir), prompts=PromptSet(("a",))).prompts["prompts"] == ["a"]
    assert not work.exists()
    assert main(["bench", "calibrate", "--model", str(sd_pipeline_dir), "--methods", "minmax"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--prompt" in err[0]


@pytest.mark.slow
def test_bench_calibrate_text_model_end_to_end(sd_pipeline_dir, tmp_path):
    """The tiny SD folder with two prompts: the calibration set and the D² statistics are made from the prompts'
    embeddings (the set stores the table, the statistics record the prompt set), each job in its own child."""
    prompts = PromptSet(("a red circle", "a blue square"), negative="blurry")
    guided = SamplerConfig(steps=2, guidance_scale=3.0)
    cfg = CalibrateBenchConfig(model=str(sd_pipeline_dir), methods=("minmax",),
                               calib_set=CalibSetConfig(num=2, keep_steps=2, batch=2, sampler=guided),
                               d2=D2StatsJob(sampler=guided, num=2, batch=2), threads=1, work_dir=str(tmp_path),
                               prompts=prompts.to_dict())
    assert CalibrateBenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    report = bench_calibrate(cfg, command="test")
    check_schema(report, "calibrate", repeats=1)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"calibration-set", "minmax", "d2-stats"}
    assert all(r["peak_rss_mb"] > 0 for r in rows.values())
    assert {k: report["method"]["prompts"][k] for k in ("count", "sha256")} == prompts.record()
    calib = CalibrationSet(tmp_path / "calib")
    assert calib.meta["embeddings"]["prompts"] == 2  # the two prompts' rows (+ the negative one) are stored
    assert D2Table.load(tmp_path / "d2").settings.prompts == prompts.record()
