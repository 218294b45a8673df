"""TensorRT backend: a :class:`~tdqrt.engines.denoiser.Denoiser` over a plan built by ``tdqrt build``, with either
TensorRT library.

Two libraries have the TensorRT builder/runtime API, and Polygraphy drives both:

* ``tensorrt`` (enterprise TensorRT, ``pip install 'tdqrt[trt]'``): data-centre and workstation GPUs; a plan is
  built on the GPU it will run on and only runs on that GPU model and TensorRT version.
* ``tensorrt_rtx`` (TensorRT for RTX, ``pip install 'tdqrt[trt-rtx]'``, real wheels on PyPI): RTX GPUs (compute
  capability 7.5, 8.6, 8.9, 12.0); its ahead-of-time build needs no GPU, so a plan can be built anywhere (CI) for
  target compute capabilities, and a just-in-time step on the GPU finishes it when it is loaded. Deserializing or
  running a plan needs one of those GPUs.

:func:`require_tensorrt` imports one of them and points Polygraphy's TensorRT modules at it
(``polygraphy.config.USE_TENSORRT_RTX``, which ``polygraphy.mod.trt_importer`` reads when those modules are first
imported — so the choice is made once per process, before they import, and a later request for the other library
is refused instead of silently building with the wrong one).

Loading refuses, before TensorRT sees the file, a plan whose ``engine.json`` is missing or corrupt, whose bytes
differ from what the card records (truncated, replaced), that was built by another TensorRT library or version, for
another GPU (enterprise) or for compute capabilities this GPU does not have (RTX), or from another bundle
(:func:`tdqrt.engines.engine_card.check_card`); every message names the ``tdqrt build`` command that rebuilds it.

I/O: torch owns the memory and the stream (no pycuda / cuda-python). Inputs are bound by ``data_ptr()`` with
``IExecutionContext.set_tensor_address`` — without a copy when they already are contiguous CUDA tensors of the
engine's dtype — and the engine runs with ``execute_async_v3`` on torch's current stream, so it is ordered with the
surrounding torch work without extra synchronisation (TensorRT logs a warning and adds a sync when that stream is
the legacy default stream; the sampling loop synchronises every step anyway when it checks ε for NaN). Output
buffers are allocated once per batch size and reused; each call returns a fresh float32 copy on ``x``'s device,
because the next call overwrites the buffer.

``cuda_graph=True`` captures ``execute_async_v3`` in a ``torch.cuda.CUDAGraph`` after one warm-up run (the
demoDiffusion pattern): a graph replays fixed addresses and shapes, so inputs are copied into static buffers and
the graph is re-captured when the batch size changes (in sampling: once, for a smaller last batch).

TensorRT-RTX compiles its kernels for the GPU when the execution context is created (the JIT step); the compiled
kernels are kept in a runtime cache (``IRuntimeConfig`` / ``IRuntimeCache``) saved beside the plan as
``<plan>.runtime_cache`` and loaded on the next start, which TensorRT-RTX validates against the GPU, driver and
library version (a mismatching cache is ignored and rewritten).

Neither library is imported at module import.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tdqrt.engines.artifacts import write_bytes_atomic
from tdqrt.engines.bundle import Bundle, open_bundle
from tdqrt.engines.denoiser import COND_INPUTS, prepare_inputs
from tdqrt.engines.engine_card import RuntimeEnv, check_card, read_card, rebuild_command
from tdqrt.engines.errors import ArtifactError, DataError, DependencyError

TENSORRT, TENSORRT_RTX = "tensorrt", "tensorrt_rtx"
LIBRARIES = (TENSORRT, TENSORRT_RTX)  # auto-detection order
INSTALL = {TENSORRT: "pip install 'tdqrt[trt]'", TENSORRT_RTX: "pip install 'tdqrt[trt-rtx]'"}
# Where each library's plans run (TensorRT and TensorRT-RTX support matrices, docs.nvidia.com/deeplearning).
GPU_CLASSES = {TENSORRT: "NVIDIA data-centre/workstation GPUs (the GPU model the plan was built on)",
               TENSORRT_RTX: "NVIDIA RTX GPUs of compute capability 7.5, 8.6, 8.9 or 12.0 (Turing, Ampere, Ada, "
                             "Blackwell RTX)"}
# "Engines built with TensorRT-RTX are by default portable across devices with compute capabilities 8.6, 8.9, and
# 12.0" (TensorRT-RTX support matrix); Turing (7.5) only when named.
RTX_DEFAULT_CAPABILITIES = ("8.6", "8.9", "12.0")
RUNTIME_CACHE_SUFFIX = ".runtime_cache"
_TRT_LOGGER: dict[str, Any] = {}


def _polygraphy_library() -> Optional[str]:
    """The library Polygraphy's TensorRT loaders were bound to when they were imported (None: not imported yet)."""
    loader = sys.modules.get("polygraphy.backend.trt.loader")
    if loader is None:
        return None
    from polygraphy import config

    return TENSORRT_RTX if config.USE_TENSORRT_RTX else TENSORRT


