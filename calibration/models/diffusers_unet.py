"""Adapter that gives a ``diffusers.UNet2DModel`` the tdqrt denoiser interface ``eps = model(x, t, y=None)``.

The wrapped model is ``self.unet`` (module names ``unet.conv_in``, ``unet.time_embedding.linear_1``,
``unet.down_blocks.*``, ``unet.conv_out``, ...). Weights are only ever read from local folders: tdqrt never
downloads models. ``diffusers`` is imported on first use, so importing this module stays cheap.

Class-conditional models use ``num_class_embeds = num_classes + 1``; the last index is the null class used
for classifier-free guidance and for ``y=None``, exactly like the built-in UNet.

``time_embedding_type="fourier"`` (diffusers' ``GaussianFourierProjection``, the score-SDE convention) takes
``log(timestep)`` and divides the output by the timestep: the timestep is a positive noise level. The adapter hands
such a model its timesteps as float32 — what ``torch.log`` of diffusers' int64 timesteps computes anyway, and what
ONNX's ``Log`` and ``Div`` need in the exported graph (they take no integers) — and refuses timestep 0, where
diffusers itself returns NaN.
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from tdqrt.engines.config import check_int
from tdqrt.engines.errors import ConfigError

# UNet2DModel configs with random initialisation; ``sample_size``/``in_channels``/``out_channels`` and the
# class embedding are set from the dataset at build time.
DIFFUSERS_PRESETS: dict[str, dict[str, Any]] = {
    # Architecture of google/ddpm-cifar10-32 (Ho et al. 2020, CIFAR-10): 35.7 M parameters.
    "ddpm-cifar10-32": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": None,  # one head over all channels
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
        "dropout": 0.1,  # DDPM's CIFAR-10 training dropout; inactive in eval mode
    },
}


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def _num_classes_from(config: Mapping[str, Any]) -> int:
    embeds = config.get("num_class_embeds")
    return embeds - 1 if embeds else 0


def _square_size(config: Mapping[str, Any]) -> int:
    """The UNet's ``sample_size`` as one int, refused unless square and divisible by its downsampling factor."""
    size = config["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"sample_size={list(size)} is invalid: only square images are supported")
        size = size[0]
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if not isinstance(size, int) or size < 1 or size % factor:
        raise ConfigError(f"sample_size={size!r} is invalid: must be a positive multiple of {factor} "
                          f"(2^(levels-1) for block_out_channels={list(config['block_out_channels'])})")
    if config["in_channels"] != config["out_channels"]:
        raise ConfigError(f"out_channels={config['out_channels']} must equal in_channels={config['in_channels']} "
                          "for a noise-predicting UNet")
    return size


class DiffusersUNet(nn.Module):
    """``eps = model(x, t, y=None)`` around ``diffusers.UNet2DModel``.

    ``num_classes=None`` infers it from ``num_class_embeds`` (``num_class_embeds - 1``; 0 when unset).
    """

    kind = "diffusers"  # spec()["kind"], the key of MODEL_KINDS
    diffusers_class = "UNet2DModel"

    def __init__(self, unet: nn.Module, num_classes: Optional[int] = None):
        super().__init__()
        config = unet.config
        if num_classes is None:
            num_classes = _num_classes_from(config)
        check_int("num_classes", num_classes, 0, fix="give 0 (unconditional) or the number of classes")
        if config.get("class_embed_type") is not None:
            raise ConfigError(f"class_embed_type={config['class_embed_type']!r} is not supported: tdqrt only wraps "
                              "unconditional UNet2DModels or label embeddings set via num_class_embeds")
        expected = num_classes + 1 if num_classes else None
        if config.get("num_class_embeds") != expected:
            raise ConfigError(f"num_class_embeds={config.get('num_class_embeds')!r} does not match num_classes="
                              f"{num_classes}: expected {expected} (num_classes labels + 1 null class, or unset "
                              "for an unconditional model)")
        size = _square_size(config)
        self.unet = unet
        self.num_classes = num_classes
        self.null_label: Optional[int] = num_classes if num_classes else None
        self.image_size = size
        self.in_channels = config["in_channels"]
        self.float_timesteps = config.get("time_embedding_type") == "fourier"
        self.min_timestep = 1 if self.float_timesteps else 0  # recorded in exported graphs and bundles

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.num_classes and y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        elif not self.num_classes and y is not None:
            raise ConfigError("labels y were given to an unconditional diffusers UNet; pass y=None "
                              "or build the model with num_classes > 0")
        if self.float_timesteps:
            if not torch.jit.is_tracing() and bool((t < self.min_timestep).any()):
                raise ConfigError("this UNet2DModel has time_embedding_type='fourier': it takes log(timestep) and "
                                  "divides its output by the timestep, so timestep 0 gives NaN (in diffusers too); "
                                  "sample with timesteps >= 1 (spacing 'scheduler' with a scheduler config whose "
                                  "steps_offset is >= 1)")
            t = t.float()
        return self.unet(x, t, class_labels=y).sample

    def spec(self) -> dict[str, Any]:
        config = {k: v for k, v in self.unet.config.items() if not k.startswith("_")}
        return {"kind": self.kind, "config": json.loads(json.dumps(config)), "num_classes": self.num_classes}

    @classmethod
    def _unet_from_config(cls, config: Mapping[str, Any], **extra: Any) -> nn.Module:
        """A random-initialised ``cls.diffusers_class`` from ``config`` (keys starting with ``_``, diffusers
        metadata, are ignored) updated with ``extra``; unknown keys and diffusers' own refusals: ConfigError."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a diffusers UNet config must be a dict, got {type(config).__name__}")
        unet_class = _diffusers_class(cls.diffusers_class)
        allowed = set(inspect.signature(unet_class.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ConfigError(f"{cls.diffusers_class} config has unknown keys {unknown}; allowed keys are "
                              f"{sorted(allowed)}")
        try:
            return unet_class(**(kwargs | extra))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"invalid {cls.diffusers_class} config: {exc}") from exc

    @classmethod
    def _unet_from_pretrained(cls, path: Union[str, os.PathLike], variant: Optional[str] = None) -> nn.Module:
        """``cls.diffusers_class`` saved with ``save_pretrained`` in ``path`` or its ``unet/`` subfolder (one weights
        file or a sharded checkpoint; ``variant``: diffusers' weights variant, e.g. ``"fp16"``), in float32."""
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"{str(path)!r} is not a local folder; tdqrt never downloads models. Download or "
                              "save the UNet (save_pretrained) yourself and pass that folder")
        if (folder / "config.json").is_file():
            subfolder = None
        elif (folder / "unet" / "config.json").is_file():
            subfolder = "unet"
        else:
            raise ConfigError(f"{str(path)!r} holds no config.json (nor unet/config.json); expected a folder "
                              f"written by {cls.diffusers_class}.save_pretrained or a diffusers pipeline")
        from diffusers.utils import logging as diffusers_logging

        bar = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # "Loading checkpoint shards" of a sharded one: noise on the CLI
        try:
            # low_cpu_mem_usage=False: the default needs `accelerate` and logs a warning on every load without it
            return _diffusers_class(cls.diffusers_class).from_pretrained(
                folder, subfolder=subfolder, variant=variant, local_files_only=True, low_cpu_mem_usage=False).float()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not load a {cls.diffusers_class} from {str(path)!r}: {exc}") from exc
        finally:
            if bar:
                diffusers_logging.enable_progress_bar()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_classes: Optional[int] = None) -> "DiffusersUNet":
        """Random-initialised UNet2DModel; keys starting with ``_`` (diffusers metadata) are ignored."""
        extra = {} if num_classes is None else {"num_class_embeds": num_classes + 1 if num_classes else None}
        return cls(cls._unet_from_config(config, **extra), num_classes)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], num_classes: Optional[int] = None, *,
                        variant: Optional[str] = None) -> "DiffusersUNet":
        """Load a UNet2DModel saved with ``save_pretrained`` (or a pipeline folder with a ``unet/`` subfolder)."""
        return cls(cls._unet_from_pretrained(path, variant), num_classes)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **overrides: Any) -> "DiffusersUNet":
        return cls.from_config({**spec["config"], **overrides}, num_classes=spec.get("num_classes"))

    @classmethod
    def from_preset(cls, name: str, *, image_size: int, in_channels: int, num_classes: int) -> "DiffusersUNet":
        if name not in DIFFUSERS_PRESETS:
            raise ConfigError(f"unknown diffusers preset {name!r}; valid presets are {sorted(DIFFUSERS_PRESETS)}")
        config = {**DIFFUSERS_PRESETS[name], "sample_size": image_size, "in_channels": in_channels,
                  "out_channels": in_channels}
        return cls.from_config(config, num_classes=num_classes)
