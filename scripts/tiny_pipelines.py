"""Write tiny diffusers pipeline folders with random weights (``save_pretrained``; nothing is downloaded): what the
test suite brings as "your own model" and what the README's bring-your-own-model walkthrough runs on.

    python scripts/tiny_pipelines.py ldm --out pipes/ldm

Kinds (``KINDS``):

* ``ddpm``: ``DDPMPipeline`` — a 3-channel 16×16 ``UNet2DModel`` with an attention block and a default
  ``DDPMScheduler`` (linear betas, epsilon prediction, 1000 steps);
* ``ddim``: ``DDIMPipeline`` — a 1-channel 16×16 UNet and a ``DDIMScheduler`` with v_prediction, the
  squaredcos_cap_v2 (cosine) schedule and "trailing" timestep spacing;
* ``ldm``: ``LDMPipeline`` — a ``VQModel`` in ``vqvae/`` (3 latent channels, 16 codes spread like the scaled latents
  so that quantize-on-decode visibly moves them; 16×16×3 pixels <-> 8×8×3 latents, scaling_factor 0.18215 as
  diffusers saves it), an 8×8 3-channel UNet and a ``DDIMScheduler`` (scaled_linear betas, epsilon);
* ``kl``: a latent pipeline with an ``AutoencoderKL`` under ``vae/`` (4 latent channels, scaling_factor 0.5), an 8×8
  4-channel UNet and a ``DDIMScheduler``; saved as an ``LDMPipeline`` whose ``vqvae/`` is renamed ``vae/`` in the
  folder and in model_index.json (the layout of latent pipelines with a KL autoencoder; diffusers' LDMPipeline
  itself only takes ``vqvae``, so tests build that pipeline from the components).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# A 16×16 UNet2DModel with an attention block (blocks of 8 and 16 channels, 4 groups): tiny but every block type.
TINY_UNET2D = {"sample_size": 16, "block_out_channels": [8, 16], "layers_per_block": 1,
               "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
               "norm_num_groups": 4, "attention_head_dim": 8}
# A two-level autoencoder (8 and 16 channels): 16×16×3 pixels <-> 8×8 latents.
TINY_AUTOENCODER = {"in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16], "layers_per_block": 1,
                    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                    "norm_num_groups": 4, "sample_size": 16}


def _unet(seed: int, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET2D, **overrides}).eval()


def ddpm(out: Path) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=_unet(0, in_channels=3, out_channels=3), scheduler=DDPMScheduler()).save_pretrained(out)
    return out


def ddim(out: Path) -> Path:
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
                              timestep_spacing="trailing")
    DDIMPipeline(unet=_unet(1, in_channels=1, out_channels=1), scheduler=scheduler).save_pretrained(out)
    return out


def ldm(out: Path) -> Path:
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(3)
    vqvae = VQModel(**TINY_AUTOENCODER, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3).eval()
    with torch.no_grad():
        vqvae.quantize.embedding.weight.normal_(0.0, 1.0 / vqvae.config.scaling_factor)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=_unet(2, sample_size=8, in_channels=3, out_channels=3),
                scheduler=scheduler).save_pretrained(out)
    return out


def kl(out: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline

    torch.manual_seed(5)
    vae = AutoencoderKL(**TINY_AUTOENCODER, latent_channels=4, scaling_factor=0.5).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    LDMPipeline(vqvae=vae, unet=_unet(4, sample_size=8, in_channels=4, out_channels=4),
                scheduler=scheduler).save_pretrained(out)
    (out / "vqvae").rename(out / "vae")
    index = json.loads((out / "model_index.json").read_text())
    index["vae"] = index.pop("vqvae")
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


KINDS = {"ddpm": ddpm, "ddim": ddim, "ldm": ldm, "kl": kl}


def build(kind: str, out: Path) -> Path:
    """Write the ``kind`` pipeline folder into ``out`` (created; must not hold a pipeline already)."""
    out = Path(out)
    if (out / "model_index.json").exists():
        raise SystemExit(f"{out} already holds a pipeline; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return KINDS[kind](out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS), help="which pipeline")
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    args = parser.parse_args()
    print(f"{args.kind} pipeline written to {build(args.kind, args.out)}")


if __name__ == "__main__":
    main()
