"""Progress bars for long work: tqdm redrawn as usual on a terminal; written to a log file (SLURM, nohup,
CI), where every redraw is kept, at most once every LOG_INTERVAL_S seconds."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) with dynamic width, throttled where its stream is not a terminal (a
    TQDM_MININTERVAL in the environment still decides)."""
    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S)))
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
