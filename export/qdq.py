"""Export-mode modules: a frozen :class:`QuantizedModel` rewritten so that ``torch.onnx.export`` (the TorchScript
exporter, ``dynamo=False``) emits ONNX ``QuantizeLinear`` / ``DequantizeLinear`` nodes.

Each :class:`~tdqrt.calibration.quant.qmodel.QuantLayer` is swapped for a :class:`QDQLayer` whose forward calls
``torch.autograd.Function``\\ s with ``symbolic`` staticmethods. Their torch forward computes exactly what the ONNX
op computes (divide, round half to even, add the zero point, saturate to int8 / uint8; subtract it, multiply back),
so the export module *is* the fake-quant model numerically (plus the output grids of ``ort-cpu``), and tracing sees
ordinary tensors.

Graph of one quantized Conv (``r_t = s_ref / s_t``, ``ρ_t = 1/r_t = s_t / s_ref``)::

    per-timestep layer:  x → Div(ρ_t) → Q(s_ref) → DQ(s_ref) ─┐
                                       W_int8 → DQ(s_w, axis 0) ┴→ Conv(no bias) → Mul(ρ_t) → Add(b)
    static layer:        x → Q(s) → DQ(s) ─┐
                         W_int8 → DQ(s_w) ─┴→ Conv(bias b)

``ort-cpu`` flavour (ONNX Runtime x86 CPU): the activation Q/DQ are uint8 with zero point 128 —
``q_u8 = q_s8 + 128``, the same grid, so the codes stay exact — and every Conv gets a uint8 ``Q(s_out, z_out) →
DQ`` right after it (before ``Mul(ρ_t)`` / ``Add(b)``), which is what ORT fuses into QLinearConv
(QLinearMatMul for a Linear)::

    per-timestep layer:  x → Div(ρ_t) → Q(s_ref, 128) → DQ ─┐
                                     W_int8 → DQ(s_w) ─┴→ Conv(no bias) → Q(s_out, z_out) → DQ
                                                                           → Mul(ρ_t) → Add(b)
    static layer:        x → Q(s, 128) → DQ → Conv(DQ(W), bias b) → Q(s_out, z_out) → DQ

The output grid is constant: the conv output is observed in the ratio domain (input divided by ρ_t), where its
range hardly depends on t (:func:`calibrate_output_grids`). A Linear's MatMul gets the same output Q/DQ (before
its bias Add) and becomes QLinearMatMul: without it ORT fuses a 3-D MatMul into MatMulIntegerToFloat, but folds a
2-D ``MatMul → Add(bias)`` into a float Gemm first (measured, ORT 1.31).

``ρ_t`` is the layer's column of a constant ``[T, L]`` table gathered by the ``timestep`` input
(``Gather(table, timestep)`` → ``[B, L]`` → column ``l`` → reshape ``[B, 1, 1, 1]``), so every Q/DQ scale is a
build-time constant as TensorRT requires, and the bias is added after the un-scaling Mul (``Conv(ρx)+b ≠
ρ(Conv(x)+b)``).

``Div(ρ_t)`` is ``Mul(r_t)`` in a form that is *bit-exact*: with a power-of-two ``s_ref`` the table
value ``s_t / s_ref`` is exact in float32 and ``(x / ρ_t) / s_ref`` rounds exactly like the torch model's
``x / s_t``, so the activation codes equal those of ``Q(x; s_t)`` element for element, ties included.
``ratio_op="mul"`` emits the literal ``Mul(r_t)`` (``r_t`` rounded to float32, a second table); its codes differ
only within float rounding of a tie. Both are plain pointwise ops on a runtime
tensor for TensorRT.

A Linear becomes ``MatMul(DQ(x), DQ(W^T))`` with the int8 weight stored pre-transposed ``[K, N]`` and the
per-output-channel scale on axis 1 (the output-channel axis of B = [K, N]), followed by ``Add(b)``; a
MatMul handles 2-D and 3-D inputs (diffusers attention) alike, where a Gemm only takes 2-D.

Reference scale: ``s_ref = 2^round(log2(geometric mean over t of s_t))``. Any positive constant is exact in real
arithmetic; this one (a) keeps ``r_t`` centred on 1 (within a factor √2 of the geometric mean), so the scaled
activations neither grow nor shrink on average and FP16 range is not stressed on either side of the conv, and
(b) is a power of two, which makes ``s_t / s_ref`` exact (the bit-exact codes above), ``DQ(q; s_ref)`` exact, and
``s_ref`` exactly representable as an FP16 scale (opset ≥ 19). (The max over t would give ``r_t ≥ 1``, inflating
every activation by up to the full spread of the table before Q, with no benefit.)
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdqrt.calibration.quant.qmodel import QuantizedModel, QuantLayer
from tdqrt.engines.config import check_choice
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError
from tdqrt.export.lint import FLAVOURS, Flavour

ZERO_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}


# --------------------------------------------------------------------------------------------------------------
# ONNX ops as autograd Functions (forward = the ONNX math in torch; symbolic = the ONNX node)


class QuantizeLinearFn(torch.autograd.Function):
    """``QuantizeLinear(x, scale, zero_point)``: ``saturate(round_half_even(x / scale) + zero_point)`` in the zero
    point's type (int8: [-128, 127]; uint8: [0, 255])."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:  # noqa: ARG004
        info = torch.iinfo(zero_point.dtype)
        q = torch.round(x / scale) + zero_point.to(x.dtype)
        return torch.clamp(q, info.min, info.max).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("QuantizeLinear", x, scale, zero_point)


