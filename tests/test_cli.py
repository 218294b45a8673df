"""The command line end to end: train -> sample on digits and shapes, env, error exits (the demo: test_demo.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from tdqrt.tools.cli import main


@pytest.mark.parametrize("data,channels,size", [("digits", 1, 16), ("shapes", 3, 32)])
def test_train_then_sample(tmp_path, data, channels, size):
    model = tmp_path / "model"
    args = ["train", "--data", data, "--model", "tiny", "--out", str(model), "--steps", "3", "--batch", "8",
            "--warmup", "1", "--num-data", "64"]
    assert main(args) == 0
    assert (model / "model.safetensors").is_file() and (model / "loss.png").is_file()
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(model), "--out", str(out), "--num", "6", "--batch", "4", "--steps", "3",
                 "--sampler", "ddim", "--eta", "1", "--guidance", "2"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, size, size, channels) and npz["arr_0"].dtype == np.uint8
    expected_labels = np.arange(6) % (10 if data == "digits" else 3)
    assert np.array_equal(npz["labels"], expected_labels)
    assert Image.open(out / "grid.png").size[0] > size
    meta = json.loads((out / "sample.json").read_text())
    assert meta["job"]["sampler"]["guidance_scale"] == 2.0


def test_sample_is_independent_of_batch_size(tiny_digits_model, tmp_path):
    common = ["--model", str(tiny_digits_model), "--num", "5", "--steps", "4", "--sampler", "ddpm", "--seed", "3"]
    assert main(["sample", *common, "--out", str(tmp_path / "a"), "--batch", "5"]) == 0
    assert main(["sample", *common, "--out", str(tmp_path / "b"), "--batch", "2"]) == 0
    a, b = np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "onnxruntime", "polygraphy", "tensorrt", "cuda available"):
        assert key in out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["train", "--model", "gigantic", "--out", str(tmp_path / "m")]) == 2
    assert "preset" in capsys.readouterr().err


def _subcommand_parsers(parser, path=()):
    """(command path, parser) for every subcommand, nested ones (bench unet, ...) included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommand_parsers(sub, (*path, name))


def test_help_shows_every_default_and_what_out_writes():
    from tdqrt.tools.cli import _parser

    commands = dict(_subcommand_parsers(_parser()))
    assert {("train",), ("calibrate",), ("sample",), ("export",), ("bench", "calibrate"), ("env",)} <= set(commands)
    for path, parser in commands.items():
        text = " ".join(parser.format_help().split())  # undo the line wrapping
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, []):
                continue  # positional, switch, or no default (its help says what happens then)
            default = " ".join(str(action.default).split()) if action.default != "" else '""'  # an empty text
            assert f"(default: {default})" in text, f"tdqrt {' '.join(path)} {action.option_strings[0]}"
        out = next((a for a in parser._actions if "--out" in a.option_strings), None)
        if out is not None:
            assert any(w in out.help for w in ("write", "written", "keep")), f"tdqrt {' '.join(path)} --out"
    export_help = " ".join(commands[("export",)].format_help().split())
    assert "--target {trt,ort-cpu}" in export_help


def test_calibration_methods_match_the_registry():
    from tdqrt.calibration.quant.methods import METHODS
    from tdqrt.tools.cli import CALIBRATION_METHODS

    assert CALIBRATION_METHODS == tuple(METHODS)


def test_spacings_match_the_sampler():
    from tdqrt.runtime import sampling
    from tdqrt.tools import cli

    assert cli.SPACINGS == tuple(sampling.SPACINGS)


def test_export_targets_match_the_flavours():
    from tdqrt.export.lint import FLAVOURS
    from tdqrt.tools.cli import EXPORT_TARGETS

    assert set(EXPORT_TARGETS) == set(FLAVOURS)


def test_calibration_set_arguments_reach_both_commands():
    """calibrate and bench calibrate take the calibration-set group, --seed included, and build the same config."""
    from tdqrt.tools.cli import _calib_set_from_args, _parser

    flags = ["--calib-num", "3", "--calib-keep", "2", "--calib-steps", "4", "--seed", "7"]
    calibrate = _parser().parse_args(["calibrate", "--model", "m", "--out", "o", *flags])
    bench = _parser().parse_args(["bench", "calibrate", "--model", "m", *flags])
    expected = _calib_set_from_args(calibrate)
    assert (expected.num, expected.keep_steps, expected.sampler.steps, expected.seed) == (3, 2, 4, 7)
    assert _calib_set_from_args(bench) == expected


def test_int4_activations_warn_at_calibration(tiny_digits_model, tiny_calib_set, tmp_path, capsys):
    """--abits 4 calibrates, saying at once that export will refuse it (and export does)."""
    out = tmp_path / "a4"
    with pytest.warns(UserWarning, match="--abits 4: 4-bit activations are a research setting that TensorRT and ONNX "
                                         "Runtime cannot deploy .* `tdqrt export` will refuse this model"):
        assert main(["calibrate", "--model", str(tiny_digits_model), "--abits", "4", "--calib",
                     str(tiny_calib_set.path), "--out", str(out)]) == 0
    assert main(["export", "--quant", str(out), "--out", str(tmp_path / "bundle"), "--no-polygraphy"]) == 2
    assert "8-bit activations" in capsys.readouterr().err
