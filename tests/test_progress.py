"""Progress bars: tqdm on a terminal; in a log, whole lines only (the outermost bar's final line, nested bars
silent, nothing for a loop left early), and the description of what is saved when a block is interrupted."""
import contextlib
import io

import pytest
from tqdm.auto import tqdm

from tdqrt.engines import progress
from tdqrt.engines.progress import LogBar, pop_interrupted, progress_bar, saved_progress


def _log(fn) -> list[str]:
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        fn()
    text = buf.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_a_log_gets_the_outer_bars_final_line_only():
    def run():
        for _ in progress_bar(range(3), desc="outer"):
            with progress_bar(total=4, desc="inner", leave=False) as bar:
                for _ in range(4):
                    bar.update()
            for _ in progress_bar(range(2), desc="inner2", leave=False):
                pass

    [line] = _log(run)
    assert line.startswith("outer: 3/3 in ") and line.endswith(" s")


def test_a_top_level_bar_reports_even_without_leave_and_postfix_is_kept():
    def run():
        bar = progress_bar(range(5), desc="train", leave=False)
        for step in bar:
            bar.set_postfix(loss=f"{1 / (step + 1):.2f}")
        bar.close()  # a second close writes nothing

    [line] = _log(run)
    assert line.startswith("train: 5/5 in ") and line.endswith(" s (loss=0.20)"), line


def test_a_loop_left_early_writes_nothing_and_is_forgotten():
    def run():
        with contextlib.suppress(RuntimeError):
            for i in progress_bar(range(5), desc="broken"):
                if i == 2:
                    raise RuntimeError
        with contextlib.suppress(RuntimeError), progress_bar(total=2, desc="ctx") as bar:
            bar.update()
            raise RuntimeError
        for _ in progress_bar(range(1), desc="after", leave=False):  # top level again: it reports
            pass

    lines = _log(run)
    assert len(lines) == 1 and lines[0].startswith("after: 1/1 in "), lines
    assert not progress._open_bars


def test_long_runs_write_a_line_per_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    lines = _log(lambda: [None for _ in progress_bar(range(3), desc="slow")])
    assert [x.split(" after ")[0] for x in lines[:3]] == ["slow: 1/3", "slow: 2/3", "slow: 3/3"]
    assert lines[3].startswith("slow: 3/3 in ") and len(lines) == 4


def test_terminal_gets_tqdm_and_disabled_is_silent(monkeypatch):
    assert isinstance(progress_bar(range(2), desc="x", disable=True), tqdm)
    assert _log(lambda: [None for _ in progress_bar(range(2), desc="x", disable=True)]) == []
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    bar = progress_bar(range(2), desc="x")
    assert isinstance(bar, tqdm) and not isinstance(bar, LogBar)
    bar.close()


def test_interrupt_keeps_the_outermost_description():
    with pytest.raises(KeyboardInterrupt):
        with saved_progress(lambda: "in stage b (1 of 3 stages finished)"):
            with saved_progress(lambda: "after 3 of 32 batches"):
                raise KeyboardInterrupt
    assert pop_interrupted() == "in stage b (1 of 3 stages finished)"
    assert pop_interrupted() is None
    with pytest.raises(KeyboardInterrupt):  # a failing description does not replace the interrupt
        with saved_progress(lambda: 1 / 0):
            raise KeyboardInterrupt
    assert pop_interrupted() is None
    with pytest.raises(ValueError), saved_progress(lambda: "never"):  # other errors record nothing
        raise ValueError
    assert pop_interrupted() is None
