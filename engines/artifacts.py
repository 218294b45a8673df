"""Artifact files: atomic writes, content hashes, JSON sidecars and the lock on an output folder.

Every stage hands files to the next one. A file is written to a temporary name in the same directory and
renamed into place, so a crash never leaves a half-written artifact under the real name. JSON sidecars carry a
``format`` tag and a ``version`` so a reader can refuse what it does not understand. Two runs writing the same
folder at once are refused (:func:`folder_lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from tdqrt.engines.errors import ArtifactError, FolderLockedError


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The result gets the mode any new file gets (``0o666`` less the umask), not the private ``0o600`` of the
    temporary file: bundles, samples and reports are files users share.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path`` (named ``.<name>.tmp-*``); when the block succeeds it
    replaces ``path``, when it fails (or is interrupted) it is deleted.

    The directory analogue of :func:`atomic_path`, for artifacts made of several files: readers only ever see
    the old directory, no directory, or the complete new one. A process killed outright can leave a
    ``.<name>.tmp-*`` directory behind, never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)  # put the previous directory back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def lock_file(path: str | os.PathLike) -> Path:
    """Where :func:`folder_lock` keeps the lock of ``path``: ``.<name>.lock`` beside it (a folder written through
    :func:`atomic_dir` is replaced as a whole, so the lock cannot live inside it)."""
    path = Path(path).resolve()
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 1 << 16) or b"{}")
    except ValueError:
        return {}


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Hold the lock on output folder ``path`` for the block; a second holder is refused with
    :class:`FolderLockedError` naming the process (pid, host, ``command``: default ``sys.argv``) that has it.

    The lock is an ``flock`` on :func:`lock_file`, which records its holder and is deleted on release. The kernel
    drops the ``flock`` when its process dies, so a lock file that is there but not locked was left by a process
    that was killed: it is taken over with a warning naming that process. Hand-written rather than the
    ``filelock`` package because the refusal must say who holds the lock, which ``filelock`` does not record.
    """
    lock = lock_file(path)
    made = [d for d in (lock.parent, *lock.parent.parents) if not d.exists()]  # removed again when left empty
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _holder(fd)
            os.close(fd)
            who = (f"process {held['pid']} on {held.get('host', '?')} ({held.get('command', '?')}, since "
                   f"{held.get('started', '?')})" if "pid" in held else "another process")
            raise FolderLockedError(f"{Path(path)} is being written by {who}; wait for it to finish, or write "
                                    "to another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # released (and deleted) between our open and our flock: try again
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _holder(fd)
        if "pid" in stale:
            warnings.warn(f"taking over the lock on {Path(path)} left by process {stale['pid']} on "
                          f"{stale.get('host', '?')} ({stale.get('command', '?')}), which is no longer running",
                          stacklevel=3)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": command or " ".join(sys.argv),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # still holding the flock, so nobody else has it
        os.close(fd)
        for d in made:  # innermost first: a command that failed before writing leaves no empty folders behind
            with contextlib.suppress(OSError):
                d.rmdir()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _reject_non_finite(obj: Any, where: str = "$") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ArtifactError(f"refusing to write non-finite number {obj!r} at {where} into a JSON artifact")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _reject_non_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _reject_non_finite(v, f"{where}[{i}]")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; NaN/Inf are refused rather than written as invalid JSON."""
    _reject_non_finite(obj)
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())


def read_json(path: str | os.PathLike, *, expect_format: str | None = None) -> dict:
    """Read a JSON artifact; a missing, truncated or foreign file raises ``ArtifactError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; run the stage that writes it first")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the file is truncated or corrupt, rewrite it") from exc
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    if expect_format is not None and obj.get("format") != expect_format:
        raise ArtifactError(
            f"{path} has format {obj.get('format')!r}, expected {expect_format!r}; "
            "point the command at the directory the matching stage wrote"
        )
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One sha256 over several files: of the ``{file name: sha256 of its bytes}`` of every one, sorted by name (a
    tokenizer folder, a sharded checkpoint's index and shards)."""
    return sha256_json({Path(p).name: sha256_file(p) for p in paths})


def sha256_json(obj: Any) -> str:
    """Content hash of a JSON-serialisable object (key order independent)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact's numbers; stored in every manifest."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("tdqrt", "torch", "numpy", "onnx", "onnxruntime", "diffusers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
