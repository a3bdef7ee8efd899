"""Running tools/train_coop.py as a real subprocess, as a user would, for the reliability tests."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest
import torch
from helpers import HANG_GUARD_S, QUICKSTART, REPO

from promptlearn.commands import entry

TRAIN_COOP = REPO / "tools" / "train_coop.py"


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def error(self) -> str:
        """The one `error: ...` line of a run that failed cleanly (exit status 2, no traceback)."""
        assert self.returncode == 2, f"exit status {self.returncode}\n{self.stderr[-3000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        errors = [line for line in self.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1 and errors[0].startswith("error: "), self.stderr[-3000:]
        return errors[0]


class TrainCoop:
    """`python tools/train_coop.py --config configs/quickstart.yaml ...` in a subprocess. Its output goes
    to temporary files, not pipes, so a long run that nobody reads never blocks on a full pipe. One
    intra-op thread: on 2 busy cores, spinning OpenMP threads make a tiny run many times slower."""

    def start(self, *args: str) -> subprocess.Popen:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, str(TRAIN_COOP), "--config", str(QUICKSTART), *map(str, args)],
                                cwd=REPO, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        proc.output_files = (out, err)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen) -> Finished:
        """Wait for the run to end, however long a busy machine makes it; only a hung one is stopped."""
        try:
            proc.wait(timeout=HANG_GUARD_S)
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            hung = True
        out = []
        for stream in proc.output_files:
            stream.seek(0)
            out.append(stream.read().decode("utf-8", errors="replace"))
            stream.close()
        if hung:
            pytest.fail(f"train_coop.py {' '.join(proc.args[4:])} still ran after {HANG_GUARD_S} s: it hung\n"
                        f"{out[1][-3000:]}")
        return Finished(proc.returncode, *out)

    def run(self, *args: str) -> Finished:
        return self.finish(self.start(*args))

    def call(self, capsys, *args: str) -> Finished:
        """`promptlearn train` in this process: the same exit status and stderr as the shell's, no start-up."""
        with pytest.raises(SystemExit) as stop:
            entry(["train", "--config", str(QUICKSTART), *args])
        captured = capsys.readouterr()
        return Finished(stop.value.code, captured.out, captured.err)


@pytest.fixture(scope="session")
def train_coop() -> TrainCoop:
    return TrainCoop()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module, as in the subprocesses above (and the same count for the
    runs a module compares bit for bit); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