class DequantizeLinearFn(torch.autograd.Function):
    """``DequantizeLinear(q, scale, zero_point, axis)``: ``(q - zero_point) · scale`` (per-channel along ``axis``
    when ``scale`` is a vector)."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]) -> Tensor:  # noqa: ARG004
        if scale.ndim == 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return (q.to(scale.dtype) - zero_point.to(scale.dtype)) * scale

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
    ``scale_ratio`` = ``s_t / s_ref`` (= 1/r_t) and, for ``ratio_op="mul"``, ``ratio`` = ``s_ref / s_t`` (= r_t).

    ``observer``, while set, receives ``(layer name, weighted-op output)`` of every layer that quantizes its output
    (``ort-cpu``), which then passes the float output on unquantized: how :func:`calibrate_output_grids` sees
    the values the output QuantizeLinear will get.
    """

    def __init__(self) -> None:
        self.scale_ratio: Optional[Tensor] = None
        self.ratio: Optional[Tensor] = None
        self.trace: list[str] = []  # layer names in call order while tracing (to name the ONNX nodes)
        self.observer: Optional[Callable[[str, Tensor], None]] = None


class QDQLayer(nn.Module):
    """A frozen QuantLayer as explicit Q/DQ ops (see the module docstring for the graph).

    ``column`` is the layer's index into the ratio tables, or ``None`` for a static layer (plain Q/DQ with the
    constant scale). Buffers become ONNX initializers: ``w_int8`` (int8 codes; ``[K, N]`` for a Linear),
    ``w_scale`` ``[C_out]``, ``w_zero`` (int8 zeros), ``a_scale`` (0-d), ``a_zero`` (0-d: int8 0, or uint8 128
    for ``ort-cpu``), ``bias``; for a flavour that quantizes outputs also ``out_scale`` / ``out_zero`` (uint8),
    set by :meth:`set_output_grid`.
    """

    def __init__(self, layer: QuantLayer, name: str, a_scale: float, column: Optional[int],
                 ctx: RatioContext, flavour: Flavour) -> None:
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
        self.register_buffer("a_zero", torch.tensor(flavour.act_zero_point, dtype=ZERO_DTYPES[flavour.act_zero_dtype]))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().cpu().float().clone())
        self.quantize_output = flavour.quantize_outputs
        self.register_buffer("out_scale", None)
        self.register_buffer("out_zero", None)

    def set_output_grid(self, scale: float, zero_point: int) -> None:
        """The constant uint8 grid of the output QuantizeLinear (``ort-cpu``)."""
        self.out_scale = torch.tensor(float(scale), dtype=torch.float32, device=self.a_scale.device)
        self.out_zero = torch.tensor(int(zero_point), dtype=torch.uint8, device=self.a_scale.device)

    def _quantize_output(self, y: Tensor) -> Tensor:
        if self.ctx.observer is not None:
            self.ctx.observer(self.layer_name, y)
            return y
        if self.out_scale is None:
            raise ConfigError(f"layer {self.layer_name} has no output quantization grid; calibrate it with "
                              "calibrate_output_grids before exporting an ort-cpu graph")
        return dequantize(quantize(y, self.out_scale, self.out_zero), self.out_scale, self.out_zero)

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
        if self.quantize_output:  # right after the weighted op: ORT fuses DQ-op-Q into QLinearConv/QLinearMatMul
            y = self._quantize_output(y)
        if ratio:
            y = y * self._per_sample(self.ctx.scale_ratio, y.ndim)
        if bias is not None and (ratio or self.kind == "linear"):
            y = y + bias
        return y


