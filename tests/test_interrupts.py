"""Long commands stopped by Ctrl-C or SIGTERM: one line saying what is saved and how to rerun, exit 130 / 143, no
traceback, what is finished kept; the rerun says it resumes and ends where an uninterrupted run ends. Output
folders are locked while a command writes them. Logs (stderr not a terminal) get lines, not bar redraws."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tdqrt.calibration.checkpoint import load_fp_checkpoint
from tdqrt.engines.artifacts import folder_lock, lock_file
from tdqrt.runtime.sampling import SamplerConfig
from tdqrt.tools.cli import main
from tdqrt.tools.sample import SampleJob, sample_model
from tdqrt.tools.shards import ShardStore

NUM, BATCH, STEPS = 24, 2, 10


def _tdqrt(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tdqrt.tools", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def _signal_when(proc: subprocess.Popen, path: Path, sig: int, timeout: float = 120.0) -> tuple[str, str]:
    """Send ``sig`` to ``proc`` as soon as ``path`` exists (the run is under way); its stdout and stderr."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"finished before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


def _lines(text: str) -> list[str]:
    assert "\r" not in text and "Traceback" not in text, text
    return text.splitlines()


@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_sample_interrupted_then_resumed(tiny_digits_model, tmp_path, sig, status, word):
    out = tmp_path / "s"
    args = ["sample", "--model", str(tiny_digits_model), "--num", str(NUM), "--batch", str(BATCH), "--steps",
            str(STEPS), "--out", str(out)]
    proc = _tdqrt(*args)
    _, err = _signal_when(proc, out / "shards" / f"{0:08d}-{BATCH:08d}.npz", sig)
    assert proc.returncode == status
    [line] = _lines(err)
    total = NUM // BATCH
    prefix = f"tdqrt sample: {word} after "
    assert line.startswith(prefix) and line.endswith(f" of {total} batches; rerun the same command to resume"), line
    done = int(line[len(prefix):].split()[0])
    size = load_fp_checkpoint(tiny_digits_model).model.image_size
    store = ShardStore(out / "shards", NUM, BATCH, (size, size, 1))
    finished = [b for b in range(total) if store.path(b).is_file()]
    assert 1 <= done == len(finished) < total
    for b in finished:  # every shard on disk is complete
        images, labels = store.load(b)
        assert images.shape == (BATCH, size, size, 1) and labels.shape == (BATCH,)
    assert not lock_file(out).exists()

    corrupt = store.path(total - 1)  # a damaged shard is reported in one line and drawn again
    corrupt.write_bytes(b"not a shard")
    proc = _tdqrt(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = _lines(err)
    assert f"resuming: {done} of {total} batches already drawn" in lines
    [warning] = [x for x in lines if "warning" in x]
    assert warning.startswith(f"tdqrt sample: warning: shard {corrupt} is unreadable") and \
        warning.endswith(f"indices {NUM - BATCH}..{NUM - 1} will be drawn again"), warning
    assert len(lines) <= 4, lines  # the warning, the resume line, the final bar line; no redraws

    job = SampleJob(num=NUM, batch=BATCH, sampler=SamplerConfig(steps=STEPS))
    ref = sample_model(tiny_digits_model, tmp_path / "ref", job, progress=False)
    with np.load(out / "samples.npz") as got:
        np.testing.assert_array_equal(got["arr_0"], ref.images)
        np.testing.assert_array_equal(got["labels"], ref.labels)


def test_train_interrupted_then_resumed(tmp_path):
    out = tmp_path / "t"
    args = ["train", "--data", "digits", "--model", "tiny", "--steps", "300", "--batch", "4", "--warmup", "2",
            "--checkpoint-every", "3", "--out", str(out)]
    proc = _tdqrt(*args)
    _, err = _signal_when(proc, out / "train_state.pt", signal.SIGINT)
    assert proc.returncode == 130
    [line] = _lines(err)
    assert line.startswith("tdqrt train: interrupted at step ") and " of 300 (last checkpoint: step " in line and \
        line.endswith("); rerun with --resume to continue from the last checkpoint"), line
    saved = int(line.split("last checkpoint: step ")[1].split(")")[0])
    assert saved % 3 == 0 and saved >= 3

    proc = _tdqrt(*args, "--steps", str(saved + 3), "--resume")
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _lines(err)[0] == f"resuming: from the checkpoint at step {saved} of {saved + 3}"
    assert (out / "model.safetensors").is_file() and "model written" in stdout


def test_held_lock_refuses_a_second_writer(tiny_digits_model, tmp_path, capsys):
    out = tmp_path / "s"
    with folder_lock(out, command="tdqrt sample --out s"):
        assert main(["sample", "--model", str(tiny_digits_model), "--num", "2", "--steps", "2", "--out", str(out)]) == 2
        assert lock_file(out).is_file()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is being written by process {os.getpid()} " in err and "tdqrt sample --out s" \
        in err, err
    assert not out.exists() and not lock_file(out).exists()  # nothing written, the lock released


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_digits_model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "s"
    lock_file(out).write_text(f'{{"pid": {dead.pid}, "host": "h", "command": "tdqrt sample", "started": "t"}}')
    with pytest.warns(UserWarning, match=f"left by process {dead.pid} on h .*no longer running"):
        assert main(["sample", "--model", str(tiny_digits_model), "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert (out / "samples.npz").is_file() and not lock_file(out).exists()


def test_demo_interrupted_names_its_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "tdqrt.tools", "demo", "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "TDQRT_CACHE_DIR": str(tmp_path / "cache")})
    _, err = _signal_when(proc, out / "model" / "stage.json", signal.SIGTERM)
    assert proc.returncode == 143
    line = _lines(err)[-1]  # after the bar lines of the finished stages
    assert line.startswith("tdqrt demo: terminated in stage ") and line.endswith(
        " stages finished); rerun the same command to resume (finished stages are reused)"), line
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written stage left


def test_brecq_calibration_interrupted_then_resumed_per_unit(tiny_digits_model, tiny_calib_set, tmp_path):
    out = tmp_path / "q"
    args = ["calibrate", "--model", str(tiny_digits_model), "--method", "brecq", "--calib", str(tiny_calib_set.path),
            "--option", "iters_w=16", "--option", "iters_a=8", "--option", "num_samples=16", "--option", "batch=8",
            "--out", str(out)]
    proc = _tdqrt(*args)
    _, err = _signal_when(proc, out / "work" / "brecq" / "unit_000.safetensors", signal.SIGINT)
    assert proc.returncode == 130
    *bars, line = _lines(err)  # bars: the final lines of the activation observation passes
    assert not [x for x in bars if "interrupted" in x or "tdqrt" in x], bars
    prefix = "tdqrt calibrate: interrupted after "
    assert line.startswith(prefix) and line.endswith(
        " BRECQ units; rerun the same command to resume (BRECQ keeps its finished units, other methods start over)"), line
    done, units = int(line[len(prefix):].split()[0]), int(line[len(prefix):].split()[2])
    assert 1 <= done < units

    proc = _tdqrt(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resuming: {done} of {units} BRECQ units already calibrated (in {out / 'work' / 'brecq'})" in _lines(err)
    assert (out / "quant.json").is_file()
