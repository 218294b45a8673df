"""Built-in UNet, diffusers adapter and the model registry (``tdqrt.calibration.models``)."""
from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from torch import nn

from tdqrt.calibration.models import (
    DIFFUSERS_PRESETS,
    PRESET_NAMES,
    PRESETS,
    DiffusersUNet,
    UNet,
    UNetConfig,
    build_model,
    count_parameters,
    model_from_preset,
    timestep_embedding,
)
from tdqrt.engines.errors import ConfigError

SMALL_DIFFUSERS = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": None,
}


def _inputs(model: nn.Module, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g) if model.num_classes else None
    return x, t, y


def _perturb_output_layer(model: nn.Module) -> None:
    """The built-in conv_out starts at zero, which would make every output 0."""
    conv_out = model.unet.conv_out if isinstance(model, DiffusersUNet) else model.conv_out
    with torch.no_grad():
        conv_out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))


def _small_diffusers(num_classes: int = 0, in_channels: int = 1) -> DiffusersUNet:
    torch.manual_seed(0)
    config = {**SMALL_DIFFUSERS, "in_channels": in_channels, "out_channels": in_channels}
    return DiffusersUNet.from_config(config, num_classes=num_classes).eval()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("in_channels,image_size", [(1, 16), (3, 32)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_builtin_output_shape(preset, in_channels, image_size, num_classes):
    model = model_from_preset(preset, image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    assert isinstance(model, UNet)
    assert (model.image_size, model.in_channels, model.num_classes) == (image_size, in_channels, num_classes)
    _perturb_output_layer(model)
    x, t, y = _inputs(model)
    with torch.no_grad():
        eps = model(x, t, y)
    assert eps.shape == x.shape and eps.dtype == x.dtype
    assert torch.isfinite(eps).all() and eps.abs().sum() > 0


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_diffusers_output_shape(in_channels, num_classes):
    model = _small_diffusers(num_classes, in_channels)
    assert (model.image_size, model.in_channels, model.num_classes) == (16, in_channels, num_classes)
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert model(x, t, y).shape == x.shape


def test_builtin_trains_one_step():
    model = model_from_preset("tiny", image_size=16, in_channels=1, num_classes=10).train()
    x, t, y = _inputs(model, batch=4)
    loss = (model(x, t, y) - x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- sizes


def test_parameter_counts():
    for image_size, in_channels, num_classes in [(16, 1, 10), (32, 3, 0)]:
        kwargs = dict(image_size=image_size, in_channels=in_channels, num_classes=num_classes)
        assert count_parameters(model_from_preset("tiny", **kwargs)) < 500_000
        assert 1_000_000 <= count_parameters(model_from_preset("small", **kwargs)) <= 2_500_000


def test_ddpm_cifar10_preset_matches_google_checkpoint_size():
    model = model_from_preset("ddpm-cifar10-32", image_size=32, in_channels=3, num_classes=0).eval()
    assert isinstance(model, DiffusersUNet)
    # google/ddpm-cifar10-32 has 35,746,307 parameters.
    assert count_parameters(model) == 35_746_307
    x, t, y = _inputs(model, batch=1)
    with torch.no_grad():
        assert model(x, t, y).shape == (1, 3, 32, 32)


def test_preset_names():
    assert set(PRESET_NAMES) == set(PRESETS) | set(DIFFUSERS_PRESETS)
    assert {"tiny", "small", "ddpm-cifar10-32"} <= set(PRESET_NAMES)
    with pytest.raises(ConfigError, match="valid presets are.*tiny"):
        model_from_preset("huge", image_size=16, in_channels=1, num_classes=0)


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("make", [
    lambda n: model_from_preset("tiny", image_size=16, in_channels=1, num_classes=n).eval(),
    lambda n: _small_diffusers(n),
], ids=["builtin", "diffusers"])
def test_class_labels(make):
    model = make(10)
    assert model.num_classes == 10 and model.null_label == 10
    _perturb_output_layer(model)
    x, t, _ = _inputs(model)
    with torch.no_grad():
        eps_a = model(x, t, torch.tensor([1, 2]))
        eps_b = model(x, t, torch.tensor([7, 8]))
        eps_null = model(x, t, torch.full((2,), model.null_label))
        # A conditional model given no labels predicts with the null class (the CFG unconditional branch).
        eps_none = model(x, t, None)
    assert not torch.allclose(eps_a, eps_b)
    assert torch.equal(eps_none, eps_null)

    uncond = make(0)
    assert uncond.num_classes == 0 and uncond.null_label is None
    x, t, _ = _inputs(uncond)
    with torch.no_grad():
        assert uncond(x, t, None).shape == x.shape
        with pytest.raises(ConfigError, match="unconditional"):
            uncond(x, t, torch.zeros(2, dtype=torch.long))


def test_timestep_embedding_is_standard_sinusoid():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]
    expected = [math.cos(5 * f) for f in freqs] + [math.sin(5 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-6)


# ---------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("make", [
    lambda: model_from_preset("tiny", image_size=16, in_channels=3, num_classes=5).eval(),
    lambda: model_from_preset("small", image_size=16, in_channels=1, num_classes=0).eval(),
    lambda: _small_diffusers(5),
    lambda: _small_diffusers(0),
], ids=["builtin-tiny-cond", "builtin-small", "diffusers-cond", "diffusers-uncond"])
def test_spec_round_trip_is_bit_identical(make):
    model = make()
    _perturb_output_layer(model)
    spec = json.loads(json.dumps(model.spec()))  # specs travel as JSON in manifests
    assert spec == model.spec()
    rebuilt = build_model(spec).eval()
    assert type(rebuilt) is type(model) and rebuilt.spec() == model.spec()
    assert [n for n, _ in rebuilt.named_modules()] == [n for n, _ in model.named_modules()]
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y), model(x, t, y))


