"""Adapter that gives a ``diffusers.UNet2DConditionModel`` (the Stable Diffusion 1.x/2.x UNet) the tdqrt denoiser
interface ``eps = model(x, t, cond)``.

``cond`` is the float conditioning the UNet cross-attends to, diffusers' ``encoder_hidden_states`` ``[B, L, D]``:
``L`` tokens (:attr:`DiffusersCondUNet.cond_shape`, 77 for CLIP text encoders, recorded in the spec as
``cond_length`` because the UNet's config does not know it) of width ``D = cross_attention_dim``. Where a label
model's classifier-free guidance uses the null label, a text model uses an unconditional embedding (the empty or
negative prompt's); the model records none (``null_label = None``): the caller passes it to
:func:`tdqrt.runtime.sampling.sample` as ``null_label``.

SDXL-style UNets (``addition_embed_type``: pooled text embeddings and time ids through ``added_cond_kwargs``) and
class embeddings on top of the text are refused. Weights are only read from local folders.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from tdqrt.calibration.models.diffusers_unet import DiffusersUNet, _square_size
from tdqrt.engines.config import check_int
from tdqrt.engines.denoiser import check_conditioning
from tdqrt.engines.errors import ConfigError

DEFAULT_COND_LENGTH = 77  # CLIP's max_position_embeddings, the token count of every Stable Diffusion text encoder

# config keys that feed the UNet something besides encoder_hidden_states; refused with the reason
_REFUSED_KEYS = {
    "addition_embed_type": "SDXL-style added conditioning (added_cond_kwargs: text_embeds / time_ids) is not "
                           "supported; tdqrt takes Stable Diffusion 1.x/2.x-style UNets",
    "class_embed_type": "class embeddings next to the text conditioning are not supported",
    "num_class_embeds": "class embeddings next to the text conditioning are not supported",
    "encoder_hid_dim_type": "a projection of encoder_hidden_states inside the UNet (encoder_hid_dim_type) is not "
                            "supported",
    "time_cond_proj_dim": "a guidance-scale embedding (time_cond_proj_dim) is not supported",
}


class DiffusersCondUNet(DiffusersUNet):
    """``eps = model(x, t, cond)`` around ``diffusers.UNet2DConditionModel``; ``cond`` is float ``[B, *cond_shape]``.

    ``cond_length`` is the token count ``L`` of the text encoder whose embeddings condition the UNet.
    """

    kind = "diffusers-cond"
    diffusers_class = "UNet2DConditionModel"

    def __init__(self, unet: nn.Module, cond_length: int = DEFAULT_COND_LENGTH):
        nn.Module.__init__(self)  # not DiffusersUNet's: its checks are the label model's
        config = unet.config
        for key, why in _REFUSED_KEYS.items():
            if config.get(key) is not None:
                raise ConfigError(f"{key}={config[key]!r} in the UNet2DConditionModel config: {why}")
        check_int("cond_length", cond_length, 1, fix="give the text encoder's token count (77 for CLIP)")
        width = config.get("cross_attention_dim")
        if not isinstance(width, int):
            raise ConfigError(f"cross_attention_dim={width!r} is not supported: give one int (the text encoder's "
                              "hidden size) for every block")
        self.unet = unet
        self.num_classes = 0
        self.null_label = None
        self.image_size = _square_size(config)
        self.in_channels = config["in_channels"]
        self.float_timesteps = False
        self.cond_shape = (int(cond_length), width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_conditioning(y, x.shape[0], self.cond_shape)
        return self.unet(x, t, encoder_hidden_states=y.to(x.dtype)).sample

    def spec(self) -> dict[str, Any]:
        return super().spec() | {"cond_length": self.cond_shape[0]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], cond_length: int = DEFAULT_COND_LENGTH) -> "DiffusersCondUNet":
        """Random-initialised UNet2DConditionModel; keys starting with ``_`` (diffusers metadata) are ignored."""
        if isinstance(config, Mapping) and config.get("addition_embed_type") is not None:
            raise ConfigError(f"addition_embed_type={config['addition_embed_type']!r} in the UNet2DConditionModel "
                              f"config: {_REFUSED_KEYS['addition_embed_type']}")
        return cls(cls._unet_from_config(config), cond_length)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike],
                        cond_length: int = DEFAULT_COND_LENGTH, *,
                        variant: Optional[str] = None) -> "DiffusersCondUNet":
        """Load a UNet2DConditionModel saved with ``save_pretrained`` (or a pipeline folder's ``unet/``)."""
        return cls(cls._unet_from_pretrained(path, variant), cond_length)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **overrides: Any) -> "DiffusersCondUNet":
        return cls.from_config({**spec["config"], **overrides},
                               cond_length=spec.get("cond_length", DEFAULT_COND_LENGTH))

