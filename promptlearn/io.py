"""Atomic file writes and the run-folder lock: a crash never leaves a half-written file behind."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from promptlearn.errors import PromptlearnError


def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise PromptlearnError(f"disk full while writing {path}; earlier results are intact. "
                                   "Free space and rerun with --resume") from None
        raise PromptlearnError(f"could not write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_bytes(path: str | Path, write: Callable[[Any], None]) -> None:
    """`write(f)` writes into a binary file object (e.g. torch.save)."""
    _atomic_write(path, write, "wb")


def check_writable(folder: str | Path) -> Path:
    """Create `folder` and prove a file can be written there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PromptlearnError(f"output folder {folder} cannot be written ({e.strerror or e}); "
                               "choose another with --output-dir") from None
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<folder>/.lock` holding the owner's pid; a lock left by a dead process is taken over."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise PromptlearnError(
                        f"another promptlearn process (pid {pid}) is using {self.path.parent}; wait for it "
                        "or choose another --output-dir") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
