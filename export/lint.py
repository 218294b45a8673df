"""``tdqrt lint``: check an exported ONNX model (or a whole bundle) against the rules its target needs.

Our own Q/DQ rules (TensorRT's explicit quantization, Developer Guide "Working with Quantized Types"; ONNX Runtime's
quantization guide, https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html), then
``onnx.checker`` (full check), ONNX shape inference (strict, type-checked), ``polygraphy check lint`` (runs the
graph node by node in ONNX Runtime) and, for ``ort-cpu``, the fusion count of ONNX Runtime's optimized graph. Every
finding names the node and says how to fix it. The result is a :class:`LintReport`: truthy when there is no error,
serialisable to JSON.

Rules for the ``trt`` target:

* every quantized Conv/ConvTranspose/Gemm/MatMul is fed by a DequantizeLinear on *both* its activation and its
  weight input (one without the other leaves TensorRT with a float op and a stray Q/DQ);
* a weight DQ is rooted at an int8 initializer (pre-quantized weights), its scale is per output channel on the
  right axis (Conv 0, ConvTranspose 1, Gemm ``transB=1`` 0 / ``transB=0`` 1, MatMul with B = [K, N] 1) or per
  tensor;
* activation Q/DQ are per tensor (TensorRT cannot quantize activations per channel);
* every Q/DQ scale is a build-time constant (initializer or Constant), finite and > 0; zero points are constant
  int8 zeros (TensorRT is symmetric-only) and explicit on every QuantizeLinear (without one it emits uint8);
* opset within the target's range (FP16 scales need ≥ 19), IR version ORT can load, only ops from
  :data:`SUPPORTED_OPS` in the default domain.

Warnings (the build still works): Q/DQ feeding ops other than weighted ones (TensorRT will not fuse them), Q/DQ
pairs whose scales differ, FP32 scales inside an FP16 graph (strongly typed TensorRT then runs the consumer in
FP32), activation×activation MatMuls with Q/DQ (no INT8 MHA in TensorRT).

Rules for the ``ort-cpu`` target (what differs; the weight, scale and per-tensor rules are the same):

* activation zero points are **uint8** (x86 ORT forms int8 kernels only for U8S8: it rewrites a simple int8
  Q -> DQ pair into uint8 itself, but not one whose Q has several consumers, which then stays unfused, and forcing
  S8S8 kernels is slower than FP32); weights stay int8 with zero point 0;
* every quantized Conv's and MatMul's output goes to exactly one QuantizeLinear (error ``output-not-quantized``):
  ORT forms QLinearConv / QLinearMatMul only from ``DQ -> op -> Q`` and otherwise runs a Conv (and a 2-D MatMul
  followed by its bias Add, which it folds into a Gemm) in float on dequantized inputs;
* the inputs of weighted ops use zero point 128, the torch model's symmetric int8 grid in uint8 (warning
  ``input-zero-point`` otherwise: it runs, but its codes are not the calibrated ones); output grids may be
  asymmetric, and output Q/DQ feeding float ops is expected (no ``qdq-placement`` warning);
* any standard ONNX op is allowed; dtype fp32 only (QLinearConv takes float32 scales);
* ``ort-fusion``: ONNX Runtime's optimized graph (:func:`optimized_op_counts`) must hold an int8 kernel
  (:data:`INT8_KERNELS`) for every quantized Conv/MatMul.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from tdqrt.engines.artifacts import write_json_atomic
from tdqrt.engines.errors import ArtifactError, ConfigError

MAX_IR_VERSION = 10  # ONNX Runtime 1.31 loads IR ≤ 13, TensorRT 10's parser (onnx 1.16-1.17) IR ≤ 10


# --------------------------------------------------------------------------------------------------------------
# Targets ("flavours") of an export: the graph conventions one backend needs


@dataclass(frozen=True)
class Flavour:
    """What an export target needs; the exporter and the Q/DQ module take it as a parameter (one exporter, two
    graph conventions)."""

    name: str
    description: str
    backend: str  # who consumes the graph (named in lint messages)
    act_zero_dtype: str  # element type of activation zero points
    act_zero_point: int  # zero point of the input quantizers: the torch model's signed int8 grid in that type
    symmetric_activations: bool  # every activation zero point must be 0 (else: any, e.g. on output grids)
    quantize_outputs: bool  # Q/DQ on weighted-op outputs too (ORT CPU fusion) or on their inputs only (TensorRT)
    min_opset: int
    max_opset: int
    default_opset: int
    fp16_min_opset: int  # fp16 Q/DQ scales appear in QuantizeLinear-19
    dtypes: tuple[str, ...] = ("fp32", "fp16")  # graph float types the backend runs quantized
    supported_ops: Optional[frozenset] = None  # default-domain ops allowed (None: any standard op)


# Ops TensorRT's ONNX parser imports (onnx-tensorrt docs/operators.md, 10.x) that a UNet export may contain.
SUPPORTED_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
ConvTranspose Cos CumSum DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish
Identity InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log MatMul Max MaxPool Mean Min Mish Mod
Mul Neg Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum Relu Reshape Resize Round ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Size Slice Softmax Softplus
Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

FLAVOURS: dict[str, Flavour] = {
    "trt": Flavour(
        "trt", "TensorRT explicit INT8: symmetric int8 Q/DQ on the inputs of Conv/Gemm/MatMul only, per-channel "
        "int8 weights, per-tensor activations",
        backend="TensorRT", act_zero_dtype="int8", act_zero_point=0, symmetric_activations=True,
        quantize_outputs=False, min_opset=17, max_opset=20, default_opset=17, fp16_min_opset=19,
        supported_ops=SUPPORTED_OPS),
    "ort-cpu": Flavour(
        "ort-cpu", "ONNX Runtime x86 CPU: uint8 activations (zero point 128 on the inputs = the symmetric int8 "
        "grid), per-channel int8 weights, and a uint8 Q/DQ right after every quantized Conv/MatMul so ORT "
        "fuses QLinearConv/QLinearMatMul",
        backend="ONNX Runtime's CPU QDQ fusion", act_zero_dtype="uint8", act_zero_point=128,
        symmetric_activations=False, quantize_outputs=True, min_opset=17, max_opset=21, default_opset=17,
        fp16_min_opset=19, dtypes=("fp32",)),
}


def get_flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise ConfigError(f"export target {name!r} is unknown; choose one of {sorted(FLAVOURS)}")
    return FLAVOURS[name]


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    rule: str
    node: str
    message: str
    fix: str
    file: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{self.severity.upper()} [{self.rule}] {where}{self.node}: {self.message} Fix: {self.fix}"


@dataclass
class LintReport:
    """All findings of one lint run; ``bool(report)`` is True when there is no error."""

    target: str
    files: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)  # check name -> "passed" / "failed" / "skipped: why"

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def __bool__(self) -> bool:
        return not self.errors

    def add(self, severity: str, rule: str, node: str, message: str, fix: str, file: str = "") -> None:
        self.findings.append(Finding(severity, rule, node, message, fix, file))

    def merge(self, other: "LintReport") -> None:
        """Add another report's findings; its checks are keyed ``"<file>: <check>"``."""
        self.files += other.files
        self.findings += other.findings
        prefix = f"{other.files[0]}: " if len(other.files) == 1 else ""
        for k, v in other.checks.items():
            self.checks[prefix + k] = v

    def rules(self, severity: Optional[str] = None) -> set[str]:
        return {f.rule for f in self.findings if severity is None or f.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        return {"format": "tdqrt-lint", "version": 1, "target": self.target, "clean": bool(self),
                "errors": len(self.errors), "warnings": len(self.warnings), "files": self.files,
                "checks": self.checks, "findings": [asdict(f) for f in self.findings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: Union[str, os.PathLike]) -> None:
        write_json_atomic(path, self.to_dict())

    def summary(self) -> str:
        state = "clean" if self else "FAILED"
        return f"lint {state}: {len(self.errors)} error(s), {len(self.warnings)} warning(s) in {', '.join(self.files)}"

    def format(self, max_findings: int = 50) -> str:
        lines = [self.summary()]
        lines += [f"  {f}" for f in self.findings[:max_findings]]
        if len(self.findings) > max_findings:
            lines.append(f"  ... {len(self.findings) - max_findings} more (see the JSON report)")
        lines += [f"  check {k}: {v}" for k, v in self.checks.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Graph helpers


class _Graph:
    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self._np = numpy_helper
        self.graph_outputs = {o.name for o in g.output}
        self.graph_inputs = {i.name: i for i in g.input}

    def name(self, node) -> str:
        return node.name or f"<unnamed {node.op_type} -> {node.output[0] if node.output else '?'}>"

    def const_source(self, tensor: str):
        """The initializer or Constant node a tensor comes from (through Identity), or None if runtime-computed."""
        seen = 0
        while seen < 16:
            if tensor in self.inits:
                return self.inits[tensor]
            node = self.producer.get(tensor)
            if node is None:
                return None
            if node.op_type == "Identity":
                tensor = node.input[0]
                seen += 1
                continue
            if node.op_type == "Constant":
                return node
            return None
        return None

    def const_value(self, tensor: str) -> Optional[np.ndarray]:
        src = self.const_source(tensor)
        if src is None:
            return None
        if hasattr(src, "dims"):  # TensorProto
            return self._np.to_array(src)
        for a in src.attribute:
            if a.name == "value":
                return self._np.to_array(a.t)
            if a.name == "value_float":
                return np.array(a.f, np.float32)
            if a.name == "value_floats":
                return np.array(list(a.floats), np.float32)
            if a.name == "value_int":
                return np.array(a.i, np.int64)
            if a.name == "value_ints":
                return np.array(list(a.ints), np.int64)
        return None

    def const_dtype(self, tensor: str) -> Optional[int]:
        src = self.const_source(tensor)
        if src is None:
            return None
        if hasattr(src, "data_type"):
            return src.data_type
        for a in src.attribute:
            if a.name == "value":
                return a.t.data_type
        return None

    def dq_feeding(self, tensor: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dtype_name(elem_type: Optional[int]) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type) if elem_type is not None else "unknown"


def _default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _graph_float_dtype(model) -> Optional[int]:
    """Element type of the first float graph input (the sample): decides whether the graph is FP16."""
    from onnx import TensorProto

    for i in model.graph.input:
        t = i.type.tensor_type.elem_type
        if t in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return t
    return None


# --------------------------------------------------------------------------------------------------------------
# Rules


def _check_model_level(g: _Graph, flavour: Flavour, rep: LintReport, file: str) -> None:
    m = g.model
    opset = _default_opset(m)
    if not flavour.min_opset <= opset <= flavour.max_opset:
        rep.add("error", "opset", "model", f"default-domain opset {opset} is outside [{flavour.min_opset}, "
                f"{flavour.max_opset}] supported for target {flavour.name}.",
                f"re-export with --opset {flavour.default_opset}.", file)
    for o in m.opset_import:
        if o.domain not in ("", "ai.onnx"):
            rep.add("error", "custom-domain", "model", f"imports custom op domain {o.domain!r} (version {o.version}).",
                    "export with standard ONNX ops only (no contrib/custom ops).", file)
    if m.ir_version > MAX_IR_VERSION:
        rep.add("error", "ir-version", "model", f"IR version {m.ir_version} is newer than {MAX_IR_VERSION}, "
                "which TensorRT 10's parser and older ONNX Runtime builds cannot load.",
                f"set model.ir_version = {MAX_IR_VERSION} before saving (tdqrt export does).", file)
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            rep.add("error", "unsupported-op", g.name(n), f"op {n.domain}::{n.op_type} is not a standard ONNX op.",
                    "replace it with standard ONNX ops.", file)
        elif flavour.supported_ops is not None and n.op_type not in flavour.supported_ops:
            rep.add("error", "unsupported-op", g.name(n), f"op {n.op_type} is not in the supported op list "
                    f"(ops {flavour.backend} imports).", "rewrite the model part that produces it, or extend "
                    f"SUPPORTED_OPS if {flavour.backend} supports it.", file)


def _check_qdq_node(g: _Graph, n, flavour: Flavour, rep: LintReport, file: str, fp16_graph: bool) -> None:
    name = g.name(n)
    opset = _default_opset(g.model)
    scale_name = n.input[1] if len(n.input) > 1 else ""
    scale = g.const_value(scale_name) if scale_name else None
    if scale is None:
        producer = g.producer.get(scale_name)
        how = f"computed at run time by {producer.op_type} node {g.name(producer)}" if producer is not None else \
            f"graph input {scale_name!r}" if scale_name in g.graph_inputs else "missing"
        rep.add("error", "runtime-scale", name, f"{n.op_type} scale {scale_name!r} is {how}; {flavour.backend} "
                "needs every Q/DQ scale to be a build-time constant.",
                "use a constant scale (initializer); fold a per-timestep scale into Mul/Div ratio nodes around a "
                "constant-scale Q/DQ (tdqrt export does this).", file)
    else:
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            bad = scale[~(np.isfinite(scale) & (scale > 0))] if scale.ndim else scale
            rep.add("error", "scale-positive", name, f"{n.op_type} scale {scale_name!r} has non-positive or "
                    f"non-finite value(s) {np.asarray(bad).ravel()[:4].tolist()}.",
                    "every scale must be finite and > 0: recalibrate or clamp the scale before export.", file)
        sdt = g.const_dtype(scale_name)
        from onnx import TensorProto

        if sdt == TensorProto.FLOAT16 and opset < 19:
            rep.add("error", "fp16-scale-opset", name, f"fp16 scale needs opset >= 19, the model has {opset}.",
                    "re-export with --opset 19 (the --dtype fp16 default).", file)
        if sdt == TensorProto.FLOAT16 and np.any(np.abs(scale) < 2.0 ** -14):
            rep.add("warning", "fp16-subnormal-scale", name, f"FP16 scale {scale_name!r} has values below 2^-14 "
                    "(subnormal: they keep fewer significant bits).",
                    "export in fp32, or keep tiny weight scales out of FP16.", file)
        if fp16_graph and sdt == TensorProto.FLOAT:
            rep.add("warning", "fp32-scale-in-fp16", name, "FP32 scale in an FP16 graph: the DQ outputs FP32 and "
                    "strongly typed TensorRT runs its consumer in FP32.", "export the scales in FP16.", file)
    # weights: int8, zero point 0 for every target; activations: the flavour's type (and 0 when symmetric)
    weight = n.op_type == "DequantizeLinear" and g.const_source(n.input[0]) is not None
    want = "int8" if weight else flavour.act_zero_dtype
    symmetric = weight or flavour.symmetric_activations
    hold = f"holding {0 if symmetric else flavour.act_zero_point}"
    zp_name = n.input[2] if len(n.input) > 2 else ""
    if not zp_name:
        if n.op_type == "QuantizeLinear":
            rep.add("error", "zero-point", name, "QuantizeLinear without a zero point outputs uint8 with zero point "
                    f"0 (no negative values); target {flavour.name} needs {want} with an explicit zero point.",
                    f"add a zero-point initializer ({want}, {hold}).", file)
    else:
        zp = g.const_value(zp_name)
        zdt = g.const_dtype(zp_name)
        from onnx import TensorProto

        if zp is None:
            rep.add("error", "zero-point", name, f"zero point {zp_name!r} is computed at run time.",
                    f"use a constant {want} zero-point initializer {hold}.", file)
        elif zdt != getattr(TensorProto, want.upper()):
            what = "weights" if weight else "activations"
            rep.add("error", "zero-point", name, f"zero point {zp_name!r} has type {_dtype_name(zdt)}; target "
                    f"{flavour.name} needs {want} for {what}.", f"store {want} zero points ({hold}).", file)
        elif symmetric and np.any(zp != 0):
            rep.add("error", "zero-point", name, f"zero point {zp_name!r} is {np.asarray(zp).ravel()[:4].tolist()}, "
                    f"not 0; {flavour.backend} takes {'weights' if weight else 'activations'} quantized "
                    "symmetrically only.", "recalibrate with symmetric quantization (zero point 0).", file)
    if scale is not None and scale.size > 1:
        data_const = g.const_source(n.input[0]) is not None
        if n.op_type == "QuantizeLinear" or not data_const:
            rep.add("error", "per-channel-activation", name, f"{n.op_type} on a run-time tensor has a per-channel "
                    f"scale ({scale.size} values); {flavour.backend} quantizes activations per tensor only.",
                    "use one scale for the whole activation tensor.", file)
    if n.op_type == "QuantizeLinear":
        consumers = g.consumers.get(n.output[0], [])
        if any(c.op_type != "DequantizeLinear" for c in consumers) or n.output[0] in g.graph_outputs:
            rep.add("warning", "q-without-dq", name, "the int8 output of this QuantizeLinear is used by something "
                    "other than a DequantizeLinear.", "pair every Q with a DQ (Q -> DQ -> weighted op).", file)


def _expected_weight_axis(op) -> int:
    if op.op_type == "Conv":
        return 0
    if op.op_type == "ConvTranspose":
        return 1
    if op.op_type == "Gemm":
        return 0 if _attr(op, "transB", 0) else 1
    return 1  # MatMul with B = [K, N]


def _check_weighted(g: _Graph, op, flavour: Flavour, rep: LintReport, file: str) -> None:
    from onnx import TensorProto

    name = g.name(op)
    if len(op.input) < 2:
        return
    a_dq, w_dq = g.dq_feeding(op.input[0]), g.dq_feeding(op.input[1])
    if a_dq is None and w_dq is None:
        return  # a float op (kept in float on purpose, or attention)
    if op.op_type == "MatMul" and w_dq is not None and g.const_source(w_dq.input[0]) is None:
        q = g.producer.get(w_dq.input[0])
        weight_from_q = q is not None and q.op_type == "QuantizeLinear" and g.const_source(q.input[0]) is not None
        if not weight_from_q:
            rep.add("warning", "act-act-matmul", name, "both MatMul inputs are quantized activations (attention); "
                    f"{flavour.backend} does not run it as an INT8 attention kernel.",
                    "leave attention matmuls in float.", file)
            return
    if w_dq is None:
        w = op.input[1]
        src = g.const_source(w)
        what = f"float initializer {w!r}" if src is not None else f"run-time tensor {w!r}"
        rep.add("error", "weight-without-dq", name, f"activation input is quantized (DequantizeLinear "
                f"{g.name(a_dq)}) but the weight is a {what} without DequantizeLinear; {flavour.backend} cannot run an "
                f"INT8 {op.op_type} with a float weight.",
                "store the weight as int8 codes + DequantizeLinear (per-channel scale), or drop the activation Q/DQ "
                "to keep the layer in float.", file)
    if a_dq is None:
        rep.add("error", "activation-without-dq", name, f"the weight is quantized (DequantizeLinear "
                f"{g.name(w_dq)}) but the activation input {op.input[0]!r} is float.",
                "add QuantizeLinear -> DequantizeLinear (per-tensor scale) on the activation input.", file)
    if w_dq is not None:
        wname = w_dq.input[0]
        src = g.const_source(wname)
        if src is None:
            q = g.producer.get(wname)
            how = (f"QuantizeLinear {g.name(q)} of a float tensor (weights quantized at run time)"
                   if q is not None and q.op_type == "QuantizeLinear" else "a run-time tensor")
            rep.add("error", "weight-not-int8-initializer", g.name(w_dq), f"the weight DequantizeLinear of {name} "
                    f"reads {how}, not an int8 initializer.",
                    "store the int8 weight codes as an initializer feeding the DequantizeLinear.", file)
        else:
            dt = g.const_dtype(wname)
            if dt != TensorProto.INT8:
                rep.add("error", "weight-not-int8-initializer", g.name(w_dq), f"the weight initializer {wname!r} "
                        f"of {name} has type {_dtype_name(dt)}, not INT8.",
                        "store the weight codes as int8 (narrow range [-127, 127]).", file)
            w_scale = g.const_value(w_dq.input[1]) if len(w_dq.input) > 1 else None
            if w_scale is not None and w_scale.size > 1:
                w_val = g.const_value(wname)
                rank = w_val.ndim if w_val is not None else 2
                axis = _attr(w_dq, "axis", 1)
                axis = axis + rank if axis < 0 else axis
                want = _expected_weight_axis(op)
                if op.op_type == "MatMul":
                    want = rank - 1
                if axis != want:
                    rep.add("error", "weight-axis", g.name(w_dq), f"per-channel weight scale on axis {axis}; "
                            f"{op.op_type} {name} needs the output-channel axis {want}.",
                            f"set axis={want} on the weight DequantizeLinear (and lay the scale out along it).", file)
                elif w_val is not None and w_val.shape[axis] != w_scale.size:
                    rep.add("error", "weight-axis", g.name(w_dq), f"{w_scale.size} weight scales for "
                            f"{w_val.shape[axis]} channels on axis {axis}.",
                            "give one scale per output channel.", file)
    if a_dq is not None:
        a_scale = g.const_value(a_dq.input[1]) if len(a_dq.input) > 1 else None
        if a_scale is not None and a_scale.size > 1:
            rep.add("error", "per-channel-activation", g.name(a_dq), f"activation input of {name} is dequantized "
                    f"with {a_scale.size} scales (per channel); {flavour.backend} needs one per tensor.",
                    "use a per-tensor activation scale.", file)
        q = g.producer.get(a_dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            rep.add("warning", "dq-without-q", g.name(a_dq), f"activation DequantizeLinear of {name} is not fed by a "
                    "QuantizeLinear.", "quantize the activation with Q -> DQ.", file)
        else:
            qs = g.const_value(q.input[1])
            if qs is not None and a_scale is not None and (qs.shape != a_scale.shape or not np.array_equal(qs, a_scale)):
                rep.add("warning", "qdq-scale-mismatch", g.name(a_dq), f"the Q/DQ pair before {name} uses different "
                        "scales (a requantization).", "use the same scale initializer on Q and DQ.", file)
            zp_name = q.input[2] if len(q.input) > 2 else ""
            zdt = g.const_dtype(zp_name) if zp_name else None
            zp = g.const_value(zp_name) if zp_name else None
            want = getattr(TensorProto, flavour.act_zero_dtype.upper())
            if zdt is not None and zdt != want:
                rep.add("error", "zero-point", g.name(q), f"activation zero point of {name} is "
                        f"{_dtype_name(zdt)}; target {flavour.name} needs {flavour.act_zero_dtype}.",
                        f"use {flavour.act_zero_dtype} zero points.", file)
            elif zp is not None and not flavour.symmetric_activations and np.any(zp != flavour.act_zero_point):
                rep.add("warning", "input-zero-point", g.name(q), f"activation zero point of {name} is "
                        f"{np.asarray(zp).ravel()[:4].tolist()}, not {flavour.act_zero_point}: its uint8 grid is not "
                        "the symmetric int8 grid the torch model was calibrated on, so the codes differ from it.",
                        f"use zero point {flavour.act_zero_point} on the inputs of weighted ops.", file)
    if flavour.quantize_outputs and op.op_type in ("Conv", "MatMul") and a_dq is not None and w_dq is not None:
        consumers = g.consumers.get(op.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear" or op.output[0] in g.graph_outputs:
            what = ", ".join(f"{c.op_type} {g.name(c)}" for c in consumers) or "nothing but the graph output"
            rep.add("error", "output-not-quantized", name, f"the output of this quantized {op.op_type} goes to "
                    f"{what}, not to a single QuantizeLinear; {flavour.backend} forms QLinear{op.op_type} only from "
                    f"DQ -> {op.op_type} -> Q and otherwise may run it in float on dequantized inputs (a Conv always, "
                    "a 2-D MatMul followed by its bias Add too), slower than the FP32 graph.",
                    f"put QuantizeLinear -> DequantizeLinear (uint8, constant scale) directly after the {op.op_type}, "
                    "before any ratio Mul or bias Add (tdqrt export --target ort-cpu does).", file)


def _check_placement(g: _Graph, rep: LintReport, file: str) -> None:
    """TensorRT: Q/DQ only on the inputs of weighted ops (ort-cpu has output Q/DQ feeding float ops by design)."""
    for n in g.nodes:
        if n.op_type != "DequantizeLinear" or g.const_source(n.input[0]) is not None:
            continue
        for c in g.consumers.get(n.output[0], []):
            if c.op_type not in WEIGHTED_OPS:
                rep.add("warning", "qdq-placement", g.name(n), f"activation DequantizeLinear feeds {c.op_type} "
                        f"{g.name(c)}; TensorRT fuses Q/DQ only into Conv/Gemm/MatMul (and keeps GroupNorm, SiLU, "
                        "softmax in float).", "quantize only the inputs of weighted ops.", file)


def lint_qdq_rules(model, target: str = "trt", *, file: str = "") -> LintReport:
    """The tdqrt Q/DQ rules alone (no checker / shape inference / polygraphy)."""
    flavour = get_flavour(target)
    rep = LintReport(target=target, files=[file] if file else [])
    g = _Graph(model)
    from onnx import TensorProto

    fp16_graph = _graph_float_dtype(model) == TensorProto.FLOAT16
    _check_model_level(g, flavour, rep, file)
    for n in g.nodes:
        if n.op_type in QDQ_OPS:
            _check_qdq_node(g, n, flavour, rep, file, fp16_graph)
        elif n.op_type in WEIGHTED_OPS:
            _check_weighted(g, n, flavour, rep, file)
    if not flavour.quantize_outputs:
        _check_placement(g, rep, file)
    rep.checks["qdq-rules"] = "passed" if not rep.errors else "failed"
    return rep


# --------------------------------------------------------------------------------------------------------------
# External checkers


def _run_onnx_checks(model, path: Optional[Path], rep: LintReport, file: str) -> None:
    import onnx

    try:
        if path is not None:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
        rep.checks["onnx-checker"] = "passed"
    except Exception as exc:  # onnx raises ValidationError, InferenceError, ...
        rep.checks["onnx-checker"] = "failed"
        rep.add("error", "onnx-checker", "model", f"onnx.checker (full_check) failed: {str(exc).strip()[:800]}",
                "fix the node the checker names (invalid types, attributes or shapes), then re-export.", file)
    try:
        if path is not None:
            with tempfile.TemporaryDirectory(prefix="tdqrt-lint-") as tmp:
                onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                                       strict_mode=True, data_prop=True)
        else:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        rep.checks["shape-inference"] = "passed"
    except Exception as exc:
        rep.checks["shape-inference"] = "failed"
        rep.add("error", "shape-inference", "model", f"ONNX shape inference (strict) failed: {str(exc).strip()[:800]}",
                "fix the shape/type inconsistency it names, then re-export.", file)


# Kernels ONNX Runtime's CPU provider forms from Q/DQ node units (any domain: QLinearConv becomes
# com.microsoft:QLinearConv in NHWC on x86).
INT8_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
                          "MatMulInteger", "DynamicQuantizeMatMul"})


def optimized_op_counts(path: Union[str, os.PathLike], *, threads: int = 1) -> dict[str, int]:
    """Op types (``domain:op`` outside the default domain) of the graph ONNX Runtime's CPU provider actually runs:
    the model after its graph optimizations (``SessionOptions.optimized_model_filepath``)."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="tdqrt-ortopt-") as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node
    return dict(collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in nodes))


def _quantized_weighted_ops(g: _Graph) -> list:
    """Conv/Gemm/MatMul with a DequantizeLinear on both the activation and an int8-initializer weight."""
    out = []
    for n in g.nodes:
        if n.op_type in WEIGHTED_OPS and len(n.input) > 1:
            a, w = g.dq_feeding(n.input[0]), g.dq_feeding(n.input[1])
            if a is not None and w is not None and g.const_source(w.input[0]) is not None:
                out.append(n)
    return out


def run_fusion_check(model, path: Path, flavour: Flavour, rep: LintReport, file: str) -> None:
    """``ort-cpu``: every quantized Conv/MatMul must become an int8 kernel (:data:`INT8_KERNELS`) in the graph ONNX
    Runtime optimizes; a float leftover runs dequantized, slower than the FP32 graph."""
    expected = _quantized_weighted_ops(_Graph(model))
    if not expected:
        rep.checks["ort-fusion"] = "skipped: no quantized weighted ops"
        return
    counts = optimized_op_counts(path)
    fused = sum(c for k, c in counts.items() if k.split(":")[-1] in INT8_KERNELS)
    if fused >= len(expected):
        rep.checks["ort-fusion"] = "passed"
        return
    rep.checks["ort-fusion"] = "failed"
    rep.add("error", "ort-fusion", "model", f"ONNX Runtime's CPU provider formed {fused} int8 kernels for "
            f"{len(expected)} quantized Conv/MatMul (optimized graph: {counts}); the rest run in float on dequantized "
            f"inputs, slower than the FP32 graph.", f"fix the {flavour.name} Q/DQ rule findings (uint8 activations, a "
            "single uint8 Q right after each Conv, constant scales), then re-export.", file)


def _polygraphy_command() -> Optional[list[str]]:
    exe = shutil.which("polygraphy")
    if exe:
        return [exe]
    candidate = Path(sys.executable).parent / "polygraphy"
    return [str(candidate)] if candidate.is_file() else None


def run_polygraphy_lint(path: Path, rep: LintReport, file: str, timeout: float = 600.0) -> None:
    """``polygraphy check lint PATH -o report.json`` in a subprocess (needs onnx_graphsurgeon + onnxruntime)."""
    import importlib.util

    missing = [m for m in ("polygraphy", "onnx_graphsurgeon", "onnxruntime") if importlib.util.find_spec(m) is None]
    cmd = _polygraphy_command()
    if missing or cmd is None:
        why = f"missing python modules {missing}" if missing else "the polygraphy command is not on PATH"
        rep.checks["polygraphy-lint"] = f"skipped: {why}"
        rep.add("warning", "polygraphy-skipped", "model", f"polygraphy check lint was not run ({why}).",
                "pip install polygraphy onnx-graphsurgeon onnxruntime", file)
        return
    with tempfile.TemporaryDirectory(prefix="tdqrt-polylint-") as tmp:
        out = Path(tmp) / "report.json"
        env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0")
        try:
            proc = subprocess.run([*cmd, "check", "lint", str(path), "-o", str(out)], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            rep.checks["polygraphy-lint"] = "failed"
            rep.add("error", "polygraphy-lint", "model", f"polygraphy check lint timed out after {timeout:.0f} s.",
                    "run it by hand to see where it hangs.", file)
            return
        if not out.is_file():
            rep.checks["polygraphy-lint"] = "failed"
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            rep.add("error", "polygraphy-lint", "model", f"polygraphy check lint wrote no report (exit "
                    f"{proc.returncode}): {' | '.join(tail)}", "run `polygraphy check lint` by hand.", file)
            return
        report = json.loads(out.read_text())
    entries = report.get("lint_entries", [])
    for e in entries:
        level = e.get("level", "")
        sev = "error" if level == "exception" else "warning" if level == "warning" else None
        if sev is None:
            continue
        nodes = ", ".join(e.get("nodes") or []) or "model"
        rep.add(sev, "polygraphy-lint", nodes, f"polygraphy ({e.get('source', '?')}): "
                f"{str(e.get('message', '')).strip()[:600]}", "fix the node named by polygraphy, then re-export.", file)
    failing = report.get("summary", {}).get("failing", [])
    rep.checks["polygraphy-lint"] = "failed" if failing or any(e.get("level") == "exception" for e in entries) \
        else "passed"


# --------------------------------------------------------------------------------------------------------------
# Entry points


def lint_model(model_or_path, target: str = "trt", *, polygraphy: bool = True, checker: bool = True,
               fusion: bool = True, file: str = "") -> LintReport:
    """Lint one ONNX model (a path or a ``ModelProto``); ``polygraphy`` and ``fusion`` (the ONNX Runtime fusion
    count of a flavour that needs it, ``ort-cpu``) need a path (or write a temp copy)."""
    import onnx

    path: Optional[Path] = None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist; export the model first (tdqrt export)")
        try:
            model = onnx.load(str(path))
        except Exception as exc:
            raise ArtifactError(f"{path} cannot be read as ONNX ({exc}); the file is truncated or corrupt, "
                                "re-export it") from exc
        file = file or path.name
    else:
        model = model_or_path
    flavour = get_flavour(target)
    rep = lint_qdq_rules(model, target, file=file)
    if checker:
        _run_onnx_checks(model, path, rep, file)
    fusion = fusion and flavour.quantize_outputs

    def file_checks(p: Path) -> None:
        if polygraphy:
            run_polygraphy_lint(p, rep, file)
        if fusion:
            run_fusion_check(model, p, flavour, rep, file)

    if path is not None:
        file_checks(path)
    elif polygraphy or fusion:
        with tempfile.TemporaryDirectory(prefix="tdqrt-lint-") as tmp:
            p = Path(tmp) / "model.onnx"
            onnx.save(model, str(p))
            file_checks(p)
    if not polygraphy:
        rep.checks["polygraphy-lint"] = "skipped: disabled"
    if flavour.quantize_outputs and not fusion:
        rep.checks["ort-fusion"] = "skipped: disabled"
    return rep


def lint_bundle(path: Union[str, os.PathLike], *, polygraphy: bool = True, target: Optional[str] = None) -> LintReport:
    """Verify a bundle (hashes, format) and lint every ONNX model in it with the target its manifest names (the
    float ``decoder.onnx`` of a latent model too: it must pass the checker, shape inference and Polygraphy)."""
    from tdqrt.engines.bundle import open_bundle

    bundle = open_bundle(path)
    target = target or bundle.manifest.get("export", {}).get("target", "trt")
    rep = LintReport(target=target)
    rep.checks["bundle-hashes"] = "passed"
    for role in ("unet", "unet_fp"):
        p = bundle.onnx_path(role)
        if p is not None:
            rep.merge(lint_model(p, target, polygraphy=polygraphy, file=p.name))
    if bundle.decoder_path is not None:
        rep.merge(lint_model(bundle.decoder_path, target, polygraphy=polygraphy, file=bundle.decoder_path.name))
    return rep


def lint_path(path: Union[str, os.PathLike], **kwargs) -> LintReport:
    """``tdqrt lint``: a bundle directory or one ``.onnx`` file."""
    path = Path(path)
    if path.is_dir():
        return lint_bundle(path, **kwargs)
    return lint_model(path, **kwargs)
