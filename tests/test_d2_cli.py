"""D² end to end through the CLI: d2-stats on a real quantized tiny model, then corrected sampling."""
import json

import numpy as np
import pytest

from tdqrt.tools.cli import main


def test_d2_stats_artifacts(tiny_w4_d2_stats, tiny_w4_model):
    card = json.loads((tiny_w4_d2_stats / "d2.json").read_text())
    assert card["settings"]["sampler"]["steps"] == 5 and card["settings"]["num_samples"] == 6
    quant_card = json.loads((tiny_w4_model / "quant.json").read_text())
    assert card["settings"]["quant_model_sha256"] == quant_card["weights"]["sha256"]
    assert (tiny_w4_d2_stats / "d2.png").stat().st_size > 1000


@pytest.mark.parametrize("kind,gran", [("d", "channel"), ("s", "tensor"), ("ptqd", "channel")])
def test_corrected_sampling_runs_and_changes_samples(tiny_w4_d2_stats, tiny_w4_model, tmp_path, kind, gran):
    base = ["sample", "--model", str(tiny_w4_model), "--num", "4", "--steps", "5", "--eta", "1", "--guidance", "2"]
    assert main(base + ["--out", str(tmp_path / "off")]) == 0
    assert main(base + ["--out", str(tmp_path / kind), "--d2", kind, "--d2-granularity", gran,
                        "--d2-stats", str(tiny_w4_d2_stats)]) == 0
    off = np.load(tmp_path / "off" / "samples.npz")["arr_0"]
    on = np.load(tmp_path / kind / "samples.npz")["arr_0"]
    assert off.shape == on.shape and not np.array_equal(off, on)


def test_mismatched_settings_refused_unless_forced(tiny_w4_d2_stats, tiny_w4_model, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_w4_model), "--num", "2", "--steps", "4", "--eta", "1", "--guidance", "2",
            "--d2", "d", "--d2-stats", str(tiny_w4_d2_stats)]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.warns(UserWarning):
        assert main(base + ["--out", str(tmp_path / "b"), "--d2-force"]) == 0


def test_stats_for_another_model_refused(tiny_w4_d2_stats, tiny_digits_model, tmp_path, capsys):
    args = ["sample", "--model", str(tiny_digits_model), "--num", "2", "--steps", "5", "--eta", "1", "--guidance", "2",
            "--d2", "d", "--d2-stats", str(tiny_w4_d2_stats), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "another quantized model" in capsys.readouterr().err


def test_d2_needs_stats(tiny_w4_model, tmp_path, capsys):
    assert main(["sample", "--model", str(tiny_w4_model), "--d2", "s", "--out", str(tmp_path)]) == 2
    assert "--d2-stats" in capsys.readouterr().err
