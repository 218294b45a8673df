"""``tdqrt build``: turn a bundle's INT8 ``unet.onnx`` into an engine file with an ``engine.json`` beside it.

``--backend trt`` — a TensorRT plan, built with whichever TensorRT library is installed (enterprise ``tensorrt``
first, else ``tensorrt_rtx``; ``--backend trt-rtx`` forces TensorRT-RTX), through ONE chain of Polygraphy loaders
for both (:func:`_build_trt`; :func:`tdqrt.engines.trt.require_tensorrt` points Polygraphy at the library)::

    NetworkFromOnnxPath(unet.onnx, strongly_typed=True)          # precision from the ONNX dtypes and Q/DQ only
    CreateConfig(profiles=[batch profile], memory_pool_limits={WORKSPACE: ...}, builder_optimization_level=N,
                 profiling_verbosity=DETAILED, load_timing_cache=FILE)
        # TensorRT-RTX: CreateConfigRTX(same settings, compute_capabilities=[(8, 6), ...] | use_gpu=True)
    EngineBytesFromNetwork(network, config, save_timing_cache=FILE)

* Strong typing, no INT8/FP16 builder flags: TensorRT's explicit-quantization guide says "use explicit
  quantization with strong typing; precision-control build flags are not required and should not be specified";
  ``BuilderFlag.FP16/INT8/...`` are deprecated in TensorRT 10.12 and removed in 11, where every network is
  strongly typed and ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is accepted and ignored (TensorRT 11
  "Removed and Deprecated C++ APIs"; Polygraphy refuses precision flags with TensorRT-RTX). So an fp32 bundle keeps
  its non-quantized layers in FP32 and ``tdqrt export --dtype fp16`` gives FP16 ones.
* GroupNorm is exported as Reshape→InstanceNormalization→Reshape; the ONNX parser flag ``NATIVE_INSTANCENORM`` is
  ON by default in TensorRT 10 (``NvOnnxParser.h``), so no parser flag is passed (passing ``flags`` would replace
  the default set).
* One optimization profile over the batch: min 1, opt ``--opt-batch``, max ``--max-batch``, both doubled for a
  class-conditional bundle because classifier-free guidance evaluates the conditional and unconditional halves in
  one call (``--no-cfg`` keeps them as given).
* TensorRT-RTX builds ahead of time without a GPU, for ``--compute-capability`` targets (default: the library's
  portable set, :data:`tdqrt.engines.trt.RTX_DEFAULT_CAPABILITIES`) or, with ``--use-gpu``, for the local GPU.
  Enterprise TensorRT needs the GPU it builds for.
* The parsed network is summarised before the build (:func:`network_summary`): the parser's warnings, layer-type
  counts, Q/DQ layers and the Conv/MatMul layers fed by DequantizeLinear on both inputs. A graph the parser rejects
  is one :class:`ArtifactError` quoting the parser's error (which names the node); nothing is written.
* ``ProfilingVerbosity.DETAILED`` makes the engine inspector print each layer's formats. When a GPU that can load
  the plan is present, the plan is deserialized, the opt shapes are set on an execution context (without one,
  dynamic dimensions print as -1 and no format is shown) and ``get_engine_information(LayerInformationFormat.JSON)``
  is parsed into ``layers.json`` (:mod:`tdqrt.engines.layer_report`): precision per layer, unfused Q/DQ warnings.
  Without one (a TensorRT-RTX build on a CPU machine) ``layers.json`` holds the network summary and the plan size,
  and says that the per-layer precision report needs a GPU.

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

import contextlib
import hashlib
import io
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from tdqrt.engines.artifacts import (atomic_path, read_json, sha256_file, versions, write_bytes_atomic,
                                     write_json_atomic)
from tdqrt.engines.bundle import Bundle, open_bundle
from tdqrt.engines.engine_card import (CARD_FILE, ENGINE_FORMAT, ENGINE_SUFFIXES, RuntimeEnv, card_path, make_card,
                                       profile_to_json)
from tdqrt.engines.config import check_bool, check_choice, check_int, check_real, invalid, is_int
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.layer_report import parse_engine_information
from tdqrt.engines.polygraphy_log import quiet_polygraphy_colors

BACKENDS = ("trt", "trt-rtx", "ort")
OPT_LEVELS = range(0, 6)  # IBuilderConfig::setBuilderOptimizationLevel: 0..5, TensorRT's default 3
LAYERS_FILE = "layers.json"
DEFAULT_ENGINE = {"trt": Path("trt") / "unet.trt.plan", "trt-rtx": Path("trt") / "unet.trt.plan",
                  "ort": Path("ort") / "unet.ort.onnx"}
_CAPABILITY = re.compile(r"^[0-9]+\.[0-9]+$")
_ORT_INT8_OPS = {"MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"}

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


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
    compute_capabilities: Optional[tuple[str, ...]] = None  # TensorRT-RTX targets ("8.6", ...); None: its default
    use_gpu: bool = False  # TensorRT-RTX: build for the local GPU (needs one)

    def __post_init__(self) -> None:
        check_choice("BuildConfig.backend", self.backend, BACKENDS, flag="--backend")
        check_int("BuildConfig.max_batch", self.max_batch, 1, flag="--max-batch")
        check_int("BuildConfig.opt_batch", self.opt_batch, 1, self.max_batch, optional=True, flag="--opt-batch",
                  fix=f"give an integer in [1, --max-batch {self.max_batch}], or leave it unset")
        check_real("BuildConfig.workspace_gb", self.workspace_gb, above=0.0, optional=True, flag="--workspace",
                   fix="give a positive number of GiB, or leave it unset")
        check_int("BuildConfig.opt_level", self.opt_level, OPT_LEVELS[0], OPT_LEVELS[-1], flag="--opt-level",
                  fix="give TensorRT's builder optimization level 0..5 (default 3)")
        check_bool("BuildConfig.cfg", self.cfg, optional=True, flag="--no-cfg")
        if self.compute_capabilities is not None:
            object.__setattr__(self, "compute_capabilities", tuple(self.compute_capabilities))
            if not self.compute_capabilities or not all(isinstance(c, str) and _CAPABILITY.match(c)
                                                        for c in self.compute_capabilities):
                raise invalid("BuildConfig.compute_capabilities", list(self.compute_capabilities),
                              "compute capabilities such as 8.6 8.9 12.0", "name them as MAJOR.MINOR",
                              flag="--compute-capability")
        check_bool("BuildConfig.use_gpu", self.use_gpu, flag="--use-gpu")
        if self.use_gpu and self.compute_capabilities is not None:
            raise invalid("BuildConfig.use_gpu", True, "either --use-gpu or --compute-capability",
                          "drop one: --use-gpu builds for the local GPU and cannot be combined with "
                          "--compute-capability", flag="--use-gpu")
        if self.backend == "ort" and (self.use_gpu or self.compute_capabilities is not None):
            raise invalid("BuildConfig.backend", self.backend, "a TensorRT backend with --compute-capability/--use-gpu",
                          "--compute-capability and --use-gpu are TensorRT-RTX settings; drop them for --backend ort",
                          flag="--backend")

    @property
    def resolved_opt_batch(self) -> int:
        return self.opt_batch if self.opt_batch is not None else self.max_batch

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.compute_capabilities is not None:
            out["compute_capabilities"] = list(self.compute_capabilities)
        return out


def resolve_cfg(config: BuildConfig, num_classes: int, *, embeddings: bool = False) -> bool:
    """Whether the profile doubles the batch: by default exactly when the model is class-conditional or takes text
    ``embeddings`` (both sample with classifier-free guidance)."""
    guided = num_classes > 0 or embeddings
    if config.cfg is None:
        return guided
    if config.cfg and not guided:
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
        if not all(is_int(d) and d > 0 for d in rest):
            raise ConfigError(f"input {inp.get('name')!r} of unet.onnx has dynamic non-batch dimensions {dims}; only "
                              "the batch may vary")
        shapes[inp["name"]] = ((1, *rest), (opt_batch * k, *rest), (max_batch * k, *rest))
    return shapes


def default_engine_path(bundle_dir: Union[str, os.PathLike], backend: str) -> Path:
    """``BUNDLE/trt/unet.trt.plan`` or ``BUNDLE/ort/unet.ort.onnx``: one folder per engine, its engine.json inside."""
    return Path(bundle_dir) / DEFAULT_ENGINE[backend]


def _check_out(out: Path, backend: str) -> None:
    suffixes = (".onnx",) if backend == "ort" else ENGINE_SUFFIXES
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
                 out: Optional[Union[str, os.PathLike]] = None, *,
                 log: Optional[Callable[[str], None]] = None) -> tuple[Path, dict]:
    """Build the ``config.backend`` engine of the (hash-verified) bundle into ``out`` (default
    :func:`default_engine_path`); returns the engine path and its ``engine.json`` content. ``log`` receives one
    line naming the TensorRT library used."""
    library = None
    if config.backend != "ort":  # fail on a missing TensorRT / GPU before touching the bundle
        library = resolve_library(config)
        if log is not None:
            import importlib

            how = "forced by --backend trt-rtx" if config.backend == "trt-rtx" else "the TensorRT library installed"
            log(f"building with {library} {importlib.import_module(library).__version__} ({how})")
    bundle = open_bundle(bundle_dir)
    out = Path(out) if out is not None else default_engine_path(bundle.path, config.backend)
    _check_out(out, config.backend)
    cfg = resolve_cfg(config, bundle.num_classes, embeddings=bundle.cond_shape is not None)
    shapes = batch_profile(bundle.signature("unet"), opt_batch=config.resolved_opt_batch,
                           max_batch=config.max_batch, cfg=cfg)
    t0 = time.perf_counter()
    if library is None:
        env, report = _build_ort(bundle, config, out, shapes)
    else:
        env, report = _build_trt(bundle, config, out, shapes, library)
    settings = config.to_dict() | {"cfg": cfg, "seconds": round(time.perf_counter() - t0, 3)}
    card = make_card(backend="ort" if library is None else "trt", plan=out, plan_bytes=out.stat().st_size,
                     plan_sha256=sha256_file(out), bundle_path=bundle.path, bundle_sha256=bundle.sha256, env=env,
                     profile=profile_to_json(shapes), build=settings, report=report, versions=_versions())
    write_json_atomic(card_path(out), card)
    return out, card


def resolve_library(config: BuildConfig) -> str:
    """The TensorRT library a ``trt``/``trt-rtx`` build uses, checked against its settings (and the GPU it needs)."""
    from tdqrt.engines.trt import TENSORRT, TENSORRT_RTX, library_name, require_cuda, require_tensorrt

    library = library_name(require_tensorrt(TENSORRT_RTX if config.backend == "trt-rtx" else None))
    if library == TENSORRT and (config.use_gpu or config.compute_capabilities is not None):
        raise ConfigError("--compute-capability and --use-gpu are TensorRT-RTX settings; enterprise TensorRT builds "
                          "for the GPU it runs on — drop them, or build with --backend trt-rtx")
    if library == TENSORRT or config.use_gpu:
        require_cuda(library)
    return library


def _versions() -> dict:
    from importlib import metadata

    out = versions()
    for dist in ("polygraphy", "tensorrt", "tensorrt-rtx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------------------------------------------
# TensorRT (enterprise and RTX: one loader chain)


def _build_trt(bundle: Bundle, config: BuildConfig, out: Path, shapes: Shapes,
               library: str) -> tuple[RuntimeEnv, dict]:
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    from tdqrt.engines.trt import RTX_DEFAULT_CAPABILITIES, TENSORRT_RTX, require_tensorrt, tensorrt_env

    quiet_polygraphy_colors()
    trt = require_tensorrt(library)
    onnx_path = bundle.onnx_path("unet")
    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    pools = None if config.workspace_gb is None else {trt.MemoryPoolType.WORKSPACE: int(config.workspace_gb * 2**30)}
    cache = config.timing_cache
    cache_loaded = cache is not None and Path(cache).is_file()
    build_warnings = []
    if cache is not None and library == TENSORRT_RTX:
        build_warnings.append(f"--timing-cache: {library} {trt.__version__} loads and saves the file but ignores it "
                              "(timing-cache operations are no-ops in TensorRT-RTX since 1.2)")
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    settings = dict(profiles=[profile], memory_pool_limits=pools, builder_optimization_level=config.opt_level,
                    profiling_verbosity=trt.ProfilingVerbosity.DETAILED, load_timing_cache=cache)
    if library == TENSORRT_RTX:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        targets = None if config.compute_capabilities is None else \
            [tuple(int(v) for v in c.split(".")) for c in config.compute_capabilities]
        _check_rtx_targets(trt, config.compute_capabilities or ())
        create_config = CreateConfigRTX(use_gpu=config.use_gpu, compute_capabilities=targets, **settings)
        env = tensorrt_env(library=library) if config.use_gpu else RuntimeEnv(library, trt.__version__)
        env = RuntimeEnv(env.name, env.version, env.gpu, env.compute_capability,
                         (env.compute_capability,) if config.use_gpu else
                         config.compute_capabilities or RTX_DEFAULT_CAPABILITIES)
    else:
        create_config = CreateConfig(**settings)
        env = tensorrt_env(library=library)
    parsed, parser_warnings = parse_onnx(onnx_path, library, lint_hint=f"`tdqrt lint {bundle.path}`")
    network = network_summary(parsed[1]) | {"parser_warnings": parser_warnings}
    try:
        plan = EngineBytesFromNetwork(parsed, config=create_config, save_timing_cache=cache)()
    except PolygraphyException as exc:
        raise ArtifactError(f"{library} could not build an engine from {onnx_path}: {str(exc)[:600]}; check the "
                            f"graph with `tdqrt lint {bundle.path}`") from exc
    data = bytes(memoryview(plan))
    write_bytes_atomic(out, data)
    head = {"format": "tdqrt-layer-report", "version": 1, "engine": out.name,
            "sha256": hashlib.sha256(data).hexdigest(), "library": library, "plan_bytes": len(data),
            "network": network}
    if _can_load(env):
        report = parse_engine_information(engine_information(data, shapes))
        write_json_atomic(out.parent / LAYERS_FILE, head | report.to_dict())
        summary = report.summary()
    else:
        why = (f"the per-layer precision report needs a GPU that can load the plan, and there is none here "
               f"({env.name} plans run on {_gpu_classes(env.name)})")
        write_json_atomic(out.parent / LAYERS_FILE, head | {"per_layer_precision": None, "needs_gpu": why})
        summary = {"layers": network["layers"], "warnings": [], "needs_gpu": why}
    summary["warnings"] = build_warnings + summary["warnings"]
    summary |= {"network": {k: network[k] for k in ("layers", "quantize", "dequantize", "quantized_conv",
                                                     "quantized_matmul")},
                "parser_warnings": len(parser_warnings), "plan_bytes": len(data),
                "timing_cache": None if cache is None else {"path": str(cache), "loaded": cache_loaded}}
    return env, summary


def parse_onnx(onnx_path: Union[str, os.PathLike], library: str, *, lint_hint: str = "`tdqrt lint`") -> tuple:
    """``(builder, network, parser)`` of ``onnx_path`` parsed by ``library``'s ONNX parser through Polygraphy's
    ``NetworkFromOnnxPath`` (strongly typed), and the parser's warnings. A graph the parser rejects is one
    :class:`ArtifactError` quoting its first error (which names the node)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    from tdqrt.engines.trt import require_tensorrt

    require_tensorrt(library)
    # Polygraphy prints its own "[!] Could not parse" line to stderr; the ArtifactError below says it in one line
    with _polygraphy_log() as log_lines, contextlib.redirect_stderr(io.StringIO()):
        try:
            parsed = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
        except PolygraphyException as exc:
            errors = [ln[4:] for ln in log_lines() if ln.startswith("[E]")]
            # the parser's own error records read "In node N with name: X and operator: Y (...): ..."
            named = [e for e in errors if e.startswith("In node")] or errors[-1:] or [str(exc)]
            raise ArtifactError(f"{library}'s ONNX parser rejected {onnx_path}: {named[0][:600]}; check the graph "
                                f"with {lint_hint}") from exc
        return parsed, [ln[4:] for ln in log_lines() if ln.startswith("[W]")]


