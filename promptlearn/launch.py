"""Running a sweep's runs beyond one process, on existing engines: side by side in local processes
(`concurrent.futures`, one process per run, pinned to its GPU) or as a SLURM job array (`submitit`).
Each run is one (dataset, shots, seed) folder; a run folder is the unit that is skipped when finished,
retried once when it fails, and resumed when it was interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from promptlearn.config import RunConfig
from promptlearn.errors import ConfigError, PromptlearnError, RunBusy
from promptlearn.io import atomic_write_json
from promptlearn.progress import progress
from promptlearn.runner import run_experiment

log = logging.getLogger("promptlearn")

LAUNCHERS = ("local", "slurm")
ATTEMPTS = 2  # a failed run is retried once, then reported
SUBMITTED_RECORD = "submitted.json"  # run folder -> the SLURM task it was last submitted as
# SLURM states of a task that may still finish its run: such runs are not submitted again
QUEUED_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
                 "SUSPENDED"}


class SweepRun(Protocol):
    """What this module needs of a sweep's run (a promptlearn.sweep.PlannedRun)."""

    dataset: str
    shots: int
    seed: int
    cfg: RunConfig

    @property
    def folder(self) -> Path: ...


@dataclass
class Busy:
    """A worker's answer for a run folder that another process holds: left for a later sweep, not retried."""
    message: str


@dataclass
class LaunchOptions:
    devices: str | None = None  # "0,1,3" or "all": one run per GPU at a time
    workers: int = 1  # runs side by side without GPUs (CPU-only machines)
    launcher: str = "local"  # local | slurm
    partition: str | None = None  # SLURM: partition
    time_min: int = 240  # SLURM: time limit of one task, minutes
    gpus_per_task: int | None = None  # SLURM; None: 1 if the runs' backbone.device may use a GPU, else 0
    cpus_per_task: int = 8  # SLURM
    array_parallelism: int = 64  # SLURM: tasks of the array running at once
    wait: bool = False  # SLURM: wait for the array, then build the report
    cluster: str = "slurm"  # submitit's cluster; "local" runs the array on this machine (tests)

    @property
    def parallel(self) -> bool:
        return self.launcher == "slurm" or self.devices is not None or self.workers > 1


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose where a sweep's runs execute (reusable by any sweep command)."""
    group = parser.add_argument_group("where the runs execute")
    group.add_argument("--devices", metavar="0,1,..|all",
                       help="run on these local GPUs, one run per GPU at a time, each in its own process")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="without GPUs: N runs side by side, each in its own process (default 1: in this process)")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="slurm: submit the unfinished runs as a SLURM job array (pip install 'promptlearn[slurm]')")
    group.add_argument("--partition", metavar="NAME", help="SLURM partition")
    group.add_argument("--time", type=int, default=240, metavar="MINUTES", help="SLURM time limit per run")
    group.add_argument("--gpus-per-task", type=int, metavar="N",
                       help="SLURM GPUs per run (default: 0 when the sweep's backbone.device is cpu, else 1)")
    group.add_argument("--cpus-per-task", type=int, default=8, metavar="N", help="SLURM CPU cores per run")
    group.add_argument("--array-parallelism", type=int, default=64, metavar="N",
                       help="SLURM: array tasks running at once")
    group.add_argument("--wait", action="store_true",
                       help="SLURM: wait for the array to finish, then build the report")


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    options = LaunchOptions(devices=args.devices, workers=args.workers, launcher=args.launcher,
                            partition=args.partition, time_min=args.time, gpus_per_task=args.gpus_per_task,
                            cpus_per_task=args.cpus_per_task, array_parallelism=args.array_parallelism,
                            wait=args.wait)
    check_options(options)
    return options


def check_options(options: LaunchOptions) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(options.launcher in LAUNCHERS, f"--launcher must be one of {', '.join(LAUNCHERS)}, got {options.launcher!r}")
    need(options.workers >= 1, f"--workers must be at least 1, got {options.workers}")
    need(options.devices is None or options.workers == 1,
         "give either --devices (one run per GPU) or --workers (runs side by side on the CPU), not both")
    if options.launcher == "slurm":
        need(options.devices is None and options.workers == 1,
             "--devices and --workers are for local runs; with --launcher slurm use --gpus-per-task and "
             "--array-parallelism")
        for name in ("time_min", "gpus_per_task", "cpus_per_task", "array_parallelism"):
            flag = "--" + name.removesuffix("_min").replace("_", "-")
            need(getattr(options, name) is None or getattr(options, name) >= (0 if name == "gpus_per_task" else 1),
                 f"{flag} must be {'0 or more' if name == 'gpus_per_task' else 'positive'}, "
                 f"got {getattr(options, name)}")


