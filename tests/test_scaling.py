"""Scaling out: group-readable files, one shared feature cache under racing processes, a sweep run by
local worker processes and by a submitit job array (its local executor), both equal to the serial sweep."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import HANG_GUARD_S, REPO, SAMPLE

from promptlearn import launch
from promptlearn.commands import entry
from promptlearn.errors import ConfigError, PromptlearnError
from promptlearn.features import FeatureCache, SplitFeatures
from promptlearn.io import atomic_write_text
from promptlearn.launch import LaunchOptions, check_options
from promptlearn.runner import COMPLETE_MARKER
from promptlearn.sweep import load_sweep, plan_runs, run_sweep

QUICK = REPO / "configs" / "sweeps" / "quick_sample.yaml"
RESULT_COLUMNS = ("method", "dataset", "shots", "seed", "accuracy", "macro_f1", "ece")


@pytest.fixture
def umask():
    def set_umask(value: int) -> None:
        os.umask(value)

    before = os.umask(0o022)
    os.umask(before)
    yield set_umask
    os.umask(before)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "results.csv", "a,b\n")
    assert stat.S_IMODE((tmp_path / "results.csv").stat().st_mode) == expected


def extract_once(folder: str, log: str, start: float) -> list[float]:
    """A racing process: wait for the common start, then get one key; `compute` notes each extraction."""
    def compute() -> SplitFeatures:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # a slow extraction: the others arrive while it is under way
        return SplitFeatures(torch.arange(12.0).reshape(4, 3), torch.arange(4), [f"img{i}.png" for i in range(4)])

    time.sleep(max(0.0, start - time.time()))
    return FeatureCache(folder).get_or_compute("key", compute).features.flatten().tolist()


@pytest.mark.subprocess
def test_processes_racing_on_one_cache_key_extract_it_once(tmp_path, umask):
    umask(0o002)  # a team's shared cache
    log, start = tmp_path / "extractions.txt", time.time() + 1.0
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(extract_once, [(str(tmp_path / "cache"), str(log), start)] * 4)
    assert len(log.read_text().splitlines()) == 1  # one process extracted; the others read its file
    assert all(r == list(map(float, range(12))) for r in results)
    cached = tmp_path / "cache" / "key.pt"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o664  # colleagues can reuse it
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


def sweep_overrides(out: Path, cache: Path) -> list[str]:
    return [f"sweep.output_dir={out}", f"cache_dir={cache}", f"data.path={SAMPLE}", "sweep.shots=[1]",
            "sweep.seeds=[1, 2]", "sweep.plots=false", "methods=[zeroshot, coop]", "train.epochs=2",
            "train.feature_passes=1"]


def sweep(out: Path, cache: Path, launch: LaunchOptions | None = None, report_only: bool = False):
    settings, base, run_overrides = load_sweep(QUICK, sweep_overrides(out, cache))
    runs = plan_runs(settings, base, run_overrides)
    return runs, run_sweep(settings, runs, report_only=report_only, launch=launch)


def results(out: Path) -> list[tuple]:
    with open(out / "results.csv", newline="") as f:
        return sorted(tuple(row[c] for c in RESULT_COLUMNS) for row in csv.DictReader(f))


def coop_context(run_folder: Path) -> torch.Tensor:
    return torch.load(run_folder / "coop" / "checkpoint.pt", weights_only=True)["state"]["prompts.ctx"]


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("serial")
    runs, _ = sweep(root / "sweep", root / "cache")
    return root / "sweep", runs


def task_folders(out: Path) -> list[Path]:
    """submitit's folder per submitted task (beside "%j", where it keeps what it submits)."""
    return [p for p in (out / "slurm").iterdir() if p.is_dir() and p.name != "%j"]


def assert_same_sweep(out: Path, serial: Path) -> None:
    assert results(out) == results(serial) and len(results(out)) == 2 * 2
    for seed in (1, 2):
        here, there = (base / "fashion_mnist_sample" / "1-shot" / f"seed-{seed}" for base in (out, serial))
        assert torch.equal(coop_context(here), coop_context(there))


