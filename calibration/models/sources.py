"""Diffusers folders as FP models: pipeline folders, bare ``UNet2DModel`` folders and ``tdqrt import`` directories.

Every ``--model`` that takes a tdqrt FP checkpoint also takes, through :func:`open_source` (called by
``tdqrt.calibration.checkpoint.load_fp_checkpoint``):

* a diffusers **pipeline folder** (``model_index.json``): ``DDPMPipeline`` / ``DDIMPipeline`` (``unet/`` +
  ``scheduler/``), ``LDMPipeline`` (``vqvae/`` + ``unet/`` + ``scheduler/``) and any pipeline whose components are a
  ``UNet2DModel`` under ``unet``, a scheduler under ``scheduler`` and optionally a ``VQModel`` / ``AutoencoderKL``
  under ``vae`` or ``vqvae``. The component classes are read from ``model_index.json``;
* a **StableDiffusionPipeline folder** (Stable Diffusion 1.x/2.x): a ``CLIPTextModel`` under ``text_encoder``, its
  tokenizer under ``tokenizer``, a ``UNet2DConditionModel`` under ``unet``, an ``AutoencoderKL`` under ``vae`` and a
  scheduler; its safety checker, feature extractor and image encoder, if any, are not used. SDXL folders (a second
  text encoder, ``added_cond_kwargs``) are refused;
* a bare **UNet2DModel folder** (``config.json`` + weights, as ``UNet2DModel.save_pretrained`` writes it) with its
  schedule from a ``scheduler_config.json`` beside it or in ``../scheduler/``;
* a directory written by :func:`import_model` (``tdqrt import``), which references such a folder by path and
  sha256 instead of copying it, and refuses to load once the weights changed.

Weights are read locally only (``local_files_only=True``; tdqrt never downloads), from
``diffusion_pytorch_model.safetensors`` or ``.bin`` (safetensors first, as diffusers picks them). A UNet may also be
a sharded checkpoint (``diffusion_pytorch_model.safetensors.index.json`` and its shards, as ``save_pretrained(...,
max_shard_size=...)`` writes it) or only a diffusers weights variant (``diffusion_pytorch_model.fp16.safetensors``:
``save_pretrained(..., variant="fp16")``); diffusers' ``from_pretrained`` loads both (``variant=`` for the latter),
upcast to float32. A standard file wins over variants beside it; several variants and no standard file are refused
(tdqrt would have to guess). The sha256 that ``tdqrt import`` and a quantized checkpoint's ``fp_model`` record check
is the weights file's, or, for a sharded checkpoint, :func:`~tdqrt.engines.artifacts.sha256_files` of the index and
every shard. The UNet becomes
a :class:`~tdqrt.calibration.models.diffusers_unet.DiffusersUNet`; the schedule is
``ScheduleConfig.from_diffusers`` of the scheduler config. The autoencoder of a latent pipeline is not loaded here:
its description (:func:`autoencoder_record`) goes into the card as ``card["autoencoder"]`` for the stages that
decode latents; likewise the text encoder of a Stable Diffusion folder (:func:`~tdqrt.calibration.models.text.
text_encoder_record`) goes into ``card["text_encoder"]`` (None for other models), and its UNet becomes a
``DiffusersCondUNet`` (``eps = model(x, t, text_embeddings)``). Whatever does not fit is refused in one line naming
what was found and what is supported.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tdqrt.calibration.checkpoint import CARD_FILE, FPCheckpoint
from tdqrt.calibration.models.autoencoder import AUTOENCODER_CLASSES
from tdqrt.calibration.models.diffusers_cond_unet import DiffusersCondUNet
from tdqrt.calibration.models.diffusers_unet import DiffusersUNet
from tdqrt.calibration.models.text import text_encoder_record
from tdqrt.engines.artifacts import atomic_dir, read_json, sha256_file, sha256_files, versions, write_json_atomic
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.runtime.schedules import ScheduleConfig

SOURCE_FORMAT = "tdqrt-diffusers-source"  # card["format"] of a model opened from a diffusers folder
IMPORT_FORMAT = "tdqrt-import"  # model.json of a `tdqrt import` directory
IMPORT_VERSION = 1
IMPORT_CONFIG = "import_config.json"
PIPELINE_INDEX = "model_index.json"
COMPONENT_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' preference
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint's index: WEIGHTS_NAME + INDEX_SUFFIX, naming its shards
# diffusers' variant file names (diffusers.utils.hub_utils._add_variant): the variant before the last suffix, for a
# sharded variant before the index's ".json"
VARIANT_FILE = re.compile(r"diffusion_pytorch_model\.(?:(?P<a>[\w]+)\.(?:safetensors|bin)|(?:safetensors|bin)\.index\."
                          r"(?P<b>[\w]+)\.json)")
UNET_CLASS = "UNet2DModel"
COND_UNET_CLASS = "UNet2DConditionModel"
TEXT_PARTS = ("text_encoder", "tokenizer")  # what a text-to-image pipeline needs besides unet, vae and scheduler
UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")  # Stable Diffusion parts tdqrt does not use
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
AUTOENCODER_KEYS = ("vqvae", "vae")
SUPPORTED = (f"supported: DDPMPipeline/DDIMPipeline/LDMPipeline folders, pipelines of a {UNET_CLASS} (unet/), a "
             f"scheduler (scheduler/) and optionally a VQModel/AutoencoderKL (vae/ or vqvae/), a bare "
             f"{UNET_CLASS} folder, or a StableDiffusionPipeline folder (SD 1.x/2.x: text_encoder/, tokenizer/, "
             f"a {COND_UNET_CLASS} in unet/, vae/, scheduler/)")
SDXL_REFUSAL = ("is a Stable Diffusion XL model (a second text encoder and added time/text conditioning), which "
                "tdqrt does not support; Stable Diffusion 1.x/2.x pipeline folders are supported")


@dataclass(frozen=True)
class SourceLayout:
    """Where the parts of a diffusers folder are: ``kind`` is ``"pipeline"`` or ``"unet-folder"``;
    ``scheduler_file`` is None for a bare UNet folder without a scheduler config beside it; ``text`` is True for a
    text-to-image pipeline (its ``text_encoder/`` and ``tokenizer/`` are under ``root``)."""

    kind: str
    root: Path
    pipeline: Optional[str]
    unet_dir: Path
    scheduler_file: Optional[Path]
    autoencoder_dir: Optional[Path]
    text: bool = False


def source_kind(path: str | Path) -> Optional[str]:
    """``"import"``, ``"pipeline"`` or ``"unet-folder"`` for a folder :func:`open_source` reads, else None (a tdqrt
    checkpoint directory, or no model at all)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / CARD_FILE).is_file():
        return "import" if read_json(path / CARD_FILE).get("format") == IMPORT_FORMAT else None
    if (path / PIPELINE_INDEX).is_file():
        return "pipeline"
    if (path / COMPONENT_CONFIG).is_file():
        return "unet-folder"
    return None


