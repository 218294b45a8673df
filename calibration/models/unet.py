"""Built-in ADM/DDPM-style UNet: ``eps = model(x, t, y=None)``.

Layout (module names are stable; later stages select layers by these names)::

    time_embed.0 / time_embed.2          Linear -> SiLU -> Linear on the sinusoidal timestep embedding
    class_embed                          Embedding(num_classes + 1), last index = null class (conditional only)
    conv_in                              3x3 conv, image -> base_channels
    down.<level>.blocks.<i>.resblock.{in_conv,temb_proj,out_conv,skip}
    down.<level>.blocks.<i>.attn.{qkv,proj}          (only at attention resolutions)
    down.<level>.downsample.conv                     (stride-2 3x3 conv, all levels but the last)
    mid.0.resblock.* / mid.0.attn.* / mid.1.resblock.*
    up.<level>.blocks.<i>.resblock.* / .attn.*       (input = features concatenated with a skip)
    up.<level>.upsample.conv                         (nearest x2 + 3x3 conv, all levels but the first)
    norm_out, conv_out                   GroupNorm -> SiLU -> 3x3 conv (zero-initialised)

Every weight layer is a plain ``nn.Conv2d`` / ``nn.Linear`` so a quantizer can swap it; the attention
matmuls and softmax are plain torch ops between those layers.

Label convention: a conditional model called with ``y=None`` predicts with the null class (the
unconditional branch of classifier-free guidance); an unconditional model called with labels raises
``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tdqrt.engines.config import check_int, check_real, config_from_dict, invalid, is_int
from tdqrt.engines.errors import ConfigError

# Architecture of each preset. ``image_size``, ``in_channels`` and ``num_classes`` come from the dataset at
# build time; attention placement is given as level indices (``attention_levels``, 0 = full resolution)
# because the absolute feature-map sizes of ``UNetConfig.attention_resolutions`` depend on ``image_size``.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: ~0.2 M parameters.
    "tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=1, groups=8),
    # Demo model for 16x16 digits: ~1.6 M parameters, attention at the lowest level (4x4) and in the middle.
    "small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(2,), num_heads=4, groups=8),
}


def _invalid(field: str, value: Any, expected: str, fix: str) -> ConfigError:
    return invalid(f"UNetConfig.{field}", value, expected, fix)


@dataclass(frozen=True)
class UNetConfig:
    image_size: int
    in_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 0
    groups: int = 8

    def __post_init__(self) -> None:
        # Lists (from JSON) become tuples, ints become floats where a float is meant; then validate.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(is_int(v) for v in value):
                raise _invalid(name, value, "a tuple of integers", "give a list of integers")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "dropout", check_real("UNetConfig.dropout", self.dropout, 0.0, below=1.0))

        for name, minimum in (("image_size", 1), ("in_channels", 1), ("base_channels", 2), ("num_res_blocks", 1),
                              ("num_heads", 1), ("num_classes", 0), ("groups", 1)):
            check_int(f"UNetConfig.{name}", getattr(self, name), minimum)
        if self.base_channels % 2 or self.base_channels % self.groups:
            raise _invalid("base_channels", self.base_channels,
                           f"an even number (sinusoidal embedding) divisible by groups={self.groups}",
                           "change base_channels or groups")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise _invalid("channel_mult", self.channel_mult, "a non-empty tuple of integers >= 1",
                           "give one multiplier >= 1 per level")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise _invalid("image_size", self.image_size,
                           f"a multiple of 2^(levels-1)={factor} for channel_mult={self.channel_mult}",
                           "change image_size or use fewer levels")
        sizes = self.level_sizes
        unknown = sorted(set(self.attention_resolutions) - set(sizes))
        if unknown:
            raise _invalid("attention_resolutions", self.attention_resolutions,
                           f"feature-map sizes among {sizes}", f"drop {unknown}")
        # Attention runs at the chosen levels and always in the middle block (last level's width).
        for level in [*self.attention_levels, len(self.channel_mult) - 1]:
            channels = self.base_channels * self.channel_mult[level]
            if channels % self.num_heads:
                raise _invalid("num_heads", self.num_heads,
                               f"a divisor of the {channels} channels of attention at {sizes[level]}x{sizes[level]}",
                               "change num_heads")

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Feature-map size of each level: image_size, image_size/2, ..."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    @property
    def attention_levels(self) -> tuple[int, ...]:
        return tuple(level for level, size in enumerate(self.level_sizes) if size in self.attention_resolutions)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists); ``from_dict`` restores an equal config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        return config_from_dict(cls, data)

    @classmethod
    def from_preset(cls, name: str, *, image_size: int, in_channels: int, num_classes: int) -> "UNetConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown built-in UNet preset {name!r}; valid presets are {sorted(PRESETS)}")
        kwargs = dict(PRESETS[name])
        levels = kwargs.pop("attention_levels")
        resolutions = tuple(image_size // 2**level for level in levels) if is_int(image_size) else ()
        return cls(image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                   attention_resolutions=resolutions, **kwargs)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard sinusoidal embedding ``[cos(t*f_i), sin(t*f_i)]`` with ``f_i = exp(-ln(10000) * i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + per-channel time bias, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.out_conv(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.num_heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, head_dim, h * w).unbind(1)
        weights = torch.softmax(torch.matmul(q.transpose(-1, -2), k) / math.sqrt(head_dim), dim=-1)  # [b, heads, N, N]
        out = torch.matmul(v, weights.transpose(-1, -2))  # [b, heads, head_dim, N]
        return x + self.proj(out.reshape(b, c, h, w))


class Block(nn.Module):
    """One ResBlock, optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, attention: bool, config: UNetConfig, temb_dim: int):
        super().__init__()
        self.resblock = ResBlock(in_ch, out_ch, temb_dim, config.dropout, config.groups)
        self.attn = AttentionBlock(out_ch, config.num_heads, config.groups) if attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resblock(x, temb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ADM-style UNet predicting the noise ``eps`` from ``(x, t, y)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ConfigError(f"UNet expects a UNetConfig, got {type(config).__name__}")
        self.config = config
        self.image_size = config.image_size
        self.in_channels = config.in_channels
        self.num_classes = config.num_classes
        self.null_label: Optional[int] = config.num_classes if config.num_classes > 0 else None

        base, groups = config.base_channels, config.groups
        temb_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, temb_dim) if config.num_classes > 0 else None
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)

        attention = set(config.attention_levels)
        last = len(config.channel_mult) - 1
        ch = base
        skip_channels = [ch]  # channels of every tensor pushed on the skip stack, in push order
        self.down = nn.ModuleList()
        for level, mult in enumerate(config.channel_mult):
            out_ch = base * mult
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(Block(ch, out_ch, level in attention, config, temb_dim))
                ch = out_ch
                skip_channels.append(ch)
            stage = nn.ModuleDict({"blocks": blocks})
            if level != last:
                stage["downsample"] = Downsample(ch)
                skip_channels.append(ch)
            self.down.append(stage)

        self.mid = nn.ModuleList([Block(ch, ch, True, config, temb_dim), Block(ch, ch, False, config, temb_dim)])

        # ``up[level]`` handles the same resolution as ``down[level]``; it runs in reverse order.
        up: list[nn.ModuleDict] = []
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            out_ch = base * mult
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(Block(ch + skip_channels.pop(), out_ch, level in attention, config, temb_dim))
                ch = out_ch
            stage = nn.ModuleDict({"blocks": blocks})
            if level != 0:
                stage["upsample"] = Upsample(ch)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)

        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ConfigError("labels y were given to an unconditional UNet (num_classes=0); pass y=None "
                              "or build the model with num_classes > 0")
        # Every ResBlock's temb_proj sees SiLU(emb); apply it once here.
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block in stage["blocks"]:
                h = block(h, emb)
                skips.append(h)
            if "downsample" in stage:
                h = stage["downsample"](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for stage in reversed(self.up):
            for block in stage["blocks"]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if "upsample" in stage:
                h = stage["upsample"](h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def spec(self) -> dict[str, Any]:
        return {"kind": "builtin", "config": self.config.to_dict()}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **overrides: Any) -> "UNet":
        return cls(UNetConfig.from_dict({**spec["config"], **overrides}))

    @classmethod
    def from_preset(cls, name: str, *, image_size: int, in_channels: int, num_classes: int) -> "UNet":
        return cls(UNetConfig.from_preset(name, image_size=image_size, in_channels=in_channels,
                                          num_classes=num_classes))
