"""One resolver turns every kind of model path into a runnable model (tdqrt.calibration.resolve.open_model), and the
deployment part of it (bundles, plans) needs nothing above tdqrt.runtime / tdqrt.engines."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdqrt.calibration.resolve import open_model, open_recorded
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.runtime.runnable import RunnableModel, open_deployed

REPO = Path(__file__).resolve().parents[1]


def test_every_kind_of_path_opens_to_a_runnable_model(tiny_digits_model, tiny_w4_model, tiny_w4_d2_stats,
                                                      tmp_path):
    from tdqrt.export.bundle import export_bundle
    from tdqrt.export.exporter import ExportConfig

    bundle = export_bundle(tiny_w4_model, tmp_path / "bundle", ExportConfig(polygraphy=False),
                           d2_stats=tiny_w4_d2_stats)
    fp, quant, deployed = open_model(tiny_digits_model), open_model(tiny_w4_model), open_model(bundle)
    for m in (fp, quant, deployed):
        assert isinstance(m, RunnableModel)
        assert m.schedule == fp.schedule and m.sample_shape == fp.sample_shape
        assert m.num_classes == fp.num_classes and m.null_label == fp.null_label
        assert m.decoder is None  # pixel models: decode is the identity
    assert quant.sha256 == json.loads((Path(tiny_w4_model) / "quant.json").read_text())["weights"]["sha256"]
    assert deployed.sha256 == quant.sha256  # what D² statistics record for the bundle
    assert deployed.d2_dir == Path(bundle) and fp.d2_dir is None and quant.d2_dir is None
    x = torch.randn(2, *fp.sample_shape)
    t = torch.tensor([3, 700])
    y = torch.tensor([1, 2])
    with torch.no_grad():
        ref = quant.model(x, t, y)
    assert torch.allclose(deployed.model(x, t, y), ref, atol=0.1 * float(ref.abs().max()))
    assert torch.equal(fp.decode(x), x)


def test_deployment_needs_nothing_above_runtime(trt_bundles):
    """Opening and running a bundle through the resolver's deployment part imports no calibration, export or tools
    code and no diffusers (a deployment host may have none of them)."""
    code = (
        "import sys, torch\n"
        "from tdqrt.runtime.runnable import open_deployed\n"
        f"m = open_deployed({str(trt_bundles['fp32'])!r})\n"
        "x = torch.zeros(1, *m.sample_shape)\n"
        "m.model(x, torch.tensor([5]), torch.tensor([1]))\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] == 'diffusers' or\n"
        "             k.startswith(('tdqrt.calibration', 'tdqrt.export', 'tdqrt.tools')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_recorded_sources_are_checked(tiny_digits_model, tiny_w4_model, tmp_path):
    card = json.loads((Path(tiny_w4_model) / "quant.json").read_text())
    src = "the quantized checkpoint Q"
    assert open_recorded(card["fp_model"], None, "FP model", src, "--fp").sha256 == card["fp_model"]["sha256"]
    with pytest.raises(ArtifactError, match=r"is not the FP model the quantized checkpoint Q was made from.*--fp"):
        open_recorded(card["fp_model"], tiny_w4_model, "FP model", src, "--fp")
    with pytest.raises(ArtifactError, match=r"the FP model .*nowhere recorded by .* does not exist; pass it with --fp"):
        open_recorded({"path": str(tmp_path / "nowhere")}, None, "FP model", src, "--fp")
    with pytest.raises(ConfigError, match="records no FP model; pass it with --fp"):
        open_recorded(None, None, "FP model", src, "--fp")


def test_d2_stats_finds_the_fp_model_from_the_quant_card(tiny_w4_model, tiny_digits_model, tmp_path, capsys):
    """``tdqrt d2-stats`` needs only --quant: the FP model is the one quant.json records; another --fp is refused."""
    from tdqrt.tools.cli import main

    common = ["--num", "2", "--batch", "2", "--steps", "2"]
    assert main(["d2-stats", "--quant", str(tiny_w4_model), "--out", str(tmp_path / "d2"), *common]) == 0
    assert (tmp_path / "d2" / "d2.npz").is_file()
    capsys.readouterr()
    assert main(["d2-stats", "--quant", str(tiny_w4_model), "--fp", str(tiny_w4_model),
                 "--out", str(tmp_path / "d2b"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made from" in err[0] and "--fp" in err[0]
    assert not (tmp_path / "d2b").exists()
    assert main(["d2-stats", "--quant", str(tiny_digits_model), "--out", str(tmp_path / "d2c"), *common]) == 2
    assert "is not a quantized checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "d2c").exists()


def test_commands_open_models_only_through_the_resolver():
    """No command module opens a model by itself: checkpoint loaders and bundle-to-denoiser wrapping are reached
    only through tdqrt.calibration.resolve (the loaders it wraps are named here)."""
    loaders = {"load_fp_checkpoint", "load_model_dir", "load_quant_checkpoint", "OrtDenoiser", "TrtDenoiser",
               "open_deployed"}
    # bench unet times, and the demo compares, a bundle's FP reference graph beside its INT8 one (a role of the
    # bundle the resolver does not hand out as a model)
    allowed = {"bench.py": {"OrtDenoiser"}, "demo.py": {"OrtDenoiser"}}
    offenders = []
    for path in sorted((REPO / "tools").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in loaders and name not in allowed.get(path.name, set()):
                    offenders.append(f"{path.name}:{node.lineno} calls {name}")
    assert offenders == []


def test_deployed_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json"):
        open_deployed(tmp_path)
