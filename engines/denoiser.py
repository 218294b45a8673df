"""The one interface every backend implements: ``eps = denoiser(x, t, y)``.

``x`` is a float tensor ``[B, C, H, W]``, ``t`` an integer tensor ``[B]`` of training timesteps in
``[0, T)``, ``y`` the conditioning: an integer tensor ``[B]`` of class labels, a float tensor ``[B, L, D]`` of text
embeddings (diffusers' ``encoder_hidden_states``, for a model with ``cond_shape = (L, D)``), or ``None`` for
unconditional models. Exported graphs name that input after its kind (:data:`COND_INPUTS`). The
return value is the predicted noise with the shape of ``x``. The sampling loop in ``tdqrt.runtime`` only ever
calls this, so a torch module, an ONNX Runtime session or a TensorRT engine plug in unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from tdqrt.engines.errors import ConfigError, DataError


LABELS_INPUT, EMBEDDINGS_INPUT = "class_labels", "encoder_hidden_states"
COND_INPUTS = (LABELS_INPUT, EMBEDDINGS_INPUT)  # the exported graph's conditioning input, by kind


def check_conditioning(cond: Any, batch: int, cond_shape: tuple[int, ...]) -> None:
    """Refuse a missing or misshapen float conditioning ``[batch, *cond_shape]`` with one DataError line (a no-op
    while tracing, where shapes are symbolic)."""
    if torch.jit.is_tracing():
        return
    if cond is None or not torch.is_tensor(cond) or not cond.is_floating_point():
        got = "None" if cond is None else str(getattr(cond, "dtype", type(cond).__name__))
        raise DataError(f"this UNet is conditioned on text embeddings: pass a float tensor [B, "
                        f"{', '.join(map(str, cond_shape))}] as y (encoder_hidden_states), got {got}")
    if tuple(cond.shape) != (batch, *cond_shape):
        raise DataError(f"encoder_hidden_states has shape {tuple(cond.shape)}, this model takes [{batch}, "
                        f"{', '.join(map(str, cond_shape))}] (batch, tokens, width)")


def feed_conditioning(feed: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The conditioning ``y`` of a feed dict of the exported signature (numpy arrays by input name): int64 labels
    from ``class_labels``, float32 embeddings from ``encoder_hidden_states``, None when it has neither."""
    if LABELS_INPUT in feed:
        return torch.from_numpy(np.asarray(feed[LABELS_INPUT], np.int64))
    if EMBEDDINGS_INPUT in feed:
        return torch.from_numpy(np.ascontiguousarray(feed[EMBEDDINGS_INPUT], np.float32))
    return None


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def prepare_inputs(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor], *, in_channels: int, image_size: int,
                   num_train_timesteps: Optional[int], conditional: bool,
                   null_label: Optional[int], cond_shape: Optional[tuple[int, ...]] = None,
                   min_timestep: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check ``(x, t, y)`` for an exported UNet and return ``(t, y)`` on their own devices: ``t`` ``[B]`` (a scalar
    ``t`` is broadcast over the batch), ``y`` labels ``[B]`` (a conditional model without ``y`` gets the null label)
    or, for a model taking embeddings of ``cond_shape`` ``(L, D)``, ``y`` ``[B, L, D]`` as given (required);
    timesteps below ``min_timestep`` (the bundle's record, 1 for a Fourier time embedding) are refused. Shared
    by the ONNX Runtime and TensorRT backends so both refuse the same inputs with the same messages."""
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
    if min_timestep and int(t.min()) < min_timestep:  # the torch adapter's refusal (calibration/models)
        raise ConfigError(f"this UNet takes timesteps >= {min_timestep} (its Fourier time embedding takes "
                          f"log(timestep): timestep 0 gives NaN), got timestep {int(t.min())}; sample with timesteps "
                          f">= {min_timestep} (spacing 'scheduler' with a scheduler config whose steps_offset is >= "
                          f"{min_timestep})")
    if cond_shape is not None:
        check_conditioning(y, batch, tuple(cond_shape))
    elif conditional:
        if y is None:
            if null_label is None:
                raise ConfigError("this model is class-conditional; pass labels y (it records no null label)")
            y = torch.full((batch,), null_label, dtype=torch.int64, device=t.device)
        y = torch.as_tensor(y).reshape(-1)
    elif y is not None:
        raise ConfigError("labels y were given to an unconditional model; pass y=None")
    return t, y