@pytest.mark.slow
@pytest.mark.subprocess
def test_local_workers_equal_the_serial_sweep_and_a_failed_run_is_retried_then_reported(serial_sweep, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per run, as in the serial sweep: equal bit for bit
    serial, _ = serial_sweep
    out = tmp_path / "sweep"
    blocked = out / "fashion_mnist_sample" / "1-shot" / "seed-2"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the run folder should be")
    with pytest.raises(PromptlearnError, match=r"1 sweep run\(s\) failed twice.*seed 2.*cannot be written"):
        sweep(out, tmp_path / "cache", LaunchOptions(workers=2))
    assert len(results(out)) == 2  # the report is built from the run that finished
    console = (out / "logs" / "fashion_mnist_sample_1-shot_seed-2.txt").read_text()
    assert console.count("error: output folder") == 2  # tried twice

    blocked.unlink()
    runs, rows = sweep(out, tmp_path / "cache", LaunchOptions(workers=2))  # only the unfinished run runs
    assert len(rows) == 4 and all((run.folder / COMPLETE_MARKER).is_file() for run in runs)
    assert_same_sweep(out, serial)


@pytest.mark.slow
@pytest.mark.subprocess
def test_submitit_array_equals_the_serial_sweep_and_resubmits_only_unfinished_runs(serial_sweep, tmp_path,
                                                                                    monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    serial, _ = serial_sweep
    out = tmp_path / "sweep"
    array = LaunchOptions(launcher="slurm", cluster="local", wait=True, time_min=10, gpus_per_task=0,
                          cpus_per_task=1)
    runs, rows = sweep(out, tmp_path / "cache", array)
    assert len(rows) == 4 and len(task_folders(out)) == 2  # one task per run folder
    assert_same_sweep(out, serial)

    first = json.loads((out / "slurm" / "submitted.json").read_text())  # run folder -> task
    assert set(first) == {str(run.folder) for run in runs}
    (runs[0].folder / COMPLETE_MARKER).unlink()
    _, submitted = sweep(out, tmp_path / "cache", LaunchOptions(launcher="slurm", cluster="local", time_min=10,
                                                                gpus_per_task=0, cpus_per_task=1))
    assert submitted is None  # submitted, not waited for: no report yet
    _, rows = sweep(out, tmp_path / "cache", report_only=True)  # rerun until the resubmitted task is done
    deadline = time.time() + HANG_GUARD_S
    while len(rows) < 4 and time.time() < deadline:
        time.sleep(2)
        _, rows = sweep(out, tmp_path / "cache", report_only=True)
    assert len(task_folders(out)) == 3  # only the unfinished run was resubmitted
    assert_same_sweep(out, serial)
    record = json.loads((out / "slurm" / "submitted.json").read_text())
    assert set(record) == set(first) and record[str(runs[0].folder)] != first[str(runs[0].folder)]
    assert record[str(runs[1].folder)] == first[str(runs[1].folder)]


@pytest.mark.parametrize("state, resubmitted", [("PENDING", False), ("RUNNING", False), ("COMPLETED", True),
                                                ("FAILED", True), ("TIMEOUT", True), ("CANCELLED", True)])
def test_runs_still_queued_on_slurm_are_not_submitted_twice(monkeypatch, tmp_path, state, resubmitted):
    runs = [SimpleNamespace(folder=tmp_path / name) for name in ("a", "b")]
    states = {"7_0": state}
    monkeypatch.setattr(launch, "slurm_job_state", lambda folder, job_id: states[job_id])
    kept = launch.not_queued(runs, tmp_path, {str(runs[0].folder): "7_0"})  # b was never submitted
    assert kept == ([runs[0]] if resubmitted else []) + [runs[1]]


@pytest.mark.parametrize("options, message", [
    (LaunchOptions(workers=0), "--workers must be at least 1"),
    (LaunchOptions(devices="0,1", workers=2), "either --devices"),
    (LaunchOptions(launcher="slurm", workers=3), "with --launcher slurm use"),
    (LaunchOptions(launcher="slurm", time_min=0), "--time must be positive"),
])
def test_launch_option_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        check_options(options)


def test_local_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert launch.local_devices("all") == ["2", "3"]  # the GPUs this process may use, as it names them
    assert launch.local_devices(" 3, 2") == ["3", "2"]
    with pytest.raises(ConfigError, match="distinct GPU ids"):
        launch.local_devices("0,0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; on a CPU-only machine use --workers"):
        launch.local_devices("all")


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on the PATH for a cluster without GPUs: a job that asks for GPUs is refused as SLURM
    refuses it; any other is accepted as job 4242 and its batch file kept for the test to read."""
    pytest.importorskip("submitit")
    bin_dir, kept = tmp_path / "bin", tmp_path / "accepted.sh"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\n"
                      'if grep -q -- "--gpus" "$1"; then\n'
                      '  echo "sbatch: error: Batch job submission failed: Invalid generic resource (gres) '
                      'specification" >&2; exit 1\n'
                      "fi\n"
                      f'cp "$1" "{kept}"; echo "Submitted batch job 4242"\n')
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; the batch file would call it
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return kept


def submit_sweep(tmp_path, capsys, *flags: str) -> tuple[int, str, str]:
    """`promptlearn sweep --launcher slurm` on the CPU sample sweep, in this process: exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as stop:
        entry(["sweep", "--config", str(QUICK), "--launcher", "slurm", *flags,
               *sweep_overrides(tmp_path / "sweep", tmp_path / "cache")])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_slurm_submission_of_a_cpu_sweep_asks_for_no_gpu_and_says_what_it_submitted(tmp_path, capsys, fake_sbatch):
    code, out, err = submit_sweep(tmp_path, capsys)
    assert code == 0, err
    batch = fake_sbatch.read_text()
    assert "--gpus" not in batch and "#SBATCH --array=0-1" in batch  # backbone.device=cpu: no GPU asked for
    assert "submitted 2 run(s) as SLURM job array 4242 (tasks 4242_0 to 4242_1;" in out
    assert f"logs in {tmp_path / 'sweep' / 'slurm'}/" in out
    assert "squeue -j 4242" in out and "--report-only" in out  # printed without -v: what to do next
    record = json.loads((tmp_path / "sweep" / "slurm" / "submitted.json").read_text())
    assert sorted(record.values()) == ["4242_0", "4242_1"]


def test_a_refused_slurm_submission_is_one_line_and_leaves_no_files(tmp_path, capsys, fake_sbatch):
    code, out, err = submit_sweep(tmp_path, capsys, "--gpus-per-task", "1")
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --launcher slurm: the job array was not submitted: "
                                                     "sbatch: error: Batch job submission failed: Invalid generic "
                                                     "resource (gres) specification; the job asked for 1 GPU(s)")
    assert "--gpus-per-task 0" in errors[0] and "submitted" not in out
    assert not (tmp_path / "sweep" / "slurm").exists()  # no pickles or batch files left behind


@pytest.mark.parametrize("devices, asked, gpus", [(["cpu", "cpu"], None, 0), (["auto", "cpu"], None, 1),
                                                  (["cuda:1"], None, 1), (["cpu"], 2, 2), (["cuda"], 0, 0)])
def test_slurm_gpus_per_task_follow_the_sweeps_device_unless_given(devices, asked, gpus):
    runs = [SimpleNamespace(cfg=SimpleNamespace(backbone=SimpleNamespace(device=d))) for d in devices]
    assert launch.task_gpus(runs, LaunchOptions(launcher="slurm", gpus_per_task=asked)) == gpus


def test_a_refused_submission_leaves_the_logs_of_running_tasks_alone(tmp_path):
    """Undoing a failed submission removes what it made, never a task of an earlier array writing its log."""
    from promptlearn.launch import remove_new_files

    folder = tmp_path / "slurm"
    (folder / "41_0").mkdir(parents=True)
    before = set(folder.rglob("*"))
    (folder / "41_0" / "41_0_0_log.out").write_text("running")  # an earlier task, logging meanwhile
    (folder / "41_1").mkdir()
    (folder / "41_1" / "41_1_0_log.err").write_text("started meanwhile")
    (folder / "submission_file_abc.sh").write_text("#!/bin/bash")  # this submission's
    (folder / "abc").mkdir()
    (folder / "abc" / "abc_submitted.pkl").write_bytes(b"x")
    remove_new_files(folder, before)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "41_0", "41_0/41_0_0_log.out", "41_1", "41_1/41_1_0_log.err"]