def local_devices(setting: str) -> list[str]:
    """GPU ids as CUDA_VISIBLE_DEVICES names them; "all" is every GPU this process may use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if setting.strip().lower() == "all":
        if visible is not None:
            devices = [d.strip() for d in visible.split(",") if d.strip()]
        else:
            devices = [str(i) for i in range(torch.cuda.device_count())]
        if not devices:
            raise ConfigError("--devices all: no CUDA GPU is visible; on a CPU-only machine use --workers N")
        return devices
    devices = [d.strip() for d in setting.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices):
        raise ConfigError(f"--devices {setting!r}: give distinct GPU ids such as 0,1,2,3, or all")
    if visible is None and not torch.cuda.is_available():
        raise ConfigError(f"--devices {setting}: no CUDA GPU is available; on a CPU-only machine use --workers N")
    return devices


# ----------------------------------------------------------------------------- local processes

def run_pinned(cfg: RunConfig, device: str | None, threads: int, console: str) -> str | Busy | None:
    """One run in a fresh worker process: pinned to its GPU, its console output in a file. Returns
    None when it finished, Busy when another process holds its folder, else the error (a line, or the
    traceback of an unexpected exception)."""
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(fd, 1)  # progress bars of runs side by side would garble the terminal
    os.dup2(fd, 2)
    os.close(fd)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # before anything initialises CUDA in this process
        cfg.backbone.device = "cuda"
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        run_experiment(cfg, resume=True)
    except RunBusy as e:
        print(f"left: {e}", flush=True)
        return Busy(str(e))
    except PromptlearnError as e:
        print(f"error: {e}", flush=True)
        return str(e)
    except BaseException as e:  # reported with its traceback in the console file; the sweep carries on
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"
    return None


def console_file(run: SweepRun, output_dir: Path) -> Path:
    """Where a run's console output goes (outside its run folder, which only the run itself creates)."""
    return output_dir / "logs" / f"{run.dataset}_{run.shots}-shot_seed-{run.seed}.txt"


