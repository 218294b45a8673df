"""``tdqrt build``: turn a bundle's INT8 ``unet.onnx`` into an engine file with an ``engine.json`` beside it.

``--backend trt`` — a TensorRT plan, built through Polygraphy's loaders::

    NetworkFromOnnxPath(unet.onnx, strongly_typed=True)          # precision from the ONNX dtypes and Q/DQ only
    CreateConfig(profiles=[batch profile], memory_pool_limits={WORKSPACE: ...}, builder_optimization_level=N,
                 profiling_verbosity=DETAILED, load_timing_cache=FILE)
    EngineBytesFromNetwork(network, config, save_timing_cache=FILE)

* Strong typing, no INT8/FP16 builder flags: TensorRT's explicit-quantization guide says "use explicit
  quantization with strong typing; precision-control build flags are not required and should not be specified";
  ``BuilderFlag.FP16/INT8/...`` are deprecated in TensorRT 10.12 and removed in 11, where every network is
  strongly typed and ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is accepted and ignored (notes/tensorrt-qdq.md
  §1.7, TensorRT 11 "Removed and Deprecated C++ APIs"). So an fp32 bundle keeps its non-quantized layers in FP32
  (TF32 stays off, Polygraphy's default) and ``tdqrt export --dtype fp16`` gives FP16 ones.
* GroupNorm is exported as Reshape→InstanceNormalization→Reshape; the ONNX parser flag ``NATIVE_INSTANCENORM`` is
  ON by default in TensorRT 10 (``NvOnnxParser.h``), so no parser flag is passed (passing ``flags`` would replace
  the default set).
* One optimization profile over the batch: min 1, opt ``--opt-batch``, max ``--max-batch``, both doubled for a
  class-conditional bundle because classifier-free guidance evaluates the conditional and unconditional halves in
  one call (``--no-cfg`` keeps them as given).
* ``ProfilingVerbosity.DETAILED`` makes the engine inspector print each layer's formats; after the build the plan
  is deserialized, the opt shapes are set on an execution context (without one, dynamic dimensions print as -1
  and no format is shown) and ``get_engine_information(LayerInformationFormat.JSON)`` is parsed into
  ``layers.json`` (:mod:`tdqrt.engines.layer_report`): precision per layer, unfused Q/DQ warnings.

``--backend ort`` — no TensorRT needed: opens ``unet.onnx`` in ONNX Runtime (CPU provider, graph optimization
level EXTENDED, where the QDQ fusions run), saves the optimized graph as the engine file, runs it once at batch 1
and at the opt batch (finite ε of the right shape, latency), and counts the integer kernels ONNX Runtime fused
(QLinearConv, MatMulIntegerToFloat, ...) and the Q/DQ nodes it left. The sampler does not need this file — ONNX
Runtime optimizes the bundle's graph when a session opens — it is the check that the bundle runs here and an
inspectable record of what ONNX Runtime made of the Q/DQ graph.

The engine file is written atomically, then ``layers.json`` (trt), then ``engine.json`` last, so a failed build
never leaves a card describing a plan that is not there.
"""
from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from tdqrt.engines.artifacts import (atomic_path, read_json, sha256_file, versions, write_bytes_atomic,
                                     write_json_atomic)
from tdqrt.engines.bundle import Bundle, open_bundle
from tdqrt.engines.engine_card import (CARD_FILE, ENGINE_FORMAT, ENGINE_SUFFIXES, RuntimeEnv, card_path, make_card,
                                       profile_to_json)
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.layer_report import parse_engine_information
from tdqrt.engines.polygraphy_log import quiet_polygraphy_colors

BACKENDS = ("trt", "ort")
OPT_LEVELS = range(0, 6)  # IBuilderConfig::setBuilderOptimizationLevel: 0..5, TensorRT's default 3
LAYERS_FILE = "layers.json"
DEFAULT_ENGINE = {"trt": Path("trt") / "unet.trt.plan", "ort": Path("ort") / "unet.ort.onnx"}
_ORT_INT8_OPS = {"MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"}

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class BuildConfig:
    """Settings of ``tdqrt build``; ``max_batch`` / ``opt_batch`` count images, before the CFG doubling."""

    backend: str = "trt"
    max_batch: int = 16
    opt_batch: Optional[int] = None  # default: max_batch
    workspace_gb: Optional[float] = None  # TensorRT's workspace pool limit; None: TensorRT's default (device memory)
    opt_level: int = 3  # TensorRT builder optimization level, 0..5
    timing_cache: Optional[str] = None  # loaded when it exists, updated after the build (trt)
    cfg: Optional[bool] = None  # double the batch for classifier-free guidance; None: when the bundle is conditional

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if not _is_int(self.max_batch) or self.max_batch < 1:
            raise ConfigError(f"--max-batch must be an integer >= 1, got {self.max_batch!r}")
        if self.opt_batch is not None and (not _is_int(self.opt_batch) or not 1 <= self.opt_batch <= self.max_batch):
            raise ConfigError(f"--opt-batch must be an integer in [1, --max-batch {self.max_batch}], got "
                              f"{self.opt_batch!r}")
        if self.workspace_gb is not None and not (isinstance(self.workspace_gb, (int, float)) and
                                                  not isinstance(self.workspace_gb, bool) and
                                                  math.isfinite(self.workspace_gb) and self.workspace_gb > 0):
            raise ConfigError(f"--workspace must be a positive number of GiB, got {self.workspace_gb!r}")
        if not _is_int(self.opt_level) or self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"--opt-level must be an integer in 0..5 (TensorRT's builder optimization level, "
                              f"default 3), got {self.opt_level!r}")
        if self.cfg is not None and not isinstance(self.cfg, bool):
            raise ConfigError(f"cfg must be True, False or None, got {self.cfg!r}")

    @property
    def resolved_opt_batch(self) -> int:
        return self.opt_batch if self.opt_batch is not None else self.max_batch

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_cfg(config: BuildConfig, num_classes: int) -> bool:
    """Whether the profile doubles the batch: by default exactly when the model is class-conditional."""
    if config.cfg is None:
        return num_classes > 0
    if config.cfg and num_classes <= 0:
        raise ConfigError("cfg=True doubles the batch for classifier-free guidance, but this bundle is unconditional")
    return config.cfg


