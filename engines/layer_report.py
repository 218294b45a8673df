"""Parse TensorRT's engine-inspector JSON into a per-layer precision report — pure Python, no TensorRT needed.

What it reads: ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` of an engine built with
``ProfilingVerbosity.DETAILED`` (with ``LAYER_NAMES_ONLY``, the default, every layer is a bare name string and
there is nothing to report — :func:`parse_engine_information` refuses that with a message saying so). The
document is ``{"Layers": [...], "Bindings": [...]}``; each layer is a dict with ``Name``, ``LayerType`` and
``Inputs`` / ``Outputs`` lists of tensors ``{"Name", "Location", "Dimensions", "Format/Datatype"}``, plus optional
``ParameterType``, ``Origin`` (``"QDQ"`` for a Q/DQ TensorRT could not fold), ``TacticName``/``TacticValue`` and
(TensorRT ≥ 10) ``Metadata`` naming the ONNX nodes. Sources for the schema:

* TensorRT developer guide, "Engine Inspector"
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/engine-tools.html);
* the recorded QAT ResNet engine of TensorRT Engine Explorer,
  ``NVIDIA/TensorRT:tools/experimental/trt-engine-explorer/examples/pytorch/resnet/A100/qat-residual-qgap/
  resnet-qat-residual-qgap.onnx.engine.graph.json`` and TREx's reader of it (``trex/layer.py``, ``activations.py``:
  the format strings, e.g. "Row major linear FP32", "Thirty-two wide channel vectorized row major Int8 format",
  and TensorRT 10's short kgen names "Half", "Float", "Int8");
* Polygraphy 0.53 ``tools/inspect/subtool/model/extractors/_trt.py``: TensorRT 11 splits ``Format/Datatype`` into
  separate ``Datatype`` and ``Format`` keys — both spellings are read here.

Precision of a layer = the data type of its first input (TREx's convention: an INT8 convolution with a float
output, the TensorRT-recommended placement with no Q on conv outputs, counts as INT8), or of its first output
when it has no inputs.

Unfused Q/DQ (each one is an extra memory-bound kernel; the cause is usually a Q/DQ placed where TensorRT cannot
fold it into the neighbouring compute layer — TensorRT developer guide, "Explicit Quantization", Q/DQ layer-placement
recommendations):

* a conversion-only layer (``Reformat`` / ``Scale``) whose input and output differ in that exactly one side is
  INT8 — TREx's ``QDQLinter`` rule (``trex/lint.py``, "Unfused Quantize/Dequantize layer");
* a layer built from a single Q/DQ node: its name is one ONNX node name (TensorRT names fusions ``"a + b"``,
  ``"PWN(a, b)"`` or ``"{ForeignNode[a...b]}"``) containing ``QuantizeLinear`` / ``DequantizeLinear`` /
  ``quantize`` — e.g. the standalone ``QuantizeLinear_2`` (``Origin: QDQ``) of the recorded ResNet engine, or
  tdqrt's ``<layer>/act_quantize``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from tdqrt.engines.errors import ArtifactError

# Tokens TensorRT uses for data types in its format strings, long ("Row major linear FP16 format") and kgen short
# forms ("Half"); matched per word, case-insensitively, so "UInt8" never reads as INT8.
_DTYPE_TOKENS = {
    "fp32": "FP32", "float": "FP32", "fp16": "FP16", "half": "FP16", "bf16": "BF16", "bfloat16": "BF16",
    "fp8": "FP8", "int8": "INT8", "uint8": "UINT8", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
    "int4": "INT4", "fp4": "FP4", "double": "FP64",
}
_CONVERSION_TYPES = {"Reformat", "Scale"}
_QDQ_NAME = re.compile(r"quantize", re.IGNORECASE)  # QuantizeLinear, DequantizeLinear, act_quantize, ...


def tensor_dtype(tensor: dict) -> Optional[str]:
    """The data type of one inspector tensor entry ("INT8", "FP16", ...), None when it is not shown (dynamic shapes
    inspected without an execution context print no format)."""
    desc = tensor.get("Format/Datatype")
    if desc is None:  # TensorRT 11: separate keys
        desc = " ".join(str(tensor[k]) for k in ("Datatype", "Format") if tensor.get(k))
    for word in re.findall(r"[A-Za-z0-9]+", str(desc)):
        found = _DTYPE_TOKENS.get(word.lower())
        if found:
            return found
    return None


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    precision: Optional[str]
    inputs: list[Optional[str]]
    outputs: list[Optional[str]]
    tactic: Optional[str] = None
    origin: Optional[str] = None
    unfused_qdq: Optional[str] = None  # "quantize" | "dequantize" when the layer is a standalone Q/DQ


def _single_node(name: str) -> bool:
    """True when a layer name is one ONNX node's: TensorRT names fusions "a + b", pointwise fusions "PWN(a, b)" and
    Myelin regions "{ForeignNode[a...b]}"."""
    return not re.search(r" \+ |[(){}\[\]]", name)


def _unfused_qdq(name: str, layer_type: str, inputs: list, outputs: list) -> Optional[str]:
    if layer_type in _CONVERSION_TYPES and inputs and outputs:
        in_int8, out_int8 = inputs[0] == "INT8", outputs[0] == "INT8"
        if in_int8 != out_int8:
            return "dequantize" if in_int8 else "quantize"
    if _single_node(name) and _QDQ_NAME.search(name):
        return "dequantize" if re.search(r"dequantize", name, re.IGNORECASE) else "quantize"
    return None


def parse_layer(raw: Any) -> LayerInfo:
    """One entry of the ``Layers`` list."""
    if not isinstance(raw, dict):
        raise ArtifactError("the engine's layer information holds only layer names: it was built without "
                            "ProfilingVerbosity.DETAILED; rebuild it with `tdqrt build` (which sets it)")
    name = str(raw.get("Name", ""))
    layer_type = str(raw.get("LayerType") or raw.get("ParameterType") or "Unknown")
    inputs = [tensor_dtype(t) for t in raw.get("Inputs") or []]
    outputs = [tensor_dtype(t) for t in raw.get("Outputs") or []]
    precision = inputs[0] if inputs else (outputs[0] if outputs else None)
    tactic = raw.get("TacticName") or raw.get("TacticValue")
    return LayerInfo(name=name, type=layer_type, precision=precision, inputs=inputs, outputs=outputs,
                     tactic=None if tactic is None else str(tactic), origin=raw.get("Origin"),
                     unfused_qdq=_unfused_qdq(name, layer_type, inputs, outputs))


@dataclass
class LayerReport:
    """Per-layer types and precisions of one engine, with the warnings worth acting on."""

    layers: list[LayerInfo]
    warnings: list[str] = field(default_factory=list)

    @property
    def precision_counts(self) -> dict[str, int]:
        """Layers per precision, standalone Q/DQ layers left out (they are listed in ``unfused_qdq``)."""
        counts = Counter(layer.precision or "unknown" for layer in self.layers if layer.unfused_qdq is None)
        return dict(sorted(counts.items()))

    @property
    def int8_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.precision == "INT8" and layer.unfused_qdq is None]

    @property
    def unfused_qdq(self) -> list[dict[str, str]]:
        return [{"name": layer.name, "kind": layer.unfused_qdq, "type": layer.type}
                for layer in self.layers if layer.unfused_qdq is not None]

    def summary(self) -> dict:
        return {"layers": len(self.layers), "precision_counts": self.precision_counts,
                "int8_layers": len(self.int8_layers), "unfused_qdq": self.unfused_qdq, "warnings": list(self.warnings)}

    def to_dict(self) -> dict:
        return self.summary() | {"per_layer": [asdict(layer) for layer in self.layers]}


def parse_engine_information(info: Union[str, dict]) -> LayerReport:
    """Parse the inspector's JSON (a string as TensorRT returns it, or the decoded dict) into a :class:`LayerReport`."""
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"the engine inspector returned invalid JSON ({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("Layers"), list):
        raise ArtifactError("the engine information has no 'Layers' list; it is not TensorRT engine-inspector JSON")
    layers = [parse_layer(raw) for raw in info["Layers"]]
    report = LayerReport(layers)
    unfused = report.unfused_qdq
    if unfused:
        names = ", ".join(u["name"] for u in unfused[:5]) + (" ..." if len(unfused) > 5 else "")
        report.warnings.append(f"{len(unfused)} Q/DQ layer(s) were not fused into a compute layer and run as "
                               f"separate kernels ({names}); check the Q/DQ placement with `tdqrt lint`")
    if not report.int8_layers:
        report.warnings.append("no layer runs in INT8: TensorRT folded or ignored every Q/DQ pair (is this the "
                               "bundle's unet.onnx, not unet_fp.onnx?)")
    if any(layer.precision is None for layer in layers):
        report.warnings.append("some layers show no data type (dynamic shapes inspected without input shapes); "
                               "their precision is 'unknown'")
    return report