@dataclass(frozen=True)
class WeightFiles:
    """A component's weights as diffusers' ``from_pretrained`` picks them: ``file`` is the one the card names (the
    weights file, or a sharded checkpoint's index), ``files`` all its sha256 covers (the index and every shard),
    ``variant`` the diffusers weights variant (``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``) or
    None."""

    file: Path
    files: tuple[Path, ...]
    variant: Optional[str] = None

    @property
    def sha256(self) -> str:
        return sha256_file(self.file) if self.files == (self.file,) else sha256_files(self.files)


def _shards(index: Path, what: str) -> tuple[Path, ...]:
    shards = sorted({str(v) for v in (read_json(index).get("weight_map") or {}).values()})
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if not shards or missing:
        raise ArtifactError(f"{index} names {'no shards' if not shards else 'missing shards ' + ', '.join(missing)}; "
                            f"the {what} checkpoint is incomplete, save it again with save_pretrained (or download "
                            "the folder again)")
    return (index, *(index.parent / s for s in shards))


def _weights(folder: Path, what: str) -> WeightFiles:
    """The weights of the component in ``folder``: a standard weights file or sharded checkpoint (safetensors
    first), else the one diffusers variant there (refused in one line when there are several, or none)."""
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return WeightFiles(folder / name, (folder / name,))
        if (folder / (name + INDEX_SUFFIX)).is_file():
            index = folder / (name + INDEX_SUFFIX)
            return WeightFiles(index, _shards(index, what))
    found = {f.name: m.group("a") or m.group("b") for f in sorted(folder.iterdir())
             if f.is_file() and (m := VARIANT_FILE.fullmatch(f.name))}
    variants = sorted(set(found.values()))
    if len(variants) > 1:
        raise ConfigError(f"{folder} holds {what} weights of several diffusers variants ({', '.join(variants)}) and "
                          f"no {' or '.join(WEIGHTS_NAMES)}; tdqrt does not guess: keep one variant's files there, or "
                          "save the weights without a variant")
    if not variants:
        raise ArtifactError(f"{folder} holds no {' or '.join(WEIGHTS_NAMES)} (nor a sharded or variant checkpoint); "
                            f"the {what} weights are missing, save it again with save_pretrained (or download the "
                            "folder again)")
    # safetensors before bin, as diffusers picks them; one file before a sharded checkpoint
    file = folder / min(found, key=lambda name: (".safetensors" not in name, name.endswith(".json")))
    return WeightFiles(file, _shards(file, what) if file.name.endswith(".json") else (file,), variants[0])