def batch_profile(signature: dict, *, opt_batch: int, max_batch: int, cfg: bool) -> Shapes:
    """min / opt / max shapes per input of a signature ``{"inputs": [{"name", "shape": ["batch", C, H, W]}, ...]}``
    (the manifest's ``signature.unet``): batch 1 / ``opt_batch`` / ``max_batch``, times 2 when ``cfg``."""
    inputs = signature.get("inputs") or []
    if not inputs:
        raise ArtifactError("the bundle manifest records no input signature for unet.onnx; re-export the bundle with "
                            "`tdqrt export`")
    k = 2 if cfg else 1
    shapes: Shapes = {}
    for inp in inputs:
        dims = list(inp.get("shape") or [])
        if not dims or not isinstance(dims[0], str):  # a named dim_param is dynamic
            raise ConfigError(f"input {inp.get('name')!r} of unet.onnx has a static batch ({dims}); the engine needs a "
                              "dynamic batch dimension — re-export the bundle with `tdqrt export`")
        rest = tuple(dims[1:])
        if not all(_is_int(d) and d > 0 for d in rest):
            raise ConfigError(f"input {inp.get('name')!r} of unet.onnx has dynamic non-batch dimensions {dims}; only "
                              "the batch may vary")
        shapes[inp["name"]] = ((1, *rest), (opt_batch * k, *rest), (max_batch * k, *rest))
    return shapes


def default_engine_path(bundle_dir: Union[str, os.PathLike], backend: str) -> Path:
    """``BUNDLE/trt/unet.trt.plan`` or ``BUNDLE/ort/unet.ort.onnx``: one folder per engine, its engine.json inside."""
    return Path(bundle_dir) / DEFAULT_ENGINE[backend]


def _check_out(out: Path, backend: str) -> None:
    suffixes = ENGINE_SUFFIXES if backend == "trt" else (".onnx",)
    if out.suffix not in suffixes:
        raise ConfigError(f"--out {out}: a {backend} engine file must end in {' or '.join(suffixes)}")
    existing = card_path(out)
    if existing.is_file():
        try:
            other = read_json(existing, expect_format=ENGINE_FORMAT).get("plan", {}).get("file")
        except ArtifactError:
            return  # a broken card is replaced
        if other not in (None, out.name):
            raise ConfigError(f"{out.parent} already holds the engine {other!r} ({CARD_FILE} describes it); put each "
                              "engine in its own folder")


def build_engine(bundle_dir: Union[str, os.PathLike], config: BuildConfig = BuildConfig(),
                 out: Optional[Union[str, os.PathLike]] = None) -> tuple[Path, dict]:
    """Build the ``config.backend`` engine of the (hash-verified) bundle into ``out`` (default
    :func:`default_engine_path`); returns the engine path and its ``engine.json`` content."""
    if config.backend == "trt":  # fail on a missing TensorRT / GPU before touching the bundle
        from tdqrt.engines.trt import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda()
    bundle = open_bundle(bundle_dir)
    out = Path(out) if out is not None else default_engine_path(bundle.path, config.backend)
    _check_out(out, config.backend)
    cfg = resolve_cfg(config, bundle.num_classes)
    shapes = batch_profile(bundle.signature("unet"), opt_batch=config.resolved_opt_batch,
                           max_batch=config.max_batch, cfg=cfg)
    build = _build_trt if config.backend == "trt" else _build_ort
    t0 = time.perf_counter()
    env, report = build(bundle, config, out, shapes)
    settings = config.to_dict() | {"cfg": cfg, "seconds": round(time.perf_counter() - t0, 3)}
    card = make_card(backend=config.backend, plan=out, plan_bytes=out.stat().st_size,
                     plan_sha256=sha256_file(out), bundle_path=bundle.path, bundle_sha256=bundle.sha256, env=env,
                     profile=profile_to_json(shapes), build=settings, report=report, versions=_versions())
    write_json_atomic(card_path(out), card)
    return out, card


