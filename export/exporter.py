"""Quantized (or FP) torch UNet -> ONNX with the FP model's signature
``(sample, timestep[, class_labels | encoder_hidden_states]) -> eps``.

* :class:`ExportConfig` — target flavour (:data:`tdqrt.export.lint.FLAVOURS`: ``trt`` for TensorRT, ``ort-cpu``
  for ONNX Runtime's x86 CPU provider), dtype (``fp32`` / ``fp16``; ``ort-cpu``: fp32 only), opset (17 default, 19
  for fp16 so Q/DQ scales can be fp16), how the per-timestep ratio enters (``div``: bit-exact codes, default;
  ``mul``: the ``Mul(r_t)`` form), external-data threshold, and for ``ort-cpu`` how many calibration inputs set
  the output grids.
* :func:`export_quantized` / :func:`export_fp` trace the export modules of :mod:`tdqrt.export.qdq` with the
  TorchScript exporter (``dynamo=False``), then tidy the graph: initializer aliases (``Identity`` of an
  initializer, left by torch's initializer de-duplication) are inlined, and the nodes of every quantized layer are
  named ``<layer>/act_quantize``, ``<layer>/conv``, ``<layer>/output_quantize`` … so lint findings and debug
  outputs point at layers.
* :func:`save_onnx` writes a model, with its tensors in ``<name>.data`` beside it when the model is larger than the
  threshold (protobuf cannot hold more than 2 GiB).
* :func:`with_debug_outputs` adds every quantized layer's input, activation codes (int8, or uint8 for ort-cpu) and
  output as graph outputs (used by the tests and by ``tdqrt validate`` to compare codes with the torch model).

Batch is dynamic (``batch`` on every input and the output); the image size is fixed. ``timestep`` and
``class_labels`` are int64 ``[B]``; a text-conditioned UNet (``cond_shape`` ``(L, D)``) takes
``encoder_hidden_states`` ``[B, L, D]`` (float, fixed L and D) instead; ``sample`` and ``eps`` are float32, or float16 for ``--dtype fp16`` (the whole
graph is then FP16: float initializers, Q/DQ scales, I/O — what strongly typed TensorRT needs).

The ``ort-cpu`` flavour is the same graph with two changes (ONNX Runtime's quantization guide,
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html): activation Q/DQ in uint8 with zero
point 128 — ``q_u8 = q_s8 + 128`` is the torch model's signed grid, so the input codes stay exact, ratio trick
included — and a uint8 Q/DQ right after every quantized Conv/MatMul (before the ratio's ``Mul`` and the bias
``Add``), the node unit ONNX Runtime fuses into QLinearConv / QLinearMatMul. That output quantization is an
approximation the torch model does not have. Its grids come from the calibration set
(:func:`tdqrt.export.qdq.calibrate_output_grids`): the min/max of each conv's output, which measured better than
percentile ranges or a symmetric zero point. What it costs in ε error and what it gains in speed is measured in the
README ("The ort-cpu flavour") and docs/results.md; without the output Q, ONNX Runtime keeps the TensorRT graph's
convs in float, so that graph runs slower than FP32 there.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.calibration.quant.qmodel import QuantizedModel
from tdqrt.engines.denoiser import EMBEDDINGS_INPUT, LABELS_INPUT
from tdqrt.engines.config import check_choice, check_int, check_real, config_from_dict, invalid
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.export.lint import MAX_IR_VERSION, WEIGHTED_OPS, get_flavour
from tdqrt.export.qdq import (RATIO_OPS, ExportUNet, QDQPlan, build_fp_module, build_qdq_module,
                              calibrate_output_grids)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUT_NAMES = ("sample", "timestep", LABELS_INPUT)
OUTPUT_NAME = "eps"
RATIO_TABLES = ("scale_ratio_table", "ratio_table")
METADATA_PREFIX = "tdqrt."


@dataclass(frozen=True)
class ExportConfig:
    """How to export. ``opset=None`` picks the target's default (17), or 19 for ``dtype="fp16"``.

    ``calib_samples``: calibration inputs (spread over the set with a fixed seed) whose weighted-op outputs set the
    output grids of a flavour that quantizes outputs (``ort-cpu``); 512 pairs see every kept timestep many times
    and take seconds on the small model.
    """

    target: str = "trt"
    dtype: str = "fp32"
    opset: Optional[int] = None
    ratio_op: str = "div"
    external_data_mb: float = 1024.0
    lint: bool = True
    polygraphy: bool = True
    fp_reference: bool = True
    trace_batch: int = 2
    calib_samples: int = 512

    def __post_init__(self) -> None:
        flavour = get_flavour(self.target)
        check_choice("ExportConfig.dtype", self.dtype, sorted(DTYPES), flag="--dtype")
        if self.dtype not in flavour.dtypes:
            raise invalid("ExportConfig.dtype", self.dtype, f"{' or '.join(flavour.dtypes)} for target {self.target}",
                          f"drop --dtype ({flavour.backend} needs float32 Q/DQ scales to fuse)", flag="--dtype")
        check_choice("ExportConfig.ratio_op", self.ratio_op, RATIO_OPS, flag="--ratio-op")
        if self.opset is not None:
            low = flavour.fp16_min_opset if self.dtype == "fp16" else flavour.min_opset
            why = " (fp16 Q/DQ scales need QuantizeLinear-19)" if self.dtype == "fp16" else ""
            check_int("ExportConfig.opset", self.opset, low, flavour.max_opset, flag="--opset",
                      fix=f"pick an opset in [{low}, {flavour.max_opset}] for target {self.target} with dtype "
                          f"{self.dtype}{why}, or leave it unset")
        check_real("ExportConfig.external_data_mb", self.external_data_mb, above=0.0, finite=False)
        check_int("ExportConfig.trace_batch", self.trace_batch, 1)
        check_int("ExportConfig.calib_samples", self.calib_samples, 1, flag="--calib-samples")

    @property
    def resolved_opset(self) -> int:
        if self.opset is not None:
            return self.opset
        flavour = get_flavour(self.target)
        return flavour.fp16_min_opset if self.dtype == "fp16" else flavour.default_opset

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"opset": self.resolved_opset}

    @classmethod
    def from_dict(cls, d: dict) -> "ExportConfig":
        return config_from_dict(cls, d)


@dataclass
class ExportedModel:
    """An exported graph in memory, with its signature and (for a Q/DQ graph) the nodes/tensors of each layer."""

    model: Any  # onnx.ModelProto
    kind: str  # "int8-qdq" | "fp"
    signature: dict
    layers: dict[str, dict] = field(default_factory=dict)
    plan: Optional[QDQPlan] = None
    target: str = "trt"


# --------------------------------------------------------------------------------------------------------------
# Tracing


def _example_inputs(model: nn.Module, num_train_timesteps: int, batch: int, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    size, ch = int(model.image_size), int(model.in_channels)
    x = torch.randn(batch, ch, size, size, generator=g).to(dtype)
    t = torch.linspace(0, num_train_timesteps - 1, batch).round().long()
    if getattr(model, "cond_shape", None) is not None:
        return x, t, torch.randn(batch, *model.cond_shape, generator=g).to(dtype)
    if getattr(model, "num_classes", 0):
        y = torch.arange(batch) % (int(model.num_classes) + 1)
        return x, t, y
    return x, t


def _input_names(model: nn.Module) -> tuple[str, ...]:
    """The graph's input names: the conditioning input is named after its kind (labels or text embeddings)."""
    if getattr(model, "cond_shape", None) is not None:
        return (*INPUT_NAMES[:2], EMBEDDINGS_INPUT)
    return INPUT_NAMES


