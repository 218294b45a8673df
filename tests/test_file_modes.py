"""Outputs follow the umask like any other tool's output (not the private mode of a temporary file)."""
import os
import stat

import numpy as np
import pytest

from tdqrt.engines.artifacts import atomic_dir, atomic_path, write_json_atomic
from tdqrt.tools.metrics import write_openai_npz


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    before = os.umask(0o022)
    try:
        yield lambda value: os.umask(value)
    finally:
        os.umask(before)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
    write_json_atomic(tmp_path / "b.json", {"k": 1})
    write_openai_npz(tmp_path / "samples.npz", np.zeros((2, 4, 4, 1), np.uint8))
    with atomic_dir(tmp_path / "bundle") as tmp:
        with atomic_path(tmp / "inner.json") as inner:
            inner.write_text("{}")
    for name in ("a.bin", "b.json", "samples.npz", "bundle/inner.json"):
        assert _mode(tmp_path / name) == file_mode, name
    assert _mode(tmp_path / "bundle") == dir_mode
    # an ordinary file made by open() under the same umask has the same mode
    (tmp_path / "plain").write_bytes(b"")
    assert _mode(tmp_path / "plain") == file_mode
