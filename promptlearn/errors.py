"""User-facing errors: a message that says what is wrong and what to do, never a deep traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class PromptlearnError(Exception):
    """An error the user can fix. Command-line tools print it alone and exit with `exit_status`."""

    exit_status = 2


class ConfigError(PromptlearnError):
    """A bad configuration value or key."""


class DataError(PromptlearnError):
    """A dataset, split file or image that cannot be used."""


class RunBusy(PromptlearnError):
    """A run folder that another promptlearn process is using (it holds the folder's lock)."""


class RunsLeft(PromptlearnError):
    """A sweep did every run it could and built its report, but left runs that other processes were
    using: not an error in what was asked, so a distinct exit status (3) that scripts can tell apart."""

    exit_status = 3


class CheckpointError(PromptlearnError):
    """A checkpoint that cannot be loaded into the current setup."""


class NonFinite(PromptlearnError):
    """Features, logits or a loss that are NaN or infinite, stopped where they first appear (a backbone's
    output, a cache file, a method's logits, a training step) before any result is made of them."""


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to `name`, best first (case-insensitive)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    """'unknown dataset 'x'; did you mean 'y'?' plus where the full list is."""
    choices = sorted(choices)
    close = nearest(name, choices)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(choices[:40]) + (" ..." if len(choices) > 40 else "")
    return f"unknown {kind} {name!r}{hint} Valid: {shown}"


def error_line(error: BaseException) -> str:
    """The last line a failed command prints: `error: <one line>` (`interrupted` for Ctrl-C)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # e.g. YAML errors
    return f"error: {text}" if isinstance(error, PromptlearnError) else f"error: {type(error).__name__}: {text}"
