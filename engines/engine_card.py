"""``engine.json``: what an engine file was built from and for, and the checks that refuse a stale engine.

``tdqrt build`` writes the engine file (a TensorRT plan, or ONNX Runtime's optimized model) and then, last, an
``engine.json`` beside it::

    format, version     "tdqrt-engine", 1
    backend             "trt" (a TensorRT or TensorRT-RTX plan) | "ort"
    plan                file name, bytes, sha256 of the engine file
    bundle              path and sha256 (of manifest.json) of the bundle it was built from
    runtime             name and version of the runtime (tensorrt / tensorrt_rtx / onnxruntime), the GPU name and
                        compute capability it was built on (None for a CPU runtime or a TensorRT-RTX ahead-of-time
                        build), and for TensorRT-RTX the target compute capabilities (None: the library's default)
    profile             per input: min / opt / max shapes of the optimization profile
    build               the build settings (BuildConfig) and how long the build took
    report              layer report summary (precision counts, unfused Q/DQ, warnings)

A TensorRT plan only runs on the TensorRT version and the GPU it was built with (the developer guide's
"Engine compatibility": by default neither version- nor hardware-compatible); a TensorRT-RTX plan runs with the
TensorRT-RTX version that built it on GPUs of the compute capabilities it targets (its "CPU-only AOT" guide). Both
bake in one bundle's weights and scales. :func:`check_card` compares the card with the running environment, given as data
(:class:`RuntimeEnv`) so every refusal is testable without TensorRT or a GPU, and says how to rebuild.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from tdqrt.engines.artifacts import read_json
from tdqrt.engines.errors import ArtifactError

ENGINE_FORMAT = "tdqrt-engine"
ENGINE_VERSION = 1
CARD_FILE = "engine.json"
ENGINE_SUFFIXES = (".plan", ".engine")  # TensorRT plan files; what `tdqrt sample --model` recognises


@dataclass(frozen=True)
class RuntimeEnv:
    """The runtime an engine is built on or loaded into: ``name`` ("tensorrt" / "tensorrt_rtx" / "onnxruntime") and
    its version, the GPU name and compute capability ("9.0"; None for CPU runtimes and TensorRT-RTX builds without a
    GPU); ``compute_capabilities``: the targets of a TensorRT-RTX plan (None: the library's default set)."""

    name: str
    version: str
    gpu: Optional[str] = None
    compute_capability: Optional[str] = None
    compute_capabilities: Optional[tuple[str, ...]] = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.compute_capabilities is not None:
            out["compute_capabilities"] = list(self.compute_capabilities)
        return out


def is_engine_file(path: Union[str, os.PathLike]) -> bool:
    return Path(path).suffix in ENGINE_SUFFIXES


def card_path(plan: Union[str, os.PathLike]) -> Path:
    return Path(plan).parent / CARD_FILE


def rebuild_command(card: dict, plan: Union[str, os.PathLike]) -> str:
    """The ``tdqrt build`` command line that rebuilds ``plan`` with the card's settings."""
    build = card.get("build") or {}
    bundle = (card.get("bundle") or {}).get("path", "BUNDLE")
    backend = str(card.get("backend", "trt"))
    if (card.get("runtime") or {}).get("name") == "tensorrt_rtx":
        backend = "trt-rtx"
    args = ["tdqrt", "build", "--bundle", str(bundle), "--backend", backend]
    for key, flag in (("max_batch", "--max-batch"), ("opt_batch", "--opt-batch"), ("workspace_gb", "--workspace"),
                      ("opt_level", "--opt-level"), ("timing_cache", "--timing-cache")):
        if build.get(key) is not None:
            args += [flag, str(build[key])]
    if build.get("cfg") is False:
        args.append("--no-cfg")
    if build.get("compute_capabilities"):
        args += ["--compute-capability", *map(str, build["compute_capabilities"])]
    if build.get("use_gpu"):
        args.append("--use-gpu")
    return " ".join(shlex.quote(a) for a in args + ["--out", str(plan)])


def make_card(*, backend: str, plan: Path, plan_bytes: int, plan_sha256: str, bundle_path: Path, bundle_sha256: str,
              env: RuntimeEnv, profile: dict[str, dict[str, list[int]]], build: dict, report: dict,
              versions: dict) -> dict:
    return {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "backend": backend,
            "plan": {"file": plan.name, "bytes": int(plan_bytes), "sha256": plan_sha256},
            "bundle": {"path": str(Path(bundle_path).resolve()), "sha256": bundle_sha256},
            "runtime": env.to_dict(), "profile": profile, "build": build, "report": report, "versions": versions}


def read_card(plan: Union[str, os.PathLike]) -> dict:
    """The ``engine.json`` beside ``plan``; missing, corrupt or foreign cards raise ``ArtifactError``."""
    plan = Path(plan)
    if not plan.is_file():
        raise ArtifactError(f"engine file {plan} does not exist; build it with `tdqrt build --bundle BUNDLE --out "
                            f"{plan}`")
    path = card_path(plan)
    if not path.is_file():
        raise ArtifactError(f"{plan} has no {CARD_FILE} beside it, so nothing says which TensorRT, GPU and bundle "
                            f"it was built for; rebuild it with `tdqrt build --bundle BUNDLE --out {plan}`")
    try:
        card = read_json(path, expect_format=ENGINE_FORMAT)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; rebuild the engine with `tdqrt build --bundle BUNDLE --out {plan}`") from exc
    if card.get("version") != ENGINE_VERSION:
        raise ArtifactError(f"{path} has version {card.get('version')!r}, this tdqrt reads {ENGINE_VERSION}; rebuild "
                            f"with `{rebuild_command(card, plan)}`")
    for key in ("backend", "plan", "bundle", "runtime"):
        if not isinstance(card.get(key), (dict, str)) or not card.get(key):
            raise ArtifactError(f"{path} has no {key!r} entry; rebuild with `tdqrt build --bundle BUNDLE --out {plan}`")
    return card


def check_card(card: dict, *, plan_name: str, plan_bytes: int, plan_sha256: str, env: RuntimeEnv,
               bundle_sha256: Optional[str] = None, plan_path: Optional[Union[str, os.PathLike]] = None) -> None:
    """Refuse an engine that is not the file the card describes (other name, truncated, modified), was built for
    another runtime version or GPU, or from another bundle than ``bundle_sha256`` (None: not checked).
    ``env`` is the running environment; every message ends with the command that rebuilds the engine."""
    where = Path(plan_path) if plan_path is not None else Path(plan_name)
    redo = f"rebuild it with `{rebuild_command(card, where)}`"
    rec = card["plan"]
    if rec.get("file") != plan_name:
        raise ArtifactError(f"{card_path(where)} describes the engine {rec.get('file')!r}, not {plan_name!r} (keep "
                            f"one engine per folder); {redo}")
    if rec.get("bytes") != plan_bytes:
        raise ArtifactError(f"engine {where} has {plan_bytes} bytes, {CARD_FILE} says {rec.get('bytes')}: it was "
                            f"truncated or replaced; {redo}")
    if rec.get("sha256") != plan_sha256:
        raise ArtifactError(f"engine {where} does not match the sha256 in {CARD_FILE} ({plan_sha256[:12]}… vs "
                            f"{str(rec.get('sha256'))[:12]}…): it was modified or corrupted; {redo}")
    built = card["runtime"]
    if built.get("name") != env.name:
        raise ArtifactError(f"engine {where} is for {built.get('name')}, not {env.name}; {redo}")
    if built.get("version") != env.version:
        raise ArtifactError(f"engine {where} was built with {env.name} {built.get('version')}, this is {env.name} "
                            f"{env.version}; engines only load into the version that built them — {redo}")
    if built.get("name") == "tensorrt_rtx":  # portable across GPUs of its target compute capabilities
        targets = built.get("compute_capabilities")
        if targets is not None and env.compute_capability not in targets:
            raise ArtifactError(f"engine {where} was built for compute capabilities {', '.join(targets)}, this GPU "
                                f"is {env.gpu} ({env.compute_capability}); {redo}")
    elif built.get("gpu") is not None and (built.get("gpu"), built.get("compute_capability")) != \
            (env.gpu, env.compute_capability):
        raise ArtifactError(f"engine {where} was built for {built.get('gpu')} (compute capability "
                            f"{built.get('compute_capability')}), this GPU is {env.gpu} ({env.compute_capability}); "
                            f"{redo}")
    built_from = card["bundle"].get("sha256")
    if bundle_sha256 is not None and built_from != bundle_sha256:
        raise ArtifactError(f"engine {where} was built from another bundle (manifest sha256 {str(built_from)[:12]}…, "
                            f"this bundle {bundle_sha256[:12]}…); {redo}")


def profile_to_json(shapes: dict[str, tuple[tuple[int, ...], ...]]) -> dict[str, dict[str, list[int]]]:
    return {name: {"min": list(mn), "opt": list(opt), "max": list(mx)} for name, (mn, opt, mx) in shapes.items()}

