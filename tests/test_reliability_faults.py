"""No lost work under faults: real training subprocesses killed (SIGKILL) at several points, Ctrl-C,
two runs on one folder, damaged checkpoints and caches, a full disk and an unwritable output folder.
A resumed run must end exactly where an uninterrupted one does (CPU, bit for bit)."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD_S, quick_config

from promptlearn.checkpoint import DamagedCheckpoint, load_checkpoint, save_checkpoint
from promptlearn.errors import CheckpointError, PromptlearnError
from promptlearn.features import FeatureCache, SplitFeatures
from promptlearn.io import RunLock, check_writable
from promptlearn.runner import COMPLETE_MARKER, is_complete, run_experiment

EPOCHS = 80  # ~0.02 s an epoch on the sample: long enough to kill a run in the middle of training
pytestmark = pytest.mark.usefixtures("one_thread")
FAULT_RUN = ("methods=[zeroshot, coop]", f"train.epochs={EPOCHS}", "train.augment=true", "train.feature_passes=2")


def run_args(out: Path, cache: Path) -> tuple[str, ...]:
    return ("--output-dir", str(out), *FAULT_RUN, f"cache_dir={cache}")


def log_size(out: Path) -> int:
    log = out / "log.txt"
    return log.stat().st_size if log.exists() else 0


def logged_since(out: Path, offset: int) -> str:
    log = out / "log.txt"
    return log.read_bytes()[offset:].decode("utf-8", errors="replace") if log.exists() else ""


def wait_until(condition, proc) -> None:
    """Poll `condition` every few milliseconds while `proc` runs, however slowly; fail if it ends first."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the point to interrupt it")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach the point to interrupt it in {HANG_GUARD_S} s: it hung")
        time.sleep(0.005)


def kill(proc) -> None:
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed or cleaned up
    proc.wait()
    for f in proc.output_files:
        f.close()


def assert_same_result(run: Path, ref: Path) -> None:
    """Same final context, optimiser state and history, and the same predictions and metrics."""
    assert is_complete(run)
    got, want = load_checkpoint(run / "coop" / "checkpoint.pt"), load_checkpoint(ref / "coop" / "checkpoint.pt")
    assert got["epoch"] == want["epoch"] == EPOCHS
    assert got["state"].keys() == want["state"].keys()
    for name, tensor in want["state"].items():
        assert torch.equal(got["state"][name], tensor), name
    for index, state in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert got["history"] == want["history"]
    got_m, want_m = (json.loads((d / "metrics.json").read_text()) for d in (run, ref))
    for method in ("zeroshot", "coop"):
        for key in ("accuracy", "macro_f1", "ece", "per_class_accuracy"):
            assert got_m[method][key] == want_m[method][key], (method, key)
    assert (run / "coop" / "predictions.csv").read_text().replace(str(run), "") == \
        (ref / "coop" / "predictions.csv").read_text().replace(str(ref), "")