def _component_class(index: dict, key: str) -> Optional[str]:
    """The class model_index.json names for component ``key`` (``[library, class]``; None when absent or null)."""
    entry = index.get(key)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def _pipeline_layout(root: Path) -> SourceLayout:
    index = read_json(root / PIPELINE_INDEX)
    name = index.get("_class_name")
    components = {k: _component_class(index, k) for k in index if not k.startswith("_")}
    components = {k: v for k, v in components.items() if v is not None}
    unet = components.get("unet")
    if unet is None:
        found = ", ".join(f"{k}={v}" for k, v in components.items()) or "none"
        raise ConfigError(f"{root / PIPELINE_INDEX}: {name} has no unet component (components: {found}); "
                          f"tdqrt quantizes {UNET_CLASS} denoisers only; {SUPPORTED}")
    text = unet == COND_UNET_CLASS
    if text:
        sdxl = [k for k in SDXL_PARTS if k in components]
        if sdxl or read_json(root / "unet" / COMPONENT_CONFIG).get("addition_embed_type") is not None:
            raise ConfigError(f"{root / PIPELINE_INDEX}: {name} {SDXL_REFUSAL}")
        missing = [k for k in TEXT_PARTS if k not in components]
        if missing:
            raise ConfigError(f"{root / PIPELINE_INDEX}: {name} has a {COND_UNET_CLASS} but no {' or '.join(missing)}"
                              f"; tdqrt encodes prompts with the pipeline's own text encoder; {SUPPORTED}")
        components = {k: v for k, v in components.items() if k not in (*TEXT_PARTS, *UNUSED_PARTS)}
    elif unet != UNET_CLASS:
        raise ConfigError(f"{root / PIPELINE_INDEX}: {name}'s unet is a {unet}, tdqrt quantizes {UNET_CLASS} only; "
                          f"{SUPPORTED}")
    if "scheduler" not in components:
        raise ConfigError(f"{root / PIPELINE_INDEX}: {name} names no scheduler; {SUPPORTED}")
    autoencoders = [k for k in AUTOENCODER_KEYS if k in components]
    extra = sorted(set(components) - {"unet", "scheduler", *autoencoders})
    if extra or len(autoencoders) > 1:
        parts = ", ".join(f"{k}={components[k]}" for k in extra + autoencoders[1:])
        raise ConfigError(f"{root / PIPELINE_INDEX}: {name} has components tdqrt does not use ({parts}); "
                          f"{SUPPORTED}")
    autoencoder_dir = None
    if autoencoders:
        key = autoencoders[0]
        if components[key] not in AUTOENCODER_CLASSES:
            raise ConfigError(f"{root / PIPELINE_INDEX}: {name}'s {key} is a {components[key]}, tdqrt decodes with "
                              f"{' or '.join(AUTOENCODER_CLASSES)} only; {SUPPORTED}")
        autoencoder_dir = root / key
        if not (autoencoder_dir / COMPONENT_CONFIG).is_file():
            raise ArtifactError(f"{autoencoder_dir} is missing (or has no {COMPONENT_CONFIG}), though "
                                f"{root / PIPELINE_INDEX} names its {components[key]} there; download or save "
                                "the whole pipeline folder again")
    for part in ("unet", "scheduler"):
        wanted = COMPONENT_CONFIG if part == "unet" else SCHEDULER_CONFIG
        if not (root / part / wanted).is_file():
            raise ArtifactError(f"{root / part / wanted} is missing, though {root / PIPELINE_INDEX} names its "
                                f"{components[part]} there; download or save the whole pipeline folder again")
    if text and autoencoder_dir is None:
        raise ConfigError(f"{root / PIPELINE_INDEX}: {name} has a {COND_UNET_CLASS} but no vae; {SUPPORTED}")
    return SourceLayout("pipeline", root, name, root / "unet", root / "scheduler" / SCHEDULER_CONFIG,
                        autoencoder_dir, text)


