"""TensorRT backend: a :class:`~tdqrt.engines.denoiser.Denoiser` over a plan built by ``tdqrt build``.

Loading refuses, before TensorRT sees the file, a plan whose ``engine.json`` is missing or corrupt, whose bytes
differ from what the card records (truncated, replaced), that was built by another TensorRT version or for another
GPU, or from another bundle (:func:`tdqrt.engines.engine_card.check_card`); every message names the
``tdqrt build`` command that rebuilds it.

I/O: torch owns the memory and the stream (no pycuda / cuda-python). Inputs are bound by ``data_ptr()`` with
``IExecutionContext.set_tensor_address`` — without a copy when they already are contiguous CUDA tensors of the
engine's dtype — and the engine runs with ``execute_async_v3`` on torch's current stream, so it is ordered with the
surrounding torch work without extra synchronisation (TensorRT logs a warning and adds a sync when that stream is
the legacy default stream; the sampling loop synchronises every step anyway when it checks ε for NaN). Output
buffers are allocated once per batch size and reused; each call returns a fresh float32 copy on ``x``'s device,
because the next call overwrites the buffer.

``cuda_graph=True`` captures ``execute_async_v3`` in a ``torch.cuda.CUDAGraph`` after one warm-up run (the
demoDiffusion pattern, notes/tensorrt-qdq.md §3.3): a graph replays fixed addresses and shapes, so inputs are
copied into static buffers and the graph is re-captured when the batch size changes (in sampling: once, for a
smaller last batch).

``tensorrt`` is imported when a denoiser is created, never at module import.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tdqrt.engines.bundle import Bundle, open_bundle
from tdqrt.engines.denoiser import prepare_inputs
from tdqrt.engines.engine_card import RuntimeEnv, check_card, read_card, rebuild_command
from tdqrt.engines.errors import ArtifactError, DataError, DependencyError

TRT_INSTALL = "pip install 'tdqrt[trt]'"
_TRT_LOGGER = None


def require_tensorrt():
    """``import tensorrt``, or a :class:`DependencyError` that says how to install it."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install (libnvinfer missing: OSError)
        raise DependencyError(
            f"TensorRT is not importable ({type(exc).__name__}: {str(exc)[:200]}); install the `trt` extra with "
            f"`{TRT_INSTALL}` (the tensorrt wheels come from NVIDIA's package index) on a machine with an NVIDIA GPU, "
            "or use --backend ort") from exc
    return trt


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise DependencyError("TensorRT needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); run "
                              "on a GPU machine with a CUDA build of torch, or use --backend ort")
    return torch.device("cuda", torch.cuda.current_device())


def trt_logger():
    """The process-wide TensorRT logger (warnings and errors)."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        trt = require_tensorrt()
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def tensorrt_env(device: Optional[torch.device] = None) -> RuntimeEnv:
    """The running TensorRT version and the GPU of ``device`` (default: torch's current CUDA device)."""
    trt = require_tensorrt()
    device = device or require_cuda()
    major, minor = torch.cuda.get_device_capability(device)
    return RuntimeEnv("tensorrt", trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def read_verified_plan(plan: Union[str, os.PathLike], *, bundle_sha256: Optional[str] = None,
                       env: Optional[RuntimeEnv] = None) -> tuple[bytes, dict]:
    """The plan's bytes and its ``engine.json``, checked against ``env`` (default: this machine's TensorRT and GPU)
    and, when given, the sha256 of the bundle it must have been built from."""
    plan = Path(plan)
    card = read_card(plan)
    data = plan.read_bytes()
    check_card(card, plan_name=plan.name, plan_bytes=len(data), plan_sha256=hashlib.sha256(data).hexdigest(),
               env=env or tensorrt_env(), bundle_sha256=bundle_sha256, plan_path=plan)
    return data, card


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
        trt = require_tensorrt()
        self.device = require_cuda()
        self.path = Path(plan)
        self.bundle = _engine_bundle(bundle, read_card(self.path), self.path)
        data, self.card = read_verified_plan(self.path, bundle_sha256=self.bundle.sha256,
                                             env=tensorrt_env(self.device))
        self._rebuild = rebuild_command(self.card, self.path)
        self._runtime = trt.Runtime(trt_logger())
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {self.path} (its log above says why); rebuild it with "
                                f"`{self._rebuild}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if "sample" not in self.inputs or "timestep" not in self.inputs or len(outputs) != 1:
            raise ArtifactError(f"{self.path} does not have the tdqrt signature (sample, timestep[, class_labels]) -> "
                                f"eps; its inputs are {self.inputs}, outputs {outputs}")
        self.output_name = outputs[0]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.conditional = "class_labels" in self.inputs
        low, _, high = self.engine.get_tensor_profile_shape("sample", 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        b = self.bundle
        self.num_classes, self.null_label = b.num_classes, b.null_label
        self.image_size, self.in_channels = b.image_size, b.in_channels
        self.num_train_timesteps = int(b.schedule.get("num_train_timesteps", 0)) or None
        self.cuda_graph = bool(cuda_graph)
        self._shape_batch: Optional[int] = None  # batch size whose input shapes are set on the context
        self._outputs: dict[int, torch.Tensor] = {}
        self._graph: Optional[tuple[int, Any, dict[str, torch.Tensor], torch.Tensor]] = None

    def __repr__(self) -> str:
        return (f"TrtDenoiser({str(self.path)!r}, batch {self.min_batch}..{self.max_batch}, "
                f"cuda_graph={self.cuda_graph})")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t, y = prepare_inputs(x, t, y, in_channels=self.in_channels, image_size=self.image_size,
                              num_train_timesteps=self.num_train_timesteps, conditional=self.conditional,
                              null_label=self.null_label)
        batch = x.shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise DataError(f"batch {batch} is outside the engine's profile [{self.min_batch}, {self.max_batch}] "
                            f"(classifier-free guidance doubles the batch); sample with a smaller --batch or rebuild "
                            f"with a larger --max-batch: `{self._rebuild}`")
        feeds = {"sample": x, "timestep": t} | ({"class_labels": y} if self.conditional else {})
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
        out = self._output_for(feeds, batch)
        self._bind(feeds, out)
        self._execute()
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