def _versions() -> dict:
    from importlib import metadata

    out = versions()
    for dist in ("polygraphy", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------------------------------------------
# TensorRT


def _build_trt(bundle: Bundle, config: BuildConfig, out: Path, shapes: Shapes) -> tuple[RuntimeEnv, dict]:
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    from tdqrt.engines.trt import require_cuda, require_tensorrt, tensorrt_env

    quiet_polygraphy_colors()
    trt = require_tensorrt()
    device = require_cuda()
    onnx_path = bundle.onnx_path("unet")
    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    pools = None if config.workspace_gb is None else {trt.MemoryPoolType.WORKSPACE: int(config.workspace_gb * 2**30)}
    cache = config.timing_cache
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    create_config = CreateConfig(profiles=[profile], memory_pool_limits=pools,
                                 builder_optimization_level=config.opt_level,
                                 profiling_verbosity=trt.ProfilingVerbosity.DETAILED, load_timing_cache=cache)
    try:
        plan = EngineBytesFromNetwork(network, config=create_config, save_timing_cache=cache)()
    except PolygraphyException as exc:
        raise ArtifactError(f"TensorRT could not build an engine from {onnx_path}: {str(exc)[:600]}; check the graph "
                            f"with `tdqrt lint {bundle.path}`") from exc
    data = bytes(memoryview(plan))
    write_bytes_atomic(out, data)
    report = parse_engine_information(engine_information(data, shapes))
    write_json_atomic(out.parent / LAYERS_FILE, {"format": "tdqrt-layer-report", "version": 1, "engine": out.name,
                                                 "sha256": hashlib.sha256(data).hexdigest()} | report.to_dict())
    return tensorrt_env(device), report.summary()


def engine_information(plan: bytes, shapes: Shapes) -> str:
    """The engine inspector's JSON for ``plan`` with every input at its opt shape (concrete dims and formats)."""
    from tdqrt.engines.trt import require_tensorrt, trt_logger

    trt = require_tensorrt()
    engine = trt.Runtime(trt_logger()).deserialize_cuda_engine(plan)
    if engine is None:
        raise ArtifactError("TensorRT could not deserialize the plan it just built (its log above says why)")
    context = engine.create_execution_context()
    for name, (_, opt, _) in shapes.items():
        if not context.set_input_shape(name, opt):
            raise ArtifactError(f"the built engine refuses the opt shape {opt} for input {name!r}")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime


def _build_ort(bundle: Bundle, config: BuildConfig, out: Path, shapes: Shapes) -> tuple[RuntimeEnv, dict]:
    import onnxruntime as ort

    from tdqrt.engines.ort import OrtDenoiser

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with atomic_path(out) as tmp:
        so.optimized_model_filepath = str(tmp)
        denoiser = OrtDenoiser(bundle, ["CPUExecutionProvider"], session_options=so)
        smoke = [_smoke_run(denoiser, batch) for batch in sorted({1, shapes["sample"][1][0]})]
    report = ort_graph_report(out) | {"smoke": smoke}
    return RuntimeEnv("onnxruntime", ort.__version__), report


def _smoke_run(denoiser, batch: int, repeats: int = 3) -> dict:
    """Run ``denoiser`` on fixed random inputs of ``batch`` images: ε must be finite and of x's shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, denoiser.in_channels, denoiser.image_size, denoiser.image_size, generator=g)
    t = torch.linspace(0, (denoiser.num_train_timesteps or 1000) - 1, batch).round().long()
    y = torch.arange(batch) % (denoiser.num_classes + 1) if denoiser.conditional else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        eps = denoiser(x, t, y)
        times.append(time.perf_counter() - t0)
    if tuple(eps.shape) != tuple(x.shape) or not bool(torch.isfinite(eps).all()):
        raise ArtifactError(f"{denoiser.path} returned ε of shape {tuple(eps.shape)} with non-finite values at batch "
                            f"{batch}; validate the bundle with `tdqrt validate`")
    return {"batch": batch, "ms": round(1e3 * statistics.median(times), 3)}


def ort_graph_report(path: Union[str, os.PathLike]) -> dict:
    """Op counts of an ONNX Runtime optimized graph: fused integer kernels and the Q/DQ nodes left unfused."""
    import onnx

    counts = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    int8 = {op: n for op, n in sorted(counts.items()) if op.startswith("QLinear") or op in _ORT_INT8_OPS}
    q, dq = counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0)
    warnings = []
    if q or dq:
        warnings.append(f"{q} QuantizeLinear / {dq} DequantizeLinear nodes stay unfused in ONNX Runtime: on x86 CPU "
                        "it fuses a Conv into QLinearConv only when a Q follows the Conv (notes/tensorrt-qdq.md §5), "
                        "which the TensorRT-flavour graph does not have, so those layers run in float")
    if not int8:
        warnings.append("ONNX Runtime fused no integer kernel: this engine runs the Q/DQ graph in float")
    return {"op_counts": dict(sorted(counts.items())), "int8_ops": int8, "quantize_linear": q,
            "dequantize_linear": dq, "warnings": warnings}