def _unet_folder_layout(root: Path) -> SourceLayout:
    scheduler = next((p for p in (root / SCHEDULER_CONFIG, root.parent / "scheduler" / SCHEDULER_CONFIG)
                      if p.is_file()), None)
    return SourceLayout("unet-folder", root, None, root, scheduler, None)


def source_layout(path: str | Path) -> SourceLayout:
    """The parts of a pipeline folder or bare UNet folder ``path``; refuses other folders in one line."""
    root = Path(path).resolve()
    kind = source_kind(root)
    if kind == "pipeline":
        return _pipeline_layout(root)
    if kind == "unet-folder":
        return _unet_folder_layout(root)
    raise ArtifactError(f"{path} holds no {PIPELINE_INDEX} (diffusers pipeline) nor {COMPONENT_CONFIG} "
                        f"({UNET_CLASS} folder); pass a folder written by save_pretrained; {SUPPORTED}")


def _check_unet_class(layout: SourceLayout) -> None:
    unet_dir = layout.unet_dir
    found = read_json(unet_dir / COMPONENT_CONFIG).get("_class_name")
    if layout.text:
        return  # _pipeline_layout checked model_index.json's class; the adapter checks the config it loads
    if found == COND_UNET_CLASS:
        raise ConfigError(f"{unet_dir / COMPONENT_CONFIG} is a {COND_UNET_CLASS} (a text-to-image UNet) without its "
                          "text encoder; pass the StableDiffusionPipeline folder that holds it (with text_encoder/ "
                          f"and tokenizer/); {SUPPORTED}")
    if found != UNET_CLASS:
        raise ConfigError(f"{unet_dir / COMPONENT_CONFIG} describes a {found}, not a {UNET_CLASS}; {SUPPORTED}")


def _class_default(class_name: str, key: str) -> Any:
    """Default of ``key`` in the diffusers class's ``__init__`` (what ``from_pretrained`` uses when a saved config
    lacks it)."""
    import diffusers

    return inspect.signature(getattr(diffusers, class_name).__init__).parameters[key].default


def autoencoder_record(folder: Path) -> dict:
    """Describe the autoencoder in ``folder`` (a pipeline's ``vae/`` or ``vqvae/``) for the stages that decode:
    ``class``, ``path`` (absolute folder), ``weights`` (file name), ``sha256``, ``scaling_factor`` (what the
    loaded model's config says — diffusers' class default, 0.18215, when the saved config has none —: the factor
    diffusers' pipelines and :class:`~tdqrt.calibration.models.autoencoder.LatentDecoder` divide latents by),
    ``latent_channels``, ``image_size`` (decoded pixel size: the sibling ``unet/``'s sample_size times 2^(levels-1)
    of the autoencoder) and ``out_channels`` (pixel channels)."""
    folder = Path(folder).resolve()
    config = read_json(folder / COMPONENT_CONFIG)
    name = config.get("_class_name")
    if name not in AUTOENCODER_CLASSES:
        raise ConfigError(f"{folder / COMPONENT_CONFIG} describes a {name}, tdqrt decodes with "
                          f"{' or '.join(AUTOENCODER_CLASSES)} only; {SUPPORTED}")
    weights = _weights(folder, name)
    if weights.files != (weights.file,) or weights.variant is not None:
        raise ConfigError(f"{folder} holds a sharded or variant {name} checkpoint ({weights.file.name}); tdqrt decodes "
                          f"from one {' or '.join(WEIGHTS_NAMES)}: save the {name} again with save_pretrained "
                          "without max_shard_size or variant")

    def get(key: str) -> Any:
        return config[key] if key in config else _class_default(name, key)

    size = read_json(folder.parent / "unet" / COMPONENT_CONFIG).get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"class": name, "path": str(folder), "weights": weights.file.name, "sha256": weights.sha256,
            "scaling_factor": float(get("scaling_factor")),
            "latent_channels": int(get("latent_channels")),
            "image_size": int(size) * 2 ** (len(get("block_out_channels")) - 1),
            "out_channels": int(get("out_channels"))}