def run_local(todo: list[SweepRun], options: LaunchOptions,
              output_dir: Path) -> tuple[list[tuple[SweepRun, str]], list[SweepRun]]:
    """Run `todo` in worker processes, one run per free slot (a GPU, or a CPU worker); each run in a
    fresh process. A failed run is retried once; returns the runs that failed twice, with the error,
    and the runs left because another process holds their folder."""
    slots: list[str | None] = [None] * options.workers  # None: a CPU worker
    if options.devices is not None:
        slots = list(local_devices(options.devices))
    threads = torch.get_num_threads()
    if options.devices is None and "OMP_NUM_THREADS" not in os.environ:  # share the cores between the workers
        threads = max(1, (os.cpu_count() or 1) // options.workers)
    queue, attempts, failed, busy = list(todo), {id(run): 0 for run in todo}, [], []
    free = list(range(len(slots)))
    running: dict = {}  # future -> (run, slot, its executor, start time)
    # each run gets a fresh one-process executor: no CUDA or thread state inherited (spawn), pinned
    # to its own GPU, and a process that dies takes no other run down with it
    context = multiprocessing.get_context("spawn")
    with progress(total=len(todo), desc="sweep", unit="run") as bar:
        try:
            while queue or running:
                while queue and free:
                    run, slot = queue.pop(0), free.pop(0)
                    attempts[id(run)] += 1
                    console = console_file(run, output_dir)
                    console.parent.mkdir(parents=True, exist_ok=True)
                    executor = ProcessPoolExecutor(max_workers=1, mp_context=context)
                    future = executor.submit(run_pinned, run.cfg, slots[slot], threads, str(console))
                    running[future] = (run, slot, executor, time.perf_counter())
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    run, slot, executor, began = running.pop(future)
                    executor.shutdown()
                    free.append(slot)
                    try:
                        error = future.result()
                    except BrokenProcessPool:
                        error = "its process died (killed, or out of memory?)"
                    where = f" on GPU {slots[slot]}" if slots[slot] is not None else ""
                    label = f"{run.dataset}, {run.shots} shots, seed {run.seed}"
                    if error is None:
                        bar.write(f"finished {label}{where} in {time.perf_counter() - began:.0f} s -> {run.folder}")
                        bar.update(1)
                    elif isinstance(error, Busy):
                        bar.write(f"left {label}: another process is using {run.folder}")
                        busy.append(run)
                        bar.update(1)
                    elif attempts[id(run)] < ATTEMPTS:
                        bar.write(f"failed {label}{where}: {error.splitlines()[0]}; retrying once")
                        queue.append(run)
                    else:
                        bar.write(f"failed {label}{where} twice: {error.splitlines()[0]} "
                                  f"(see {console_file(run, output_dir)})")
                        failed.append((run, error))
                        bar.update(1)
        finally:  # Ctrl-C: stop the runs under way (each saves its checkpoint) before returning
            for _, _, executor, _ in running.values():
                executor.shutdown(wait=True, cancel_futures=True)
    return failed, busy


# ----------------------------------------------------------------------------- SLURM (submitit)

def run_task(cfg: RunConfig) -> str:
    """One array task: one run folder, resumed if an earlier task was interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_experiment(cfg, resume=True)
    return cfg.output_dir


def task_gpus(todo: list[SweepRun], options: LaunchOptions) -> int:
    """GPUs per array task: as asked, else what the runs' backbone.device uses (a run uses one device)."""
    on_cpu = all(run.cfg.backbone.device == "cpu" for run in todo)
    if options.gpus_per_task is None:
        return 0 if on_cpu else 1
    if options.gpus_per_task and on_cpu:
        log.warning("--gpus-per-task %d, but the sweep's backbone.device is cpu: the runs will not use the GPUs",
                    options.gpus_per_task)
    return options.gpus_per_task


def slurm_executor(folder: Path, options: LaunchOptions, gpus: int):
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install 'promptlearn[slurm]'") from None
    if options.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: sbatch is not found; submit from a machine of the SLURM cluster "
                          "(a login node), or use --devices / --workers on this machine")
    executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
    executor.update_parameters(name="promptlearn-sweep", timeout_min=options.time_min, nodes=1, tasks_per_node=1,
                               cpus_per_task=options.cpus_per_task, slurm_array_parallelism=options.array_parallelism)
    if gpus:  # no GPU option at all without GPUs: a cluster without GPU resources refuses even a count of 0
        executor.update_parameters(gpus_per_node=gpus)
    if options.partition:
        executor.update_parameters(slurm_partition=options.partition)
    return executor


def submission_error(error: Exception, gpus: int) -> ConfigError:
    """One line for a failed submission: sbatch's own error line (submitit passes on its whole stderr)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
    said = said or type(error).__name__
    advice = ("check --partition, --time, --gpus-per-task and --cpus-per-task against the cluster (sinfo shows "
              "its partitions and resources)")
    if "gres" in said.lower() or "gpu" in said.lower():
        advice = (f"the job asked for {gpus} GPU(s) per run; on a cluster (or partition) without GPUs use "
                  "--gpus-per-task 0 with backbone.device=cpu, else choose a --partition that has GPUs")
    return ConfigError(f"--launcher slurm: the job array was not submitted: {said}; {advice}")


def slurm_job_state(folder: Path, job_id: str) -> str:
    """SLURM's state of a submitted task (sacct), e.g. PENDING, RUNNING, COMPLETED."""
    import submitit

    state = submitit.SlurmJob(folder=folder / "%j", job_id=job_id).state
    return state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 1234" -> "CANCELLED"


def not_queued(todo: list[SweepRun], folder: Path, record: dict[str, str]) -> list[SweepRun]:
    """The runs of `todo` whose last task (if any) has ended; the others may still finish on their own."""
    queued = [run for run in todo if str(run.folder) in record
              and slurm_job_state(folder, record[str(run.folder)]) in QUEUED_STATES]
    if queued:
        print(f"{len(queued)} unfinished run(s) are still queued or running (e.g. {queued[0].folder} as job "
              f"{record[str(queued[0].folder)]}); not submitted again. When they have finished, run the same "
              "command with --report-only to build the report.")
    return [run for run in todo if run not in queued]


