"""diffusers ``UNet2DModel`` block layouts beyond the presets, through minmax W8A8 quantization and both export
flavours: multi-head attention (``attention_head_dim`` below the channel count) and one head over all channels,
``norm_num_groups`` 2/4/8, ``resnet_time_scale_shift="scale_shift"``, ``time_embedding_type`` positional (both
``flip_sin_to_cos``) and fourier, mid blocks with and without attention (``add_attention``), 1/3/4-channel inputs,
score-SDE (NCSN++) skip blocks, and sizes 8, 32 (three levels), 64 and — graph only — 256.

Per layout: the quantized layers are exactly the Conv2d/Linear layers the keep-float defaults
(:data:`tdqrt.calibration.quant.config.DEFAULT_KEEP_FLOAT`) leave, found by module role (the UNet's first and last
conv, the skip blocks' image-space convs, the timestep-embedding MLP, every ResNet block's timestep projection, the
class embedding), not by name patterns or counts; the ``trt`` and ``ort-cpu`` graphs lint clean and pass the teacher-forced per-layer check
``tdqrt validate`` uses (:class:`tdqrt.tools.layer_check.LayerCheck`: every activation code is ``Q(x; s_t)`` of
ONNX Runtime's own layer input, every layer output is recomputed from the codes in float64, and the torch model with
its layer outputs forced to ORT's gives ORT's layer inputs and ε); free-running ORT is compared as in
tests/test_export.py (``trt``: ≤ 0.5 relative — near-tie flips cascade through an untrained network, see there) and
tests/test_ort_cpu.py (``ort-cpu`` fused kernels: the validate bound on the error ratio, with 7-bit weights where
ONNX Runtime's U8S8 kernels saturate).

Image size changes no decision here: the keep-float rule and the Q/DQ plan look at module names and types only, and
every quantizer is per tensor (activations) or per output channel (weights), so a layer's plan is the same at any
resolution; only the traced shapes change. 32 and 64 run end to end; 256 (about a minute of calibration and ORT on one
core even at 8 channels) is checked as a graph: plan, layer set, signature and lint.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tdqrt.calibration.checkpoint import FPCheckpoint
from tdqrt.calibration.models import DiffusersUNet
from tdqrt.calibration.quant.calib_set import CalibSetConfig, collect_calibration_set
from tdqrt.calibration.quant.config import QuantConfig
from tdqrt.calibration.quant.job import CalibrationJob
from tdqrt.calibration.quant.methods import method_spec, options_from_dict
from tdqrt.calibration.quant.qmodel import QuantLayer, quantize_model
from tdqrt.calibration.quant.static import init_act_scales
from tdqrt.engines.errors import ConfigError
from tdqrt.engines.ort import U8S8_SAFE_WEIGHT_BITS, create_session, u8s8_saturates
from tdqrt.export.exporter import ExportConfig, export_fp, export_quantized, save_onnx
from tdqrt.export.lint import lint_model
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig
from tdqrt.tools.layer_check import LayerCheck
from tdqrt.tools.validate import ValidateConfig, error_ratio

ORT_CPU_WBITS = U8S8_SAFE_WEIGHT_BITS if u8s8_saturates() else 8

_TWO_LEVELS = dict(block_out_channels=[8, 16], layers_per_block=1)
LAYOUTS = {
    # two heads of 4 channels at the 16-channel level; GroupNorm of 8 groups; FiLM-style scale/shift ResNets;
    # 4 channels (a latent); class-conditional (3 classes + the null class)
    "heads-scale_shift-4ch": dict(_TWO_LEVELS, sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
                                  num_class_embeds=4, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                                  down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                  up_block_types=["AttnUpBlock2D", "UpBlock2D"]),
    # score-SDE (NCSN++) style: Gaussian Fourier timestep embedding (float timesteps, log) and skip blocks with
    # their image-space skip convs (diffusers builds those for 3 channels only); mid block without attention
    "fourier-skip-3ch-no_mid_attention": dict(_TWO_LEVELS, sample_size=8, in_channels=3, out_channels=3,
                                              norm_num_groups=2, time_embedding_type="fourier", add_attention=False,
                                              down_block_types=["SkipDownBlock2D", "SkipDownBlock2D"],
                                              up_block_types=["SkipUpBlock2D", "SkipUpBlock2D"]),
    # 32×32, three levels, one head over all channels (attention_head_dim None) at 16×16, cos-first embedding
    "32px-3levels-1ch": dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=[8, 16, 16],
                             layers_per_block=1, norm_num_groups=4, attention_head_dim=None, flip_sin_to_cos=True,
                             freq_shift=0, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    # 64×64, attention only in the mid block (at the 32×32 level: 1024 tokens, 4 heads of 4 channels)
    "64px-mid_attention": dict(_TWO_LEVELS, sample_size=64, in_channels=3, out_channels=3, norm_num_groups=4,
                               attention_head_dim=4, down_block_types=["DownBlock2D", "DownBlock2D"],
                               up_block_types=["UpBlock2D", "UpBlock2D"]),
}
# Fourier embeddings take log(timestep): calibrate those on a grid without t = 0 (steps_offset 1), as diffusers'
# scheduler configs with steps_offset do.
OFFSET = {"fourier-skip-3ch-no_mid_attention"}


def _build(name: str) -> DiffusersUNet:
    torch.manual_seed(0)
    return DiffusersUNet.from_config(LAYOUTS[name]).eval()


def _kept_by_role(model: DiffusersUNet) -> set[str]:
    """Names of the Conv2d/Linear layers the keep-float defaults promise to leave in float, found by role: the
    UNet's ``conv_in``/``conv_out``, everything in its timestep (and class) embedding, each ResNet block's
    timestep projection, and the image-space convs of skip blocks (the blocks ``UNet2DModel.forward`` passes the
    skip sample to: those with a ``skip_conv``)."""
    from diffusers.models.resnet import ResnetBlock2D

    unet = model.unet
    roles = [unet.conv_in, unet.conv_out, unet.time_embedding]
    roles += [m.time_emb_proj for m in unet.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
    roles += [b.skip_conv for b in [*unet.down_blocks, *unet.up_blocks] if getattr(b, "skip_conv", None) is not None]
    if unet.class_embedding is not None:
        roles.append(unet.class_embedding)
    ids = {id(sub) for r in roles for sub in r.modules()}
    return {f"unet.{n}" if n else "unet" for n, m in unet.named_modules() if id(m) in ids
            and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def _weighted(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    """``(name, fp model, calibration set, {"trt": qm W8A8, "ort-cpu": qm with ORT_CPU_WBITS-bit weights})``."""
    name = request.param
    model = _build(name)
    root = tmp_path_factory.mktemp(name)
    schedule = ScheduleConfig(steps_offset=1 if name in OFFSET else 0)
    sampler = SamplerConfig(steps=2, spacing="scheduler" if name in OFFSET else "uniform")
    calib = collect_calibration_set(model, NoiseSchedule(schedule), CalibSetConfig(
        num=2, keep_steps=2, batch=2, sampler=sampler), root / "calib", progress=False)
    spec = method_spec("minmax")
    models = {}
    for target, wbits in (("trt", 8), ("ort-cpu", ORT_CPU_WBITS)):
        job = CalibrationJob(FPCheckpoint(model, schedule, {}, root, "0" * 64), NoiseSchedule(schedule), calib,
                             QuantConfig(method="minmax", wbits=wbits), options_from_dict(spec.options_cls, {}),
                             root / f"work-{target}", progress=False)
        qm = spec.run(job)
        qm.freeze()
        models[target] = qm
    return name, model, calib, models


def _feeds(calib, per_timestep: int = 2):
    """Calibration inputs: ``(timestep, x, t, y, feed)`` for the first and the last timestep of the set."""
    for ts in (calib.timesteps[0], calib.timesteps[-1]):
        rows = np.flatnonzero(calib.t == ts)[:per_timestep]
        x, t, y = calib.get(rows)
        feed = {"sample": x.numpy(), "timestep": t.numpy()}
        if y is not None:
            feed["class_labels"] = y.numpy()
        yield ts, x, t, y, feed


def test_keep_float_defaults_by_role(layout):
    name, model, _, models = layout
    kept = _kept_by_role(model)
    assert {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1"} <= kept
    if "skip" in name:
        assert {"unet.down_blocks.0.skip_conv", "unet.up_blocks.0.skip_conv"} <= kept
    for qm in models.values():
        quantized = {n for n, m in qm.model.named_modules() if isinstance(m, QuantLayer)}
        assert quantized == set(qm.layer_names) == _weighted(model) - kept, name
        # the float ones are untouched modules of the FP model's types, weights included
        for n in kept:
            a, b = qm.model.get_submodule(n), model.get_submodule(n)
            assert type(a) is type(b) and torch.equal(a.weight, b.weight), n
    cfg = LAYOUTS[name]
    has_attention = cfg.get("add_attention", True) or any("Attn" in b for b in cfg["down_block_types"])
    attention = [n for n in _weighted(model) if ".attentions." in n]
    assert bool(attention) == has_attention, name
    assert set(attention) <= set(models["trt"].layer_names)  # q, k, v, out of every attention block are quantized


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_export_lints_and_matches_fake_quant(layout, target, tmp_path):
    name, fp, calib, models = layout
    qm = models[target]
    exported = export_quantized(qm, ExportConfig(target=target, polygraphy=False, calib_samples=16), calib=calib)
    assert set(exported.layers) == set(qm.layer_names)
    size, ch = LAYOUTS[name]["sample_size"], LAYOUTS[name]["in_channels"]
    assert exported.signature["inputs"][0]["shape"] == ["batch", ch, size, size]
    assert [i["dtype"] for i in exported.signature["inputs"][1:]] == ["int64"] * (1 + bool(fp.num_classes))
    report = lint_model(exported.model, target, polygraphy=False)
    assert report and not report.warnings, report.format()
    path = tmp_path / "unet.onnx"
    save_onnx(exported.model, path)
    check = LayerCheck(path, qm, target=target, config=ValidateConfig(), output_grids=exported.plan.output_grids)
    sess = create_session(path, ["CPUExecutionProvider"])
    for ts, x, t, y, feed in _feeds(calib):
        check.run(feed, ts)
        out = sess.run(None, feed)[0]
        with torch.no_grad():
            ref = qm(x, t, y).numpy()
            fp_eps = fp(x, t, y).numpy()
        assert np.isfinite(out).all()
        if target == "trt":
            assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 0.5, (name, ts)
        else:
            assert error_ratio(fp_eps, ref, out) <= ValidateConfig().ort_cpu_max_error_ratio, (name, ts)
    summary = check.summary()
    assert check.failures() == [] and summary["layers_checked"] == len(qm.layer_names), check.failures()[:3]
    assert summary["codes"] > 0 and summary["code_errors"] == 0


def test_fourier_timesteps_are_float_noise_levels(tmp_path):
    """diffusers' Gaussian Fourier embedding: the adapter equals ``UNet2DModel`` with int64 timesteps bit for bit,
    the exported graph casts the int64 ``timestep`` input to float before ``Log`` (ONNX has no integer Log) and
    matches torch, and timestep 0 (log 0: NaN in diffusers) is refused with one clear line."""
    model = _build("fourier-skip-3ch-no_mid_attention")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t), model.unet(x, t).sample)
    with pytest.raises(ConfigError, match="timestep 0"):
        model(x, torch.tensor([0, 5]))
    exported = export_fp(model, 1000, ExportConfig(polygraphy=False))
    g = exported.model.graph
    log = next(n for n in g.node if n.op_type == "Log")
    producer = {o: n for n in g.node for o in n.output}
    seen, frontier = set(), [log.input[0]]
    while frontier:  # what feeds Log: a Cast to float of the timestep input, no integer path
        tensor = frontier.pop()
        node = producer.get(tensor)
        if node is None:
            seen.add(tensor)
            continue
        if node.op_type == "Cast":
            assert next(a.i for a in node.attribute if a.name == "to") == onnx.TensorProto.FLOAT
            seen.add("cast")
        frontier += [i for i in node.input if i]
    assert {"cast", "timestep"} <= seen
    assert lint_model(exported.model, polygraphy=False)
    save_onnx(exported.model, tmp_path / "fp.onnx")
    out = create_session(tmp_path / "fp.onnx", ["CPUExecutionProvider"]).run(
        None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
    with torch.no_grad():
        ref = model(x, t).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-5


def test_a_fourier_bundle_records_and_enforces_timesteps_from_1(tmp_path):
    """The t >= 1 rule of a Fourier-embedding UNet travels with the export: the manifest and the graph's metadata
    record ``min_timestep`` 1, and the engines refuse t = 0 in one line (as the torch adapter does) instead of
    returning NaN, while t = 1 runs and matches the quantized torch model."""
    import json

    from tdqrt.calibration.checkpoint import save_fp_checkpoint
    from tdqrt.calibration.quant.api import CalibrateConfig, calibrate, load_model_dir
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.export.bundle import export_bundle

    schedule = ScheduleConfig(steps_offset=1)
    fp_dir = save_fp_checkpoint(tmp_path / "fp", _build("fourier-skip-3ch-no_mid_attention"), schedule,
                                data={"name": "random"}, training={"steps": 0}, ema=False)
    quant = calibrate(fp_dir, tmp_path / "q", CalibrateConfig(calib_set=CalibSetConfig(
        num=2, keep_steps=2, batch=2, sampler=SamplerConfig(steps=2, spacing="scheduler"))), progress=False)
    bundle = export_bundle(quant, tmp_path / "bundle", ExportConfig(polygraphy=False))
    assert json.loads((bundle / "manifest.json").read_text())["model"]["min_timestep"] == 1
    x = torch.randn(2, 3, 8, 8)
    for role in ("unet", "unet_fp"):
        d = OrtDenoiser(bundle, role=role)
        with pytest.raises(ConfigError, match=r"timesteps >= 1 .*got timestep 0") as err:
            d(x, torch.tensor([0, 500]))
        assert "\n" not in str(err.value)
        assert d.min_timestep == 1 and OrtDenoiser(d.path).min_timestep == 1  # the bare graph's metadata too
    qm = load_model_dir(quant).model
    t = torch.tensor([1, 999])
    with torch.no_grad():
        ref = qm(x, t).numpy()
    out = OrtDenoiser(bundle)(x, t).numpy()
    assert np.isfinite(out).all() and np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 0.5  # test_export's bound


def test_256px_graph(tmp_path):
    """At 256×256 (two levels, attention in the mid block at 128×128 would be 16 k tokens: left out) the plan and
    the graph are those of the small sizes: the same layer set, lint clean, the signature at 256."""
    cfg = dict(LAYOUTS["64px-mid_attention"], sample_size=256, add_attention=False)
    torch.manual_seed(0)
    model = DiffusersUNet.from_config(cfg).eval()
    qm = quantize_model(model, QuantConfig(), 1000)
    for _, layer in qm.layers():
        layer.weight_quant.init_scale(layer.weight, "minmax")
    for i, q in enumerate(qm.act_quantizers()):
        q.observe(256, i)
    with torch.no_grad():
        qm(torch.randn(1, 3, 256, 256), torch.tensor([500]))
    init_act_scales(qm, "static", "minmax", 2.4)
    qm.freeze()
    assert set(qm.layer_names) == _weighted(model) - _kept_by_role(model)
    exported = export_quantized(qm, ExportConfig(polygraphy=False, trace_batch=1))
    assert set(exported.layers) == set(qm.layer_names)
    assert exported.signature["inputs"][0]["shape"] == ["batch", 3, 256, 256]
    assert exported.signature["outputs"][0]["shape"] == ["batch", 3, 256, 256]
    report = lint_model(exported.model, polygraphy=False)
    assert report and not report.warnings, report.format()