class ExportUNet(nn.Module):
    """The exported signature ``(sample, timestep[, class_labels | encoder_hidden_states]) -> eps`` around an FP or
    a Q/DQ UNet (``conditional``: whether the UNet takes the third input, labels or text embeddings).

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

    def forward(self, sample: Tensor, timestep: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if self.scale_ratio_table is not None:
            self.ctx.scale_ratio = self.scale_ratio_table[timestep]
            self.ctx.ratio = None if self.ratio_table is None else self.ratio_table[timestep]
        try:
            if self.conditional:
                return self.model(sample, timestep, cond)
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
        self.output_grids: dict[str, dict] = {}  # ort-cpu: layer -> observed range and uint8 grid of its output

    @property
    def per_timestep(self) -> bool:
        return not all(self.static)

    def summary(self) -> dict:
        out = {
            "layers": self.layer_names,
            "per_timestep_layers": [n for n, s in zip(self.layer_names, self.static) if not s],
            "act_scale": self.scales,
            "act_scale_kind": ["static" if s else "s_ref" for s in self.static],
            "s_ref_rule": "2^round(log2(geometric mean over t of s_t)); r_t = s_ref / s_t",
            "num_train_timesteps": int(self.table.shape[0]),
        }
        if self.output_grids:
            out |= {"output_grid": [self.output_grids[n] for n in self.layer_names],
                    "output_grid_rule": OUTPUT_GRID_RULE}
        return out


OUTPUT_GRID_RULE = ("uint8 grid over [min(lo, 0), max(hi, 0)] of the weighted-op output observed on the calibration "
                    "inputs (per-timestep layers: in the ratio domain, before Mul(s_t/s_ref)); scale = (hi - lo) / "
                    "255, zero point = round(-lo / scale)")


def output_grid(lo: float, hi: float) -> tuple[float, int]:
    """Scale and uint8 zero point of the grid that spans ``[min(lo, 0), max(hi, 0)]`` (0 exactly representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0  # an all-zero output still needs a positive scale
    return scale, int(min(max(round(-lo / scale), 0), 255))


@torch.no_grad()
def calibrate_output_grids(module: ExportUNet, plan: QDQPlan, batches: Iterable[tuple]) -> None:
    """Give every output-quantizing layer of ``module`` (``ort-cpu``) its output grid: run ``batches`` of
    ``(x, t, y)`` through the module with the output Q/DQ bypassed, record the min and max each layer's
    weighted op produces, and apply :func:`output_grid` (recorded in ``plan.output_grids``).

    The bypass makes this the range of the torch fake-quant model's own conv outputs (later layers see
    unrequantized inputs, as in the model being exported).
    """
    layers = _output_quantizing_layers(module)
    lo = dict.fromkeys(layers, float("inf"))
    hi = dict.fromkeys(layers, float("-inf"))

    def observe(name: str, y: Tensor) -> None:
        lo[name] = min(lo[name], float(y.min()))
        hi[name] = max(hi[name], float(y.max()))

    module.ctx.observer = observe
    try:
        for x, t, y in batches:
            module(x, t, y)
    finally:
        module.ctx.observer = None
    missing = [n for n in layers if lo[n] == float("inf")]
    if missing:
        raise DataError(f"the calibration inputs never reached layers {missing[:5]}; pass a calibration set of this "
                        "model")
    for name in layers:
        scale, zero = output_grid(lo[name], hi[name])
        plan.output_grids[name] = {"min": lo[name], "max": hi[name], "scale": scale, "zero_point": zero}
    apply_output_grids(module, plan.output_grids)


def _output_quantizing_layers(module: ExportUNet) -> dict[str, QDQLayer]:
    layers = {m.layer_name: m for m in module.modules() if isinstance(m, QDQLayer) and m.quantize_output}
    if not layers:
        raise ConfigError("this export module has no output-quantizing layers (built for a flavour without them)")
    return layers


def apply_output_grids(module: ExportUNet, grids: dict[str, dict]) -> None:
    """Set the output grids ``{layer: {"scale": s, "zero_point": z, ...}}`` (``plan.output_grids``, or the
    ``output_grid`` list of a bundle manifest) on every output-quantizing layer of ``module``: with them the module
    computes what the exported ``ort-cpu`` graph computes."""
    layers = _output_quantizing_layers(module)
    if set(grids) != set(layers):
        raise ArtifactError(f"output grids are given for {len(grids)} layers, the model quantizes the outputs of "
                            f"{len(layers)} (missing: {sorted(set(layers) - set(grids))[:3]}, unknown: "
                            f"{sorted(set(grids) - set(layers))[:3]}); re-export the bundle")
    for name, layer in layers.items():
        layer.set_output_grid(grids[name]["scale"], grids[name]["zero_point"])


def build_qdq_module(qm: QuantizedModel, ratio_op: str = "div",
                     flavour: Flavour = FLAVOURS["trt"]) -> tuple[ExportUNet, QDQPlan]:
    """A copy of ``qm``'s UNet with every QuantLayer replaced by a :class:`QDQLayer`, wrapped in the export
    signature. ``qm`` is left untouched.

    ``ratio_op`` says how ``r_t`` enters before the Q: ``"div"`` (default) divides by the exact table value
    ``s_t / s_ref``; with a power-of-two ``s_ref`` this makes ``x / (s_t/s_ref) / s_ref`` bit-identical to the torch
    model's ``x / s_t``, so the activation codes are *exactly* those of ``Q(x; s_t)``, ties included.
    ``"mul"`` multiplies by ``r_t = s_ref / s_t`` rounded to float32: the same math, codes equal except within
    float rounding of a tie. After the conv both use ``Mul(s_t / s_ref)``.

    ``flavour`` sets the activation zero point (int8 0 / uint8 128) and whether outputs get a Q/DQ; when they do,
    :func:`calibrate_output_grids` must run before the module is traced.
    """
    import copy

    check_choice("ratio_op", ratio_op, RATIO_OPS, flag="--ratio-op")
    if not qm.frozen:
        raise ConfigError("only a frozen quantized model can be exported; load it with load_model_dir")
    plan = QDQPlan(qm)
    ctx = RatioContext()
    model = copy.deepcopy(qm.model).cpu().eval()
    for j, name in enumerate(plan.layer_names):
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QDQLayer(layer, name, plan.scales[j], None if plan.static[j] else j, ctx, flavour))
    conditional = takes_conditioning(qm)
    if plan.per_timestep:
        wrapper = ExportUNet(model, conditional, plan.scale_ratio.clone(),
                             plan.ratio.clone() if ratio_op == "mul" else None, ctx)
    else:
        wrapper = ExportUNet(model, conditional, ctx=ctx)
    return wrapper.eval(), plan


def build_fp_module(fp_model: nn.Module) -> ExportUNet:
    import copy

    return ExportUNet(copy.deepcopy(fp_model).cpu().eval(), takes_conditioning(fp_model)).eval()


def takes_conditioning(model: nn.Module) -> bool:
    """Whether ``model`` takes a conditioning ``y``: class labels (``num_classes``) or text embeddings
    (``cond_shape``)."""
    return bool(getattr(model, "num_classes", 0)) or getattr(model, "cond_shape", None) is not None
