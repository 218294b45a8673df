"""The one interface every backend implements: ``eps = denoiser(x, t, y)``.

``x`` is a float tensor ``[B, C, H, W]``, ``t`` an integer tensor ``[B]`` of training timesteps in
``[0, T)``, ``y`` an integer tensor ``[B]`` of class labels (or ``None`` for unconditional models). The
return value is the predicted noise with the shape of ``x``. The sampling loop in ``tdqrt.runtime`` only ever
calls this, so a torch module, an ONNX Runtime session or a TensorRT engine plug in unchanged.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from tdqrt.engines.errors import ConfigError, DataError


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def prepare_inputs(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor], *, in_channels: int, image_size: int,
                   num_train_timesteps: Optional[int], conditional: bool,
                   null_label: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check ``(x, t, y)`` for an exported UNet and return ``(t, y)`` as ``[B]`` tensors on their own devices: a scalar
    ``t`` is broadcast over the batch, a conditional model without ``y`` gets the null label. Shared by the ONNX
    Runtime and TensorRT backends so both refuse the same inputs with the same messages."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (in_channels, image_size, image_size):
        raise DataError(f"x has shape {tuple(x.shape)}, this model takes [B, {in_channels}, {image_size}, "
                        f"{image_size}]")
    batch = x.shape[0]
    t = torch.as_tensor(t).reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise DataError(f"t has {t.numel()} entries for a batch of {batch}")
    if num_train_timesteps and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
        raise DataError(f"timesteps must lie in [0, {num_train_timesteps}), got {int(t.min())}..{int(t.max())}")
    if conditional:
        if y is None:
            if null_label is None:
                raise ConfigError("this model is class-conditional; pass labels y (it records no null label)")
            y = torch.full((batch,), null_label, dtype=torch.int64, device=t.device)
        y = torch.as_tensor(y).reshape(-1)
    elif y is not None:
        raise ConfigError("labels y were given to an unconditional model; pass y=None")
    return t, y
