"""The text side of text-to-image UNets (Stable Diffusion 1.x/2.x): prompt sets and their text embeddings.

A ``UNet2DConditionModel`` denoises conditioned on text embeddings ``[B, L, D]`` (``encoder_hidden_states``): the
last hidden state of the pipeline's CLIP text encoder over the prompt's ``L`` tokens. The text encoder runs once
per prompt, in float, outside the quantized UNet; classifier-free guidance pairs every prompt with the embedding of
the negative prompt (``""`` when none is given), as diffusers' ``StableDiffusionPipeline`` does.

A **text encoder record** (``model.json["text_encoder"]`` of an FP checkpoint opened from a Stable Diffusion
pipeline folder; None for other models) says where the text encoder and its tokenizer are and what they were when
the model was made::

    {"class": "CLIPTextModel", "path": "<text_encoder/ folder>", "weights": "<file>", "sha256": "<of that file>",
     "tokenizer_path": "<tokenizer/ folder>", "tokenizer_sha256": "<of its files, see tokenizer_sha256>",
     "max_length": <tokens per prompt, the tokenizer's model_max_length>, "hidden_size": <embedding width>}

:class:`TextEncoder` loads it (sha256-checked, local files only) and encodes prompts exactly as
``StableDiffusionPipeline.encode_prompt`` does without LoRA or clip-skip; :class:`PromptSet` is the validated list
of prompts (and the negative prompt) that sampling, calibration sets and D² statistics record by count and sha256.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from tdqrt.calibration.models.autoencoder import check_component_record
from tdqrt.engines.artifacts import read_json, sha256_file, sha256_files
from tdqrt.engines.errors import ArtifactError, ConfigError, DataError

TEXT_ENCODER_CLASSES = ("CLIPTextModel",)  # SD 1.x/2.x; SDXL's second encoder (…WithProjection) is not supported
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")  # transformers' preference
RECORD_KEYS = ("class", "path", "weights", "sha256", "tokenizer_path", "tokenizer_sha256", "max_length",
               "hidden_size")
ENCODE_BATCH = 64  # prompts per text-encoder call: bounds memory for large prompt files


def tokenizer_sha256(folder: str | Path) -> str:
    """One sha256 over a tokenizer folder: of the ``{file name: sha256 of its bytes}`` of every file in it, sorted
    by name (vocabularies, merges, tokenizer.json and the configs all change what a prompt encodes to)."""
    return sha256_files(f for f in Path(folder).iterdir() if f.is_file())


def _weights_file(folder: Path) -> Path:
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ArtifactError(f"{folder} holds no {' or '.join(WEIGHTS_NAMES)}; the text encoder weights are missing (a "
                        "sharded checkpoint is not supported), save it again with save_pretrained or download the "
                        "pipeline folder again")


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{folder} cannot be loaded as a tokenizer ({type(exc).__name__}: {str(exc)[:300]}); "
                            "download or save the pipeline folder again") from exc


def text_encoder_record(pipeline_folder: str | Path) -> dict:
    """The text encoder record (module docstring) of a Stable Diffusion pipeline folder's ``text_encoder/`` and
    ``tokenizer/``. Refuses, in one line, a text encoder class other than ``CLIPTextModel`` and a tokenizer whose
    ``model_max_length`` exceeds the text encoder's positions (an old tokenizer config without it)."""
    root = Path(pipeline_folder).resolve()
    folder, tok_folder = root / "text_encoder", root / "tokenizer"
    for part in (folder, tok_folder):
        if not part.is_dir():
            raise ArtifactError(f"{part} is missing, though {root / 'model_index.json'} names a {part.name} there; "
                                "download or save the whole pipeline folder again")
    config = read_json(folder / "config.json")
    name = (config.get("architectures") or [None])[0]
    if name not in TEXT_ENCODER_CLASSES:
        raise ConfigError(f"{folder / 'config.json'} describes a {name}, tdqrt encodes prompts with "
                          f"{' or '.join(TEXT_ENCODER_CLASSES)} only (Stable Diffusion 1.x/2.x)")
    import transformers

    text_config = getattr(transformers, name).config_class.from_pretrained(str(folder), local_files_only=True)
    weights = _weights_file(folder)
    max_length = int(_load_tokenizer(tok_folder).model_max_length)
    if max_length > text_config.max_position_embeddings:
        raise ConfigError(f"{tok_folder}: model_max_length={max_length} exceeds the text encoder's "
                          f"max_position_embeddings={text_config.max_position_embeddings} ({folder}); set "
                          "model_max_length in its tokenizer_config.json to the text encoder's")
    return {"class": name, "path": str(folder), "weights": weights.name, "sha256": sha256_file(weights),
            "tokenizer_path": str(tok_folder), "tokenizer_sha256": tokenizer_sha256(tok_folder),
            "max_length": max_length, "hidden_size": int(text_config.hidden_size)}