def _read_scheduler(layout: SourceLayout) -> dict:
    if layout.scheduler_file is None:
        raise ConfigError(f"{layout.root} is a bare {UNET_CLASS} folder without a {SCHEDULER_CONFIG} (beside it or "
                          f"in ../scheduler/); put the scheduler's {SCHEDULER_CONFIG} beside it, or run `tdqrt "
                          f"import {layout.root} --scheduler-config FILE --out DIR` and pass DIR")
    return read_json(layout.scheduler_file)


def _open(layout: SourceLayout, scheduler: dict, scheduler_name: str, device: str | torch.device,
          where: str) -> FPCheckpoint:
    """Load the UNet of ``layout`` with the schedule of the scheduler config ``scheduler`` (``scheduler_name`` in
    the card, ``where`` in messages)."""
    schedule = ScheduleConfig.from_diffusers(scheduler, source=where)
    _check_unet_class(layout)
    weights = _weights(layout.unet_dir, COND_UNET_CLASS if layout.text else UNET_CLASS)
    autoencoder = None if layout.autoencoder_dir is None else autoencoder_record(layout.autoencoder_dir)
    text = text_encoder_record(layout.root) if layout.text else None
    model = (DiffusersUNet.from_pretrained(layout.unet_dir, variant=weights.variant) if text is None
             else _cond_unet(layout, text, weights.variant))
    if autoencoder is not None and model.in_channels != autoencoder["latent_channels"]:
        raise ConfigError(f"{layout.unet_dir / COMPONENT_CONFIG}: in_channels={model.in_channels} does not match "
                          f"the {autoencoder['class']}'s latent_channels={autoencoder['latent_channels']} in "
                          f"{layout.autoencoder_dir}; the UNet and the autoencoder come from different models")
    model.to(device).eval()
    digest = weights.sha256
    card = {
        "format": SOURCE_FORMAT,
        "model": model.spec(),
        "schedule": schedule.to_dict(),
        "source": {"kind": layout.kind, "path": str(layout.root), "pipeline": layout.pipeline,
                   "unet": {"file": weights.file.relative_to(layout.root).as_posix(), "sha256": digest},
                   "scheduler": scheduler_name},
        "autoencoder": autoencoder,
        "text_encoder": text,
    }
    return FPCheckpoint(model, schedule, card, layout.root, digest)


def _cond_unet(layout: SourceLayout, text: dict, variant: Optional[str]):
    """The ``DiffusersCondUNet`` of a text-to-image pipeline's ``unet/``, conditioned on ``text["max_length"]``
    tokens of width ``text["hidden_size"]`` (refused in one line when its cross-attention has another width)."""
    width = read_json(layout.unet_dir / COMPONENT_CONFIG).get("cross_attention_dim")
    if width != text["hidden_size"]:
        raise ConfigError(f"{layout.unet_dir / COMPONENT_CONFIG}: cross_attention_dim={width} does not match the "
                          f"text encoder's hidden_size={text['hidden_size']} in {text['path']}; the UNet and the text "
                          "encoder come from different models")
    return DiffusersCondUNet.from_pretrained(layout.unet_dir, cond_length=text["max_length"], variant=variant)


def _relative(file: Path, root: Path) -> str:
    return file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)