def require_tensorrt(library: Optional[str] = None, *, instead: str = "or build with --backend ort"):
    """Import TensorRT — ``library`` (``"tensorrt"`` / ``"tensorrt_rtx"``), or None: the one Polygraphy already
    uses in this process, else the first of :data:`LIBRARIES` that imports — and point Polygraphy's TensorRT
    loaders at it. A missing library, or one other than Polygraphy was already bound to, is a
    :class:`DependencyError` that says what to do (``instead``: the way around it of the command at hand)."""
    bound = _polygraphy_library()
    if library is not None and library not in LIBRARIES:
        raise DependencyError(f"unknown TensorRT library {library!r}: use one of {', '.join(LIBRARIES)}")
    wanted = [library] if library is not None else [bound] if bound is not None else list(LIBRARIES)
    errors = []
    for name in wanted:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install (libnvinfer missing: OSError)
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if bound is not None and bound != name:
            raise DependencyError(f"this process already set up Polygraphy's TensorRT loaders for {bound}; "
                                  f"{name} can only be used in a fresh process (run the command again)")
        if bound is None:
            from polygraphy import config

            config.USE_TENSORRT_RTX = name == TENSORRT_RTX  # read when polygraphy.backend.trt first imports
        return module
    which = " or ".join(wanted)
    raise DependencyError(
        f"TensorRT is not importable ({'; '.join(errors)}); install {which} — enterprise TensorRT for data-centre "
        f"GPUs: `{INSTALL[TENSORRT]}` (wheels from NVIDIA's package index, build on the target GPU), TensorRT-RTX "
        f"for RTX GPUs, builds without a GPU: `{INSTALL[TENSORRT_RTX]}` — {instead}")


def library_name(trt) -> str:
    """``"tensorrt"`` or ``"tensorrt_rtx"``: the library of the imported module ``trt``."""
    return trt.__name__.split(".")[0]


def require_cuda(library: str = TENSORRT) -> torch.device:
    if not torch.cuda.is_available():
        raise DependencyError(f"{library} plans run on {GPU_CLASSES[library]} and torch sees no CUDA GPU here "
                              "(torch.cuda.is_available() is False); run on such a machine with a CUDA build of torch")
    return torch.device("cuda", torch.cuda.current_device())


def trt_logger():
    """The process-wide logger (warnings and errors) of the TensorRT library in use."""
    trt = require_tensorrt()
    name = library_name(trt)
    if name not in _TRT_LOGGER:
        _TRT_LOGGER[name] = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER[name]