def check_record(record: Any) -> dict:
    """``record`` as a dict after checking it has every key of a text encoder record and a supported class."""
    return check_component_record(record, "text encoder", RECORD_KEYS, TEXT_ENCODER_CLASSES, "encodes prompts")


def _check_unchanged(what: str, path: Path, digest: Optional[str], recorded: str) -> None:
    if digest is None:
        raise ArtifactError(f"the {what} {path} is missing (the pipeline folder was moved or deleted); put it back, "
                            "or import the pipeline again from where it is now")
    if digest != recorded:
        raise ArtifactError(f"the {what} {path} changed after the model was made (sha256 {digest[:12]}… vs "
                            f"{str(recorded)[:12]}… recorded); restore it, or import the pipeline again and "
                            "recalibrate")


class TextEncoder:
    """``embeddings = text_encoder.encode(prompts)``: prompts -> ``[P, L, D]`` float32 text embeddings, the
    ``encoder_hidden_states`` of a ``UNet2DConditionModel``.

    The tokenizer and ``CLIPTextModel`` are transformers' own; ``encode`` is ``StableDiffusionPipeline.encode_prompt``
    (diffusers 0.42) without LoRA scaling or clip-skip, so that tdqrt conditions the UNet exactly as the pipeline does.
    """

    def __init__(self, tokenizer, model: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = int(tokenizer.model_max_length)
        self.hidden_size = int(model.config.hidden_size)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], device: str | torch.device = "cpu") -> "TextEncoder":
        """The tokenizer and text encoder the record names, in float32 eval mode on ``device``, after checking that
        the weights and the tokenizer files still have the recorded sha256 (one-line ``ArtifactError`` naming the
        file otherwise)."""
        record = check_record(record)
        folder, tok_folder = Path(record["path"]), Path(record["tokenizer_path"])
        weights = folder / record["weights"]
        _check_unchanged("text encoder weights", weights, sha256_file(weights) if weights.is_file() else None,
                         record["sha256"])
        _check_unchanged("tokenizer folder", tok_folder, tokenizer_sha256(tok_folder) if tok_folder.is_dir() else None,
                         record["tokenizer_sha256"])
        import transformers
        from transformers.utils import logging as transformers_logging

        bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # one weights file: its loading bar is noise on the CLI
        try:
            model = getattr(transformers, record["class"]).from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{folder} cannot be loaded as a transformers {record['class']} "
                                f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        finally:
            if bar:
                transformers_logging.enable_progress_bar()
        return cls(_load_tokenizer(tok_folder), model.float().to(device))  # float32 whatever dtype was saved

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _warn_truncated(self, prompts: Sequence[str], first: int, what: Optional[str]) -> None:
        """diffusers' truncation warning, one line per prompt: which prompt (``what``, else its index) and how many
        tokens are dropped."""
        for i, ids in enumerate(self.tokenizer(list(prompts), verbose=False).input_ids):
            if len(ids) > self.max_length:
                warnings.warn(f"{what or f'prompt {first + i}'} has {len(ids) - self.max_length} token(s) more than the text "
                              f"encoder's {self.max_length} (start and end included); they are dropped, as "
                              "diffusers' StableDiffusionPipeline does", stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, what: Optional[str] = None) -> torch.Tensor:
        """``[P, L, D]`` float32 embeddings of ``prompts``: tokenized to ``L = max_length`` tokens
        (``padding="max_length"``, ``truncation=True``; longer prompts are truncated with a warning), the text
        encoder's last hidden state, with the attention mask only where the text encoder's config asks for it
        (``use_attention_mask``), as ``StableDiffusionPipeline.encode_prompt`` does. ``what`` names the prompts in
        the truncation warning (default: "prompt INDEX")."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"encode takes a non-empty list of prompt strings, got {prompts!r}")
        use_mask = bool(getattr(self.model.config, "use_attention_mask", False))
        out = []
        for start in range(0, len(prompts), ENCODE_BATCH):
            chunk = prompts[start:start + ENCODE_BATCH]
            self._warn_truncated(chunk, start, what)
            tokens = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt")
            mask = tokens.attention_mask.to(self.device) if use_mask else None
            out.append(self.model(tokens.input_ids.to(self.device), attention_mask=mask)[0].float())
        return torch.cat(out)

    def encode_set(self, prompts: "PromptSet") -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond [P, L, D], uncond [L, D])`` of a prompt set: the prompts' embeddings and the negative prompt's
        (``""`` when none was given), the pair classifier-free guidance combines."""
        return self.encode(prompts.prompts), self.encode([prompts.negative], what="the negative prompt")[0]