def _gpu_classes(library: str) -> str:
    from tdqrt.engines.trt import GPU_CLASSES

    return GPU_CLASSES[library]


def _can_load(env: RuntimeEnv) -> bool:
    """Whether this machine can deserialize the plan just built for ``env`` (a GPU of a targeted capability)."""
    if not torch.cuda.is_available():
        return False
    if env.compute_capabilities is None:
        return True
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" in env.compute_capabilities


def _check_rtx_targets(trt, capabilities: tuple[str, ...]) -> None:
    known = sorted(n[2:] for n in dir(trt.ComputeCapability) if re.fullmatch(r"SM[0-9]+", n))
    for c in capabilities:
        if not hasattr(trt.ComputeCapability, "SM" + c.replace(".", "")):
            pretty = ", ".join(f"{k[:-1]}.{k[-1]}" for k in known)
            raise ConfigError(f"--compute-capability {c}: TensorRT-RTX {trt.__version__} builds for {pretty}")


@contextlib.contextmanager
def _polygraphy_log() -> Iterator[Callable[[], list[str]]]:
    """Collect the lines Polygraphy's logger writes (TensorRT's parser warnings and errors reach it through
    Polygraphy's TensorRT logger) while the block runs; yields a function returning them so far.

    Polygraphy logs each TensorRT warning once per process (``LogMode.ONCE``); the set of seen messages is emptied
    for the block and merged back afterwards, so a second build in one process reports its warnings too."""
    from polygraphy.logger import G_LOGGER

    seen, previous = G_LOGGER.once_logged, (G_LOGGER._log_path, G_LOGGER._log_file)
    G_LOGGER.once_logged = set()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "polygraphy.log"
        G_LOGGER.log_file = str(path)  # the public setter opens the file; restoring goes around it (it truncates)
        try:
            yield lambda: [ln for ln in path.read_text().splitlines() if ln.strip()]
        finally:
            G_LOGGER._log_file.close()
            G_LOGGER._log_path, G_LOGGER._log_file = previous
            G_LOGGER.once_logged = seen | G_LOGGER.once_logged


