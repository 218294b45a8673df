"""The sampling loop on a CUDA device (issue 6, "with CUDA but no TensorRT"): it gives the CPU loop's samples with
the torch and the ONNX Runtime backends, runs the D² correction on the device, and does not wait for the device
inside the loop. Every test here needs a CUDA device and is skipped without one.

Tolerances: the noise is the same on both devices (counter-based, tests/test_philox.py), and TF32 is switched off,
so an FP model differs only by float summation order (~1e-6 per call). The fake-quant model may flip an activation
code that sits on a rounding tie and cascade (as ONNX Runtime vs torch does, tests/test_export.py), hence the
looser bound there; the ONNX Runtime backend computes on the CPU in both loops, so only the update arithmetic
moves to the device.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from tdqrt.calibration.checkpoint import load_fp_checkpoint
from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.runtime import NoiseSchedule, Sampler, SamplerConfig, sample
from tdqrt.runtime.corrections import make_correction
from tdqrt.runtime.d2 import D2Table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm())


def _both(model_cpu, model_gpu, cfg, hook=None, **kw):
    kw = dict(sample_indices=list(range(6)), seed=2, shape=(1, 16, 16), y=torch.arange(6) % 10, null_label=10) | kw
    cpu = sample(model_cpu, NoiseSchedule(), cfg, hook=hook, **kw)
    gpu = sample(model_gpu, NoiseSchedule(), cfg, hook=hook, device="cuda", **kw)
    assert gpu.device.type == "cuda" and bool(torch.isfinite(gpu).all())
    return cpu, gpu


def _syncs(fn) -> int:
    """How many times ``fn`` makes the host wait for the device (torch's sync debug mode, as warnings)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_torch_fp_loop_on_device_equals_cpu_loop(tiny_digits_model):
    fp = load_fp_checkpoint(tiny_digits_model)
    model_gpu = load_fp_checkpoint(tiny_digits_model, device="cuda").model
    cpu, gpu = _both(fp.model, model_gpu, SamplerConfig(steps=10, eta=1.0, guidance_scale=2.0),
                     null_label=fp.model.null_label)
    assert _rel(gpu, cpu) <= 1e-4


def test_d2_runs_on_device_and_matches_cpu(tiny_w4_model, tiny_w4_d2_stats):
    """D-D² with the statistics of the W4 model (DDIM-5, η 1, CFG 2) on the fake-quant model."""
    q_cpu = load_model_dir(tiny_w4_model).model
    q_gpu = load_model_dir(tiny_w4_model).model.cuda()
    cfg = SamplerConfig(steps=5, eta=1.0, guidance_scale=2.0)
    hook = make_correction("d", "channel", D2Table.load(tiny_w4_d2_stats), Sampler(NoiseSchedule(), cfg))
    null = q_cpu.null_label
    cpu, gpu = _both(q_cpu, q_gpu, cfg, hook=hook, null_label=null)
    plain = sample(q_gpu, NoiseSchedule(), cfg, sample_indices=list(range(6)), seed=2, shape=(1, 16, 16),
                   y=torch.arange(6) % 10, null_label=null, device="cuda")
    assert _rel(gpu, plain) > 1e-3  # the correction did something on the device...
    assert _rel(gpu, cpu) <= 5e-2  # ...the same as on the CPU, up to tie cascades of the fake-quant model
    assert [device.type for device, _ in hook._placed] == ["cpu", "cuda"]  # coefficients moved once per device


def test_ort_backend_in_a_device_loop_equals_cpu_loop(tiny_w4_model, tmp_path):
    from tdqrt.engines.ort import OrtDenoiser
    from tdqrt.export.bundle import export_bundle
    from tdqrt.export.exporter import ExportConfig

    bundle = export_bundle(tiny_w4_model, tmp_path / "bundle", ExportConfig(polygraphy=False))
    denoiser = OrtDenoiser(bundle)
    cpu, gpu = _both(denoiser, denoiser, SamplerConfig(steps=8, eta=0.5, guidance_scale=2.0),
                     null_label=denoiser.null_label)
    assert _rel(gpu, cpu) <= 1e-5


def _toy(x, t, y=None):
    return 0.3 * x + 1e-3 * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def test_loop_waits_for_the_device_once_whatever_the_number_of_steps():
    """The only synchronisation is the NaN/Inf check after the last step; the noise, the update and the check
    itself stay on the device."""
    kwargs = dict(sample_indices=[0, 1, 2, 3], seed=1, shape=(3, 8, 8))
    cpu = sample(_toy, NoiseSchedule(), SamplerConfig(steps=20, eta=1.0), **kwargs)
    gpu = sample(_toy, NoiseSchedule(), SamplerConfig(steps=20, eta=1.0), device="cuda", **kwargs)
    assert _rel(gpu, cpu) <= 1e-5
    assert _syncs(lambda: torch.zeros(1, device="cuda").item()) == 1  # the debug mode does see a sync
    few, many = (_syncs(lambda n=n: sample(_toy, NoiseSchedule(), SamplerConfig(steps=n, eta=1.0), device="cuda",
                                           **kwargs)) for n in (5, 50))
    assert few == many <= 1, (few, many)
