"""Progress of long work, one display per phase (a method's training, a split's features, a sweep).

On a terminal (or in a notebook) a tqdm bar, redrawn in place. Where stderr is not a terminal (a SLURM or
nohup log, CI) no carriage-return bars at all: plain lines, one when the work ends and one at most every
LOG_INTERVAL_S seconds while it goes on (a method's training writes one line per epoch). `-q` silences both
(set_quiet), whatever tqdm read from the environment when it was imported.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Every display from now on is off (`-q`, or a benchmark's measuring process) or on again."""
    global _quiet
    _quiet = quiet


def log_interval() -> float:
    """TQDM_MININTERVAL from the environment where it is a number, else LOG_INTERVAL_S."""
    try:
        return float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S))
    except ValueError:
        return LOG_INTERVAL_S


def on_terminal(stream) -> bool:
    return "ipykernel" in sys.modules or getattr(stream, "isatty", lambda: False)()


class LineProgress:
    """A progress display written as plain lines (tqdm's interface, as far as promptlearn uses it)."""

    def __init__(self, iterable=None, *, desc: str, total: int | None, unit: str, leave: bool, stream):
        self.iterable, self.desc, self.unit, self.leave, self.stream = iterable, desc, unit, leave, stream
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.postfix, self.written = 0, "", False
        self.began = self.last_line = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()  # work that stops on an error gets no closing line: the error is the last line

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= log_interval():
            self.line("")

    def set_postfix(self, values: dict) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def line(self, suffix: str) -> None:
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        self.write(f"{self.desc}: {done} {self.unit}{suffix}" + (f", {self.postfix}" if self.postfix else ""))
        self.last_line, self.written = time.monotonic(), True

    def close(self) -> None:
        """The closing line, unless the display was transient (leave=False) and never wrote one."""
        if not self.closed and (self.leave or self.written):
            self.line(f" in {time.monotonic() - self.began:.1f} s")
        self.closed = True


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", leave: bool = True,
             disable: bool = False, stream=None) -> "tqdm | LineProgress":
    """The one progress display: a tqdm bar on a terminal, plain lines elsewhere, nothing where disabled or
    quiet. leave=False: a transient bar, and plain lines only for work that takes longer than the interval."""
    stream = stream or sys.stderr
    if disable or _quiet:
        return tqdm(iterable, total=total, disable=True)
    if on_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=stream, dynamic_ncols=True)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, leave=leave, stream=stream)


def console_shows_info() -> bool:
    """The console's log handler (cli.setup_logging) already prints promptlearn's INFO lines (-v)."""
    return any(getattr(h, "promptlearn_console", False) and h.level <= logging.INFO
               for h in logging.getLogger().handlers)


class TrainingProgress:
    """One display for a method's whole training: on a terminal one bar over every step, its postfix the
    epoch, loss and accuracy; elsewhere one line per epoch with those numbers (and one per interval within
    an epoch that takes longer), none where `-v` prints the trainer's own epoch line."""

    def __init__(self, name: str, epochs: int, steps: int, start: int, disable: bool = False):
        self.name, self.epochs, self.steps = name, epochs, steps
        self.bar = progress(desc=name, total=(epochs - start) * steps, unit="step",
                            disable=disable or start >= epochs)  # a finished training resumed: nothing to show
        self.epoch_lines = isinstance(self.bar, LineProgress) and not console_shows_info()

    def show(self, epoch: int, step: int, loss: float, accuracy: float) -> None:
        """The running figures of the epoch (1-based) after `step` steps."""
        figures = {"epoch": f"{epoch}/{self.epochs}", "loss": f"{loss:.4f}", "accuracy": f"{accuracy:.2f}%"}
        if isinstance(self.bar, LineProgress):
            figures["epoch"] += f" (step {step}/{self.steps})"
        self.bar.set_postfix(figures)  # tqdm keeps a dict's order (keyword arguments it would sort)

    def step(self) -> None:
        self.bar.update(1)

    def epoch_done(self, epoch: int, loss: float, accuracy: float) -> None:
        if self.epoch_lines:
            self.bar.write(f"{self.name} epoch {epoch}/{self.epochs}: loss {loss:.4f}, train accuracy {accuracy:.2f}%")
            self.bar.last_line = time.monotonic()
            self.bar.postfix = ""  # the closing line says only how long training took

    def close(self) -> None:
        self.bar.close()

    def stop(self) -> None:
        """Training stopped by an error: a terminal's bar ends its line, so the error starts a line of its own;
        a log gets no closing line, so the error stays its last."""
        if not isinstance(self.bar, LineProgress):
            self.bar.close()
