"""Progress output of long runs: bars, one-line notes, and what of a run is saved when it is interrupted.

Every loop that reports progress goes through :func:`progress_bar`. On a terminal it is tqdm's bar, redrawn in
place. When stderr is a file or a pipe (a log), tqdm would still write every redraw, ``\\r``-separated, into it
(thousands of lines for the demo), so there a bar writes no redraws: the outermost open bar (or any bar with
``leave=True``) writes a line every :data:`LOG_INTERVAL_S` seconds while it runs and one final line when it
completes; bars nested inside it write nothing. tqdm offers no such mode, hence this small wrapper.

:func:`saved_progress` lets a long function say which part of its work is on disk; when the block is left by an
interrupt (Ctrl-C, or SIGTERM, which the command line turns into the same exception) the description is kept for
the command line's one-line message (:func:`pop_interrupted`). Nested blocks: the outermost one's description is
the one kept, since the outer function decides what a rerun reuses.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0

_open_bars: list["LogBar"] = []
_interrupted: Optional[str] = None


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def note(text: str) -> None:
    """One line of progress information (a stage starts, a run resumes) on stderr."""
    print(text, file=sys.stderr, flush=True)


class LogBar:
    """The bar of a log: the tqdm calls tdqrt uses (iteration, ``update``, ``set_postfix[_str]``, ``close``,
    ``with``), writing whole lines only (see the module docstring)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 leave: bool = True, initial: int = 0) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)
        self.total, self.desc, self.n = total, desc, initial
        self.postfix = ""
        self.writes = leave or not _open_bars  # nested bars stay silent unless they are meant to stay
        self.closed = False
        self.t0 = self.last = time.perf_counter()
        _open_bars.append(self)

    def _line(self, final: bool) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        postfix = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: {count} {'in' if final else 'after'} {time.perf_counter() - self.t0:.1f} s{postfix}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.writes and now - self.last >= LOG_INTERVAL_S:
            self.last = now
            note(self._line(final=False))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _forget(self) -> None:
        self.closed = True
        if self in _open_bars:
            _open_bars.remove(self)

    def close(self) -> None:
        """Finished: write the final line (once)."""
        if not self.closed:
            self._forget()
            if self.writes:
                note(self._line(final=True))

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        except GeneratorExit:  # the loop was left early (break or an exception): no final line
            self._forget()
            raise
        self.close()

    def __enter__(self) -> "LogBar":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._forget()


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 leave: bool = True, initial: int = 0, disable: bool = False):
    """A progress bar over ``iterable`` (or updated by hand up to ``total``): tqdm on a terminal, a
    :class:`LogBar` otherwise, a silent one when ``disable``. Same calls either way."""
    if disable or stderr_is_terminal():
        return tqdm(iterable, total=total, desc=desc, leave=leave, initial=initial, disable=disable)
    return LogBar(iterable, total=total, desc=desc, leave=leave, initial=initial)


@contextlib.contextmanager
def saved_progress(describe: Callable[[], str]) -> Iterator[None]:
    """Inside the block, an interrupt records ``describe()`` (e.g. "after 3 of 32 batches") before it propagates:
    what of the run is on disk for a rerun to reuse."""
    global _interrupted
    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # a failing description must not hide the interrupt
            _interrupted = describe()
        raise


def pop_interrupted() -> Optional[str]:
    """The description recorded by the last interrupted :func:`saved_progress` block (then forgotten)."""
    global _interrupted
    text, _interrupted = _interrupted, None
    return text


ProgressBar = tqdm | LogBar  # what progress_bar returns (for annotations)