def test_build_model_overrides_and_errors():
    spec = model_from_preset("tiny", image_size=16, in_channels=1, num_classes=0).spec()
    assert build_model(spec, dropout=0.1).config.dropout == 0.1
    with pytest.raises(ConfigError, match="valid kinds are.*builtin.*diffusers"):
        build_model({"kind": "onnx", "config": {}})
    with pytest.raises(ConfigError, match="'kind' and 'config'"):
        build_model({"kind": "builtin"})
    with pytest.raises(ConfigError, match="unknown key"):
        build_model(spec, width=3)


def test_unet_config_json_round_trip():
    config = UNetConfig.from_preset("small", image_size=32, in_channels=3, num_classes=10)
    assert config.attention_resolutions == (8,)
    data = json.loads(json.dumps(config.to_dict()))
    assert UNetConfig.from_dict(data) == config
    assert isinstance(UNetConfig.from_dict(data).channel_mult, tuple)


# ---------------------------------------------------------------------------------------------- pretrained


def test_diffusers_from_pretrained_local_folder(tmp_path, no_network):
    model = _small_diffusers(3)
    _perturb_output_layer(model)
    model.unet.save_pretrained(tmp_path / "unet")
    x, t, y = _inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
    # Both the UNet folder itself and a pipeline folder holding it in unet/ load.
    for folder in (tmp_path / "unet", tmp_path, str(tmp_path)):
        loaded = DiffusersUNet.from_pretrained(folder).eval()
        assert loaded.num_classes == 3 and loaded.spec() == model.spec()
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), expected)
    with pytest.raises(ConfigError, match="num_class_embeds"):
        DiffusersUNet.from_pretrained(tmp_path, num_classes=5)


@pytest.mark.parametrize("name", ["google/ddpm-cifar10-32", "does/not/exist", "ddpm-cifar10-32"])
def test_diffusers_from_pretrained_refuses_non_folders(name, no_network):
    with pytest.raises(ConfigError, match="not a local folder; tdqrt never downloads"):
        DiffusersUNet.from_pretrained(name)


def test_diffusers_from_pretrained_refuses_folder_without_config(tmp_path, no_network):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="config.json"):
        DiffusersUNet.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a local folder"):
        DiffusersUNet.from_pretrained(tmp_path / "weights.bin")


# ---------------------------------------------------------------------------------------------- module layout


