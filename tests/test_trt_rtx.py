"""TensorRT-RTX: real engines built from tdqrt's bundles on the CPU (ahead of time, no GPU needed).

Every bundle kind parses without a parser error and builds a plan: the tiny trt-flavour W8A8 bundle (fp32,
class-conditional: the CFG-doubled profile), its fp16 export, a TDQ bundle with per-timestep ratio tables and the
``ddpm-cifar10-32`` architecture. The parsed network holds exactly the Q/DQ nodes the exporter wrote; engine.json
and layers.json are complete; a second build reuses the timing cache; stale plans are refused; a graph the parser
rejects is one error naming the node. The planted-violation graphs of tests/test_lint.py go through the real
parser and builder, and what TensorRT-RTX accepts is recorded next to what the lint says.

Running a plan needs an RTX-class GPU; those tests skip elsewhere with the reason.
"""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tdqrt.engines.artifacts import sha256_file
from tdqrt.engines.build import LAYERS_FILE, BuildConfig, build_engine
from tdqrt.engines.engine_card import RuntimeEnv, check_card, read_card
from tdqrt.engines.errors import ArtifactError, ConfigError, DependencyError
from tdqrt.tools.cli import main

pytest.importorskip("tensorrt_rtx", reason="the test extra installs TensorRT-RTX: pip install -e '.[test]'")

LINT_DIR = Path(__file__).parent


@pytest.fixture(scope="module")
def rtx():
    """TensorRT-RTX, with Polygraphy's TensorRT loaders pointed at it (once per process)."""
    from tdqrt.engines.trt import TENSORRT_RTX, require_tensorrt

    try:
        return require_tensorrt(TENSORRT_RTX)
    except DependencyError as exc:  # enterprise TensorRT claimed Polygraphy first in this process
        pytest.skip(str(exc))


def _onnx_qdq(path: Path) -> tuple[int, int]:
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


