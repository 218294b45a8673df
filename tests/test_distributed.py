"""Sharded, resumable sampling (``tdqrt sample [--distributed]``): two gloo ranks on the CPU give exactly the
samples of one process (D²-corrected), killed runs resume with any world size without drawing a finished batch
again, changed settings are refused, and a corrupt shard is drawn again.

Killing is simulated by wrapping ``tdqrt.tools.sample.sample`` (the per-batch sampler call): it logs every range it
draws and raises after a given number of batches. The two-rank runs are ``torch.multiprocessing.spawn`` workers
that set the variables torchrun would set and call the CLI.
"""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import tdqrt.tools.sample as sample_mod
from tdqrt.engines.errors import ArtifactError, ConfigError, TdqrtError
from tdqrt.tools.cli import main
from tdqrt.tools.distributed import Ranks, process_group
from tdqrt.tools.shards import ShardStore

# 7 samples in batches of 2: ranges 0-2, 2-4, 4-6, 6-7. The W4 model with stochastic D² (its own noise stream per
# sample, a hook per rank), DDIM eta 1 and guidance (the settings the statistics were collected for).
ARGS = ["--num", "7", "--batch", "2", "--steps", "5", "--eta", "1", "--guidance", "2", "--seed", "5", "--device", "cpu",
        "--d2", "s"]


def _instrument(log: Path, fail_after=None) -> None:
    """Make every batch append its range to ``log``; raise ("killed") instead of drawing batch ``fail_after + 1``."""
    real = sample_mod.sample.__wrapped__ if hasattr(sample_mod.sample, "__wrapped__") else sample_mod.sample
    drawn = []

    def logged(*args, sample_indices, **kwargs):
        if fail_after is not None and len(drawn) >= fail_after:
            raise RuntimeError("simulated kill")
        x = real(*args, sample_indices=sample_indices, **kwargs)
        drawn.append(f"{int(sample_indices[0])}-{int(sample_indices[-1]) + 1}")
        with log.open("a") as f:
            f.write(drawn[-1] + "\n")
        return x

    logged.__wrapped__ = real
    sample_mod.sample = logged


def _drawn(log: Path) -> list[str]:
    return sorted(log.read_text().split()) if log.exists() else []


@pytest.fixture
def instrument(monkeypatch, tmp_path):
    """In-process runs: ``instrument(fail_after)`` returns the log file of the batches drawn from then on."""
    monkeypatch.setattr(sample_mod, "sample", sample_mod.sample)  # restored after the test

    def install(fail_after=None) -> Path:
        log = tmp_path / f"drawn{len(list(tmp_path.glob('drawn*')))}.log"
        _instrument(log, fail_after)
        return log

    return install


def _worker(rank, world, port, argv, logs, fail_after):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _instrument(Path(logs) / f"rank{rank}.log", fail_after.get(rank))
    try:
        outcome = str(main(argv + ["--distributed"]))
    except Exception as exc:  # the rank that "was killed" raises its RuntimeError past the CLI
        outcome = f"{type(exc).__name__}: {exc}"
    (Path(logs) / f"rank{rank}.out").write_text(outcome)


def _spawn(argv, logs: Path, fail_after=None) -> list[str]:
    """Run the CLI as 2 gloo ranks; the outcome (exit status or exception) of each rank."""
    logs.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, argv, str(logs), fail_after or {}), nprocs=2, join=True)
    return [(logs / f"rank{r}.out").read_text() for r in range(2)]


def _load(out: Path):
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"], npz["labels"]


@pytest.fixture(scope="module")
def model_args(tiny_w4_model, tiny_w4_d2_stats):
    return ["sample", "--model", str(tiny_w4_model), *ARGS, "--d2-stats", str(tiny_w4_d2_stats)]


