"""Checkpoints: written atomically, read with `weights_only=True` (no pickled code ever runs),
and checked against the current setup before use."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from promptlearn.errors import CheckpointError
from promptlearn.io import atomic_write_bytes

FORMAT = "promptlearn-checkpoint-v1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, **payload}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds pickled objects or code that a weights-only load "
            f"does not run ({str(e).splitlines()[0]}). Only load checkpoints you trust, re-saved as plain "
            "tensors and Python values.") from None
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be "
                              "truncated or not a checkpoint") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a promptlearn checkpoint (no dict inside)")
    return payload


def check_meta(path: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Name every setting in which the checkpoint differs from the current setup."""
    problems = []
    for key, now in current.items():
        then = saved.get(key)
        if then != now:
            if isinstance(now, list) and isinstance(then, list):
                diff = [f"{a!r} vs {b!r}" for a, b in zip(then, now) if a != b][:3]
                detail = f"{len(then)} vs {len(now)} entries" + (f"; first differences {', '.join(diff)}" if diff else "")
            else:
                detail = f"{then!r} in the checkpoint, {now!r} now"
            problems.append(f"{key}: {detail}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this setup: " + "; ".join(problems)
                              + ". Use a checkpoint from the same backbone, classes and context, or "
                                "another --output-dir.")
