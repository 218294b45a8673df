"""Denoising UNets with the tdqrt interface ``eps = model(x, t, y=None)``.

* ``build_model(spec)`` rebuilds a model from ``model.spec()`` (``{"kind": ..., "config": ...}``); weights are
  loaded separately with ``load_state_dict``.
* ``model_from_preset(name, image_size=, in_channels=, num_classes=)`` builds a fresh, randomly initialised
  model from a named architecture (``PRESET_NAMES``).

Every model exposes ``num_classes``, ``null_label`` (``num_classes`` when conditional, else ``None``),
``image_size``, ``in_channels`` and ``spec()``; a text-conditioned UNet (:class:`DiffusersCondUNet`) also
``cond_shape`` ``(L, D)``, the shape of its float conditioning ``y`` ``[B, L, D]`` (``encoder_hidden_states``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from tdqrt.calibration.models.diffusers_cond_unet import DiffusersCondUNet
from tdqrt.calibration.models.diffusers_unet import DIFFUSERS_PRESETS, DiffusersUNet
from tdqrt.calibration.models.unet import PRESETS, UNet, UNetConfig, timestep_embedding
from tdqrt.engines.errors import ConfigError

# spec["kind"] -> builder(spec, **overrides)
MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {
    "builtin": UNet.from_spec,
    "diffusers": DiffusersUNet.from_spec,
    "diffusers-cond": DiffusersCondUNet.from_spec,
}

# preset name -> builder(name, *, image_size, in_channels, num_classes)
_PRESET_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: UNet.from_preset for name in PRESETS},
    **{name: DiffusersUNet.from_preset for name in DIFFUSERS_PRESETS},
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESET_BUILDERS)


def build_model(spec: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild the architecture described by ``spec``; ``overrides`` replace keys of ``spec["config"]``."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("config"), Mapping):
        raise ConfigError(f"a model spec must be a dict with 'kind' and 'config' (a dict), got {spec!r}")
    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; valid kinds are {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](spec, **overrides)


def model_from_preset(name: str, *, image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    """Fresh model of preset ``name``; the dataset fixes image size, channels and number of classes."""
    if name not in _PRESET_BUILDERS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets are {list(PRESET_NAMES)}")
    return _PRESET_BUILDERS[name](name, image_size=image_size, in_channels=in_channels, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DIFFUSERS_PRESETS",
    "MODEL_KINDS",
    "PRESETS",
    "PRESET_NAMES",
    "DiffusersCondUNet",
    "DiffusersUNet",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "model_from_preset",
    "timestep_embedding",
]