@pytest.fixture(scope="module")
def fp32_builds(rtx, trt_bundles, tmp_path_factory):
    """The tiny fp32 bundle built twice with one timing cache: first through the CLI with ``--backend trt``
    (auto-detected library), then with ``backend="trt-rtx"``; both under spies that record which builder function
    and which Polygraphy loaders ran."""
    import polygraphy.backend.trt as pbt

    import tdqrt.engines.build as build_mod

    root = tmp_path_factory.mktemp("rtx_fp32")
    cache = root / "timing.cache"
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("NetworkFromOnnxPath", "EngineBytesFromNetwork"):
            real = getattr(pbt, name)
            mp.setattr(pbt, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
        real_build = build_mod._build_trt
        mp.setattr(build_mod, "_build_trt",
                   lambda *a, **k: calls.append(("_build_trt", a[-1])) or real_build(*a, **k))
        printed = io.StringIO()
        first = root / "a" / "unet.trt.plan"
        with contextlib.redirect_stdout(printed):
            assert main(["build", "--bundle", str(trt_bundles["fp32"]), "--backend", "trt", "--max-batch", "2",
                         "--timing-cache", str(cache), "--out", str(first)]) == 0
        second, card2 = build_engine(trt_bundles["fp32"], BuildConfig(backend="trt-rtx", max_batch=2,
                                                                      timing_cache=str(cache)),
                                     root / "b" / "unet.trt.plan")
    return {"first": (first, read_card(first)), "second": (second, card2), "printed": printed.getvalue(),
            "calls": calls, "cache": cache}


@pytest.fixture(scope="module")
def kind_builds(rtx, trt_bundles, cifar_bundle, tmp_path_factory):
    """One plan per remaining bundle kind: fp16, tdq (per-timestep tables), ddpm-cifar10-32."""
    root = tmp_path_factory.mktemp("rtx_kinds")
    bundles = {"fp16": trt_bundles["fp16"], "tdq": trt_bundles["tdq"], "ddpm-cifar10-32": cifar_bundle}
    return {kind: (bundle, *build_engine(bundle, BuildConfig(backend="trt-rtx", max_batch=2),
                                         root / kind / "unet.trt.plan"))
            for kind, bundle in bundles.items()}


# ---------------------------------------------------------------------------------------------------------------
# Real builds


def test_fp32_bundle_builds_with_the_library_installed(fp32_builds, trt_bundles, rtx):
    plan, card = fp32_builds["first"]
    assert "building with tensorrt_rtx " in fp32_builds["printed"]  # auto-detected, and said so
    assert f"trt engine written to {plan}" in fp32_builds["printed"]
    assert plan.is_file() and card["plan"]["bytes"] == plan.stat().st_size == card["report"]["plan_bytes"]
    assert card["plan"]["sha256"] == sha256_file(plan) and card["backend"] == "trt"
    assert card["runtime"] == {"name": "tensorrt_rtx", "version": rtx.__version__, "gpu": None,
                               "compute_capability": None, "compute_capabilities": ["8.6", "8.9", "12.0"]}
    assert card["bundle"]["sha256"] == json.loads(json.dumps(card))["bundle"]["sha256"]
    from tdqrt.engines.bundle import open_bundle

    assert card["bundle"]["sha256"] == open_bundle(trt_bundles["fp32"]).sha256
    # class-conditional: the profile doubles the batch for classifier-free guidance
    assert card["build"]["cfg"] is True
    assert card["profile"]["sample"] == {"min": [1, 1, 16, 16], "opt": [4, 1, 16, 16], "max": [4, 1, 16, 16]}
    assert card["profile"]["class_labels"]["max"] == [4]
    assert card["versions"]["tensorrt-rtx"] == rtx.__version__


def test_every_bundle_kind_parses_cleanly_and_holds_the_exported_qdq(fp32_builds, kind_builds, trt_bundles):
    builds = {"fp32": (trt_bundles["fp32"], *fp32_builds["first"])} | kind_builds
    for kind, (bundle, plan, card) in builds.items():
        layers = json.loads((plan.parent / LAYERS_FILE).read_text())
        net = layers["network"]
        q, dq = _onnx_qdq(Path(bundle) / "unet.onnx")
        assert (net["quantize"], net["dequantize"]) == (q, dq), kind
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        assert net["quantized_conv"] + net["quantized_matmul"] == len(manifest["quant"]["qdq"]["layers"]), kind
        assert manifest["lint"]["unet.onnx"]["clean"], kind  # the lint passed it, and it builds
        assert all("error" not in w.lower() for w in net["parser_warnings"]), (kind, net["parser_warnings"])
        assert layers["plan_bytes"] == plan.stat().st_size > 0 and layers["library"] == "tensorrt_rtx"
        assert layers["per_layer_precision"] is None and "needs a GPU" in layers["needs_gpu"]
        assert card["report"]["network"]["quantize"] == q and card["build"]["seconds"] > 0
    tdq = json.loads((Path(trt_bundles["tdq"]) / "manifest.json").read_text())["quant"]["qdq"]
    assert tdq["per_timestep_layers"]  # the TDQ bundle really has ratio tables
    fp16 = onnx.load(str(Path(trt_bundles["fp16"]) / "unet.onnx"), load_external_data=False)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    _, _, cifar = kind_builds["ddpm-cifar10-32"]
    assert cifar["build"]["cfg"] is False and cifar["profile"]["sample"]["max"] == [2, 3, 32, 32]


def test_second_build_reuses_the_timing_cache(fp32_builds):
    first, second = fp32_builds["first"][1], fp32_builds["second"][1]
    assert first["report"]["timing_cache"] == {"path": str(fp32_builds["cache"]), "loaded": False}
    assert second["report"]["timing_cache"] == {"path": str(fp32_builds["cache"]), "loaded": True}
    assert fp32_builds["cache"].is_file() and fp32_builds["cache"].stat().st_size > 0
    assert second["build"]["backend"] == "trt-rtx" and second["runtime"]["name"] == "tensorrt_rtx"
    # TensorRT-RTX takes the file and does nothing with it; the build says so instead of implying a speed-up
    assert any("no-ops in TensorRT-RTX" in w for w in second["report"]["warnings"])


def test_both_backends_share_one_builder_and_polygraphy_loader_chain(fp32_builds):
    """``--backend trt`` and ``trt-rtx`` go through the same builder function, which runs Polygraphy's
    NetworkFromOnnxPath and EngineBytesFromNetwork once per build; no other function in engines/build.py calls a
    Polygraphy network or engine loader (an RTX-only builder would show up here)."""
    import inspect

    import tdqrt.engines.build as build_mod

    build_calls = ["_build_trt", "NetworkFromOnnxPath", "EngineBytesFromNetwork"]
    assert [c if isinstance(c, str) else c[0] for c in fp32_builds["calls"]] == build_calls * 2
    assert [c[1] for c in fp32_builds["calls"] if isinstance(c, tuple)] == ["tensorrt_rtx", "tensorrt_rtx"]
    users = {name: [loader for loader in ("NetworkFromOnnx", "EngineBytesFromNetwork", "EngineFromNetwork",
                                          "CreateConfig") if loader in inspect.getsource(fn)]
             for name, fn in vars(build_mod).items() if inspect.isfunction(fn) and fn.__module__ == build_mod.__name__}
    assert {name: found for name, found in users.items() if found} == {
        "parse_onnx": ["NetworkFromOnnx"], "_build_trt": ["EngineBytesFromNetwork", "CreateConfig"]}


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_stale_rtx_plans_are_refused_with_the_rebuild_command(fp32_builds, tmp_path):
    plan, card = fp32_builds["first"]
    data = plan.read_bytes()
    rec = dict(plan_name=plan.name, plan_bytes=len(data), plan_sha256=card["plan"]["sha256"], plan_path=plan)
    version = card["runtime"]["version"]
    check_card(card, env=RuntimeEnv("tensorrt_rtx", version, "NVIDIA GeForce RTX 4090", "8.9"),
               bundle_sha256=card["bundle"]["sha256"], **rec)  # a targeted RTX GPU: accepted
    redo = "tdqrt build --bundle"
    cases = [(RuntimeEnv("tensorrt", "10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0"), {}, "is for tensorrt_rtx, not "
              "tensorrt"),
             (RuntimeEnv("tensorrt_rtx", "1.8.0.1", "NVIDIA GeForce RTX 4090", "8.9"), {}, f"built with tensorrt_rtx "
              f"{version}, this is tensorrt_rtx 1.8.0.1"),
             (RuntimeEnv("tensorrt_rtx", version, "NVIDIA H100 80GB HBM3", "9.0"), {}, "built for compute "
              "capabilities 8.6, 8.9, 12.0, this GPU is NVIDIA H100 80GB HBM3 \\(9.0\\)"),
             (RuntimeEnv("tensorrt_rtx", version, "NVIDIA GeForce RTX 4090", "8.9"), {"bundle_sha256": "0" * 64},
              "built from another bundle")]
    for env, extra, match in cases:
        with pytest.raises(ArtifactError, match=match) as err:
            check_card(card, env=env, **(rec | extra))
        assert redo in str(err.value) and "--backend trt-rtx" in str(err.value)
    modified = bytearray(data)
    modified[len(data) // 2] ^= 0xFF
    import hashlib

    with pytest.raises(ArtifactError, match="was modified or corrupted.*--backend trt-rtx"):
        check_card(card, env=RuntimeEnv("tensorrt_rtx", version, "RTX", "8.9"),
                   **(rec | {"plan_sha256": hashlib.sha256(bytes(modified)).hexdigest()}))


def test_rtx_settings_are_checked(rtx, trt_bundles, tmp_path):
    with pytest.raises(ConfigError, match="compute capabilities such as 8.6"):
        BuildConfig(backend="trt-rtx", compute_capabilities=("sm86",))
    with pytest.raises(ConfigError, match="cannot be combined"):
        BuildConfig(backend="trt-rtx", compute_capabilities=("8.6",), use_gpu=True)
    with pytest.raises(ConfigError, match="drop them for --backend ort"):
        BuildConfig(backend="ort", use_gpu=True)
    with pytest.raises(ConfigError, match=r"--compute-capability 9.0: TensorRT-RTX .* builds for .*8.6"):
        build_engine(trt_bundles["fp32"], BuildConfig(backend="trt-rtx", compute_capabilities=("9.0",)),
                     tmp_path / "x" / "unet.trt.plan")
    assert not (tmp_path / "x").exists()
    if not torch.cuda.is_available():
        assert main(["build", "--bundle", str(trt_bundles["fp32"]), "--backend", "trt-rtx", "--use-gpu",
                     "--out", str(tmp_path / "g" / "unet.trt.plan")]) == 2
        assert not (tmp_path / "g").exists()


def test_one_target_capability_is_recorded(rtx, trt_bundles, tmp_path, capsys):
    out = tmp_path / "cc" / "unet.trt.plan"
    assert main(["build", "--bundle", str(trt_bundles["fp32"]), "--backend", "trt-rtx", "--max-batch", "1",
                 "--opt-level", "0", "--compute-capability", "8.9", "--out", str(out)]) == 0
    card = read_card(out)
    assert card["runtime"]["compute_capabilities"] == ["8.9"] and card["build"]["compute_capabilities"] == ["8.9"]
    printed = capsys.readouterr().out
    assert "network: " in printed and "Q / " in printed and "needs a GPU" in printed
    with pytest.raises(ArtifactError, match="--compute-capability 8.9"):  # the rebuild command repeats it
        check_card(card, plan_name=out.name, plan_bytes=out.stat().st_size, plan_sha256=card["plan"]["sha256"],
                   env=RuntimeEnv("tensorrt_rtx", card["runtime"]["version"], "NVIDIA GeForce RTX 3090", "8.6"))


def _with_unknown_op(bundle: Path, dest: Path) -> str:
    """A copy of ``bundle`` whose unet.onnx has one node turned into an op no ONNX parser knows (manifest hashes
    updated, so the bundle itself verifies); returns that node's name."""
    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / "unet.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type = "TdqrtUnknownOp"
    onnx.save(model, str(dest / "unet.onnx"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["unet.onnx"] |= {"sha256": sha256_file(dest / "unet.onnx"),
                                       "bytes": (dest / "unet.onnx").stat().st_size}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return node.name


def test_a_bundle_the_parser_rejects_is_one_error_naming_the_node(rtx, trt_bundles, tmp_path, capsys):
    bundle = tmp_path / "bad"
    node = _with_unknown_op(Path(trt_bundles["fp32"]), bundle)
    out = tmp_path / "engine" / "unet.trt.plan"
    assert main(["build", "--bundle", str(bundle), "--backend", "trt-rtx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorrt_rtx's ONNX parser rejected" in err[0], err
    assert f"name: {node}" in err[0] and "TdqrtUnknownOp" in err[0] and "tdqrt lint" in err[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no plan, no layers.json, no engine.json


# ---------------------------------------------------------------------------------------------------------------
# The lint and the real parser


# What TensorRT-RTX 1.7 does with each planted violation of tests/test_lint.py (every one is a lint error):
#   "rejected": the ONNX parser refuses the graph; "accepted": it parses and a plan is built — TensorRT-RTX silently
#   reads the graph another way (uint8 zero point -> int8, per-channel activation scales, float weights) or runs
#   the op in float; "crash": it parses, and the builder dies (SIGSEGV) in a fresh process.
PARSER_OUTCOMES = {
    "clean": "accepted",
    "runtime_scale": "crash",
    "nonzero_zp": "rejected",
    "uint8_zp": "accepted",
    "no_zp": "accepted",
    "negative_scale": "rejected",
    "per_channel_act": "accepted",
    "weight_axis": "accepted",
    "weight_without_dq": "accepted",
    "float_weight_into_dq": "accepted",
    "int32_weight": "rejected",
    "unsupported_op": "accepted",  # LpNormalization: TensorRT-RTX has an importer for it
}


def _outcome(path: Path, shapes: dict) -> str:
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
    from polygraphy.backend.trt import EngineBytesFromNetwork, Profile

    from tdqrt.engines.build import parse_onnx

    try:
        parsed, _ = parse_onnx(path, "tensorrt_rtx")
    except ArtifactError:
        return "rejected"
    profile = Profile()
    for name, shape in shapes.items():
        profile.add(name, min=(1, *shape[1:]) if shape else (), opt=shape, max=shape)
    plan = EngineBytesFromNetwork(parsed, config=CreateConfigRTX(profiles=[profile], builder_optimization_level=0))()
    return "accepted" if len(bytes(memoryview(plan))) > 0 else "rejected"


def test_lint_and_the_real_parser_on_the_planted_violations(rtx, tmp_path):
    sys.path.insert(0, str(LINT_DIR))
    try:
        from test_lint import _build
    finally:
        sys.path.remove(str(LINT_DIR))
    from tdqrt.export.lint import lint_qdq_rules

    outcomes = {}
    for variant, expected in PARSER_OUTCOMES.items():
        model = _build(variant)
        assert bool(lint_qdq_rules(model)) == (variant == "clean"), variant
        path = tmp_path / f"{variant}.onnx"
        onnx.save(model, str(path))
        if expected == "crash":  # only in a child process: the builder takes the interpreter down with it
            code = (f"from tdqrt.engines.trt import require_tensorrt; require_tensorrt('tensorrt_rtx'); "
                    f"import sys; sys.path.insert(0, {str(LINT_DIR)!r}); import test_trt_rtx as m; "
                    f"print(m._outcome(__import__('pathlib').Path({str(path)!r}), {{'x': (2, 4, 8, 8), 't': ()}}))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            outcomes[variant] = "crash" if proc.returncode < 0 else proc.stdout.strip().splitlines()[-1]
        else:
            outcomes[variant] = _outcome(path, {"x": (2, 4, 8, 8)})
    assert outcomes == PARSER_OUTCOMES


# ---------------------------------------------------------------------------------------------------------------
# Running a plan: an RTX GPU of a targeted compute capability


def _rtx_gpu_reason() -> str:
    from tdqrt.engines.trt import GPU_CLASSES

    if not torch.cuda.is_available():
        return (f"running a plan needs a GPU and torch sees none: TensorRT-RTX plans run on {GPU_CLASSES['tensorrt_rtx']}"
                f"; enterprise TensorRT plans on {GPU_CLASSES['tensorrt']}")
    major, minor = torch.cuda.get_device_capability()
    if f"{major}.{minor}" not in ("8.6", "8.9", "12.0"):
        return (f"this GPU ({torch.cuda.get_device_name()}, {major}.{minor}) is not one the plan targets: TensorRT-RTX "
                f"plans run on {GPU_CLASSES['tensorrt_rtx']}")
    return ""


def test_an_rtx_plan_without_a_supported_gpu_is_refused_in_one_line(fp32_builds, trt_bundles, tmp_path, capsys):
    if not _rtx_gpu_reason():
        pytest.skip("an RTX GPU is here: the plan runs (test_rtx_plan_runs_like_onnx_runtime)")
    plan, _ = fp32_builds["first"]
    for args in (["sample", "--engine", str(plan), "--out", str(tmp_path / "s"), "--num", "1", "--steps", "2"],
                 ["validate", str(trt_bundles["fp32"]), "--engine", str(plan), "--timesteps", "1",
                  "--per-timestep", "1", "--out", str(tmp_path / "v")]):
        assert main(args) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in captured.err, err
        assert "tensorrt_rtx" in err[0] and ("RTX GPUs" in err[0] or "compute capabilities" in err[0]), err
        assert "--backend" not in err[0]  # sample and validate have no --backend flag
        assert "PASSED" not in captured.out


@pytest.mark.trt
def test_rtx_plan_runs_like_onnx_runtime(fp32_builds, trt_bundles):
    reason = _rtx_gpu_reason()
    if reason:
        pytest.skip(reason)
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.engines.trt import TrtDenoiser, runtime_cache_path
    from tdqrt.tools.validate import compare_arrays

    plan, _ = fp32_builds["first"]
    den, ref = TrtDenoiser(plan), OrtDenoiser(trt_bundles["fp32"])
    assert den.library == "tensorrt_rtx" and runtime_cache_path(plan).is_file()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.linspace(0, 999, 4).round().long()
    y = torch.arange(4) % 11
    eps = den(x, t, y).numpy()
    per_sample = [compare_arrays(a, b) for a, b in zip(ref(x, t, y).numpy(), eps)]
    assert np.median([m["cosine"] for m in per_sample]) >= 0.999
