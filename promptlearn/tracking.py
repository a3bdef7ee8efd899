"""Experiment tracking with the ecosystem's own libraries, chosen by `log_to` (`--log-to`): TensorBoard event
files (torch.utils.tensorboard) in `<output_dir>/tensorboard/`, and Weights & Biases runs under
`<output_dir>/wandb/` (WANDB_MODE=offline works without a network; `wandb sync` uploads later). Neither
package is needed or imported unless asked for.

The trainer and the runner report events to a Tracking object and know nothing of the backends: each
method's epochs (as they end, and from its history afterwards for epochs that did not pass through the
trainer: a resumed run's earlier epochs, a method's own loop), its test results, and the run's table.
"""
from __future__ import annotations

import html
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from promptlearn.errors import ConfigError, PromptlearnError

log = logging.getLogger("promptlearn")

# tracker -> (the package it needs, the promptlearn extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
# a method's result keys that are tracked as test scalars (others are records, lists or text)
RESULT_KEYS = ("accuracy", "macro_f1", "ece", "base_accuracy", "novel_accuracy", "hm", "targets_average",
               "val_accuracy", "train_seconds")


def installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it (wandb alone takes seconds)."""
    return importlib.util.find_spec(package) is not None


def check_trackers(names: list[str]) -> None:
    """Before any work: every tracker is known and its package installed."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log_to: unknown tracker {name!r}; use {' or '.join(TRACKERS)} (or both)")
        package, extra = TRACKERS[name]
        if not installed(package):
            raise ConfigError(f"log_to={name} needs the {package} package, which is not installed: "
                              f"pip install 'promptlearn[{extra}]'")


def epoch_scalars(record: dict) -> dict[str, float]:
    """An epoch's record (the trainer's, or a method's own loop's) as tracked scalars: its loss (and named
    parts), train accuracy, learning rate and validation accuracy, whichever it has."""
    names = {"accuracy": "train_accuracy"}
    return {names.get(key, key): float(value) for key, value in record.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Backend(Protocol):
    def scalars(self, method: str, values: dict[str, float], epoch: int) -> None: ...
    def results(self, method: str, values: dict[str, float]) -> None: ...
    def text(self, name: str, text: str) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, method: str, values: dict[str, float], epoch: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{method}/{key}", value, epoch)

    def results(self, method: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"test/{method}/{key}", value, 0)

    def text(self, name: str, text: str) -> None:
        self.writer.add_text(name, text)  # TensorBoard renders it as Markdown: the run's table

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, folder: Path, name: str, config: dict):
        import wandb

        self.wandb = wandb
        folder.mkdir(parents=True, exist_ok=True)
        try:
            # silent: wandb's own banner and summary would bury the run's console; log.txt keeps the console
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "promptlearn"), dir=str(folder),
                                  name=name, config=config, settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # no login, no network: wandb's reason, and the offline remedy
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise PromptlearnError(f"log_to=wandb: Weights & Biases could not start a run ({reason}); log in with "
                                   "`wandb login`, or set WANDB_MODE=offline to log to the run folder and "
                                   "`wandb sync` it later") from None
        self.methods: set[str] = set()
        log.info("log_to=wandb: run %s in %s", self.run.id, self.run.dir)

    def scalars(self, method: str, values: dict[str, float], epoch: int) -> None:
        if method not in self.methods:  # each method's curves against its own epochs
            self.run.define_metric(f"{method}/*", step_metric=f"{method}/epoch")
            self.methods.add(method)
        self.run.log({f"{method}/epoch": epoch, **{f"{method}/{k}": v for k, v in values.items()}})

    def results(self, method: str, values: dict[str, float]) -> None:
        self.run.summary.update({f"test/{method}/{key}": value for key, value in values.items()})

    def text(self, name: str, text: str) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def close(self) -> None:
        self.run.finish()


class Tracking:
    """The chosen trackers of one run (none: every call does nothing). A context manager: closed, and
    their files complete, however the run ends."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self.logged: dict[str, set[int]] = {}  # method -> its epochs already reported

    def epoch(self, method: str, record: dict) -> None:
        seen = self.logged.setdefault(method, set())
        if record.get("epoch") is None or record["epoch"] in seen:
            return
        seen.add(record["epoch"])
        values = epoch_scalars(record)
        for backend in self.backends:
            backend.scalars(method, values, int(record["epoch"]))

    def history(self, method: str, history: list[dict]) -> None:
        """A method's epochs after it has trained: those not reported as they ended."""
        for record in history:
            self.epoch(method, record)

    def result(self, method: str, metrics: dict) -> None:
        values = {key: float(metrics[key]) for key in RESULT_KEYS if isinstance(metrics.get(key), (int, float))}
        for backend in self.backends:
            backend.results(method, values)

    def text(self, name: str, text: str) -> None:
        for backend in self.backends:
            backend.text(name, text)

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, *exc: Any) -> None:
        for backend in self.backends:
            backend.close()


def open_tracking(names: list[str], output_dir: str | Path, name: str, config: dict) -> Tracking:
    """The trackers `names` asks for, writing under `output_dir` (checked by check_trackers)."""
    out = Path(output_dir)
    backends: list[Backend] = []
    try:
        for tracker in names:
            backends.append(TensorBoard(out / "tensorboard") if tracker == "tensorboard"
                            else WandB(out, name, config))
    except BaseException:
        Tracking(backends).__exit__(None, None, None)
        raise
    return Tracking(backends)