def _open_import(path: Path, device: str | torch.device) -> FPCheckpoint:
    card = read_json(path / CARD_FILE, expect_format=IMPORT_FORMAT)
    if card.get("version") != IMPORT_VERSION:
        raise ArtifactError(f"{path / CARD_FILE} has version {card.get('version')}, this tdqrt reads "
                            f"{IMPORT_VERSION}; run `tdqrt import` again")
    source, args = card["source"], read_json(path / IMPORT_CONFIG)
    again = "" if args["scheduler_config"] is None else f" --scheduler-config {args['scheduler_config']}"
    rerun = f"re-run `tdqrt import {args['src']}{again} --out {path}` if the change is intended"
    if not Path(source["path"]).is_dir():
        raise ArtifactError(f"{source['path']}, imported into {path}, is missing; put it back or {rerun}")
    layout = source_layout(source["path"])
    fp = _open(layout, card["scheduler_config"], source["scheduler"], device,
               f"{path / CARD_FILE} scheduler_config")
    ae, te = fp.card["autoencoder"], fp.card["text_encoder"]
    checks = [("UNet weights", source["unet"]["sha256"], fp.sha256, layout.root / source["unet"]["file"]),
              ("autoencoder weights", (card["autoencoder"] or {}).get("sha256"), ae and ae["sha256"],
               layout.root / PIPELINE_INDEX if ae is None else Path(ae["path"]) / ae["weights"])]
    if te is not None:  # a text-to-image pipeline: its text encoder and tokenizer too
        then = card.get("text_encoder") or {}
        checks += [("text encoder weights", then.get("sha256"), te["sha256"], Path(te["path"]) / te["weights"]),
                   ("tokenizer files", then.get("tokenizer_sha256"), te["tokenizer_sha256"],
                    Path(te["tokenizer_path"]))]
    for what, then, now, file in checks:
        if then != now:
            raise ArtifactError(f"the {what} {file} changed since `tdqrt import` (sha256 {str(now)[:12]}… vs "
                                f"{str(then)[:12]}… recorded in {path / CARD_FILE}); {rerun}")
    fp.card["imported"] = {"path": str(path.resolve())}
    fp.path = path
    return fp


def open_source(path: str | Path, *, device: str | torch.device = "cpu") -> FPCheckpoint:
    """Open a pipeline folder, a bare UNet2DModel folder or a ``tdqrt import`` directory as an FP checkpoint.

    ``path`` of the result is the folder given (the pipeline folder, not its ``unet/``); ``sha256`` is that of the
    UNet weights file, so a quantized checkpoint's ``fp_model`` record finds and checks it again.
    """
    path = Path(path)
    if source_kind(path) == "import":
        return _open_import(path, device)
    layout = source_layout(path)
    fp = _open(layout, _read_scheduler(layout), _relative(layout.scheduler_file, layout.root), device,
               str(layout.scheduler_file))
    fp.path = path
    return fp


def import_model(src: str | Path, out: str | Path, scheduler_config: Optional[str | Path] = None) -> Path:
    """Write the tdqrt model directory ``out`` that references the diffusers folder ``src`` (nothing copied):
    ``model.json`` records the folder, the sha256 of its UNet, autoencoder and text encoder weights (and tokenizer
    files) and the scheduler config's
    content (``scheduler_config``, a ``scheduler_config.json`` file, replaces the folder's own or supplies one for a
    bare UNet folder); ``import_config.json`` records the arguments. The source is opened first, so a folder that
    does not load is refused before anything is written, and ``out`` appears complete or not at all (written
    through ``atomic_dir``); loading ``out`` later refuses changed weights."""
    layout = source_layout(src)
    if scheduler_config is not None:
        scheduler_file = Path(scheduler_config).resolve()
        scheduler, name, where = read_json(scheduler_file), str(scheduler_file), str(scheduler_file)
    else:
        scheduler = _read_scheduler(layout)
        name, where = _relative(layout.scheduler_file, layout.root), str(layout.scheduler_file)
    fp = _open(layout, scheduler, name, "cpu", where)
    ae, te = fp.card["autoencoder"], fp.card["text_encoder"]
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / IMPORT_CONFIG, {"src": str(layout.root),
                                                "scheduler_config": None if scheduler_config is None else name})
        write_json_atomic(tmp / CARD_FILE, {
            "format": IMPORT_FORMAT,
            "version": IMPORT_VERSION,
            "source": fp.card["source"],
            "autoencoder": None if ae is None else {k: ae[k] for k in ("path", "weights", "sha256")},
            "text_encoder": None if te is None else {k: te[k] for k in ("path", "weights", "sha256",
                                                                        "tokenizer_path", "tokenizer_sha256")},
            "scheduler_config": scheduler,
            "model": fp.card["model"],
            "schedule": fp.card["schedule"],
            "versions": versions(),
        })
    return out