@pytest.fixture(scope="module")
def reference(model_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main(model_args + ["--out", str(out)]) == 0
    return _load(out)


def _assert_equal_to(out: Path, reference) -> None:
    images, labels = _load(out)
    assert images.dtype == np.uint8 and images.shape == reference[0].shape
    np.testing.assert_array_equal(images, reference[0])
    np.testing.assert_array_equal(labels, reference[1])
    assert not (out / "shards").exists()  # merged and removed


@pytest.mark.slow  # two spawned processes, mostly importing torch; in the default suite, so CI runs it
def test_two_ranks_equal_one_process(model_args, reference, tmp_path):
    out = tmp_path / "out"
    assert _spawn(model_args + ["--out", str(out)], tmp_path / "logs") == ["0", "0"]
    _assert_equal_to(out, reference)
    # static round-robin over the pending batches
    assert _drawn(tmp_path / "logs" / "rank0.log") == ["0-2", "4-6"]
    assert _drawn(tmp_path / "logs" / "rank1.log") == ["2-4", "6-7"]
    meta = json.loads((out / "sample.json").read_text())
    assert meta["world_size"] == 2 and meta["batches"] == {"total": 4, "drawn": 4, "resumed": 0}


@pytest.mark.slow  # two spawned processes, mostly importing torch; in the default suite, so CI runs it
def test_killed_runs_resume_across_world_sizes(model_args, reference, instrument, tmp_path):
    """1 process killed after one batch -> 2 ranks resume, rank 1 killed at once -> 1 process finishes."""
    argv = model_args + ["--out", str(tmp_path / "out")]
    first = instrument(fail_after=1)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(argv)
    assert _drawn(first) == ["0-2"]
    assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.npz")) == ["00000000-00000002.npz"]

    # pending batches 1, 2, 3: rank 0 gets 1 and 3, rank 1 gets 2 and is "killed" before drawing it
    outcomes = _spawn(argv, tmp_path / "logs", fail_after={1: 0})
    assert outcomes[0] == "2" and outcomes[1] == "RuntimeError: simulated kill"
    assert _drawn(tmp_path / "logs" / "rank0.log") == ["2-4"] and _drawn(tmp_path / "logs" / "rank1.log") == []

    last = instrument()
    assert main(argv) == 0
    assert _drawn(last) == ["4-6", "6-7"]  # finished batches are not drawn again
    _assert_equal_to(tmp_path / "out", reference)
    meta = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert meta["world_size"] == 1 and meta["batches"] == {"total": 4, "drawn": 2, "resumed": 2}


@pytest.mark.parametrize("change, named", [(["--seed", "6"], "seed: 5 vs 6"), (["--batch", "3"], "batch: 2 vs 3"),
                                           (["--num", "8"], "num: 7 vs 8"), (["--d2", "d"], "d2: 's' vs 'd'")])
def test_resume_with_other_settings_is_refused(model_args, instrument, tmp_path, capsys, change, named):
    argv = model_args + ["--out", str(tmp_path / "out")]
    instrument(fail_after=1)
    with pytest.raises(RuntimeError):
        main(argv)
    log = instrument()
    assert main(argv + change) == 2
    err = capsys.readouterr().err
    assert named in err and "other settings" in err
    assert _drawn(log) == []


def test_corrupt_shards_are_drawn_again(model_args, reference, instrument, tmp_path):
    argv = model_args + ["--out", str(tmp_path / "out")]
    instrument(fail_after=3)
    with pytest.raises(RuntimeError):
        main(argv)
    shards = tmp_path / "out" / "shards"
    truncated, flipped = shards / "00000000-00000002.npz", shards / "00000002-00000004.npz"
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # caught by the zip CRC
    flipped.write_bytes(bytes(data))
    (shards / ".00000004-00000006.npz.abc.tmp").write_bytes(b"half")  # a write the kill interrupted
    log = instrument()
    with pytest.warns(UserWarning, match="unreadable") as warned:
        assert main(argv) == 0
    assert len(warned) == 2, "\n".join(f"{w.category.__name__}: {w.message}" for w in warned)
    assert _drawn(log) == ["0-2", "2-4", "6-7"]
    _assert_equal_to(tmp_path / "out", reference)


def _fake_batch(n):
    return np.zeros((n, 4, 4, 1), np.uint8), np.arange(n, dtype=np.int64)


def test_merge_checks_every_index_once(tmp_path):
    store = ShardStore(tmp_path / "shards", num=5, batch=2, image_shape=(4, 4, 1))
    assert store.open({"seed": 0}) == [0, 1, 2]
    store.write(0, *_fake_batch(2))
    store.write(2, *_fake_batch(1))
    with pytest.raises(ArtifactError, match=r"missing \['2..3'\]"):
        store.merge()
    store.write(1, *_fake_batch(2))
    overlapping = tmp_path / "shards" / "00000001-00000003.npz"
    overlapping.write_bytes((tmp_path / "shards" / "00000000-00000002.npz").read_bytes())
    with pytest.raises(ArtifactError, match=r"unexpected \['1..2'\]"):
        store.merge()
    with pytest.raises(ArtifactError, match="not written by it"):
        store.open({"seed": 0})
    overlapping.unlink()
    assert store.open({"seed": 0}) == []
    images, labels = store.merge()
    assert images.shape == (5, 4, 4, 1) and labels.tolist() == [0, 1, 0, 1, 0]
    store.remove()
    assert not (tmp_path / "shards").exists()


def test_shards_without_manifest_are_refused(tmp_path):
    store = ShardStore(tmp_path / "shards", num=2, batch=2, image_shape=(4, 4, 1))
    store.write(0, *_fake_batch(2))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        store.open({"seed": 0})


def test_launch_environment_is_checked(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="add --distributed"):
        with process_group(False, None):
            pass
    with pytest.raises(ConfigError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        with process_group(True, None):
            pass
    monkeypatch.delenv("WORLD_SIZE")
    with process_group(False, None) as device:
        assert device == "cpu"


def test_a_failing_peer_stops_every_rank(monkeypatch):
    ranks = Ranks(rank=0, world=2)
    monkeypatch.setattr(Ranks, "gather", lambda self, obj: [obj, "DataError: denoiser returned NaN"])
    with pytest.raises(TdqrtError, match="rank 1 of 2 failed, so this rank stops too: DataError: denoiser"):
        ranks.collective(lambda: "done")
    monkeypatch.setattr(Ranks, "gather", lambda self, obj: [obj, None])
    assert ranks.collective(lambda: "done") == "done"