def test_named_module_layout():
    model = model_from_preset("small", image_size=16, in_channels=1, num_classes=10)
    modules = dict(model.named_modules())
    assert type(modules["conv_in"]) is nn.Conv2d and type(modules["conv_out"]) is nn.Conv2d
    assert [type(m) for m in modules["time_embed"]] == [nn.Linear, nn.SiLU, nn.Linear]
    assert type(modules["class_embed"]) is nn.Embedding and modules["class_embed"].num_embeddings == 11
    for name in ["down.0.blocks.0.resblock.in_conv", "down.0.blocks.0.resblock.temb_proj",
                 "down.0.blocks.0.resblock.out_conv", "down.1.blocks.0.resblock.skip",
                 "down.2.blocks.0.attn.qkv", "down.2.blocks.0.attn.proj", "down.0.downsample.conv",
                 "mid.0.resblock.in_conv", "mid.0.attn.qkv", "mid.1.resblock.out_conv",
                 "up.0.blocks.2.resblock.skip", "up.2.blocks.0.attn.proj", "up.1.upsample.conv"]:
        assert type(modules[name]) in (nn.Conv2d, nn.Linear), name
    # Every parameter lives in a plain torch layer (nothing a quantizer wrapper would miss).
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)):
            assert type(module) in (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding), name


class _Recorder(nn.Module):
    """Stand-in for a quantized wrapper: calls the wrapped layer and records that it was used."""

    def __init__(self, inner: nn.Module, seen: set, name: str):
        super().__init__()
        self.inner, self.seen, self.name = inner, seen, name

    def forward(self, x):
        self.seen.add(self.name)
        return self.inner(x)


@pytest.mark.parametrize("make", [
    lambda: model_from_preset("tiny", image_size=16, in_channels=1, num_classes=10).eval(),
    lambda: _small_diffusers(10),
], ids=["builtin", "diffusers"])
def test_every_weight_layer_is_called_as_a_module(make):
    model = make()
    _perturb_output_layer(model)
    x, t, y = _inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
    seen: set = set()
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, layer in layers:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, _Recorder(layer, seen, name))
    with torch.no_grad():
        assert torch.equal(model(x, t, y), expected)
    assert seen == {n for n, _ in layers}


# ---------------------------------------------------------------------------------------------- validation

VALID = dict(image_size=16, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,), num_heads=2, dropout=0.0, num_classes=0, groups=8)


@pytest.mark.parametrize("field,value", [
    ("image_size", 0),
    ("image_size", 15),  # not divisible by 2^(levels-1)
    ("image_size", "16"),
    ("in_channels", 0),
    ("base_channels", 12),  # not divisible by groups
    ("base_channels", 1.5),
    ("channel_mult", ()),
    ("channel_mult", (1, 0)),
    ("channel_mult", "12"),
    ("num_res_blocks", 0),
    ("attention_resolutions", (4,)),  # no 4x4 feature map for a 2-level 16 px model
    ("num_heads", 3),
    ("num_heads", True),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("num_classes", -1),
    ("groups", 0),
])
def test_invalid_unet_config(field, value):
    UNetConfig(**VALID)
    with pytest.raises(ConfigError, match=f"UNetConfig.{field}: expected "):
        UNetConfig(**{**VALID, field: value})


def test_invalid_unet_config_dicts():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['width'\]"):
        UNetConfig.from_dict({**VALID, "width": 1})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['image_size'\]"):
        UNetConfig.from_dict({k: v for k, v in VALID.items() if k != "image_size"})
    with pytest.raises(ConfigError, match="image_size"):
        model_from_preset("small", image_size=18, in_channels=1, num_classes=0)


@pytest.mark.parametrize("change,match", [
    ({"channels": 3}, "unknown keys"),
    ({"norm_num_groups": 5}, "invalid UNet2DModel config"),
    ({"sample_size": 15}, "sample_size"),
    ({"out_channels": 3}, "out_channels"),
    ({"num_class_embeds": 1}, "num_class_embeds"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
])
def test_invalid_diffusers_config(change, match):
    with pytest.raises(ConfigError, match=match):
        DiffusersUNet.from_config({**SMALL_DIFFUSERS, **change})