JOB_FOLDER = re.compile(r"\d+(_\d+)?")  # slurm/<job id>/: a task's logs


def submit_array(todo: list[SweepRun], options: LaunchOptions, output_dir: Path) -> tuple[list[SweepRun], list]:
    """Submit one array task per unfinished run that is not already queued or running; returns those
    runs and their jobs, and says on the console what was submitted and what to do next. The jobs'
    logs go to `<output_dir>/slurm/`, which also records which task each run folder was last submitted
    as. A failed submission is one ConfigError and leaves no files behind."""
    folder, record_path = output_dir / "slurm", output_dir / "slurm" / SUBMITTED_RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    gpus = task_gpus(todo, options)
    before = set(folder.rglob("*")) if folder.exists() else None
    try:
        executor = slurm_executor(folder / "%j", options, gpus)
        if options.cluster == "slurm":  # submitit's local executor cannot look up jobs of an earlier process
            todo = not_queued(todo, folder, record)
        said = io.StringIO()
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr, then raises it on failure
            jobs = executor.map_array(run_task, [run.cfg for run in todo]) if todo else []
    except PromptlearnError:
        remove_new_files(folder, before)
        raise
    except Exception as e:  # submitit and sbatch failures: their message, not their traceback
        remove_new_files(folder, before)
        raise submission_error(e, gpus) from None
    if said.getvalue().strip():  # a submission that worked: sbatch's warnings still reach the user
        print(said.getvalue().rstrip(), file=sys.stderr)
    if jobs:
        record.update({str(run.folder): job.job_id for run, job in zip(todo, jobs)})
        atomic_write_json(record_path, record)
        array = jobs[0].job_id.split("_")[0]
        tasks = jobs[0].job_id if len(jobs) == 1 else f"{jobs[0].job_id} to {jobs[-1].job_id}"
        print(f"submitted {len(jobs)} run(s) as SLURM job array {array} (tasks {tasks}; {gpus} GPU(s), "
              f"{options.cpus_per_task} CPU(s), {options.time_min} min per run); logs in {folder}/")
        if not options.wait:
            print(f"follow them with: squeue -j {array}. When they have finished, run the same command with "
                  "--report-only to build the report (or without it to resubmit the runs that did not finish).")
    return todo, jobs


def remove_new_files(folder: Path, before: set[Path] | None) -> None:
    """Undo a failed submission: what it created under `folder` (pickles, the sbatch file), deepest first. A
    job's own folder (named by its id) belongs to a task of an earlier submission that may be writing its log
    now: it is left alone, and so is whatever cannot be removed."""
    if not folder.exists():
        return
    new = [path for path in set(folder.rglob("*")) - (before or set())
           if not JOB_FOLDER.fullmatch(path.relative_to(folder).parts[0])]
    for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
    if before is None:
        with contextlib.suppress(OSError):
            folder.rmdir()


def wait_for_array(todo: list[SweepRun], jobs: list) -> list[tuple[SweepRun, str]]:
    """Wait for every task; the runs whose task failed, with the error."""
    failed = []
    for run, job in progress(list(zip(todo, jobs)), desc="sweep (SLURM array)", unit="run"):
        try:
            job.result()
        except Exception as e:  # submitit re-raises the task's error with its traceback
            lines = [line for line in str(e).splitlines() if line.strip()]
            failed.append((run, lines[-1] if lines else type(e).__name__))
    return failed


def execute(todo: list[SweepRun], options: LaunchOptions, output_dir: Path) -> tuple[list, list, bool]:
    """Run or submit `todo`. Returns the runs that failed (with errors), the runs left because another
    process holds their folder, and whether they have all ended (False: submitted to SLURM and not
    waited for)."""
    check_options(options)
    if not todo:
        return [], [], True
    if options.launcher == "slurm":
        todo, jobs = submit_array(todo, options, output_dir)
        if not options.wait:
            return [], [], False
        return wait_for_array(todo, jobs), [], True
    return *run_local(todo, options, output_dir), True
