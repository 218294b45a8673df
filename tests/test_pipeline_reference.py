"""Reference check against diffusers' own pipelines: with the FP model, tdqrt's DDIM sampling of a pipeline folder
(opened by the model resolver) equals the diffusers pipeline's output for the same initial noise — the pipeline's
``generator`` noise fed in as ``x_T`` — for a pixel DDIMPipeline and for latent LDMPipelines (VQModel and
AutoencoderKL), where tdqrt also decodes with the pipeline's autoencoder."""
from __future__ import annotations

import warnings

import pytest
import torch

from tdqrt.calibration.resolve import open_model
from tdqrt.runtime.sampling import SamplerConfig, sample
from tdqrt.runtime.schedules import NoiseSchedule

STEPS = 6
BATCH = 2
# Float rounding only: an ε model agrees to ~6e-6 (measured). The DDIM fixture is a v-prediction model with cosine
# betas and "trailing" spacing, whose first step is t=999 with ᾱ ≈ 2e-9: tdqrt converts v to ε (the D² correction is
# defined on ε) and its step recovers x0 = (x − sqrt(1−ᾱ)·ε)/sqrt(ᾱ), where float32 rounding of the ε round trip is
# divided by sqrt(ᾱ) ≈ 5e-5 (diffusers computes x0 from v directly): measured 2.2e-4 after 6 steps.
ATOL = 1e-4
ATOL_V_COSINE_TRAILING = 1e-3


def _tdqrt_images(folder, x_T: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    """tdqrt's DDIM on the scheduler's own timestep grid from ``x_T``, decoded, mapped to [0, 1] as the pipelines
    do, NHWC."""
    m = open_model(folder)
    cfg = SamplerConfig(kind="ddim", steps=STEPS, eta=eta, spacing="scheduler")
    x = sample(m.model, NoiseSchedule(m.schedule), cfg, sample_indices=range(BATCH), seed=0, shape=m.sample_shape,
               x_T=x_T)
    return (m.decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def _initial_noise(folder, seed: int) -> torch.Tensor:
    """The noise a pipeline called with ``generator=torch.Generator().manual_seed(seed)`` starts from (diffusers'
    randn_tensor on the CPU is ``torch.randn`` with that generator)."""
    m = open_model(folder, decoder=False)
    return torch.randn((BATCH, *m.sample_shape), generator=torch.Generator().manual_seed(seed))


def test_ddim_pipeline_folder_matches_diffusers(ddim_pipeline_dir):
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(ddim_pipeline_dir, local_files_only=True)
    ref = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(3), eta=0.0, num_inference_steps=STEPS,
               output_type="pt").images.permute(0, 2, 3, 1)
    ours = _tdqrt_images(ddim_pipeline_dir, _initial_noise(ddim_pipeline_dir, 3))
    assert ours.shape == ref.shape
    assert (ref.std() > 0.01) and not torch.allclose(ref[0], ref[1])  # a real trajectory, two different images
    torch.testing.assert_close(ours, ref.float(), atol=ATOL_V_COSINE_TRAILING, rtol=0)


@pytest.mark.parametrize("fixture", ["ldm_pipeline_dir", "kl_pipeline_dir"])
def test_latent_pipeline_folder_matches_diffusers(fixture, request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LDMPipeline is deprecated in diffusers
        from diffusers import LDMPipeline

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    folder = request.getfixturevalue(fixture)
    if fixture == "ldm_pipeline_dir":
        pipe = LDMPipeline.from_pretrained(folder, local_files_only=True)
    else:  # LDMPipeline's code with the AutoencoderKL of vae/ in its autoencoder slot (it only calls .decode)
        pipe = LDMPipeline(vqvae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
                           unet=UNet2DModel.from_pretrained(folder / "unet", local_files_only=True),
                           scheduler=DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True))
    ref = torch.from_numpy(pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(4), eta=0.0,
                                num_inference_steps=STEPS, output_type="np").images)
    ours = _tdqrt_images(folder, _initial_noise(folder, 4))
    m = open_model(folder)
    assert ours.shape == ref.shape == (BATCH, *m.image_shape)  # decoded pixel size, not the latent's
    assert m.image_shape[0] > m.sample_shape[1]
    assert not torch.allclose(ref[0], ref[1])
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
