"""Export-mode modules: a frozen :class:`QuantizedModel` rewritten so that ``torch.onnx.export`` (the TorchScript
exporter, ``dynamo=False``) emits ONNX ``QuantizeLinear`` / ``DequantizeLinear`` nodes.

Each :class:`~tdqrt.calibration.quant.qmodel.QuantLayer` is swapped for a :class:`QDQLayer` whose forward calls
``torch.autograd.Function``\\ s with ``symbolic`` staticmethods. Their torch forward computes exactly what the ONNX
op computes (divide, round half to even, saturate to int8; multiply back), so the export module *is* the fake-quant
model numerically, and tracing sees ordinary tensors.

Graph of one quantized Conv (notes/tensorrt-qdq.md §2(d); ``r_t = s_ref / s_t``, ``ρ_t = 1/r_t = s_t / s_ref``)::

    per-timestep layer:  x → Div(ρ_t) → Q(s_ref) → DQ(s_ref) ─┐
                                       W_int8 → DQ(s_w, axis 0) ┴→ Conv(no bias) → Mul(ρ_t) → Add(b)
    static layer:        x → Q(s) → DQ(s) ─┐
                         W_int8 → DQ(s_w) ─┴→ Conv(bias b)

``ρ_t`` is the layer's column of a constant ``[T, L]`` table gathered by the ``timestep`` input
(``Gather(table, timestep)`` → ``[B, L]`` → column ``l`` → reshape ``[B, 1, 1, 1]``), so every Q/DQ scale is a
build-time constant as TensorRT requires, and the bias is added after the un-scaling Mul (``Conv(ρx)+b ≠
ρ(Conv(x)+b)``).

``Div(ρ_t)`` is ``Mul(r_t)`` of the notes in a form that is *bit-exact*: with a power-of-two ``s_ref`` the table
value ``s_t / s_ref`` is exact in float32 and ``(x / ρ_t) / s_ref`` rounds exactly like the torch model's
``x / s_t``, so the activation codes equal those of ``Q(x; s_t)`` element for element, ties included.
``ratio_op="mul"`` emits the literal ``Mul(r_t)`` (``r_t`` rounded to float32, a second table); its codes differ
only within float rounding of a tie (measured: 2 in 2.3 M codes). Both are plain pointwise ops on a runtime
tensor for TensorRT.

A Linear becomes ``MatMul(DQ(x), DQ(W^T))`` with the int8 weight stored pre-transposed ``[K, N]`` and the
per-output-channel scale on axis 1 (notes §1.3: MatMul with B = [K, N] → axis 1), followed by ``Add(b)``; a
MatMul handles 2-D and 3-D inputs (diffusers attention) alike, where a Gemm only takes 2-D.

Reference scale: ``s_ref = 2^round(log2(geometric mean over t of s_t))``. Any positive constant is exact in real
arithmetic; this one (a) keeps ``r_t`` centred on 1 (within a factor √2 of the geometric mean), so the scaled
activations neither grow nor shrink on average and FP16 range is not stressed on either side of the conv, and
(b) is a power of two, which makes ``s_t / s_ref`` exact (the bit-exact codes above), ``DQ(q; s_ref)`` exact, and
``s_ref`` exactly representable as an FP16 scale (opset ≥ 19). (The max over t would give ``r_t ≥ 1``, inflating
every activation by up to the full spread of the table before Q, with no benefit.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdqrt.calibration.quant.qmodel import QuantizedModel, QuantLayer
from tdqrt.engines.errors import ConfigError

ACT_QMIN, ACT_QMAX = -128, 127  # QuantizeLinear's int8 saturation = the tdqrt 8-bit activation grid


# --------------------------------------------------------------------------------------------------------------
# ONNX ops as autograd Functions (forward = the ONNX math in torch; symbolic = the ONNX node)


class QuantizeLinearFn(torch.autograd.Function):
    """``QuantizeLinear(x, scale, zero_point=int8 0)``: ``clamp(round_half_even(x / scale), -128, 127)`` as int8."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:  # noqa: ARG004
        return torch.clamp(torch.round(x / scale), ACT_QMIN, ACT_QMAX).to(torch.int8)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("QuantizeLinear", x, scale, zero_point)


class DequantizeLinearFn(torch.autograd.Function):
    """``DequantizeLinear(q, scale, zero_point=0, axis)``: ``q · scale`` (per-channel along ``axis`` when ``scale``
    is a vector)."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]) -> Tensor:  # noqa: ARG004
        if scale.ndim == 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        return q.to(scale.dtype) * scale

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        if axis is None:  # per tensor
            return g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return QuantizeLinearFn.apply(x, scale, zero_point)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int] = None) -> Tensor:
    return DequantizeLinearFn.apply(q, scale, zero_point, axis)


# --------------------------------------------------------------------------------------------------------------
# Scale choices


def reference_scale(column: Tensor) -> float:
    """``s_ref`` of one layer: the power of two nearest (in log space) to the geometric mean of its ``s_t``."""
    col = column.detach().double()
    if not bool(torch.isfinite(col).all()) or bool((col <= 0).any()):
        raise ConfigError("an activation scale table column has non-positive or non-finite entries; the quantized "
                          "checkpoint is broken, calibrate again")
    return float(2.0 ** round(float(torch.log2(col).mean())))


def is_static_column(column: Tensor) -> bool:
    """True when a layer's scale is the same at every timestep (static methods): no ratio nodes needed."""
    return bool((column == column[0]).all())


