"""TensorRT engines: build settings and profiles, engine.json refusals, the layer-report parser, the ONNX Runtime
build, the CLI without TensorRT — and, where TensorRT and a CUDA GPU exist, building and running a real engine.

Everything above the ``needs TensorRT`` line runs without TensorRT and without CUDA: the environment checks take
the running environment as data (:class:`RuntimeEnv`), the parser reads recorded-format fixtures
(tests/data/trt_inspector/README.md says where their format comes from).
"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tdqrt.calibration.quant.api import CalibrateConfig, calibrate
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.engines.build import (BuildConfig, batch_profile, build_engine, default_engine_path, ort_graph_report,
                                 resolve_cfg)
from tdqrt.engines.engine_card import (CARD_FILE, RuntimeEnv, card_path, check_card, is_engine_file, make_card,
                                       read_card, rebuild_command)
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.engines.layer_report import parse_engine_information, tensor_dtype
from tdqrt.engines.trt import read_verified_plan
from tdqrt.export.bundle import export_bundle
from tdqrt.export.exporter import ExportConfig
from tdqrt.tools.cli import main

DATA = Path(__file__).parent / "data" / "trt_inspector"
SIGNATURE = {"inputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", 1, 16, 16]},
                        {"name": "timestep", "dtype": "int64", "shape": ["batch"]},
                        {"name": "class_labels", "dtype": "int64", "shape": ["batch"]}]}
H100 = RuntimeEnv("tensorrt", "10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0")


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Build settings and the optimization profile


def test_build_config_defaults_and_validation():
    cfg = BuildConfig()
    assert (cfg.backend, cfg.max_batch, cfg.resolved_opt_batch, cfg.opt_level) == ("trt", 16, 16, 3)
    assert BuildConfig(max_batch=8, opt_batch=2).resolved_opt_batch == 2
    bad = [dict(backend="tensorflow"), dict(max_batch=0), dict(max_batch=True), dict(max_batch=2.5),
           dict(max_batch=4, opt_batch=5), dict(opt_batch=0), dict(workspace_gb=0), dict(workspace_gb=-1.0),
           dict(workspace_gb=float("nan")), dict(workspace_gb=float("inf")), dict(opt_level=6), dict(opt_level=-1),
           dict(opt_level=3.0), dict(cfg="yes")]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            BuildConfig(**kwargs)
    with pytest.raises(ConfigError, match=r"--opt-batch: expected an integer in \[1, 4\] or None, got 8; fix: .*"
                                          r"--max-batch 4"):
        BuildConfig(max_batch=4, opt_batch=8)
    with pytest.raises(ConfigError, match="0..5"):
        BuildConfig(opt_level=7)
    assert BuildConfig(workspace_gb=0.5, opt_level=0, opt_batch=1).to_dict()["workspace_gb"] == 0.5


def test_batch_profile_doubles_for_cfg():
    shapes = batch_profile(SIGNATURE, opt_batch=4, max_batch=8, cfg=True)
    assert shapes["sample"] == ((1, 1, 16, 16), (8, 1, 16, 16), (16, 1, 16, 16))
    assert shapes["timestep"] == ((1,), (8,), (16,)) and shapes["class_labels"] == ((1,), (8,), (16,))
    plain = batch_profile(SIGNATURE, opt_batch=4, max_batch=8, cfg=False)
    assert plain["sample"] == ((1, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16))


def test_batch_profile_refuses_static_or_odd_signatures():
    static = {"inputs": [{"name": "sample", "shape": [4, 1, 16, 16]}]}
    with pytest.raises(ConfigError, match="static batch"):
        batch_profile(static, opt_batch=1, max_batch=1, cfg=False)
    spatial = {"inputs": [{"name": "sample", "shape": ["batch", 1, "h", "w"]}]}
    with pytest.raises(ConfigError, match="only the batch may vary"):
        batch_profile(spatial, opt_batch=1, max_batch=1, cfg=False)
    with pytest.raises(ArtifactError, match="no input signature"):
        batch_profile({}, opt_batch=1, max_batch=1, cfg=False)


def test_cfg_doubling_follows_the_bundle():
    assert resolve_cfg(BuildConfig(), num_classes=10) is True
    assert resolve_cfg(BuildConfig(), num_classes=0) is False
    assert resolve_cfg(BuildConfig(cfg=False), num_classes=10) is False
    with pytest.raises(ConfigError, match="unconditional"):
        resolve_cfg(BuildConfig(cfg=True), num_classes=0)


# ---------------------------------------------------------------------------------------------------------------
# engine.json and the refusals


def _write_engine(folder: Path, data: bytes = b"serialized-plan-bytes" * 50, env: RuntimeEnv = H100,
                  bundle_sha: str = "b" * 64, name: str = "unet.trt.plan") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / name
    plan.write_bytes(data)
    card = make_card(backend="trt", plan=plan, plan_bytes=len(data), plan_sha256=hashlib.sha256(data).hexdigest(),
                     bundle_path=folder.parent / "bundle", bundle_sha256=bundle_sha, env=env,
                     profile={"sample": {"min": [1, 1, 16, 16], "opt": [8, 1, 16, 16], "max": [8, 1, 16, 16]}},
                     build=BuildConfig(max_batch=4).to_dict() | {"cfg": True}, report={"warnings": []}, versions={})
    card_path(plan).write_text(json.dumps(card))
    return plan


def test_engine_card_round_trip_and_accepts_its_own_environment(tmp_path):
    plan = _write_engine(tmp_path / "trt")
    data, card = read_verified_plan(plan, bundle_sha256="b" * 64, env=H100)
    assert data == plan.read_bytes() and card["runtime"]["gpu"] == H100.gpu
    assert card["plan"] == {"file": "unet.trt.plan", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    read_verified_plan(plan, env=H100)  # no bundle given: not checked
    assert is_engine_file(plan) and is_engine_file("x.engine") and not is_engine_file(tmp_path / "unet.onnx")


@pytest.mark.parametrize("env,match", [
    (RuntimeEnv("tensorrt", "10.14.1.48", H100.gpu, "9.0"), "built with tensorrt 10.13.3.9, this is tensorrt 10.14"),
    (RuntimeEnv("tensorrt", "11.0.0.1", H100.gpu, "9.0"), "only load into the version that built them"),
    (RuntimeEnv("tensorrt", H100.version, "NVIDIA H200", "9.0"), "built for NVIDIA H100 80GB HBM3"),
    (RuntimeEnv("tensorrt", H100.version, H100.gpu, "8.9"), r"compute capability 9.0\), this GPU"),
    (RuntimeEnv("onnxruntime", "1.31.1"), "is for tensorrt, not onnxruntime"),
])
def test_engine_for_another_tensorrt_or_gpu_is_refused(tmp_path, env, match):
    plan = _write_engine(tmp_path / "trt")
    with pytest.raises(ArtifactError, match=match) as err:
        read_verified_plan(plan, env=env)
    assert "tdqrt build --bundle" in str(err.value) and "--out" in str(err.value)


def test_engine_of_another_bundle_is_refused(tmp_path):
    plan = _write_engine(tmp_path / "trt", bundle_sha="b" * 64)
    with pytest.raises(ArtifactError, match="built from another bundle.*tdqrt build --bundle"):
        read_verified_plan(plan, bundle_sha256="c" * 64, env=H100)


def test_truncated_modified_or_renamed_plan_is_refused(tmp_path):
    plan = _write_engine(tmp_path / "trt")
    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        read_verified_plan(plan, env=H100)
    plan.write_bytes(data[:-1] + b"X")
    with pytest.raises(ArtifactError, match="modified or corrupted"):
        read_verified_plan(plan, env=H100)
    plan.write_bytes(data)
    other = plan.with_name("other.plan")
    shutil.copy(plan, other)
    with pytest.raises(ArtifactError, match="describes the engine 'unet.trt.plan', not 'other.plan'"):
        read_verified_plan(other, env=H100)


def test_missing_corrupt_or_foreign_engine_json_is_refused(tmp_path):
    plan = _write_engine(tmp_path / "trt")
    card = json.loads(card_path(plan).read_text())
    card_path(plan).write_text(json.dumps(card)[:40])
    with pytest.raises(ArtifactError, match="not valid JSON.*rebuild the engine with `tdqrt build"):
        read_card(plan)
    card_path(plan).write_text(json.dumps(card | {"format": "tdqrt-bundle"}))
    with pytest.raises(ArtifactError, match="expected 'tdqrt-engine'"):
        read_card(plan)
    card_path(plan).write_text(json.dumps(card | {"version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        read_card(plan)
    card_path(plan).write_text(json.dumps({k: v for k, v in card.items() if k != "runtime"}))
    with pytest.raises(ArtifactError, match="no 'runtime' entry"):
        read_card(plan)
    card_path(plan).unlink()
    with pytest.raises(ArtifactError, match=f"no {CARD_FILE} beside it.*tdqrt build --bundle"):
        read_card(plan)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_card(tmp_path / "nowhere.plan")


def test_rebuild_command_repeats_the_build_settings(tmp_path):
    plan = _write_engine(tmp_path / "trt")
    card = read_card(plan) | {"build": BuildConfig(max_batch=4, opt_batch=2, workspace_gb=2.0, opt_level=5,
                                                   timing_cache="/c/tc.bin").to_dict() | {"cfg": False}}
    cmd = rebuild_command(card, plan)
    for part in ("tdqrt build --bundle", "--backend trt", "--max-batch 4", "--opt-batch 2", "--workspace 2.0",
                 "--opt-level 5", "--timing-cache /c/tc.bin", "--no-cfg", f"--out {plan}"):
        assert part in cmd, (part, cmd)


def test_check_card_is_pure(tmp_path):
    card = json.loads(card_path(_write_engine(tmp_path / "trt")).read_text())
    rec = card["plan"]
    check_card(card, plan_name=rec["file"], plan_bytes=rec["bytes"], plan_sha256=rec["sha256"], env=H100)
    cpu_card = card | {"runtime": RuntimeEnv("onnxruntime", "1.31.1").to_dict()}
    check_card(cpu_card, plan_name=rec["file"], plan_bytes=rec["bytes"], plan_sha256=rec["sha256"],
               env=RuntimeEnv("onnxruntime", "1.31.1", "any GPU", "8.0"))  # no GPU recorded: none compared


# ---------------------------------------------------------------------------------------------------------------
# Layer report parser (recorded-format fixtures)


def test_layer_report_counts_int8_layers_and_finds_unfused_qdq():
    report = parse_engine_information((DATA / "unet_int8_trt10.json").read_text())
    assert len(report.layers) == 9
    assert report.precision_counts == {"FP32": 4, "INT8": 3}
    assert report.int8_layers == ["down.0.blocks.0.resblock.in_conv/weight_dequantize + "
                                  "down.0.blocks.0.resblock.in_conv/conv",
                                  "down.0.blocks.0.resblock.out_conv/weight_dequantize + "
                                  "down.0.blocks.0.resblock.out_conv/conv + down.0.blocks.0.resblock/Add",
                                  "down.1.blocks.0.attn.qkv/weight_dequantize + down.1.blocks.0.attn.qkv/gemm"]
    assert report.unfused_qdq == [
        {"name": "down.1.blocks.0.attn.qkv/act_quantize", "kind": "quantize", "type": "Reformat"},
        {"name": "mid.0.attn.proj/act_dequantize", "kind": "dequantize", "type": "Scale"}]
    assert len(report.warnings) == 1 and "2 Q/DQ layer(s) were not fused" in report.warnings[0]
    by_name = {layer.name: layer for layer in report.layers}
    pwn = next(layer for name, layer in by_name.items() if name.startswith("PWN("))
    assert pwn.unfused_qdq is None and pwn.outputs == ["INT8"]  # a Q folded into the SiLU: the desired fusion
    assert by_name["{ForeignNode[down.1.blocks.0.attn/Reshape...down.1.blocks.0.attn/Softmax]}"].precision == "FP32"
    assert by_name["down.1.blocks.0.attn.qkv/act_quantize"].origin == "QDQ"
    summary = report.summary()
    assert summary["int8_layers"] == 3 and json.loads(json.dumps(report.to_dict()))["per_layer"][0]["type"] == \
        "CaskConvolution"


def test_layer_report_reads_tensorrt_11_split_datatype_keys():
    report = parse_engine_information(json.loads((DATA / "unet_int8_trt11.json").read_text()))
    assert [(layer.precision, layer.outputs) for layer in report.layers] == \
        [("INT8", ["FP16"]), ("FP16", ["INT8"]), ("FP16", ["FP16"])]
    assert report.precision_counts == {"FP16": 1, "INT8": 1}
    assert [u["kind"] for u in report.unfused_qdq] == ["quantize"]


def test_layer_report_warns_when_nothing_runs_in_int8_and_refuses_names_only():
    fp = {"Layers": [{"Name": "/model/conv_in/Conv", "LayerType": "CaskConvolution",
                      "Inputs": [{"Name": "sample", "Format/Datatype": "Row major linear FP16 format"}],
                      "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}]},
                     {"Name": "x", "LayerType": "Shuffle", "Inputs": [{"Name": "y"}], "Outputs": []}]}
    report = parse_engine_information(fp)
    assert report.precision_counts == {"FP16": 1, "unknown": 1}
    assert any("no layer runs in INT8" in w for w in report.warnings)
    assert any("show no data type" in w for w in report.warnings)
    with pytest.raises(ArtifactError, match="ProfilingVerbosity.DETAILED"):
        parse_engine_information({"Layers": ["conv1 + relu", "fc"], "Bindings": ["x", "y"]})
    with pytest.raises(ArtifactError, match="no 'Layers' list"):
        parse_engine_information({"layers": []})
    with pytest.raises(ArtifactError, match="invalid JSON"):
        parse_engine_information("{not json")


@pytest.mark.parametrize("desc,dtype", [
    ("Row major linear FP32", "FP32"), ("Thirty-two wide channel vectorized row major Int8 format", "INT8"),
    ("Channel major FP16 format where channel % 8 == 0", "FP16"), ("Half", "FP16"), ("Float", "FP32"),
    ("Row major linear UInt8 format", "UINT8"), ("Row major linear Int64 format", "INT64"),
    ("Channel major BFloat16 format where channel % 8 == 0", "BF16"), ("Row major linear BOOL", "BOOL"),
    ("Channel major INT8 format where column stride % 32 == 0", "INT8"), ("Unknown format", None)])
def test_tensor_dtype_from_format_strings(desc, dtype):
    assert tensor_dtype({"Format/Datatype": desc}) == dtype


# ---------------------------------------------------------------------------------------------------------------
# Without TensorRT: imports stay lazy, the CLI says what to install


def test_engines_import_without_tensorrt():
    code = ("import sys, tdqrt.engines.trt, tdqrt.engines.build, tdqrt.engines.layer_report, "
            "tdqrt.engines.engine_card; print(sorted(m for m in ('tensorrt', 'polygraphy', 'onnxruntime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_cli_build_trt_without_tensorrt_names_the_extras(tmp_path, capsys, monkeypatch):
    """Neither TensorRT library importable (a None entry in sys.modules makes `import` fail): one line naming both
    extras and the flag that builds without TensorRT."""
    import tdqrt.engines.trt as trt_mod

    for name in trt_mod.LIBRARIES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(trt_mod, "_polygraphy_library", lambda: None)
    assert main(["build", "--bundle", str(tmp_path), "--backend", "trt"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not importable" in err and "tdqrt[trt]" in err and "tdqrt[trt-rtx]" in err
    assert "--backend ort" in err and len(err.strip().splitlines()) == 1


def test_cli_build_refuses_bad_settings_before_anything_else(tmp_path, capsys):
    assert main(["build", "--bundle", str(tmp_path), "--backend", "ort", "--max-batch", "2", "--opt-batch", "4"]) == 2
    assert "--opt-batch: expected an integer in [1, 2] or None, got 4; fix: give an integer in [1, --max-batch 2]" \
        in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The ONNX Runtime build on a real (tiny) bundle


@pytest.fixture(scope="module")
def bundle_dir(tiny_digits_model, tiny_calib_set, tmp_path_factory):
    quant = calibrate(tiny_digits_model, tmp_path_factory.mktemp("q_minmax"), CalibrateConfig(quant=QuantConfig()),
                      calib_dir=tiny_calib_set.path, progress=False)
    return export_bundle(quant, tmp_path_factory.mktemp("bundles") / "minmax", ExportConfig(polygraphy=False))


def test_ort_build_checks_the_session_and_records_the_graph(bundle_dir, tmp_path):
    out, card = build_engine(bundle_dir, BuildConfig(backend="ort", max_batch=2), tmp_path / "ort" / "unet.onnx")
    assert out.is_file() and read_card(out) == card
    assert card["backend"] == "ort" and card["runtime"]["name"] == "onnxruntime" and card["runtime"]["gpu"] is None
    assert card["profile"]["sample"] == {"min": [1, 1, 16, 16], "opt": [4, 1, 16, 16], "max": [4, 1, 16, 16]}
    assert card["build"]["cfg"] is True and card["bundle"]["path"] == str(Path(bundle_dir).resolve())
    report = card["report"]
    assert [s["batch"] for s in report["smoke"]] == [1, 4] and all(s["ms"] > 0 for s in report["smoke"])
    assert report == ort_graph_report(out) | {"smoke": report["smoke"]}
    assert report["dequantize_linear"] > 0 and report["warnings"]  # TRT-flavour Q/DQ: ORT CPU leaves it in float
    rec = card["plan"]
    check_card(card, plan_name=out.name, plan_bytes=out.stat().st_size, plan_sha256=rec["sha256"],
               env=RuntimeEnv(**card["runtime"]), bundle_sha256=card["bundle"]["sha256"])
    with pytest.raises(ConfigError, match="already holds the engine 'unet.onnx'"):
        build_engine(bundle_dir, BuildConfig(backend="ort"), out.with_name("second.onnx"))
    with pytest.raises(ConfigError, match="must end in .onnx"):
        build_engine(bundle_dir, BuildConfig(backend="ort"), tmp_path / "x.plan")


def test_cli_build_ort_default_location(bundle_dir, capsys):
    assert main(["build", "--bundle", str(bundle_dir), "--backend", "ort", "--max-batch", "1", "--no-cfg"]) == 0
    out = default_engine_path(bundle_dir, "ort")
    assert out == Path(bundle_dir) / "ort" / "unet.ort.onnx" and out.is_file()
    printed = capsys.readouterr().out
    assert f"ort engine written to {out}" in printed and "batch 1/1/1" in printed and "warning:" in printed
    assert read_card(out)["build"]["cfg"] is False


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is installed here")
def test_cli_sample_with_a_plan_without_tensorrt(bundle_dir, tmp_path, capsys):
    plan = _write_engine(tmp_path / "trt")
    for args in (["--model", str(plan)], ["--engine", str(plan), "--model", str(bundle_dir)]):
        assert main(["sample", *args, "--out", str(tmp_path / "s"), "--num", "1", "--steps", "2"]) == 2
        assert "tdqrt[trt]" in capsys.readouterr().err
    assert main(["sample", "--out", str(tmp_path / "s")]) == 2
    assert "pass --model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# needs TensorRT + a CUDA GPU (runs on a user's machine; skipped here)


@pytest.fixture(scope="module")
def trt_engine(bundle_dir, tmp_path_factory):
    from tdqrt.engines.trt import GPU_CLASSES

    pytest.importorskip("tensorrt", reason=f"enterprise TensorRT is not installed (pip install 'tdqrt[trt]'; it runs "
                                           f"on {GPU_CLASSES['tensorrt']}); TensorRT-RTX plans are built and refused "
                                           "in tests/test_trt_rtx.py")
    if not torch.cuda.is_available():
        pytest.skip(f"enterprise TensorRT plans need a CUDA GPU: {GPU_CLASSES['tensorrt']}")
    out = tmp_path_factory.mktemp("engine") / "unet.trt.plan"
    return build_engine(bundle_dir, BuildConfig(max_batch=4, opt_batch=2, opt_level=1), out)


@pytest.mark.trt
def test_build_and_run_tiny_engine(trt_engine, bundle_dir):
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.engines.trt import TrtDenoiser, tensorrt_env
    from tdqrt.tools.validate import compare_arrays

    plan, card = trt_engine
    assert card["runtime"] == tensorrt_env().to_dict()
    assert card["profile"]["sample"]["max"] == [8, 1, 16, 16]  # 4 images, doubled for CFG
    layers = json.loads((plan.parent / "layers.json").read_text())
    assert layers["int8_layers"] > 0 and layers["layers"] == len(layers["per_layer"])
    trt_den, ort_den = TrtDenoiser(plan), OrtDenoiser(bundle_dir)
    assert (trt_den.num_classes, trt_den.null_label, trt_den.image_size, trt_den.in_channels) == \
        (ort_den.num_classes, ort_den.null_label, ort_den.image_size, ort_den.in_channels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 16, 16, generator=g)
    t = torch.linspace(0, 999, 8).round().long()
    y = torch.arange(8) % 11
    ref = ort_den(x, t, y).numpy()
    eps = trt_den(x.cuda(), t.cuda(), y.cuda())
    assert eps.device.type == "cuda" and eps.dtype == torch.float32
    per_sample = [compare_arrays(a, b) for a, b in zip(ref, eps.cpu().numpy())]
    assert np.median([m["cosine"] for m in per_sample]) >= 0.999
    assert np.median([m["rel_l2"] for m in per_sample]) <= 0.02
    on_cpu = trt_den(x, t, y)  # CPU tensors in, CPU tensor out
    assert on_cpu.device.type == "cpu"
    torch.testing.assert_close(on_cpu, eps.cpu(), rtol=1e-5, atol=1e-5)
    graphed = TrtDenoiser(plan, bundle_dir, cuda_graph=True)
    for batch in (8, 8, 3):  # capture, replay, re-capture for a smaller batch
        torch.testing.assert_close(graphed(x[:batch].cuda(), t[:batch].cuda(), y[:batch].cuda()), eps[:batch],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match=r"outside the engine's profile \[1, 8\]"):
        trt_den(torch.randn(9, 1, 16, 16), torch.zeros(9, dtype=torch.long))


@pytest.mark.trt
def test_tensorrt_refuses_a_tampered_card_and_validates(trt_engine, bundle_dir, tmp_path):
    from tdqrt.engines.trt import TrtDenoiser
    from tdqrt.tools.validate import ValidateConfig, validate_bundle

    plan, card = trt_engine
    report = validate_bundle(bundle_dir, ValidateConfig(timesteps=2, per_timestep=3), engine=plan, save=False)
    assert report.tensorrt["ran"] and report.pairs["torch_quant vs trt_int8"]["passed"], report.failures
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(plan, moved / plan.name)
    stale = card | {"runtime": card["runtime"] | {"version": "9.0.0"}}
    (moved / CARD_FILE).write_text(json.dumps(stale))
    with pytest.raises(ArtifactError, match="built with tensorrt 9.0.0.*tdqrt build --bundle"):
        TrtDenoiser(moved / plan.name)


@pytest.mark.trt
def test_cli_sample_with_engine(trt_engine, tmp_path):
    plan, _ = trt_engine
    assert main(["sample", "--engine", str(plan), "--out", str(tmp_path / "s"), "--num", "4", "--batch", "4",
                 "--steps", "3", "--guidance", "2"]) == 0
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["job"]["engine"] == str(plan) and meta["job"]["device"] == "cuda"


def test_ort_build_warnings_say_what_happened_per_export_flavour(tmp_path):
    """What ``tdqrt build --backend ort`` reports for a graph ONNX Runtime fused two convolutions of and left one
    Q/DQ pair in: per export flavour, citing only the repository's own commands and README."""
    import onnx
    from onnx import helper

    nodes = [helper.make_node("QLinearConv", ["x"], ["a"]), helper.make_node("QLinearConv", ["a"], ["b"]),
             helper.make_node("QuantizeLinear", ["b"], ["c"]), helper.make_node("DequantizeLinear", ["c"], ["y"])]
    path = tmp_path / "optimized.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], [])), str(path))
    cpu = ort_graph_report(path, "ort-cpu")
    assert cpu["int8_ops"] == {"QLinearConv": 2}
    assert cpu["warnings"] == ["ort-cpu bundle: ONNX Runtime fused 2 QLinearConv and left 1 QuantizeLinear / 1 "
                               "DequantizeLinear nodes unfused, which run as float Q/DQ math"]
    trt = ort_graph_report(path, "trt")
    assert len(trt["warnings"]) == 1 and trt["warnings"][0].startswith("trt-flavour bundle: its convolutions stay "
                                                                       "float in ONNX Runtime")
    assert "tdqrt export --target ort-cpu" in trt["warnings"][0]
    for warning in cpu["warnings"] + trt["warnings"]:
        assert "notes" not in warning
