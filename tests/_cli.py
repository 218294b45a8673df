"""CLI assertions shared by the tests that drive ``tdqrt`` commands end to end."""
from pathlib import Path

from tdqrt.tools.cli import main

# Arguments for the tiny SD folder (conftest.py sd_pipeline_dir): two prompts, a negative one, a CFG sampler and a
# calibration set of CFG trajectories (the sd_bundle fixture and the text-to-image tests).
PROMPTS = ["--prompt", "a red circle", "--prompt", "a blue square"]
NEGATIVE = ["--negative-prompt", "blurry"]
SAMPLER = ["--steps", "4", "--spacing", "scheduler", "--guidance", "3"]
CALIB = ["--calib-num", "4", "--calib-keep", "2", "--calib-steps", "4", "--calib-guidance", "3"]


def run_ok(argv, capsys) -> str:
    """``tdqrt ARGV`` (paths allowed) exits 0; returns its standard output."""
    argv = [str(a) for a in argv]
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, f"tdqrt {' '.join(argv)} exited {code}: {out.err}"
    return out.out


def refused(capsys, argv, out: Path, *words) -> str:
    """``tdqrt ARGV`` exits 2 with one error line holding ``words``, no traceback, and writes nothing at ``out``
    (nor leaves its lock); returns the line."""
    argv = [str(a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"tdqrt {argv[0]}: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() and not (out.parent / f".{out.name}.lock").exists()
    return lines[0]