# --------------------------------------------------------------------------------------------------------------
# Export modules


class RatioContext:
    """Per-call rows of the ratio tables (``[B, L]``), set by :class:`ExportUNet` and read by every QDQLayer:
    ``scale_ratio`` = ``s_t / s_ref`` (= 1/r_t) and, for ``ratio_op="mul"``, ``ratio`` = ``s_ref / s_t`` (= r_t)."""

    def __init__(self) -> None:
        self.scale_ratio: Optional[Tensor] = None
        self.ratio: Optional[Tensor] = None
        self.trace: list[str] = []  # layer names in call order while tracing (to name the ONNX nodes)


class QDQLayer(nn.Module):
    """A frozen QuantLayer as explicit Q/DQ ops (see the module docstring for the graph).

    ``column`` is the layer's index into the ratio tables, or ``None`` for a static layer (plain Q/DQ with the
    constant scale). Buffers become ONNX initializers: ``w_int8`` (int8 codes; ``[K, N]`` for a Linear),
    ``w_scale`` ``[C_out]``, ``w_zero`` (int8 zeros), ``a_scale`` (0-d), ``a_zero`` (0-d int8), ``bias``.
    """

    def __init__(self, layer: QuantLayer, name: str, a_scale: float, column: Optional[int],
                 ctx: RatioContext) -> None:
        super().__init__()
        wq = layer.weight_quant
        if not wq.frozen:
            raise ConfigError("only a frozen quantized model can be exported (its int8 weight codes are missing)")
        if layer.act_quant.mode != "table" or layer.act_quant.bits != 8:
            raise ConfigError(f"export needs 8-bit activations in table mode, got {layer.act_quant.bits}-bit in mode "
                              f"{layer.act_quant.mode!r}; ONNX QuantizeLinear only saturates to the int8 range "
                              "(weights may have fewer bits: their codes are stored as int8)")
        self.kind = layer.kind
        self.layer_name = name
        self.conv_args = dict(layer.conv_args)
        self.column = column
        self.ctx = ctx
        codes = wq.codes.detach().cpu().to(torch.int8)
        if self.kind == "linear":
            codes = codes.t().contiguous()  # [K, N]: MatMul's B, per-channel axis 1
        self.w_axis = 0 if self.kind == "conv" else 1
        self.register_buffer("w_int8", codes)
        self.register_buffer("w_scale", wq.scale.detach().cpu().float().clone())
        self.register_buffer("w_zero", torch.zeros(codes.shape[self.w_axis], dtype=torch.int8))
        self.register_buffer("a_scale", torch.tensor(float(a_scale), dtype=torch.float32))
        self.register_buffer("a_zero", torch.tensor(0, dtype=torch.int8))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().cpu().float().clone())

    def _per_sample(self, table_rows: Tensor, ndim: int) -> Tensor:
        return table_rows[:, self.column].reshape([-1] + [1] * (ndim - 1))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            self.ctx.trace.append(self.layer_name)
        ratio = self.column is not None
        if ratio:
            rho = self._per_sample(self.ctx.scale_ratio, x.ndim)  # s_t / s_ref = 1 / r_t
            if self.ctx.ratio is not None:  # ratio_op "mul": x · r_t
                x = x * self._per_sample(self.ctx.ratio, x.ndim)
            else:  # ratio_op "div": x / (s_t / s_ref), bit-exact codes (see build_qdq_module)
                x = x / rho
        x = dequantize(quantize(x, self.a_scale, self.a_zero), self.a_scale, self.a_zero)
        w = dequantize(self.w_int8, self.w_scale, self.w_zero, self.w_axis)
        if self.kind == "conv":
            y = F.conv2d(x, w, None if ratio else self.bias, **self.conv_args)
            bias = None if self.bias is None else self.bias.reshape(1, -1, 1, 1)
        else:
            y = torch.matmul(x, w)
            bias = self.bias
        if ratio:
            y = y * self._per_sample(self.ctx.scale_ratio, y.ndim)
        if bias is not None and (ratio or self.kind == "linear"):
            y = y + bias
        return y