def _trace(module: nn.Module, example: tuple, opset: int, *, input_names: Optional[tuple[str, ...]] = None,
           output_name: str = OUTPUT_NAME) -> Any:
    """``module`` traced on ``example`` to an ONNX model (in memory) with a dynamic batch dimension; the inputs
    are named ``input_names`` (default: the UNet's), the output ``output_name``."""
    import onnx

    names = list((input_names or INPUT_NAMES)[: len(example)])
    dynamic = {n: {0: "batch"} for n in names} | {output_name: {0: "batch"}}
    with tempfile.TemporaryDirectory(prefix="tdqrt-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                torch.onnx.export(module, example, str(raw), input_names=names, output_names=[output_name],
                                  dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
            except Exception as exc:  # the exporter raises many types (SymbolicValueError, RuntimeError, ...)
                raise ConfigError(f"torch.onnx.export (TorchScript, opset {opset}) failed for this model: "
                                  f"{type(exc).__name__}: {str(exc)[:600]}") from exc
        return onnx.load(str(raw))


def _signature(model) -> dict:
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
             TensorProto.INT64: "int64", TensorProto.INT32: "int32"}

    def describe(v) -> dict:
        tt = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        dtype = names.get(tt.elem_type, TensorProto.DataType.Name(tt.elem_type).lower())
        return {"name": v.name, "dtype": dtype, "shape": dims}

    return {"inputs": [describe(i) for i in model.graph.input], "outputs": [describe(o) for o in model.graph.output]}


