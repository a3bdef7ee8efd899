"""Checkpoints: written atomically with a checksum of their contents, read with `weights_only=True`
(no pickled code ever runs), and checked against the current setup before use. A training checkpoint
also holds the global random-number states, so that a resumed run draws what an uninterrupted one draws."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptlearn.errors import CheckpointError
from promptlearn.io import atomic_write_bytes

FORMAT = "promptlearn-checkpoint-v1"


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that is truncated, unreadable or fails its checksum: never used as if complete."""


def content_digest(obj: Any) -> str:
    """SHA-256 of nested dicts / lists of tensors (dtype, shape and bytes) and plain values, keys in order."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for key in sorted(x, key=repr):
                h.update(repr(key).encode())
                walk(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def random_states() -> dict[str, Any]:
    """Every global random-number state that training may draw from: torch's CPU generator (dropout, and
    anything a method draws), CUDA's generators once CUDA is in use, Python's `random` and NumPy's. As
    tensors and plain values, which a weights-only load reads back."""
    version, words, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    states = {"torch": torch.get_rng_state(),
              "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
              "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": numpy["state"]["pos"],
                        "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]}}
    if torch.cuda.is_initialized():  # never initialise CUDA only to read its generators
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Set the global generators to what `random_states` read; CUDA's where this process has those devices
    (a run resumed on another device cannot draw the same numbers anyway)."""
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]}})
    if torch.cuda.is_available():
        for device, state in enumerate(states.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, **payload}
    payload["checksum"] = content_digest(payload)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def read_weights_only(path: str | Path) -> Any:
    """Whatever a PyTorch file holds, read with `weights_only=True`: pickled code is refused, never run."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise CheckpointError(f"checkpoint {path} is {what}; pass the checkpoint file itself, e.g. "
                              "<run folder>/coop/checkpoint.pt")
    with open(path, "rb") as f:
        magic = f.read(4)
    # unreadable files are all alike: --resume sets them aside and retrains, --eval-only stops
    if not magic:
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read (the file is empty); it is truncated or damaged")
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch's zip or a pickle
        raise DamagedCheckpoint(f"{path} is not a checkpoint (not a PyTorch file); pass a checkpoint.pt "
                                "that promptlearn wrote")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({e}); it is truncated or damaged") from None
        # torch's own advice (allow-listing globals) is the opposite of ours: name only the offending global
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it names {found.group(1)}" if found else "unsupported pickle content"
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds pickled objects or code, which a weights-only load "
            f"never runs ({reason}). Only load checkpoints you trust, re-saved as plain tensors and "
            "Python values.") from None
    except Exception as e:  # truncated or not a torch file
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is "
                                "truncated, damaged or not a checkpoint") from None
    return payload


def is_promptlearn_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT and "checksum" in payload


def verified(path: str | Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload of a promptlearn checkpoint after its checksum matched and its tensors are finite."""
    payload = dict(payload)
    if payload.pop("checksum") != content_digest(payload):
        raise DamagedCheckpoint(f"checkpoint {path} fails its checksum; it is damaged")
    bad = non_finite_tensors(payload)
    if bad:  # a checksum recomputed over NaN would let --resume finish with every prediction NaN
        raise DamagedCheckpoint(f"checkpoint {path} holds non-finite values (NaN or infinity) in "
                                f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; it cannot be used")
    return payload


def non_finite_tensors(obj: Any, where: str = "") -> list[str]:
    """Where in nested dicts / lists a floating-point tensor holds NaN or infinity."""
    if isinstance(obj, torch.Tensor):
        return [where or "tensor"] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in non_finite_tensors(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [w for i, v in enumerate(obj) for w in non_finite_tensors(v, f"{where}[{i}]")]
    return []


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint promptlearn wrote, read safely and checked against its checksum."""
    payload = read_weights_only(path)
    if not is_promptlearn_checkpoint(payload):
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format and checksum missing); "
                              "use a checkpoint that promptlearn wrote")
    return verified(path, payload)


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of the way, kept for inspection, so that training starts afresh."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside


def check_meta(path: str | Path, saved: dict[str, Any], current: dict[str, Any],
               absent: dict[str, Any] | None = None) -> None:
    """Name every setting in which the checkpoint differs from the current setup. `absent`: what a setting the
    checkpoint lacks was when it was written (the default of a key added since)."""
    problems = []
    for key, now in current.items():
        then = saved.get(key, (absent or {}).get(key))
        if then != now:
            if isinstance(now, list) and isinstance(then, list):
                diff = [f"{a!r} vs {b!r}" for a, b in zip(then, now) if a != b][:3]
                detail = f"{len(then)} vs {len(now)} entries" + (
                    f"; first differences {', '.join(diff)}" if diff else "")
            else:
                detail = f"{then!r} in the checkpoint, {now!r} now"
            problems.append(f"{key}: {detail}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this setup: " + "; ".join(problems)
                              + ". Use a checkpoint from the same backbone, classes and context, or "
                                "another --output-dir; rerunning without --resume (with --overwrite once the run "
                                "is complete) starts over and replaces it.")