@dataclass(frozen=True)
class PromptSet:
    """Prompts to sample or calibrate with, and the negative prompt of classifier-free guidance (``""``: none, the
    unconditional embedding as diffusers uses it). Records keep :meth:`record` (count and sha256), not the text."""

    prompts: tuple[str, ...]
    negative: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE (one prompt a line)")
        bad = [p for p in (*self.prompts, self.negative) if not isinstance(p, str)]
        if bad:
            raise ConfigError(f"prompts must be strings, got {bad[0]!r}")

    @classmethod
    def from_sources(cls, prompts: Sequence[str] = (), file: Optional[str | Path] = None,
                     negative: str = "") -> "PromptSet":
        """The prompts given one by one followed by those of ``file`` (one a line, surrounding whitespace stripped,
        blank lines ignored); a file without any prompt is refused in one line."""
        found = list(prompts)
        if file is not None:
            path = Path(file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"--prompts {path}: cannot be read as UTF-8 text ({type(exc).__name__}: {exc}); "
                                "pass a text file with one prompt a line") from exc
            from_file = [line.strip() for line in lines if line.strip()]
            if not from_file:
                raise ConfigError(f"--prompts {path} holds no prompt (the file is empty or only has blank lines); "
                                  "write one prompt a line")
            found += from_file
        return cls(tuple(found), negative)

    @property
    def count(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """sha256 of the UTF-8 prompts joined with "\\n", then a NUL byte, then the negative prompt."""
        return hashlib.sha256(("\n".join(self.prompts) + "\0" + self.negative).encode("utf-8")).hexdigest()

    def record(self) -> dict:
        """What an artifact records of the prompts it was made with: ``{"count", "sha256"}``."""
        return {"count": self.count, "sha256": self.sha256}

    def to_dict(self) -> dict:
        return {"prompts": list(self.prompts), "negative": self.negative, **self.record()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptSet":
        """The prompt set :meth:`to_dict` wrote; refuses one whose recorded sha256 does not match its prompts."""
        out = cls(tuple(data["prompts"]), data.get("negative", ""))
        if "sha256" in data and data["sha256"] != out.sha256:
            raise ArtifactError(f"the prompt set's recorded sha256 {str(data['sha256'])[:12]}… does not match its "
                                f"{out.count} prompts ({out.sha256[:12]}…); the file was edited, write it again")
        return out


def prompt_embeddings(model: Any, card: dict, prompts: Optional[PromptSet], *,
                      device: str | torch.device = "cpu") -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(cond [P, L, D], uncond [L, D])`` for a text-conditioned ``model`` (``cond_shape`` set) from ``prompts``,
    encoded by the text encoder its ``card`` (FP or quantized card, or bundle manifest) records; ``(None, None)``
    for other models. Refused in one line: prompts for a model without text conditioning, a text model without
    prompts or without a recorded text encoder."""
    text_model = getattr(model, "cond_shape", None) is not None
    if not text_model:
        if prompts is not None:
            raise ConfigError("--prompt/--prompts are for text-to-image models; this model is not conditioned on "
                              "text: drop them")
        return None, None
    if prompts is None:
        raise ConfigError("this is a text-to-image model: give the prompts with --prompt TEXT (repeatable) or "
                          "--prompts FILE")
    record = card.get("text_encoder")
    if record is None:
        raise ArtifactError("the model records no text encoder (text_encoder) to encode the prompts with; open it "
                            "from its pipeline folder or re-import it")
    cond, uncond = TextEncoder.from_record(record, device).encode_set(prompts)
    if tuple(cond.shape[1:]) != tuple(model.cond_shape):
        raise ConfigError(f"the text encoder gives embeddings of shape {list(cond.shape[1:])}, the UNet takes "
                          f"{list(model.cond_shape)}; the UNet and the text encoder come from different models")
    return cond.to(device), uncond.to(device)