def _inline_initializer_identities(model) -> int:
    """Replace ``Identity(initializer)`` aliases by the initializer itself (torch de-duplicates equal buffers and
    leaves such aliases; TensorRT and lint want the Q/DQ scale to *be* an initializer)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    alias = {}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    if not alias:
        return 0
    for n in keep:
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]
    del g.node[:]
    g.node.extend(keep)
    return len(alias)


def _reaches_table(tensor: str, producer: dict, inits: set, hops: int = 8) -> bool:
    for _ in range(hops):
        if tensor in RATIO_TABLES:
            return True
        node = producer.get(tensor)
        if node is None:
            return False
        if node.op_type == "Gather" and node.input[0] in RATIO_TABLES:
            return True
        data_inputs = [i for i in node.input if i and i not in inits or i in RATIO_TABLES]
        if not data_inputs:
            return False
        tensor = data_inputs[0]
    return False


def _name_layers(model, trace: list[str]) -> dict[str, dict]:
    """Name the nodes of every quantized layer after it; return ``{layer: {"nodes": {...}, "tensors": {...}}}``.

    The k-th input QuantizeLinear (one whose DequantizeLinear feeds a weighted op's activation input) in graph
    order belongs to the k-th QDQLayer call recorded while tracing; an output QuantizeLinear (``ort-cpu``) is
    found as the weighted op's consumer.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def feeds_weighted_op(q) -> bool:
        return any(op.op_type in WEIGHTED_OPS and op.input[0] == dq.output[0]
                   for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"
                   for op in consumers.get(dq.output[0], []))

    qnodes = [n for n in g.node if n.op_type == "QuantizeLinear" and feeds_weighted_op(n)]
    if len(qnodes) != len(trace):
        warnings.warn(f"{len(qnodes)} input QuantizeLinear nodes for {len(trace)} traced quantized layer calls; the "
                      "nodes keep the exporter's names", stacklevel=2)
        return {}
    layers: dict[str, dict] = {}
    renames: dict[str, str] = {}  # folded bias initializers -> "<layer>.bias"
    for q, layer in zip(qnodes, trace):
        key = layer if layer not in layers else f"{layer}#{sum(k.split('#')[0] == layer for k in layers)}"
        nodes: dict[str, str] = {}

        def name(node, role: str) -> None:
            node.name = f"{key}/{role}"
            nodes[role] = node.name

        name(q, "act_quantize")
        act_input = q.input[0]
        pre = producer.get(q.input[0])
        if pre is not None and pre.op_type in ("Div", "Mul") and _reaches_table(pre.input[1], producer, inits):
            name(pre, "ratio_div" if pre.op_type == "Div" else "ratio_mul")
            act_input = pre.input[0]
        dq = next((c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"), None)
        out = None
        if dq is not None:
            name(dq, "act_dequantize")
            op = next((c for c in consumers.get(dq.output[0], []) if c.op_type in ("Conv", "MatMul", "Gemm")), None)
            if op is not None:
                name(op, op.op_type.lower())
                wdq = producer.get(op.input[1])
                if wdq is not None and wdq.op_type == "DequantizeLinear":
                    name(wdq, "weight_dequantize")
                out = op.output[0]
                nxt = consumers.get(out, [])
                if len(nxt) == 1 and nxt[0].op_type == "QuantizeLinear":
                    name(nxt[0], "output_quantize")
                    odq = consumers.get(nxt[0].output[0], [])
                    if len(odq) == 1 and odq[0].op_type == "DequantizeLinear":
                        name(odq[0], "output_dequantize")
                        out = odq[0].output[0]
                        nxt = consumers.get(out, [])
                if len(nxt) == 1 and nxt[0].op_type == "Mul" and _reaches_table(
                        next(i for i in nxt[0].input if i != out), producer, inits):
                    name(nxt[0], "ratio_unscale")
                    out = nxt[0].output[0]
                    nxt = consumers.get(out, [])
                if len(nxt) == 1 and nxt[0].op_type == "Add" and any(i in inits for i in nxt[0].input):
                    name(nxt[0], "bias_add")
                    out = nxt[0].output[0]
                    bias = next(i for i in nxt[0].input if i in inits)
                    if bias.startswith("onnx::") and len(consumers.get(bias, [])) == 1:
                        renames[bias] = f"{key}.bias"
        layers[key] = {"nodes": nodes, "tensors": {"input": act_input, "codes": q.output[0], "output": out}}
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in RATIO_TABLES:
            n.name = f"timestep_ratio/gather_{n.input[0]}"
        for k, i in enumerate(n.input):
            if i in renames:
                n.input[k] = renames[i]
    for init in g.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    return layers


def _fix_output_shape(model) -> None:
    """``eps`` has the shape of ``sample`` (the exporter leaves its spatial dims symbolic)."""
    src = model.graph.input[0].type.tensor_type.shape.dim
    dst = model.graph.output[0].type.tensor_type.shape
    del dst.dim[:]
    for d in src:
        new = dst.dim.add()
        if d.dim_param:
            new.dim_param = d.dim_param
        else:
            new.dim_value = d.dim_value


def _finish(model, *, kind: str, config: ExportConfig, metadata: dict) -> None:
    _fix_output_shape(model)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    model.producer_name = "tdqrt"
    inputs = ", ".join(i.name for i in model.graph.input)
    model.doc_string = f"tdqrt {kind} UNet: ({inputs}) -> eps; target {config.target}, dtype {config.dtype}"
    meta = {"kind": kind, "target": config.target, "dtype": config.dtype} | metadata
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + k, str(v)


def model_metadata(model: nn.Module, num_train_timesteps: int) -> dict:
    """What an engine needs to sample from the graph like from the torch model (also stored in the manifest)."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    null = getattr(model, "null_label", None)
    cond_shape = getattr(model, "cond_shape", None)
    return {"num_classes": num_classes, "null_label": "" if null is None else int(null),
            "image_size": int(model.image_size), "in_channels": int(model.in_channels),
            "num_train_timesteps": int(num_train_timesteps),
            "min_timestep": int(getattr(model, "min_timestep", 0))} | (
        {} if cond_shape is None else {"cond_shape": ",".join(map(str, cond_shape))})


def _cast_module(module: ExportUNet, config: ExportConfig) -> ExportUNet:
    if config.dtype == "fp32":
        return module
    return copy.deepcopy(module).to(config.torch_dtype)  # float params/buffers only; int8 codes stay int8


def _calibration_batches(calib: CalibrationSet, num: int, batch: int = 64):
    """``num`` calibration pairs (all when the set is smaller), picked with a fixed seed, in batches."""
    rows = np.random.default_rng(0).permutation(len(calib))[:num]
    for i in range(0, len(rows), batch):
        yield calib.get(rows[i: i + batch])


def export_quantized(qm: QuantizedModel, config: ExportConfig = ExportConfig(), *,
                     calib: Optional[Union[CalibrationSet, str, os.PathLike]] = None) -> ExportedModel:
    """The frozen quantized model ``qm`` as an INT8 Q/DQ ONNX graph (in memory).

    ``calib`` (a calibration set of this model, or its directory) is needed by targets that quantize outputs
    (``ort-cpu``): ``config.calib_samples`` of its inputs set the output grids.
    """
    flavour = get_flavour(config.target)
    module, plan = build_qdq_module(qm, config.ratio_op, flavour)
    if flavour.quantize_outputs:
        if calib is None:
            raise ConfigError(f"target {config.target} quantizes conv outputs and needs calibration inputs to choose "
                              "their grids; pass the model's calibration set (tdqrt export uses the one quant.json "
                              "records, or --calib DIR)")
        calib = calib if isinstance(calib, CalibrationSet) else CalibrationSet(calib)
        calibrate_output_grids(module, plan, _calibration_batches(calib, config.calib_samples))
    module = _cast_module(module, config)
    example = _example_inputs(qm, qm.num_train_timesteps, config.trace_batch, config.torch_dtype)
    module.ctx.trace.clear()
    model = _trace(module, example, config.resolved_opset, input_names=_input_names(qm))
    _inline_initializer_identities(model)
    layers = _name_layers(model, list(module.ctx.trace))
    module.ctx.trace.clear()
    _finish(model, kind="int8-qdq", config=config,
            metadata=model_metadata(qm, qm.num_train_timesteps) | {"method": qm.config.method,
                                                                    "per_timestep": int(plan.per_timestep)})
    return ExportedModel(model, "int8-qdq", _signature(model), layers, plan, config.target)


def export_fp(fp_model: nn.Module, num_train_timesteps: int, config: ExportConfig = ExportConfig()) -> ExportedModel:
    """The FP UNet with the same signature (the validation reference)."""
    module = _cast_module(build_fp_module(fp_model), config)
    example = _example_inputs(fp_model, num_train_timesteps, config.trace_batch, config.torch_dtype)
    model = _trace(module, example, config.resolved_opset, input_names=_input_names(fp_model))
    _inline_initializer_identities(model)
    _finish(model, kind="fp", config=config, metadata=model_metadata(fp_model, num_train_timesteps))
    return ExportedModel(model, "fp", _signature(model))


# --------------------------------------------------------------------------------------------------------------
# Saving and debug variants


def save_onnx(model, path: Path, *, external_data_mb: float = 1024.0) -> list[str]:
    """Write ``model`` to ``path``; above ``external_data_mb`` the tensors go to ``<name>.data`` beside it.
    Returns the file names written (relative to ``path.parent``)."""
    import onnx

    path = Path(path)
    data_name = path.name + ".data"
    size = model.ByteSize()
    if size > external_data_mb * 2**20 or size >= 2**31 - 2**20:  # protobuf's hard limit is 2 GiB
        model = copy.deepcopy(model)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=False)
        return [path.name, data_name] if (path.parent / data_name).is_file() else [path.name]
    onnx.save_model(model, str(path))
    return [path.name]


LAYER_OUTPUT_ROLES = ("bias_add", "ratio_unscale", "output_dequantize", "conv", "matmul", "gemm")


def layers_from_node_names(model) -> dict[str, dict]:
    """The ``{layer: {"nodes": ..., "tensors": ...}}`` map of a saved Q/DQ graph, recovered from the node names
    ``<layer>/<role>`` that :func:`export_quantized` gives (what :class:`ExportedModel` holds in memory). A layer
    is any name with an ``act_quantize`` node; its output is the last of bias add, ratio un-scaling, output
    dequantization and the weighted op that the graph has."""
    nodes: dict[str, dict] = {}
    for n in model.graph.node:
        layer, _, role = n.name.rpartition("/")
        if layer:
            nodes.setdefault(layer, {})[role] = n
    layers = {}
    for layer, by_role in nodes.items():
        q = by_role.get("act_quantize")
        if q is None:
            continue
        ratio = by_role.get("ratio_div") or by_role.get("ratio_mul")
        out = next((by_role[r].output[0] for r in LAYER_OUTPUT_ROLES if r in by_role), None)
        layers[layer] = {"nodes": {r: n.name for r, n in by_role.items()},
                         "tensors": {"input": (ratio or q).input[0], "codes": q.output[0], "output": out}}
    return layers


def with_debug_outputs(exported: ExportedModel, roles: tuple[str, ...] = ("input", "codes", "output")):
    """A copy of the Q/DQ graph that also outputs, per quantized layer, its input (before the ratio), its int8
    activation codes and its output (after the bias). Output names are ``<layer>:<role>``."""
    import onnx
    from onnx import TensorProto

    if not exported.layers:
        raise ArtifactError("this export has no named quantized layers (an FP graph, or node naming failed)")
    model = copy.deepcopy(exported.model)
    g = model.graph
    float_type = g.input[0].type.tensor_type.elem_type
    code_type = getattr(TensorProto, get_flavour(exported.target).act_zero_dtype.upper())
    for layer, info in exported.layers.items():
        for role in roles:
            tensor = info["tensors"].get(role)
            if not tensor:
                continue
            out = f"{layer}:{role}"
            g.node.append(onnx.helper.make_node("Identity", [tensor], [out], name=f"{layer}/debug_{role}"))
            dtype = code_type if role == "codes" else float_type
            g.output.append(onnx.helper.make_tensor_value_info(out, dtype, None))
    return model