class ExportUNet(nn.Module):
    """The exported signature ``(sample, timestep[, class_labels]) -> eps`` around an FP or a Q/DQ UNet.

    ``scale_ratio`` (and ``ratio`` for ``ratio_op="mul"``): constant ``[T, L]`` tables, None when every layer is
    static. Gathering them by ``timestep`` inside the graph keeps the FP model's signature.
    """

    def __init__(self, model: nn.Module, conditional: bool, scale_ratio: Optional[Tensor] = None,
                 ratio: Optional[Tensor] = None, ctx: Optional[RatioContext] = None) -> None:
        super().__init__()
        self.model = model
        self.conditional = conditional
        self.ctx = ctx
        self.register_buffer("scale_ratio_table", scale_ratio)
        self.register_buffer("ratio_table", ratio)

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        if self.scale_ratio_table is not None:
            self.ctx.scale_ratio = self.scale_ratio_table[timestep]
            self.ctx.ratio = None if self.ratio_table is None else self.ratio_table[timestep]
        try:
            if self.conditional:
                return self.model(sample, timestep, class_labels)
            return self.model(sample, timestep)
        finally:
            if self.ctx is not None:
                self.ctx.scale_ratio = self.ctx.ratio = None


RATIO_OPS = ("div", "mul")


class QDQPlan:
    """What the export of one quantized model looks like: per layer ``s_ref`` (or the static scale) and whether
    it takes the ratio nodes; kept for the manifest and for tests.

    ``scale_ratio[t, l] = s_t / s_ref`` is *exact* in float32 because ``s_ref`` is a power of two, and
    ``ratio[t, l] = s_ref / s_t`` is that value's reciprocal rounded once from float64.
    """

    def __init__(self, qm: QuantizedModel) -> None:
        table = qm.scale_table().float()  # [T, L], the float32 scales the torch model divides by
        self.layer_names = list(qm.layer_names)
        self.static = [is_static_column(table[:, j]) for j in range(table.shape[1])]
        self.scales = [float(table[0, j]) if s else reference_scale(table[:, j]) for j, s in enumerate(self.static)]
        self.table = table
        ref = torch.tensor(self.scales, dtype=torch.float32)
        self.scale_ratio = table / ref[None, :]  # exact: division by a power of two
        self.ratio = (ref.double()[None, :] / table.double()).float()
        self.scale_ratio[:, self.static] = 1.0
        self.ratio[:, self.static] = 1.0

    @property
    def per_timestep(self) -> bool:
        return not all(self.static)

    def summary(self) -> dict:
        return {
            "layers": self.layer_names,
            "per_timestep_layers": [n for n, s in zip(self.layer_names, self.static) if not s],
            "act_scale": self.scales,
            "act_scale_kind": ["static" if s else "s_ref" for s in self.static],
            "s_ref_rule": "2^round(log2(geometric mean over t of s_t)); r_t = s_ref / s_t",
            "num_train_timesteps": int(self.table.shape[0]),
        }


def build_qdq_module(qm: QuantizedModel, ratio_op: str = "div") -> tuple[ExportUNet, QDQPlan]:
    """A copy of ``qm``'s UNet with every QuantLayer replaced by a :class:`QDQLayer`, wrapped in the export
    signature. ``qm`` is left untouched.

    ``ratio_op`` says how ``r_t`` enters before the Q: ``"div"`` (default) divides by the exact table value
    ``s_t / s_ref``; with a power-of-two ``s_ref`` this makes ``x / (s_t/s_ref) / s_ref`` bit-identical to the torch
    model's ``x / s_t``, so the activation codes are *exactly* those of ``Q(x; s_t)``, ties included.
    ``"mul"`` multiplies by ``r_t = s_ref / s_t`` rounded to float32: the same math, codes equal except within
    float rounding of a tie (the form of notes §2(d)). After the conv both use ``Mul(s_t / s_ref)``.
    """
    import copy

    if ratio_op not in RATIO_OPS:
        raise ConfigError(f"ratio_op {ratio_op!r} must be one of {RATIO_OPS}")
    if not qm.frozen:
        raise ConfigError("only a frozen quantized model can be exported; load it with load_model_dir")
    plan = QDQPlan(qm)
    ctx = RatioContext()
    model = copy.deepcopy(qm.model).cpu().eval()
    for j, name in enumerate(plan.layer_names):
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QDQLayer(layer, name, plan.scales[j], None if plan.static[j] else j, ctx))
    conditional = bool(getattr(qm, "num_classes", 0))
    if plan.per_timestep:
        wrapper = ExportUNet(model, conditional, plan.scale_ratio.clone(),
                             plan.ratio.clone() if ratio_op == "mul" else None, ctx)
    else:
        wrapper = ExportUNet(model, conditional, ctx=ctx)
    return wrapper.eval(), plan


def build_fp_module(fp_model: nn.Module) -> ExportUNet:
    import copy

    return ExportUNet(copy.deepcopy(fp_model).cpu().eval(), bool(getattr(fp_model, "num_classes", 0))).eval()