def network_summary(network) -> dict:
    """What the parsed TensorRT network holds, known without a GPU: layer-type counts, Q/DQ layers, and the
    Conv/MatMul layers both of whose first two inputs come from a DequantizeLinear — directly or through the
    SHUFFLE layers the parser inserts for MatMul broadcasting (the INT8 candidates)."""
    producer = {}
    types = Counter()
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    for layer in layers:
        types[layer.type.name] += 1
        for k in range(layer.num_outputs):
            producer[layer.get_output(k).name] = layer

    def from_dequantize(tensor) -> bool:
        layer = producer.get(tensor.name) if tensor is not None else None
        while layer is not None and layer.type.name == "SHUFFLE" and layer.get_input(0) is not None:
            layer = producer.get(layer.get_input(0).name)
        return layer is not None and layer.type.name == "DEQUANTIZE"

    def quantized(layer) -> bool:
        return layer.num_inputs >= 2 and all(from_dequantize(layer.get_input(k)) for k in range(2))

    conv = sum(1 for la in layers if la.type.name == "CONVOLUTION" and quantized(la))
    matmul = sum(1 for la in layers if la.type.name == "MATRIX_MULTIPLY" and quantized(la))
    return {"layers": len(layers), "layer_types": dict(sorted(types.items())), "quantize": types["QUANTIZE"],
            "dequantize": types["DEQUANTIZE"], "quantized_conv": conv, "quantized_matmul": matmul}


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
    report = ort_graph_report(out, bundle.manifest.get("export", {}).get("target", "trt")) | {"smoke": smoke}
    return RuntimeEnv("onnxruntime", ort.__version__), report


