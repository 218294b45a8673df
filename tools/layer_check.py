"""The teacher-forced per-layer check behind ``tdqrt validate``'s INT8 verdict: is the Q/DQ graph the fake-quant
model, layer by layer, whatever the network does with float rounding?

Why not compare ε end to end: ONNX Runtime and torch sum convolutions, GroupNorm and attention in different
orders, so a layer input differs by ~1e-7 relative. Where that flips an activation sitting on a rounding tie, the
flip propagates through every later quantizer, and a network that amplifies small perturbations (an untrained or
barely trained one, or any model at t≈0) turns a handful of tie flips into an ε difference of the size of the
quantization error itself. No bound on the end-to-end error separates that from a wrong scale in a layer that
hardly matters. Teacher forcing removes the cascade: each layer is checked on ORT's *own* input for that layer.

For every quantized layer of the graph (named ``<layer>/act_quantize`` … by the exporter, recovered with
:func:`tdqrt.export.exporter.layers_from_node_names`) the graph gets debug outputs (its input, activation codes
and output, :func:`tdqrt.export.exporter.with_debug_outputs`) and runs in ONNX Runtime with graph optimizations
off: what the graph *means*. (The fused integer kernels ONNX Runtime runs an ort-cpu graph with show only in the
reported end-to-end error; ``tdqrt validate`` warns where they are known to saturate.) Per layer and timestep:

* **codes**: ORT's activation codes vs ``Q(input; s_t)`` (:func:`tdqrt.calibration.quant.intmath.quantize_codes`
  with the torch model's scale at t; ``+128`` for the uint8 ``ort-cpu`` grid). A differing code is forgiven only
  as a rounding tie: one step off where ``input / s_t`` lies within ``code_tie`` code units of ``k + ½``. Float32
  rounding of ``x / ρ_t / s_ref`` (or ``x · r_t``) against ``x / s_t`` moves a value of at most 128 code units
  by a few ulp, ≤ 1.5e-5 code units; ``code_tie`` = 1e-4 is a few times that, while a wrong scale, zero point or
  ratio table entry moves codes far from ties.
* **output**: ORT's layer output vs the layer recomputed in float64 from ORT's codes: ``trt``:
  ``op(codes·s_t, W) + b`` (``W`` = int8 codes × per-channel scale), relative L2 ≤ ``layer_rel_l2`` (1e-4; float32
  accumulation over up to C_in·k² products differs from float64 by ~1e-6 relative, while a wrong weight scale,
  bias or op is ≥ 1e-2). ``ort-cpu``: the weighted op's output (ratio domain) requantized on the output grid the
  bundle records, ``(Q(y; s_out, z) − z)·s_out·ρ_t + b``; ORT's output must lie on that grid (within 1e-3 of a
  step: float32 rounding) at the recorded code, or one step off where the float64 ``y / s_out`` lies within
  ``output_tie`` (1e-3) code units of a tie: float32 accumulation moves it that little (the forgiven flips of a
  random-weight ``ddpm-cifar10-32``-architecture ort-cpu bundle were within 3.7e-5 code units of a tie; the report
  records ``max_output_tie_distance``). A missing or
  mis-scaled output Q/DQ puts the output off the recorded grid.
* **input / mapping**: the torch fake-quant model run with every quantized layer's *output* replaced by ORT's (a
  forward hook), so that no quantizer is left to amplify rounding: each layer's input in torch vs ORT's input
  for that layer, and torch's ε vs ORT's, relative L2 ≤ ``forced_rel_l2`` (1e-4; GroupNorm, SiLU, attention and
  skip connections between layers in float32, ~1e-6 apart). A wrong or missing op between layers, or a graph
  layer mapped to the wrong torch layer, fails here, naming the first layer whose input is wrong.

A layer missing from the graph, or one the torch model does not have, fails too. The network's own sensitivity
(how far a relative ``sensitivity_perturbation`` of the input moves the fake-quant ε) is measured beside it by
:func:`sensitivity` — the size of ε differences that float rounding alone can cause.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tdqrt.calibration.quant.intmath import quantize_codes
from tdqrt.calibration.quant.qmodel import QuantizedModel
from tdqrt.engines.denoiser import feed_conditioning
from tdqrt.export.exporter import ExportedModel, layers_from_node_names, save_onnx, with_debug_outputs
from tdqrt.export.qdq import QDQPlan


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape([-1] + [1] * (ndim - 1))


def _weighted_op(layer, xq: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    wq = layer.weight_quant
    w = wq.codes.double() * _per_sample(wq.scale.detach().double(), wq.codes.ndim)
    if layer.kind == "conv":
        return F.conv2d(xq, w, bias, **layer.conv_args)
    return F.linear(xq, w, bias)


class LayerCheck:
    """The per-layer check of one INT8 graph against one quantized torch model (see the module docstring).

    ``target`` is the graph's export flavour; ``output_grids`` (``ort-cpu`` only) the ``{layer: {"scale",
    "zero_point"}}`` the bundle records. Call :meth:`run` once per feed dict, then read :meth:`summary`.
    """

    def __init__(self, int8_onnx: Path, qm: QuantizedModel, *, target: str, config,
                 output_grids: Optional[dict] = None) -> None:
        import onnx
        import onnxruntime as ort

        from tdqrt.engines.ort import create_session

        self.qm, self.target, self.config = qm, target, config
        self.plan = QDQPlan(qm)
        self.torch_layers = dict(qm.layers())
        model = onnx.load(str(int8_onnx))
        graph_layers = layers_from_node_names(model)
        self.problems: list[str] = []  # structural: layers missing from / unknown to the graph
        missing = [n for n in self.plan.layer_names if n not in graph_layers]
        unknown = [n for n in graph_layers if n.split("#")[0] not in self.torch_layers]  # "#k": a repeated call
        if missing:
            self.problems.append(f"layers {missing[:3]}{' …' if len(missing) > 3 else ''} of the torch model have no "
                                 "quantized layer (<layer>/act_quantize) in the graph (a dropped layer or a wrong "
                                 "layer mapping)")
        if unknown:
            self.problems.append(f"the graph quantizes layers {unknown[:3]} the torch model does not have")
        self.layers = [n for n in self.plan.layer_names if n in graph_layers]
        self.grids = output_grids or {}
        if target == "ort-cpu" and not output_grids:
            self.problems.append("no output grids given for an ort-cpu graph (the bundle manifest records them)")
        debug = with_debug_outputs(ExportedModel(model, "int8-qdq", {}, {n: graph_layers[n] for n in self.layers},
                                                 None, target))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "debug.onnx"
            save_onnx(debug, path)
            self.session = create_session(path, ["CPUExecutionProvider"], session_options=so)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.stats = {n: {"codes": 0, "code_ties": 0, "code_errors": 0, "output_rel_l2": 0.0, "output_ties": 0,
                          "max_tie_distance": 0.0, "output_errors": 0, "input_rel_l2": 0.0, "failed_at": {}}
                      for n in self.layers}
        self.eps_rel_l2 = 0.0
        self.eps_failed_at: list[int] = []

    # -- per feed

    def run(self, feed: dict, timestep: int) -> None:
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        t = torch.from_numpy(np.asarray(feed["timestep"], np.int64))
        for name in self.layers:
            self._check_layer(name, outs, t, timestep)
        self._check_forced(feed, outs, t, timestep)

    def _fail(self, name: str, what: str, timestep: int) -> None:
        self.stats[name]["failed_at"].setdefault(what, []).append(int(timestep))

    def _check_layer(self, name: str, outs: dict, t: torch.Tensor, timestep: int) -> None:
        cfg, st, layer = self.config, self.stats[name], self.torch_layers[name]
        j = self.plan.layer_names.index(name)
        xi = torch.from_numpy(outs[f"{name}:input"]).float()
        s_t = _per_sample(layer.act_quant.table[t].float(), xi.ndim)
        offset = 128 if self.target == "ort-cpu" else 0
        codes = torch.from_numpy(outs[f"{name}:codes"].astype(np.int64)) - offset
        ref = quantize_codes(xi, s_t, -128, 127).to(torch.int64)
        v = xi.double() / s_t.double()
        tie = ((v - torch.floor(v)) - 0.5).abs() <= cfg.code_tie
        off = codes != ref
        flips = off & tie & ((codes - ref).abs() == 1)
        st["codes"] += codes.numel()
        st["code_ties"] += int(flips.sum())
        bad = int((off & ~flips).sum())
        st["code_errors"] += bad
        if bad:
            self._fail(name, f"{bad} of {codes.numel()} activation codes are not Q(input; s_t) (not rounding ties)",
                       timestep)
        out = torch.from_numpy(outs[f"{name}:output"]).double()
        s64 = s_t.double()
        bias = None if layer.bias is None else layer.bias.detach().double()
        if self.target != "ort-cpu":
            with torch.no_grad():
                y_ref = _weighted_op(layer, codes.double() * s64, bias)
            rel = _rel(out, y_ref)
            st["output_rel_l2"] = max(st["output_rel_l2"], rel)
            if rel > cfg.layer_rel_l2:
                self._fail(name, f"the output differs from op(codes·s_t, W) + b by rel-L2 {rel:.3g} > "
                                 f"{cfg.layer_rel_l2:g} (a wrong weight scale, bias or op)", timestep)
            return
        grid = self.grids.get(name)
        if grid is None:
            self._fail(name, "the bundle records no output grid for this layer", timestep)
            return
        static = self.plan.static[j]
        rho = torch.ones_like(s64) if static else s64 / self.plan.scales[j]  # s_t / s_ref
        bias_inside = static and layer.kind == "conv"
        with torch.no_grad():
            y = _weighted_op(layer, codes.double() * s64 / rho, bias if bias_inside else None)
        if bias is None or bias_inside:
            b_after = 0.0
        else:
            b_after = bias.reshape([1, -1] + [1] * (y.ndim - 2)) if layer.kind == "conv" else bias
        s_out, z = float(grid["scale"]), int(grid["zero_point"])
        w = y / s_out + z
        q = torch.clamp(torch.round(w), 0, 255)
        step = s_out * rho
        expect = (q - z) * step + b_after
        d = (out - expect) / step
        float_tol = 1e-3 + 1e-5 * expect.abs() / step  # float32 rounding of DQ, Mul and Add, in output steps
        on_grid = d.abs() <= float_tol
        near_tie = (((w - torch.floor(w)) - 0.5).abs() <= cfg.output_tie) & (w > -0.5) & (w < 255.5)
        flip = ((d.abs() - 1).abs() <= float_tol) & near_tie
        forgiven = ~on_grid & flip
        st["output_ties"] += int(forgiven.sum())
        if forgiven.any():  # how far from k + ½ the forgiven flips were (in code units; measured against output_tie)
            dist = float(((w - torch.floor(w)) - 0.5).abs()[forgiven].max())
            st["max_tie_distance"] = max(st["max_tie_distance"], dist)
        bad = int((~on_grid & ~flip).sum())
        st["output_errors"] += bad
        st["output_rel_l2"] = max(st["output_rel_l2"], _rel(out, expect))
        if bad:
            self._fail(name, f"{bad} of {out.numel()} outputs are not (Q(y; s_out, z) − z)·s_out·ρ_t + b on the "
                             "recorded output grid (a missing or mis-scaled output Q/DQ, a wrong weight scale, bias "
                             "or op)", timestep)

    def _check_forced(self, feed: dict, outs: dict, t: torch.Tensor, timestep: int) -> None:
        """The torch model with every quantized layer's output forced to ORT's (see the module docstring)."""
        inputs, hooks = {}, []

        def hook(module, args, output, name):
            inputs[name] = args[0].detach()
            return torch.from_numpy(outs[f"{name}:output"]).to(output.dtype)

        for name in self.layers:
            hooks.append(self.torch_layers[name].register_forward_hook(
                lambda m, a, o, name=name: hook(m, a, o, name)))
        x = torch.from_numpy(np.asarray(feed["sample"], np.float32))
        y = feed_conditioning(feed)
        try:
            with torch.no_grad():
                eps = self.qm(x, t, y).numpy()
        finally:
            for h in hooks:
                h.remove()
        for name in self.layers:
            if name not in inputs:
                self._fail(name, "the torch model never called this layer", timestep)
                continue
            rel = _rel(inputs[name].numpy(), outs[f"{name}:input"])
            self.stats[name]["input_rel_l2"] = max(self.stats[name]["input_rel_l2"], rel)
            if rel > self.config.forced_rel_l2:
                self._fail(name, f"its input differs from the torch model's (every earlier layer output forced to "
                                 f"ORT's) by rel-L2 {rel:.3g} > {self.config.forced_rel_l2:g} (a wrong or missing op "
                                 "before it, or a wrong layer mapping)", timestep)
        rel = _rel(outs[self.output_names[0]], eps)
        self.eps_rel_l2 = max(self.eps_rel_l2, rel)
        if rel > self.config.forced_rel_l2:
            self.eps_failed_at.append(int(timestep))

    # -- results

    def failures(self) -> list[str]:
        """One line per layer and problem, naming the layer and the timesteps; the first wrong layer first."""
        lines = list(self.problems)
        for k, name in enumerate(self.layers):
            for what, ts in self.stats[name]["failed_at"].items():
                lines.append(f"layer {name} ({k + 1} of {len(self.layers)}) at t={','.join(map(str, ts))}: {what}")
        if self.eps_failed_at:
            lines.append(f"eps after the last quantized layer at t={','.join(map(str, self.eps_failed_at))}: differs "
                         f"from the torch model's (layer outputs forced to ORT's) by rel-L2 {self.eps_rel_l2:.3g} > "
                         f"{self.config.forced_rel_l2:g} (a wrong op after the last layer)")
        return lines

    def summary(self) -> dict:
        tot = {k: sum(s[k] for s in self.stats.values()) for k in ("codes", "code_ties", "code_errors",
                                                                    "output_ties", "output_errors")}
        worst = {k: max(((s[k], n) for n, s in self.stats.items()), default=(0.0, None))
                 for k in ("output_rel_l2", "input_rel_l2")}
        return {"passed": not self.failures(), "layers_checked": len(self.layers), **tot,
                "max_output_rel_l2": worst["output_rel_l2"][0], "max_output_rel_l2_layer": worst["output_rel_l2"][1],
                "max_input_rel_l2": worst["input_rel_l2"][0], "max_input_rel_l2_layer": worst["input_rel_l2"][1],
                "forced_eps_rel_l2": self.eps_rel_l2,
                "max_output_tie_distance": max((s["max_tie_distance"] for s in self.stats.values()), default=0.0),
                "per_layer": {n: {k: v for k, v in s.items()} for n, s in self.stats.items()}}


def sensitivity(qm: QuantizedModel, fp_eps: np.ndarray, feed: dict, eps: np.ndarray, relative: float,
                seed: int = 0) -> dict:
    """How far the fake-quant ε moves when each sample's input moves by ``relative`` of its norm (a fixed random
    direction): the median over the samples of ``‖Δε‖/‖ε‖`` and of ``‖Δε‖ / ‖ε_quant − ε_fp‖`` (the second is on
    the scale of the end-to-end error ratio: float rounding alone can cause differences that large)."""
    x = torch.from_numpy(np.asarray(feed["sample"], np.float32))
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(x.shape, generator=g)
    b = len(x)
    scale = relative * x.reshape(b, -1).norm(dim=1) / n.reshape(b, -1).norm(dim=1)
    xp = x + _per_sample(scale, x.ndim) * n
    t = torch.from_numpy(np.asarray(feed["timestep"], np.int64))
    y = feed_conditioning(feed)
    with torch.no_grad():
        moved = qm(xp, t, y).double().numpy()
    delta = np.linalg.norm((moved - eps).reshape(b, -1), axis=1)
    own = np.linalg.norm(np.asarray(eps, np.float64).reshape(b, -1), axis=1)
    quant = np.linalg.norm((np.asarray(eps, np.float64) - fp_eps).reshape(b, -1), axis=1)
    return {"median_rel_l2": float(np.median(delta / np.maximum(own, 1e-30))),
            "median_of_quant_error": float(np.median(delta / np.maximum(quant, 1e-30)))}