def tensorrt_env(device: Optional[torch.device] = None, library: Optional[str] = None) -> RuntimeEnv:
    """The running TensorRT library, its version and the GPU of ``device`` (default: torch's current CUDA
    device)."""
    trt = require_tensorrt(library)
    name = library_name(trt)
    device = device or require_cuda(name)
    major, minor = torch.cuda.get_device_capability(device)
    return RuntimeEnv(name, trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def require_plan_runtime(card: dict, plan: Union[str, os.PathLike]) -> torch.device:
    """The CUDA device to run the plan described by ``card`` on, or one clear :class:`DependencyError` saying which
    library and GPU class it needs."""
    library = (card.get("runtime") or {}).get("name", TENSORRT)
    if library not in LIBRARIES:
        raise ArtifactError(f"engine {plan} was built by {library!r}, not a TensorRT library; rebuild it with "
                            f"`{rebuild_command(card, plan)}`")
    instead = "or pass the bundle directory without --engine (ONNX Runtime on the CPU)"
    require_tensorrt(library, instead=instead)
    if not torch.cuda.is_available():
        raise DependencyError(f"engine {plan} is a {library} plan: it runs on {GPU_CLASSES[library]}, and torch sees "
                              f"no CUDA GPU here; run it on such a GPU, {instead}")
    return torch.device("cuda", torch.cuda.current_device())


def read_verified_plan(plan: Union[str, os.PathLike], *, bundle_sha256: Optional[str] = None,
                       env: Optional[RuntimeEnv] = None) -> tuple[bytes, dict]:
    """The plan's bytes and its ``engine.json``, checked against ``env`` (default: this machine's TensorRT library
    of the plan's kind and GPU — refused with one line when there is none) and, when given, the sha256 of the bundle
    it must have been built from."""
    plan = Path(plan)
    card = read_card(plan)
    if env is None:
        device = require_plan_runtime(card, plan)
        env = tensorrt_env(device, card["runtime"].get("name"))
    data = plan.read_bytes()
    check_card(card, plan_name=plan.name, plan_bytes=len(data), plan_sha256=hashlib.sha256(data).hexdigest(),
               env=env, bundle_sha256=bundle_sha256, plan_path=plan)
    return data, card


def runtime_cache_path(plan: Union[str, os.PathLike]) -> Path:
    """Where a TensorRT-RTX plan's runtime cache (its JIT-compiled kernels) is kept: beside the plan."""
    plan = Path(plan)
    return plan.with_name(plan.name + RUNTIME_CACHE_SUFFIX)


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    from polygraphy.datatype import DataType

    dtype = DataType.to_dtype(DataType.from_dtype(trt_dtype, "tensorrt"), "torch")
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"the engine has an I/O tensor of TensorRT type {trt_dtype} that torch cannot hold")
    return dtype


def _engine_bundle(bundle: Union[Bundle, str, os.PathLike, None], card: dict, plan: Path) -> Bundle:
    if isinstance(bundle, Bundle):
        return bundle
    path = Path(bundle if bundle is not None else card["bundle"]["path"])
    if not path.is_dir():
        raise ArtifactError(f"the bundle {path} that engine {plan} was built from does not exist; pass the bundle "
                            "with --model BUNDLE (or bundle=...)")
    # The engine holds the weights; only the manifest (model description, schedule) is read, and its sha256 is
    # what check_card compares, so the ONNX files need not be re-hashed here.
    return open_bundle(path, verify=False)


