"""Finished batches of a sampling run on disk: what lets a killed run resume and several ranks merge into one file.

``OUT/shards/`` holds ``manifest.json`` (the settings the shards were drawn with) and one ``START-STOP.npz`` per
finished batch of global sample indices ``[START, STOP)`` (uint8 NHWC ``images``, int64 ``labels``), each
written atomically, so a file under a shard name is always complete. The ranges are fixed by ``num`` and
``batch`` alone, not by which rank drew them or how many ranks there were, so a run resumes with any world size.
"""
from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from tdqrt.engines.artifacts import read_json, write_bytes_atomic, write_json_atomic
from tdqrt.engines.errors import ArtifactError, ConfigError

MANIFEST_FORMAT = "tdqrt-sample-shards"
_SHARD_NAME = re.compile(r"^(\d+)-(\d+)\.npz$")
_ABSENT = "<absent>"


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """``arrays`` as the bytes of an uncompressed ``.npz`` (``np.savez``), ready for an atomic write."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old vs new"`` for every (dotted, nested) setting that differs; empty when they agree."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # compare as the manifest stores them
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} vs {b!r}")
    return diffs


class ShardStore:
    """The shard folder of one job: ``num`` samples in batches of ``batch``, images of ``image_shape`` (H, W, C).

    Batch ``b`` covers indices ``[b·batch, min(num, (b+1)·batch))``. :meth:`open` runs once (rank 0) before any
    rank draws; :meth:`write` is called by whichever rank drew a batch; :meth:`merge` once every batch is there.
    """

    def __init__(self, root: str | Path, num: int, batch: int, image_shape: Sequence[int]) -> None:
        self.root = Path(root)
        self.ranges = [(start, min(num, start + batch)) for start in range(0, num, batch)]
        self.image_shape = tuple(image_shape)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def path(self, batch: int) -> Path:
        start, stop = self.ranges[batch]
        return self.root / f"{start:08d}-{stop:08d}.npz"

    def _shard_files(self) -> dict[tuple[int, int], Path]:
        found = {}
        for path in self.root.glob("*.npz") if self.root.is_dir() else ():
            match = _SHARD_NAME.match(path.name)
            if match:
                found[(int(match[1]), int(match[2]))] = path
        return found

    def count(self) -> int:
        """How many finished batches are on disk."""
        return len(self._shard_files())

    def open(self, settings: dict) -> list[int]:
        """Start or resume: the batches still to draw, in order.

        Without shards on disk the manifest is (re)written with ``settings``; existing shards must have been drawn
        with the same settings (else ``ConfigError`` naming each differing setting). Temporary files of writes a
        kill interrupted are removed; a shard that does not load or has the wrong contents is removed with a
        warning and drawn again.
        """
        has_shards = bool(self._shard_files())
        if has_shards and self.manifest.is_file():
            recorded = read_json(self.manifest, expect_format=MANIFEST_FORMAT).get("settings", {})
            diffs = settings_diff(recorded, settings)
            if diffs:
                raise ConfigError(f"{self.root} holds shards of a run with other settings (shards vs now: "
                                  f"{'; '.join(diffs)}); rerun with the same settings to resume it, or use another "
                                  f"--out, or delete {self.root} to start over")
        elif has_shards:
            raise ArtifactError(f"{self.root} has shard files but no manifest.json, so their settings are unknown; "
                                f"delete {self.root} to start over")
        else:  # nothing to resume: (re)start with these settings
            write_json_atomic(self.manifest, {"format": MANIFEST_FORMAT, "version": 1, "settings": settings})
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink()
        planned = set(self.ranges)
        foreign = sorted(str(p) for r, p in self._shard_files().items() if r not in planned)
        if foreign:
            raise ArtifactError(f"{', '.join(foreign)}: index ranges this job does not draw (num/batch give "
                                f"{self.ranges[:3]}...); these files were not written by it, remove them")
        return [b for b in range(len(self.ranges)) if not self._finished(b)]

    def _finished(self, batch: int) -> bool:
        path = self.path(batch)
        if not path.is_file():
            return False
        try:
            self.load(batch)
        except ArtifactError as err:
            start, stop = self.ranges[batch]
            warnings.warn(f"{err}; it is deleted and indices {start}..{stop - 1} will be drawn again", stacklevel=2)
            path.unlink()
            return False
        return True

    def load(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of a finished batch; ``ArtifactError`` if the file is missing, unreadable or wrong."""
        path = self.path(batch)
        start, stop = self.ranges[batch]
        if not path.is_file():
            raise ArtifactError(f"shard {path} (indices {start}..{stop - 1}) is missing; rerun the same command "
                                "to draw it")
        try:
            with path.open("rb") as f, np.load(f) as npz:  # our handle: np.load leaks its own on a bad zip
                images, labels = npz["images"], npz["labels"]
        except Exception as exc:  # zip/npy errors come in many types (BadZipFile, ValueError, KeyError, EOFError)
            raise ArtifactError(f"shard {path} is unreadable ({type(exc).__name__}: {exc})") from exc
        expected = (stop - start, *self.image_shape)
        if images.dtype != np.uint8 or images.shape != expected or labels.dtype != np.int64 \
                or labels.shape != (stop - start,):
            raise ArtifactError(f"shard {path} holds images {images.dtype}{list(images.shape)} and labels "
                                f"{labels.dtype}{list(labels.shape)}, expected uint8{list(expected)} and "
                                f"int64[{stop - start}]")
        return images, labels

    def write(self, batch: int, images: np.ndarray, labels: np.ndarray) -> None:
        write_bytes_atomic(self.path(batch), npz_bytes(images=images, labels=labels))

    def merge(self) -> tuple[np.ndarray, np.ndarray]:
        """All samples in index order, after checking that the shards cover 0..num-1, each index exactly once."""
        found = sorted(self._shard_files())
        if found != self.ranges:
            missing = [f"{a}..{b - 1}" for a, b in self.ranges if (a, b) not in found]
            extra = [f"{a}..{b - 1}" for a, b in found if (a, b) not in self.ranges]
            raise ArtifactError(f"{self.root} does not cover indices 0..{self.ranges[-1][1] - 1} exactly once "
                                f"(missing {missing or 'none'}, unexpected {extra or 'none'}); rerun the same "
                                "command to draw what is missing")
        parts = [self.load(b) for b in range(len(self.ranges))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def remove(self) -> None:
        """Delete the shards and the manifest (after a merge: ``samples.npz`` now holds everything)."""
        for path in self._shard_files().values():
            path.unlink()
        self.manifest.unlink()
        if not any(self.root.iterdir()):
            self.root.rmdir()
