"""The end-to-end demo in --quick mode: every stage runs and the report has every section with valid PNGs, the
metrics are numbers, a re-run reuses every stage, and a changed setting or a damaged stage reruns exactly the
stages it affects."""
import contextlib
import io
import json
import math
import re

import pytest
from PIL import Image

from tdqrt.engines.errors import ConfigError
from tdqrt.tools.cli import main
from tdqrt.tools.demo import RUN_FILE, STAGES, DemoConfig, run_demo

SECTIONS = ("# tdqrt demo report", "## FP model", "## Samples: FP vs INT8 vs INT8+D²", "## Metrics",
            "## Activation scale vs timestep", "## D² statistics vs timestep", "## Validation", "## TensorRT engine",
            "## Timings")
FE = "tdqrt-digits-cnn"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo through the CLI, with its own cache (so it also trains its feature extractor); its output
    folder and what it wrote to stderr (not a terminal: a log)."""
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("TDQRT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert main(["demo", "--out", str(out), "--quick"]) == 0
    yield out, log.getvalue()
    mp.undo()


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[0]


def _statuses(out) -> dict:
    return {name: s["status"] for name, s in json.loads((out / RUN_FILE).read_text())["stages"].items()}


def _rerun(out, **overrides) -> set:
    """Run the quick demo again with ``overrides``; the stages that ran (the others were reused)."""
    run_demo(out, DemoConfig.create(quick=True, **overrides), progress=False)
    statuses = _statuses(out)
    assert set(statuses) == set(STAGES)
    return {name for name, status in statuses.items() if status == "ran"}


def test_report_has_every_section_and_valid_pngs(demo):
    assert _statuses(demo) == {name: "ran" for name in STAGES}
    report_dir = demo / "report"
    text = (report_dir / "report.md").read_text()
    for heading in SECTIONS:
        assert re.search(rf"^{re.escape(heading)}$", text, re.M), heading
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"samples.png", "scales.png", "d2.png", "validate.png", "eps_error.png"} <= set(pngs)
    for name in pngs:
        with Image.open(report_dir / name) as img:
            assert img.format == "PNG"
            img.verify()
    assert f"FID [{FE}]" in text and "ONNX Runtime INT8" in text and "torch fake-quant" in text
    saved = json.loads((report_dir / "demo.json").read_text())
    assert DemoConfig.from_dict(saved) == DemoConfig.create(quick=True)


def test_log_has_lines_not_bar_redraws(demo_run):
    """With stderr not a terminal, progress bars write a final line each (nested ones none), never redraws."""
    log = demo_run[1]
    assert "\r" not in log and "\x1b" not in log
    lines = log.splitlines()
    assert 0 < len(lines) <= 3 * len(STAGES), lines
    assert all(re.fullmatch(r"[^:]+: \d+(/\d+)? in \d+\.\d s( \(.*\))?", line) for line in lines), lines


def test_metrics_are_numbers(demo):
    metrics = json.loads((demo / "report" / "metrics.json").read_text())
    assert metrics["extractor"]["name"] == FE
    assert set(metrics["fid_kid"]) == {"samples-fp", "samples-int8", "samples-int8-d2"}
    for values in metrics["fid_kid"].values():
        assert math.isfinite(values[f"FID[{FE}]"]) and math.isfinite(values[f"KID[{FE}]"])
    means = metrics["eps_error"]["mean"]
    assert len(means) == 2 and all(math.isfinite(v) and v > 0 for v in means.values())
    assert len(metrics["speed"]["s_per_step"]) == 4 and all(v > 0 for v in metrics["speed"]["s_per_step"].values())
    # the quick demo's bundle must pass validation: the checked FP pair (the INT8 pairs are information) and the
    # teacher-forced per-layer check of the INT8 graph, every activation code exact
    val = metrics["validation"]
    checked = {name: p["passed"] for name, p in val["pairs"].items() if p["passed"] is not None}
    assert val["passed"] is True and checked == {"torch_fp vs ort_fp": True}, val
    assert val["layers"]["passed"] is True and val["layers"]["code_errors"] == 0 and val["layers"]["codes"] > 0
    assert len(val["timesteps"]) == DemoConfig.create(quick=True).validate_timesteps
    build = metrics["tensorrt_build"]
    try:
        import tensorrt_rtx  # noqa: F401  (the test extra installs it: then the demo builds a real plan)
    except ImportError:
        assert build["built"] or build["reason"]
    else:
        assert build["built"] and build["plan_bytes"] > 0 and build["seconds"] > 0
        assert build["network"]["quantize"] > 0 and build["network"]["quantized_conv"] > 0
        text = (demo / "report" / "report.md").read_text()
        assert f"| {build['library']} | {build['version']} |" in text


def test_rerun_reuses_every_stage(demo):
    records = {name: (demo / name / "stage.json").read_text() for name in STAGES}
    assert _rerun(demo) == set()
    assert records == {name: (demo / name / "stage.json").read_text() for name in STAGES}


def test_changed_setting_reruns_it_and_downstream_only(demo):
    # the W8A8 model feeds the ε-error table and the scale plot of the report, nothing else
    assert _rerun(demo, w8a8_method="minmax") == {"w8a8", "eps-error", "report"}
    assert json.loads((demo / "report" / "demo.json").read_text())["w8a8_method"] == "minmax"


def test_damaged_or_unfinished_stage_reruns(demo):
    _rerun(demo, w8a8_method="minmax")  # the settings below, whatever the tests before left (order-independent)
    (demo / "samples-fp" / "grid.png").write_bytes(b"truncated")  # a file that no longer has its recorded hash
    stale = demo / ".calib.tmp-killed"  # what a killed run leaves behind
    stale.mkdir()
    (stale / "calib.json").write_text("{}")
    assert _rerun(demo, w8a8_method="minmax") == {"samples-fp", "eval", "report"}
    assert not stale.exists()
    (demo / "speed" / "stage.json").unlink()  # killed before its record was written
    assert _rerun(demo, w8a8_method="minmax") == {"speed", "report"}


def test_config_is_validated():
    with pytest.raises(ConfigError, match="calib_keep"):
        DemoConfig.create(quick=True, calib_keep=50)
    with pytest.raises(ConfigError, match="iters_q"):
        DemoConfig.create(w4a8_options={"iters_q": 3})
    with pytest.raises(ConfigError, match="num"):
        DemoConfig(num=1)
    assert dict(DemoConfig.create(w4a8_method="mse").w4a8_options) == {}  # the preset's options are tdq-ptq's