def leftover_temps(folder: Path) -> list[Path]:
    return [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_coop):
    """The uninterrupted run, and its (warm) feature cache."""
    base = tmp_path_factory.mktemp("reference")
    out, cache = base / "run", base / "cache"
    done = train_coop.run(*run_args(out, cache))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, cache


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_killed_at_several_points_resumes_to_the_uninterrupted_result(reference, tmp_path, train_coop):
    ref, _ = reference
    out, cache = tmp_path / "run", tmp_path / "cache"  # a cold cache: the first kill lands in feature extraction
    args = run_args(out, cache)

    # 1. SIGKILL during feature extraction, as soon as the first cache file is complete
    proc = train_coop.start(*args)
    wait_until(lambda: any(cache.glob("*.pt")), proc)
    kill(proc)
    assert not is_complete(out)
    # what a kill in the middle of a cache write leaves, and a complete cache file damaged since
    first = next(cache.glob("*.pt"))
    (cache / f".{first.name}.k1ll3d.tmp").write_bytes(first.read_bytes()[:200])
    payload = torch.load(first, weights_only=True)
    payload["features"][0, 0] += 1.0  # the content changes, the stored checksum does not
    torch.save(payload, first)

    # 2. SIGKILL in the middle of training; while the run is alive, a second run on its folder is refused
    mark = log_size(out)
    proc = train_coop.start(*args, "--resume")
    wait_until(lambda: f"coop epoch 20/{EPOCHS}" in logged_since(out, mark), proc)
    os.kill(proc.pid, signal.SIGSTOP)  # holds the lock, frozen, until it is killed below
    try:
        second = train_coop.run(*args, "--resume")
    finally:
        kill(proc)
    assert f"another promptlearn process (pid {proc.pid}) is using {out}" in second.error()
    assert "is damaged; extracting again" in logged_since(out, mark)
    assert (out / ".lock").exists()  # left behind by the killed process: it must not block the next run
    assert 19 <= load_checkpoint(out / "coop" / "checkpoint.pt")["epoch"] < EPOCHS  # epoch 20 is logged, then saved

    # 3. SIGKILL later on; plus what a kill in the middle of a checkpoint write leaves behind
    mark = log_size(out)
    proc = train_coop.start(*args, "--resume")
    wait_until(lambda: f"coop epoch 50/{EPOCHS}" in logged_since(out, mark), proc)
    kill(proc)
    checkpoint = out / "coop" / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["epoch"] >= 49  # the file under the real name is always complete
    data = checkpoint.read_bytes()
    (out / "coop" / ".checkpoint.pt.k1ll3d.tmp").write_bytes(data[:len(data) // 2])

    # 4. resumed to the end: exactly the uninterrupted result
    mark = log_size(out)
    done = train_coop.run(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "coop: resumed from" in logged_since(out, mark)
    assert_same_result(out, ref)
    assert not leftover_temps(out) and not (out / ".lock").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same(reference, tmp_path, train_coop):
    ref, cache = reference
    out = tmp_path / "run"
    args = run_args(out, cache)
    proc = train_coop.start(*args)
    wait_until(lambda: f"coop epoch 10/{EPOCHS}" in logged_since(out, 0), proc)
    proc.send_signal(signal.SIGINT)
    stopped = train_coop.finish(proc)
    message = stopped.error()
    saved = re.fullmatch(r"error: interrupted; saved the state after epoch (\d+) to (\S+)\. Rerun with --resume "
                         r"to continue\.", message)
    assert saved, message
    assert Path(saved[2]) == out / "coop" / "checkpoint.pt"
    assert load_checkpoint(saved[2])["epoch"] == int(saved[1]) >= 10
    assert not (out / ".lock").exists() and not is_complete(out)

    done = train_coop.run(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_result(out, ref)


# ----------------------------------------------------------------------------- checkpoints

def ctx(run: Path) -> torch.Tensor:
    return load_checkpoint(run / "coop" / "checkpoint.pt")["state"]["prompts.ctx"]


@pytest.fixture(scope="module")
def five_epochs(tmp_path_factory, one_thread) -> Path:
    """An uninterrupted in-process 5-epoch CoOp run to compare resumed runs with."""
    base = tmp_path_factory.mktemp("five")
    run_experiment(quick_config(base, "methods=[coop]"))
    return base / "run"


def test_truncated_checkpoint_is_set_aside_and_training_starts_again(five_epochs, tmp_path, caplog):
    cfg = quick_config(tmp_path, "methods=[coop]", f"cache_dir={five_epochs.parent / 'cache'}")
    run_experiment(cfg)
    checkpoint = tmp_path / "run" / "coop" / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 2])
    (tmp_path / "run" / COMPLETE_MARKER).unlink()  # stopped before its end: --resume of a complete run redoes nothing
    run_experiment(cfg, resume=True)
    assert "starts again from epoch 0" in caplog.text
    assert checkpoint.with_name("checkpoint.pt.damaged").read_bytes() == data[:len(data) // 2]
    assert torch.equal(ctx(tmp_path / "run"), ctx(five_epochs))


def _stale_checksum(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    payload["state"]["prompts.ctx"][0, 0] += 1e-3
    torch.save(payload, path)


@pytest.mark.parametrize("damage, error, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), DamagedCheckpoint, r"cannot be read .* truncated, damaged"),
    (lambda p: p.write_bytes(b""), DamagedCheckpoint, r"cannot be read"),
    (_stale_checksum, DamagedCheckpoint, r"fails its checksum"),
    (lambda p: torch.save({"state": {}}, p), CheckpointError, r"is not a promptlearn-checkpoint-v1 checkpoint"),
])
def test_damaged_checkpoint_is_never_read_as_complete(tmp_path, damage, error, message):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"state": {"prompts.ctx": torch.randn(4, 8)}, "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    damage(path)
    with pytest.raises(error, match=message):
        load_checkpoint(path)


def test_full_disk_stops_the_run_with_earlier_results_intact(five_epochs, tmp_path, monkeypatch):
    cfg = quick_config(tmp_path, "methods=[coop]", f"cache_dir={five_epochs.parent / 'cache'}")
    real_fsync, checkpoint_writes = os.fsync, []

    def fsync(fd):  # the third checkpoint write finds the disk full
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".checkpoint.pt."):
            checkpoint_writes.append(fd)
            if len(checkpoint_writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(PromptlearnError, match=r"disk full while writing .*checkpoint.pt; earlier results are "
                                               r"intact\. Free space and rerun with --resume"):
        run_experiment(cfg)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert load_checkpoint(run / "coop" / "checkpoint.pt")["epoch"] == 2
    assert not leftover_temps(run) and not (run / ".lock").exists()
    run_experiment(cfg, resume=True)
    assert torch.equal(ctx(run), ctx(five_epochs))


@pytest.mark.subprocess
def test_unwritable_output_folder_is_found_before_any_work(tmp_path, train_coop):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder's parent should be")
    failed = train_coop.run("--output-dir", str(blocker / "run"), f"cache_dir={tmp_path / 'cache'}")
    assert re.fullmatch(rf"error: output folder {re.escape(str(blocker / 'run'))} cannot be written \(.*\); "
                        r"choose another with --output-dir", failed.error())
    assert "epoch" not in failed.stderr and not (tmp_path / "cache").exists()


def test_nearly_full_disk_is_found_before_any_work(tmp_path, monkeypatch):
    from promptlearn import io

    monkeypatch.setattr(io.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 2**20})())
    with pytest.raises(PromptlearnError, match=r"has only 1 MiB free, less than the 64 MiB a run needs"):
        check_writable(tmp_path / "run")


# ----------------------------------------------------------------------------- the run-folder lock

def test_lock_refuses_a_second_holder_until_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(PromptlearnError, match=rf"another promptlearn process \(pid {os.getpid()}\) is using"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path) as second:
        assert second.held and (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_lock_and_temp_files_left_by_a_dead_run_are_cleared(tmp_path):
    (tmp_path / ".lock").write_text("999999999\n")  # a pid that no process has: its holder died
    temps = [tmp_path / ".metrics.json.abc123.tmp", tmp_path / "coop" / ".checkpoint.pt.def456.tmp"]
    for t in temps:
        t.parent.mkdir(exist_ok=True)
        t.write_bytes(b"half")
    keep = tmp_path / "coop" / "checkpoint.pt"
    keep.write_bytes(b"complete")
    with RunLock(tmp_path):
        assert not any(t.exists() for t in temps) and keep.exists()


# ----------------------------------------------------------------------------- the feature cache

class RunsCode:
    """Unpickling this would create `marker`: a stand-in for any code hidden in a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_damaged_feature_cache_is_extracted_again(tmp_path, caplog):
    cache, path, marker = FeatureCache(tmp_path), tmp_path / "key.pt", tmp_path / "code-ran"
    fresh = SplitFeatures(torch.randn(4, 8), torch.arange(4), ["a", "b", "c", "d"])
    computed = []

    def compute():
        computed.append(1)
        return SplitFeatures(fresh.features.clone(), fresh.labels.clone(), list(fresh.paths))

    (tmp_path / ".key.pt.k1ll3d.tmp").write_bytes(b"cut short")  # a write that never finished is not the file
    cache.get_or_compute("key", compute)
    assert len(computed) == 1 and path.exists()

    def stale_labels(p):
        payload = torch.load(p, weights_only=True)
        payload["labels"][0] = 3
        torch.save(payload, p)

    damages = [lambda p: p.write_bytes(p.read_bytes()[:300]), lambda p: p.write_bytes(b""), stale_labels,
               lambda p: torch.save({"features": RunsCode(marker)}, p)]
    for n, damage in enumerate(damages, start=2):
        damage(path)
        got = cache.get_or_compute("key", compute)
        assert len(computed) == n  # recomputed, not read
        assert torch.equal(got.features, fresh.features) and torch.equal(got.labels, fresh.labels)
    assert caplog.text.count("is damaged; extracting again") == len(damages)
    assert not marker.exists()
    assert torch.equal(cache.get_or_compute("key", compute).labels, fresh.labels) and len(computed) == len(damages) + 1
