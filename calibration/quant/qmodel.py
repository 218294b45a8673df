"""Quantized layers and the quantized model wrapper.

:func:`quantize_model` deep-copies an FP UNet (built-in or diffusers adapter) and swaps every ``nn.Conv2d`` /
``nn.Linear`` whose name is not kept in float for a :class:`QuantLayer` (input-activation quantizer + weight
quantizer). :class:`QuantizedModel` keeps the FP model's interface ``eps = model(x, t, y)`` and publishes the
timesteps of each call to the activation quantizers through a :class:`TimestepContext`.
"""
from __future__ import annotations

import copy
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.quantizers import ActQuantizer, TimestepContext, WeightQuantizer
from tdqrt.engines.errors import ConfigError


class QuantLayer(nn.Module):
    """A Conv2d or Linear computing ``op(Q_a(x), Q_w(W)) + b`` with fake-quantized input and weight."""

    def __init__(self, module: nn.Module, config: QuantConfig, ctx: TimestepContext, num_train_timesteps: int):
        super().__init__()
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ConfigError(f"Conv2d with padding_mode={module.padding_mode!r} cannot be exported; use zeros")
            self.kind = "conv"
            self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                                  groups=module.groups)
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
            self.conv_args = {}
        else:
            raise ConfigError(f"cannot quantize {type(module).__name__}; only Conv2d and Linear")
        self.weight = nn.Parameter(module.weight.detach().clone())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        self.weight_shape = module.weight.shape
        self.act_quant = ActQuantizer(config.abits, ctx, num_train_timesteps)
        self.weight_quant = WeightQuantizer(self.weight, config.wbits, config.weight_granularity)
        self.weight_enabled = True

    def quantized_weight(self) -> Tensor:
        return self.weight_quant(self.weight) if self.weight_enabled else self.weight

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_quant(x)
        w = self.quantized_weight()
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Store the int8 weight codes and the activation scale table; drop the float weight."""
        self.weight_quant.freeze(self.weight)
        self.act_quant.freeze()
        self.weight = None

    def prepare_frozen(self) -> None:
        self.weight_quant.prepare_frozen(self.weight_shape)
        self.act_quant.prepare_frozen()
        self.weight = None


class QuantizedModel(nn.Module):
    """An FP UNet with its Conv2d/Linear layers replaced by :class:`QuantLayer`; same ``forward(x, t, y)``."""

    def __init__(self, fp_model: nn.Module, config: QuantConfig, num_train_timesteps: int) -> None:
        super().__init__()
        self.config = config
        self.num_train_timesteps = num_train_timesteps
        self.ctx = TimestepContext()
        self.model = copy.deepcopy(fp_model)
        self.layer_names: list[str] = []
        targets = [(n, m) for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for name, module in targets:
            if config.keeps_float(name):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, QuantLayer(module, config, self.ctx, num_train_timesteps))
            self.layer_names.append(name)
        if not self.layer_names:
            raise ConfigError(f"keep_float {list(config.keep_float)} leaves no Conv2d/Linear layer to quantize")
        for attr in ("num_classes", "null_label", "image_size", "in_channels"):
            setattr(self, attr, getattr(fp_model, attr))
        self.cond_shape = getattr(fp_model, "cond_shape", None)  # (L, D) of a text-conditioned UNet
        self.min_timestep = int(getattr(fp_model, "min_timestep", 0))  # 1 for a Fourier time embedding

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self.ctx.t = t
        try:
            return self.model(x, t, y)
        finally:
            self.ctx.t = None

    def spec(self) -> dict:
        return self.model.spec()

    def layers(self) -> Iterator[tuple[str, QuantLayer]]:
        for name in self.layer_names:
            yield name, self.model.get_submodule(name)

    def act_quantizers(self) -> Iterator[ActQuantizer]:
        for _, layer in self.layers():
            yield layer.act_quant

    def set_act_mode(self, mode: str) -> None:
        for q in self.act_quantizers():
            q.set_mode(mode)

    def set_weight_quant(self, enabled: bool) -> None:
        for _, layer in self.layers():
            layer.weight_enabled = enabled

    @torch.no_grad()
    def scale_table(self) -> Tensor:
        """Activation scales of every training timestep and quantized layer, ``[T, L]`` (rows = timesteps)."""
        t = torch.arange(self.num_train_timesteps)
        return torch.stack([q.scales_for(t.to(q.scale.device)).cpu() for q in self.act_quantizers()], dim=1)

    def freeze(self) -> None:
        for _, layer in self.layers():
            layer.freeze()

    def prepare_frozen(self) -> None:
        for _, layer in self.layers():
            layer.prepare_frozen()

    @property
    def frozen(self) -> bool:
        return all(layer.weight_quant.frozen for _, layer in self.layers())


def quantize_model(fp_model: nn.Module, config: QuantConfig, num_train_timesteps: int) -> QuantizedModel:
    """Wrap ``fp_model`` (left untouched) into a :class:`QuantizedModel` with activations in float mode."""
    return QuantizedModel(fp_model, config, num_train_timesteps)
