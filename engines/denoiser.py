"""The one interface every backend implements: ``eps = denoiser(x, t, y)``.

``x`` is a float tensor ``[B, C, H, W]``, ``t`` an integer tensor ``[B]`` of training timesteps in
``[0, T)``, ``y`` an integer tensor ``[B]`` of class labels (or ``None`` for unconditional models). The
return value is the predicted noise with the shape of ``x``. The sampling loop in ``tdqrt.runtime`` only ever
calls this, so a torch module, an ONNX Runtime session or a TensorRT engine plug in unchanged.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor: ...
