"""Progress bars in a log file: where stderr is not a terminal (SLURM, nohup, CI) a bar is written at
most once every LOG_INTERVAL_S seconds instead of redrawn every 0.1 s, so logs stay readable."""
from __future__ import annotations

import io
import sys

from promptlearn.progress import LOG_INTERVAL_S, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn(stream: io.StringIO, steps: int = 2000) -> int:
    for _ in progress(range(steps), desc="work", file=stream, miniters=1):
        pass
    return stream.getvalue().count("\r")


def test_a_bar_written_to_a_log_file_is_throttled(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert progress(range(3), file=io.StringIO()).mininterval == LOG_INTERVAL_S
    assert progress(range(3), file=Terminal()).mininterval < 1  # a terminal keeps tqdm's redraws
    monkeypatch.setitem(sys.modules, "ipykernel", object())  # a notebook's widget keeps them too
    assert progress(range(3), file=io.StringIO()).mininterval < 1


def test_tqdm_mininterval_in_the_environment_decides(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    assert progress(range(3), file=io.StringIO()).mininterval == 0
    assert drawn(io.StringIO()) > 100
    monkeypatch.setenv("TQDM_MININTERVAL", "often")  # not a number: the log interval, no crash
    assert progress(range(3), file=io.StringIO()).mininterval == LOG_INTERVAL_S