def _smoke_run(denoiser, batch: int, repeats: int = 3) -> dict:
    """Run ``denoiser`` on fixed random inputs of ``batch`` images: ε must be finite and of x's shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, denoiser.in_channels, denoiser.image_size, denoiser.image_size, generator=g)
    t = torch.linspace(0, (denoiser.num_train_timesteps or 1000) - 1, batch).round().long()
    if denoiser.cond_shape is not None:
        y = torch.randn(batch, *denoiser.cond_shape, generator=g)
    else:
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


def ort_graph_report(path: Union[str, os.PathLike], target: str = "trt") -> dict:
    """Op counts of an ONNX Runtime optimized graph: fused integer kernels and the Q/DQ nodes left unfused, with
    warnings that say what that means for a bundle of export flavour ``target`` (``trt`` / ``ort-cpu``)."""
    import onnx

    counts = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    int8 = {op: n for op, n in sorted(counts.items()) if op.startswith("QLinear") or op in _ORT_INT8_OPS}
    q, dq = counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0)
    fused = ", ".join(f"{n} {op}" for op, n in int8.items()) or "no integer kernel"
    warnings = []
    if target == "ort-cpu":
        if q or dq:
            warnings.append(f"ort-cpu bundle: ONNX Runtime fused {fused} and left {q} QuantizeLinear / {dq} "
                            "DequantizeLinear nodes unfused, which run as float Q/DQ math")
        if not int8:
            warnings.append("ort-cpu bundle: ONNX Runtime fused no QLinearConv; this engine runs the Q/DQ graph in "
                            "float — re-export it with `tdqrt export --target ort-cpu` and check it with `tdqrt lint`")
    elif q or dq:
        warnings.append(f"trt-flavour bundle: its convolutions stay float in ONNX Runtime ({q} QuantizeLinear / {dq} "
                        f"DequantizeLinear nodes unfused; fused: {fused}) — the TensorRT graph puts no Q after a Conv, "
                        "which ONNX Runtime's CPU QLinearConv fusion needs; for integer kernels on the CPU export "
                        "with `tdqrt export --target ort-cpu` (README, \"The ort-cpu flavour\")")
    return {"op_counts": dict(sorted(counts.items())), "int8_ops": int8, "quantize_linear": q,
            "dequantize_linear": dq, "warnings": warnings}
