"""`polygraphy run` as a bundle's data-loader script documents it (tdqrt/export/data_loader.py), for the tests."""
import json
import subprocess
from pathlib import Path

from tdqrt.export.lint import _polygraphy_command


def polygraphy_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = _polygraphy_command()
    assert cmd is not None, "the polygraphy command is not on PATH"
    return subprocess.run([*cmd, "run", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def compare(bundle: Path, graph: Path, reference: Path, threshold: float, cwd: Path) -> subprocess.CompletedProcess:
    """The bundle's INT8 comparison: ``graph`` (its unet.onnx or a tampered copy) with the ONNX Runtime options the
    manifest records, against the outputs saved in ``reference``."""
    loader = json.loads((Path(bundle) / "manifest.json").read_text())["data_loader"]
    return polygraphy_run(str(graph), "--onnxrt", *loader["onnxrt_args"], "--data-loader-script",
                          str(Path(bundle) / loader["script"]), "--load-outputs", str(reference),
                          "--compare", "snr", "--snr-threshold", str(threshold), cwd=cwd)
