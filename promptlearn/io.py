"""Atomic file writes and the run-folder lock: a crash never leaves a half-written file behind."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from promptlearn.errors import PromptlearnError, RunBusy

TEMP_SUFFIX = ".tmp"  # `.<name>.<random>.tmp`: a write in progress, or one a killed process left behind
MIN_FREE_BYTES = 64 * 2**20  # refuse to start a run on a disk with less room than this
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a CSV cell starting so is a formula to a spreadsheet (OWASP)


def spreadsheet_safe(cell: Any) -> Any:
    """A text cell that a spreadsheet would evaluate (a class named `=cmd|...`) with a leading single quote, as
    OWASP's CSV-injection advice has it; every other cell as it is."""
    return f"'{cell}" if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell


def safe_row(cells: Any) -> list:
    """A CSV row with every cell `spreadsheet_safe`."""
    return [spreadsheet_safe(cell) for cell in cells]


def file_creation_mode() -> int:
    """The mode an ordinary new file gets: 0666 less the process's umask (0644 or 0664 usually)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise PromptlearnError(f"could not write {path}: {e.strerror or e}") from None
    try:
        # mkstemp makes the file 0600; results and shared caches are meant to be read by the group
        os.chmod(tmp, file_creation_mode())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
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
    """Create `folder` and prove a file can be written there and the disk has room, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"  # per process: two runs starting at once don't collide
        probe.write_text("ok")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise PromptlearnError(f"output folder {folder} cannot be written ({e.strerror or e}); "
                               "choose another with --output-dir") from None
    if free < MIN_FREE_BYTES:
        raise PromptlearnError(f"the disk holding {folder} has only {free / 2**20:.0f} MiB free, less than the "
                               f"{MIN_FREE_BYTES // 2**20} MiB a run needs; free space or choose another --output-dir")
    return folder


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files of writes that never finished in `folder` and its subfolders (one level)."""
    for tmp in [*folder.glob(f".*{TEMP_SUFFIX}"), *folder.glob(f"*/.*{TEMP_SUFFIX}")]:
        tmp.unlink(missing_ok=True)


class RunLock:
    """An exclusive `flock` on `<folder>/.lock`, which also names the holder's pid. The kernel drops
    the lock when its process ends, however it ends, so a killed run never blocks the next one."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunBusy(
                    f"another promptlearn process (pid {holder}) is using {self.path.parent}; wait for it "
                    "or choose another --output-dir") from None
            try:  # the previous holder may have removed the file between our open and flock
                current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        remove_stale_temps(self.path.parent)  # the folder is ours now: leftovers of killed writers go
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking, so no one locks a file that is gone
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
