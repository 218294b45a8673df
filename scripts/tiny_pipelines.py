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
  itself only takes ``vqvae``, so tests build that pipeline from the components);
* ``sd``: ``StableDiffusionPipeline`` — a ``CLIPTextModel`` (hidden size 16, 2 layers, 2 heads, 16 positions) in
  ``text_encoder/``, a ``CLIPTokenizer`` built from a vocab.json + merges.txt written here (the special tokens, every
  lowercase letter and a few punctuation marks as pieces and word ends, and merges for the words of ``WORDS``;
  ``model_max_length`` 16, the text encoder's positions) in ``tokenizer/``, an 8×8 4-channel
  ``UNet2DConditionModel`` with cross-attention (dim 16) in ``unet/``, an ``AutoencoderKL`` (8×8×4 latents <->
  16×16×3 pixels, scaling_factor 0.18215 as Stable Diffusion's) in ``vae/`` and Stable Diffusion's
  ``DDIMScheduler`` (scaled_linear 0.00085–0.012, epsilon, steps_offset 1); no safety checker;
* ``sd-v``: the same with a v_prediction scheduler (the Stable Diffusion 2.x convention).
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
# A text-to-image UNet: cross-attention in the first level, 8×8×4 latents, 16-wide text embeddings.
TINY_UNET2D_CONDITION = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16],
                         "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 4,
                         "cross_attention_dim": 16, "attention_head_dim": 4}
TEXT_LENGTH = 16  # tokens per prompt: the tokenizer's model_max_length and the text encoder's positions
TINY_CLIP_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "max_position_embeddings": TEXT_LENGTH, "projection_dim": 16}
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words that tokenize to one piece each; any other lowercase word falls apart into letters.
WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "drawing", "cat", "dog", "car",
         "house", "tree", "red", "blue", "green", "small", "big", "blurry", "low", "quality", "sky", "city", "night")


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


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE pieces for ``WORDS``: single characters (alone and as word ends, ``</w>``) and the merges that
    build each word left to right, as CLIP's merges.txt does for its words."""
    pieces = list(SPECIAL_TOKENS)
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        pieces += [char, char + "</w>"]
    merges = []
    for word in WORDS:
        for i in range(1, len(word)):
            right = word[i] + ("</w>" if i == len(word) - 1 else "")
            merged = word[:i + 1] + ("</w>" if i == len(word) - 1 else "")
            if merged not in pieces:
                pieces.append(merged)
                merges.append(f"{word[:i]} {right}")
    return {piece: i for i, piece in enumerate(pieces)}, merges


def _clip_tokenizer(folder: Path, max_length: int = TEXT_LENGTH):
    """A ``CLIPTokenizer`` read from the vocab.json + merges.txt written into ``folder`` (CLIP's file formats)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def stable_diffusion(out: Path, prediction_type: str = "epsilon", *, unet: dict = TINY_UNET2D_CONDITION,
                     text: dict = TINY_CLIP_TEXT) -> Path:
    """A ``StableDiffusionPipeline`` folder (see ``sd`` in the module docstring) with the ``UNet2DConditionModel``
    config ``unet`` and the ``CLIPTextConfig`` fields ``text`` (its ``max_position_embeddings`` is the tokenizer's
    length); other scripts pass larger, Stable-Diffusion-shaped configs for speed and memory measurements."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(tmp), text["max_position_embeddings"])
    vocab = tokenizer.get_vocab()
    torch.manual_seed(6)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, vocab_size=len(vocab),
                                                bos_token_id=vocab[SPECIAL_TOKENS[0]],
                                                eos_token_id=vocab[SPECIAL_TOKENS[1]],
                                                pad_token_id=vocab[SPECIAL_TOKENS[1]])).eval()
    unet = UNet2DConditionModel(**unet).eval()
    vae = AutoencoderKL(**TINY_AUTOENCODER, latent_channels=4).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    return out


def sd(out: Path) -> Path:
    return stable_diffusion(out, "epsilon")


def sd_v(out: Path) -> Path:
    return stable_diffusion(out, "v_prediction")


KINDS = {"ddpm": ddpm, "ddim": ddim, "ldm": ldm, "kl": kl, "sd": sd, "sd-v": sd_v}


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
