"""Progress bars for long work: tqdm redrawn as usual on a terminal; written to a log file (SLURM, nohup,
CI), where every redraw is kept, at most once every LOG_INTERVAL_S seconds."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def log_interval() -> float:
    """TQDM_MININTERVAL from the environment where it is a number, else LOG_INTERVAL_S."""
    try:
        return float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S))
    except ValueError:
        return LOG_INTERVAL_S


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) with dynamic width, throttled where its stream is not a terminal (a
    TQDM_MININTERVAL in the environment still decides). A notebook's widget is left as it is."""
    stream = kwargs.get("file") or sys.stderr
    in_notebook = "ipykernel" in sys.modules
    if not in_notebook and not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", log_interval())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
