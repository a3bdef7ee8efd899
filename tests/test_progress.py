"""One progress display per phase: a tqdm bar on a terminal; where stderr is not a terminal (SLURM, nohup,
CI) plain lines and no carriage-return bars, at most one per interval while the work goes on; nothing with
-q, whatever tqdm read from the environment at import."""
from __future__ import annotations

import io
import sys

import pytest
from tqdm.auto import tqdm

from promptlearn.progress import LOG_INTERVAL_S, LineProgress, TrainingProgress, log_interval, progress, set_quiet


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def quiet_off():
    yield
    set_quiet(False)


def test_a_terminal_gets_a_bar_a_log_file_plain_lines(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert isinstance(progress(range(3), desc="work", stream=Terminal()), tqdm)
    log = io.StringIO()
    for _ in progress(range(3), desc="work", unit="batch", stream=log):
        pass
    assert "\r" not in log.getvalue()
    assert log.getvalue().startswith("work: 3/3 batch in ") and log.getvalue().count("\n") == 1
    monkeypatch.setitem(sys.modules, "ipykernel", object())  # a notebook's widget is a bar too
    assert isinstance(progress(range(3), desc="work", stream=io.StringIO()), tqdm)


def test_plain_lines_come_at_most_once_per_interval(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    log = io.StringIO()
    for _ in progress(range(4), desc="work", leave=False, stream=log):
        pass
    assert log.getvalue().splitlines()[:4] == ["work: 1/4 it", "work: 2/4 it", "work: 3/4 it", "work: 4/4 it"]
    monkeypatch.delenv("TQDM_MININTERVAL")
    log = io.StringIO()
    for _ in progress(range(1000), desc="work", leave=False, stream=log):  # fast and transient: no line
        pass
    assert log.getvalue() == ""
    monkeypatch.setenv("TQDM_MININTERVAL", "often")  # not a number: the log interval, no crash
    assert log_interval() == LOG_INTERVAL_S


def test_work_stopped_by_an_error_gets_no_closing_line():
    log = io.StringIO()
    with pytest.raises(ValueError):
        for _ in progress(range(3), desc="work", stream=log):
            raise ValueError("an unreadable image")
    assert log.getvalue() == ""  # the error is the log's last line, not "work: 0/3 it in 0.0 s"


def test_quiet_silences_bars_and_lines_whatever_tqdm_read_at_import(quiet_off):
    set_quiet(True)
    for stream in (Terminal(), io.StringIO()):
        with progress(total=3, desc="work", stream=stream) as shown:
            shown.update(3)
        assert stream.getvalue() == ""


def two_epochs_of_three_steps() -> TrainingProgress:
    """CoOp's display through 2 epochs of 3 steps (loss 1.5 and 50% within, 1.25 and 62.5% at each end), closed."""
    shown = TrainingProgress("coop", epochs=2, steps=3, start=0)
    for epoch in (1, 2):
        for step in range(3):
            shown.step()
            shown.show(epoch, step + 1, 1.5, 50.0)
        shown.epoch_done(epoch, 1.25, 62.5)
    shown.close()
    return shown


def test_training_shows_one_line_per_epoch_with_its_figures(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)  # the default interval: no line within these epochs
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    shown = two_epochs_of_three_steps()
    assert isinstance(shown.bar, LineProgress)
    lines = log.getvalue().splitlines()
    assert lines[:2] == ["coop epoch 1/2: loss 1.2500, train accuracy 62.50%",
                         "coop epoch 2/2: loss 1.2500, train accuracy 62.50%"]
    assert lines[2].startswith("coop: 6/6 step in ") and len(lines) == 3


def test_training_on_a_terminal_is_one_bar_with_the_epoch_loss_and_accuracy(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    shown = two_epochs_of_three_steps()
    drawn = terminal.getvalue()
    assert isinstance(shown.bar, tqdm) and "coop epoch" not in drawn  # no line per epoch: the bar says it
    assert "6/6" in drawn and "epoch=2/2, loss=1.5000, accuracy=50.00%" in drawn.rsplit("\r", 1)[-1]


def test_training_stopped_by_an_error_ends_the_terminal_bar_line(monkeypatch):
    """The error line that follows starts a line of its own, not the end of the bar's."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    shown = TrainingProgress("coop", epochs=2, steps=3, start=0)
    shown.step()
    shown.stop()
    assert terminal.getvalue().endswith("\n")