class TrtDenoiser:
    """``eps = denoiser(x, t, y)`` with a TensorRT engine.

    ``plan``: the engine file written by ``tdqrt build`` (with its ``engine.json``). ``bundle``: the bundle it was
    built from (a :class:`Bundle` or directory; default: the path recorded in ``engine.json``) — it supplies
    ``num_classes``, ``null_label``, ``image_size``, ``in_channels`` and the schedule, and must be the bundle the
    engine was built from. ``cuda_graph``: replay a captured CUDA graph instead of enqueueing every call.
    """

    def __init__(self, plan: Union[str, os.PathLike], bundle: Union[Bundle, str, os.PathLike, None] = None, *,
                 cuda_graph: bool = False) -> None:
        self.path = Path(plan)
        card = read_card(self.path)
        self.device = require_plan_runtime(card, self.path)
        self.library = card["runtime"]["name"]
        trt = require_tensorrt(self.library)
        self.bundle = _engine_bundle(bundle, card, self.path)
        data, self.card = read_verified_plan(self.path, bundle_sha256=self.bundle.sha256,
                                             env=tensorrt_env(self.device, self.library))
        self._rebuild = rebuild_command(self.card, self.path)
        self._runtime = trt.Runtime(trt_logger())
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError(f"{self.library} could not deserialize {self.path} (its log above says why); rebuild "
                                f"it with `{self._rebuild}`")
        self.runtime_cache: Optional[Path] = None
        if self.library == TENSORRT_RTX:
            self.context = self._rtx_context()
        else:
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if "sample" not in self.inputs or "timestep" not in self.inputs or len(outputs) != 1:
            raise ArtifactError(f"{self.path} does not have the tdqrt signature (sample, timestep[, conditioning]) -> "
                                f"eps; its inputs are {self.inputs}, outputs {outputs}")
        self.output_name = outputs[0]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.cond_input = next((n for n in COND_INPUTS if n in self.inputs), None)
        self.conditional = self.cond_input is not None
        low, _, high = self.engine.get_tensor_profile_shape("sample", 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        b = self.bundle
        self.num_classes, self.null_label = b.num_classes, b.null_label
        self.image_size, self.in_channels = b.image_size, b.in_channels
        self.cond_shape = b.cond_shape
        self.min_timestep = b.min_timestep
        self.num_train_timesteps = int(b.schedule.get("num_train_timesteps", 0)) or None
        self.cuda_graph = bool(cuda_graph)
        self._shape_batch: Optional[int] = None  # batch size whose input shapes are set on the context
        self._outputs: dict[int, torch.Tensor] = {}
        self._graph: Optional[tuple[int, Any, dict[str, torch.Tensor], torch.Tensor]] = None

    def __repr__(self) -> str:
        return (f"TrtDenoiser({str(self.path)!r}, batch {self.min_batch}..{self.max_batch}, "
                f"cuda_graph={self.cuda_graph})")

    def _rtx_context(self):
        """An execution context whose JIT step uses (and fills) the runtime cache beside the plan."""
        self.runtime_cache = runtime_cache_path(self.path)
        config = self.engine.create_runtime_config()
        cache = config.create_runtime_cache()
        if self.runtime_cache.is_file():
            cache.deserialize(self.runtime_cache.read_bytes())  # False (ignored) when built for another GPU/driver
        config.set_runtime_cache(cache)
        context = self.engine.create_execution_context(config)
        self._cache, self._runtime_config = cache, config  # the context uses both; keep them alive with it
        self.save_runtime_cache()
        return context

    def save_runtime_cache(self) -> None:
        """Write the TensorRT-RTX runtime cache (kernels compiled so far) beside the plan; no-op for enterprise
        TensorRT."""
        if self.runtime_cache is not None:
            write_bytes_atomic(self.runtime_cache, bytes(memoryview(self._cache.serialize())))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t, y = prepare_inputs(x, t, y, in_channels=self.in_channels, image_size=self.image_size,
                              num_train_timesteps=self.num_train_timesteps, conditional=self.conditional,
                              null_label=self.null_label, cond_shape=self.cond_shape,
                              min_timestep=self.min_timestep)
        batch = x.shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise DataError(f"batch {batch} is outside the engine's profile [{self.min_batch}, {self.max_batch}] "
                            f"(classifier-free guidance doubles the batch); sample with a smaller --batch or rebuild "
                            f"with a larger --max-batch: `{self._rebuild}`")
        feeds = {"sample": x, "timestep": t} | ({self.cond_input: y} if self.conditional else {})
        feeds = {name: v.to(device=self.device, dtype=self.dtypes[name]).contiguous() for name, v in feeds.items()}
        out = self._replay(feeds, batch) if self.cuda_graph else self._enqueue(feeds, batch)
        return out.to(device=x.device, dtype=torch.float32, copy=True)

    # -- execution ---------------------------------------------------------------------------------------------
    def _output_for(self, feeds: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Set the input shapes (when the batch size changed) and return the output buffer of this batch size."""
        if batch != self._shape_batch:
            for name, v in feeds.items():
                if not self.context.set_input_shape(name, tuple(v.shape)):
                    raise DataError(f"TensorRT refused the shape {tuple(v.shape)} for input {name!r} of {self.path}")
            self._shape_batch = batch
        out = self._outputs.get(batch)
        if out is None:
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = self._outputs[batch] = torch.empty(shape, dtype=self.dtypes[self.output_name], device=self.device)
        return out

    def _bind(self, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        for name, v in list(feeds.items()) + [(self.output_name, out)]:
            if not self.context.set_tensor_address(name, v.data_ptr()):
                raise ArtifactError(f"TensorRT refused the buffer for tensor {name!r} of {self.path}")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise ArtifactError(f"TensorRT execute_async_v3 failed for {self.path} (its log above says why)")

    def _enqueue(self, feeds: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        new_shape = batch not in self._outputs
        out = self._output_for(feeds, batch)
        self._bind(feeds, out)
        self._execute()
        if new_shape:  # TensorRT-RTX may have compiled kernels for this shape while enqueueing
            self.save_runtime_cache()
        return out

    def _replay(self, feeds: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        if self._graph is None or self._graph[0] != batch:
            self._graph = None  # release the old graph before capturing the new one
            static = {name: v.clone() for name, v in feeds.items()}
            out = self._enqueue(static, batch)  # warm-up: TensorRT's shape-dependent setup happens outside the capture
            torch.cuda.current_stream(self.device).synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # captures on torch's side stream, which is current inside the block
                self._execute()
            self._graph = (batch, graph, static, out)
        _, graph, static, out = self._graph
        for name, v in feeds.items():
            static[name].copy_(v)
        graph.replay()
        return out
