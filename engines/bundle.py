"""The deployment bundle on disk: open it, verify it, describe it — without any export or calibration code.

A bundle is a directory written by ``tdqrt export``::

    unet.onnx            INT8 Q/DQ UNet  (sample, timestep[, class_labels]) -> eps   (+ unet.onnx.data when large)
    unet_fp.onnx         the FP UNet with the same signature (the validation reference)
    d2.npz, d2.json      D² statistics (optional; read with tdqrt.runtime.d2.D2Table.load(bundle.path))
    decoder.onnx         latent models only: the FP32 autoencoder decoder, latents -> images in [-1, 1]
                         (run by tdqrt.engines.decoder.OrtDecoder; the manifest's "decoder" entry describes it)
    manifest.json        format tag + version, sha256 and size of every file, model / quant / export settings,
                         noise schedule, D² sampler settings, versions of the tools that wrote it

:func:`open_bundle` refuses a bundle whose manifest is foreign or of another version, and any listed file that is
missing, of the wrong size or whose sha256 differs (truncated, tampered, replaced), naming the file and saying to
re-export. ``bundle.sha256`` (the manifest's own hash, which covers every file through their hashes) identifies
the bundle for engines built from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

from tdqrt.engines.artifacts import read_json, sha256_file
from tdqrt.engines.errors import ArtifactError

BUNDLE_FORMAT = "tdqrt-bundle"
BUNDLE_VERSION = 1
MANIFEST_FILE = "manifest.json"
UNET_FILE = "unet.onnx"
UNET_FP_FILE = "unet_fp.onnx"
DECODER_FILE = "decoder.onnx"
ROLES = {"unet": UNET_FILE, "unet_fp": UNET_FP_FILE}

_REEXPORT = "re-export the bundle with `tdqrt export`"


def _safe_relative(name: str, manifest: Path) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ArtifactError(f"{manifest} lists the file {name!r} outside the bundle; {_REEXPORT}")
    return rel


@dataclass(frozen=True)
class Bundle:
    """An opened (and, unless ``verify=False``, verified) bundle."""

    path: Path
    manifest: dict
    sha256: str  # sha256 of manifest.json

    # --- model description (what the runtime loop needs to sample like from the torch model)
    @property
    def model_info(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def num_classes(self) -> int:
        return int(self.model_info.get("num_classes", 0) or 0)

    @property
    def null_label(self) -> Optional[int]:
        v = self.model_info.get("null_label")
        return None if v is None else int(v)

    @property
    def cond_shape(self) -> Optional[tuple[int, ...]]:
        """``(L, D)`` of the text embeddings a text-conditioned UNet takes (``encoder_hidden_states``), else None."""
        v = self.model_info.get("cond_shape")
        return None if v is None else tuple(int(d) for d in v)

    @property
    def image_size(self) -> int:
        return int(self.model_info["image_size"])

    @property
    def in_channels(self) -> int:
        return int(self.model_info["in_channels"])

    @property
    def min_timestep(self) -> int:
        """The lowest timestep the UNet takes: 1 for a Fourier time embedding (log of the timestep), else 0 (also
        for bundles written before the manifest recorded it)."""
        return int(self.model_info.get("min_timestep", 0) or 0)

    @property
    def schedule(self) -> dict:
        """The noise schedule as a dict (``tdqrt.runtime.schedules.ScheduleConfig.from_dict`` reads it)."""
        return dict(self.manifest["schedule"])

    @property
    def files(self) -> dict[str, dict]:
        return dict(self.manifest.get("files", {}))

    @property
    def has_d2(self) -> bool:
        return "d2.npz" in self.manifest.get("files", {}) and "d2.json" in self.manifest.get("files", {})

    @property
    def d2_dir(self) -> Optional[Path]:
        """Directory holding ``d2.npz`` + ``d2.json`` (the bundle itself), or None when the bundle has none."""
        return self.path if self.has_d2 else None

    @property
    def decoder(self) -> Optional[dict]:
        """The manifest's ``"decoder"`` entry of a latent model (``record``: the autoencoder record it was
        exported from, ``image_size``, ``out_channels``, ``latent_shape``); None for a pixel model."""
        return self.manifest.get("decoder")

    @property
    def decoder_path(self) -> Optional[Path]:
        """``decoder.onnx`` of a latent model; None for a pixel model."""
        return self.path / DECODER_FILE if self.decoder is not None else None

    @property
    def output_image_size(self) -> int:
        """Pixel size of the images the bundle samples: the decoder's for a latent model, else the UNet's."""
        return int(self.decoder["image_size"]) if self.decoder is not None else self.image_size

    @property
    def output_channels(self) -> int:
        """Channels of the images the bundle samples: the decoder's for a latent model, else the UNet's."""
        return int(self.decoder["out_channels"]) if self.decoder is not None else self.in_channels

    def onnx_path(self, role: str = "unet") -> Optional[Path]:
        """Path of ``unet.onnx`` (``role="unet"``) or ``unet_fp.onnx`` (``"unet_fp"``); None if not in the bundle."""
        if role not in ROLES:
            raise ArtifactError(f"unknown bundle model role {role!r}; use one of {sorted(ROLES)}")
        name = ROLES[role]
        return self.path / name if name in self.manifest.get("files", {}) else None

    def signature(self, role: str = "unet") -> dict:
        return self.manifest.get("signature", {}).get(role, {})


def verify_files(path: Path, manifest: dict, manifest_path: Path) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{manifest_path} lists no files; {_REEXPORT}")
    for name, entry in files.items():
        rel = _safe_relative(name, manifest_path)
        f = path.joinpath(*rel.parts)
        if not f.is_file():
            raise ArtifactError(f"bundle file {f} is missing; {_REEXPORT}")
        want_size = entry.get("bytes")
        size = f.stat().st_size
        if want_size is not None and size != want_size:
            raise ArtifactError(f"bundle file {f} has {size} bytes, the manifest says {want_size}: it was truncated "
                                f"or replaced; {_REEXPORT}")
        digest = sha256_file(f)
        if digest != entry.get("sha256"):
            raise ArtifactError(f"bundle file {f} does not match the sha256 in {manifest_path} ({digest[:12]}… vs "
                                f"{str(entry.get('sha256'))[:12]}…): it was modified or corrupted; {_REEXPORT}")


def open_bundle(path: Union[str, os.PathLike], *, verify: bool = True) -> Bundle:
    """Open the bundle directory ``path``; with ``verify`` (default) check every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a bundle directory; pass the --out folder of `tdqrt export`")
    manifest_path = path / MANIFEST_FILE
    manifest = read_json(manifest_path, expect_format=BUNDLE_FORMAT)
    if manifest.get("version") != BUNDLE_VERSION:
        raise ArtifactError(f"{manifest_path} has bundle version {manifest.get('version')!r}, this tdqrt reads "
                            f"{BUNDLE_VERSION}; {_REEXPORT}")
    for key in ("model", "schedule", "files"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path} has no {key!r} entry; {_REEXPORT}")
    if verify:
        verify_files(path, manifest, manifest_path)
    if UNET_FILE not in manifest["files"]:
        raise ArtifactError(f"{manifest_path} lists no {UNET_FILE}; {_REEXPORT}")
    if manifest.get("decoder") is not None and DECODER_FILE not in manifest["files"]:
        raise ArtifactError(f"{manifest_path} describes a latent decoder but lists no {DECODER_FILE}; {_REEXPORT}")
    return Bundle(path=path, manifest=manifest, sha256=sha256_file(manifest_path))


def is_bundle_dir(path: Union[str, os.PathLike]) -> bool:
    return Path(path, MANIFEST_FILE).is_file()


def describe(bundle: Bundle) -> dict[str, Any]:
    """A short summary for the CLI."""
    m = bundle.manifest
    return {"path": str(bundle.path), "sha256": bundle.sha256, "files": sorted(m["files"]),
            "target": m.get("export", {}).get("target"), "dtype": m.get("export", {}).get("dtype"),
            "method": m.get("quant", {}).get("config", {}).get("method"), "num_classes": bundle.num_classes,
            "image_size": bundle.image_size, "in_channels": bundle.in_channels, "d2": bundle.has_d2,
            "decoder": None if bundle.decoder is None else {"image_size": bundle.output_image_size,
                                                             "out_channels": bundle.output_channels}}
