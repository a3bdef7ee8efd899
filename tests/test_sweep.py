"""Sweeps: the tool on the embedded sample writes the CSV, summary and plots; reruns skip finished runs,
resume unfinished ones and refuse folders made with other settings; the statistics; the shipped configs."""
import csv
import os
import subprocess
import sys

import pytest
from helpers import REPO, SAMPLE

from promptlearn import sweep as sweep_module
from promptlearn.commands import entry
from promptlearn.data import DATASETS
from promptlearn.errors import ConfigError, DataError
from promptlearn.io import RunLock
from promptlearn.runner import COMPLETE_MARKER
from promptlearn.sweep import CSV_COLUMNS, average_curve, curve_table, dataset_curves, load_sweep, plan_runs, run_sweep

QUICK = REPO / "configs" / "sweeps" / "quick_sample.yaml"
FULL = REPO / "configs" / "sweeps" / "coop_11_datasets_rn50.yaml"
ALL_METHODS = ["zeroshot", "linear_probe", "coop", "coop_csc", "clip_adapter", "tip_adapter", "tip_adapter_f"]


def small_sweep(tmp_path, *extra):
    return [f"sweep.output_dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}", f"data.path={SAMPLE}",
            "sweep.shots=[1, 2]", "sweep.seeds=[1, 2]", "methods=[zeroshot, tip_adapter, coop]", "train.epochs=2",
            "train.feature_passes=1", "tip_adapter.beta_steps=5", *extra]


def sweep_again(overrides, report_only=False):
    sweep, base, run_overrides = load_sweep(QUICK, overrides)
    return run_sweep(sweep, plan_runs(sweep, base, run_overrides), report_only=report_only)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CountedRuns:
    def __init__(self, monkeypatch):
        self.calls, self.real = [], sweep_module.run_experiment
        monkeypatch.setattr(sweep_module, "run_experiment", self)

    def __call__(self, cfg, resume=False):
        self.calls.append((cfg.output_dir, resume))
        return self.real(cfg, resume=resume)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sweep_tool_writes_csv_summary_and_plots_then_skips_and_resumes(tmp_path, monkeypatch):
    overrides = small_sweep(tmp_path)
    proc = subprocess.run([sys.executable, "tools/sweep.py", "--config", str(QUICK), *overrides], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sweep"
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 3 * 2 * 2
    assert {(r["method"], r["shots"], r["seed"]) for r in rows} == {
        (m, k, s) for m in ("zeroshot", "tip_adapter", "coop") for k in ("1", "2") for s in ("1", "2")}
    assert {r["dataset"] for r in rows} == {"fashion_mnist_sample"} and rows[0]["backbone"] == "tiny-clip"
    summary = (out / "summary.md").read_text()
    assert "## Average over 1 dataset" in summary and "## fashion_mnist_sample" in summary
    assert "| tip_adapter | " in summary and " ± " in summary and "| 1 shot | 2 shots |" in summary
    assert "Average over 1 dataset" in proc.stdout
    for name in ("accuracy_average.png", "accuracy_fashion_mnist_sample.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    runs = CountedRuns(monkeypatch)
    sweep_again(overrides)  # everything finished: nothing runs
    assert runs.calls == []
    unfinished = out / "fashion_mnist_sample" / "2-shot" / "seed-1"
    (unfinished / COMPLETE_MARKER).unlink()
    assert len(sweep_again(overrides, report_only=True)) == 3 * 3  # left out of the report, not run
    assert runs.calls == []
    sweep_again(overrides)
    assert runs.calls == [(str(unfinished), True)]
    # a method added to the sweep: every run resumes (finished methods reload their final checkpoints)
    rows = sweep_again(small_sweep(tmp_path, "methods=[zeroshot, tip_adapter, coop, clip_adapter]"))
    assert len(runs.calls) == 1 + 4 and all(resume for _, resume in runs.calls)
    assert len(rows) == 4 * 2 * 2 and len(read_csv(out / "results.csv")) == 16
    with pytest.raises(ConfigError, match=r"4 run folder\(s\) hold runs made with other settings.*train.lr"):
        sweep_again(small_sweep(tmp_path, "train.lr=0.01"))


def test_statistics_and_tables():
    def row(dataset, method, shots, seed, acc):
        return {"dataset": dataset, "method": method, "shots": shots, "seed": seed, "accuracy": acc}

    rows = [row("a", "m", 1, 1, 50.0), row("a", "m", 1, 2, 52.0), row("b", "m", 1, 1, 70.0),
            row("b", "m", 1, 2, 74.0), row("a", "m", 2, 1, 60.0), row("a", "m", 2, 3, 61.0), row("b", "m", 2, 1, 80.0)]
    curves = dataset_curves(rows)
    assert curves["a"][("m", 1)] == (51.0, pytest.approx(2 ** 0.5), 2)
    assert curves["b"][("m", 2)] == (80.0, 0.0, 1)
    average = average_curve(rows, ["a", "b"])
    assert average[("m", 1)] == (61.5, pytest.approx(1.5 * 2 ** 0.5), 2)  # per seed (50+70)/2, (52+74)/2
    assert average[("m", 2)] == (70.0, 0.0, 1)  # only seed 1 has both datasets
    table = curve_table(curves["a"], ["m", "absent"], [1, 2, 4])
    assert "| m | 51.00 ± 1.41 | 60.50 ± 0.71 | – |" in table and "absent" not in table


def test_sweep_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'sweep.seed'; did you mean 'sweep.seeds'"):
        load_sweep(QUICK, ["sweep.seed=[1]"])
    with pytest.raises(ConfigError, match="data.shots is set by the sweep for each run; use sweep.shots"):
        load_sweep(QUICK, ["data.shots=4"])
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_sweep(QUICK, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="sweep.shots lists a value twice"):
        load_sweep(QUICK, ["sweep.shots=[1, 1]"])
    plain = tmp_path / "plain.yaml"
    plain.write_text("methods: [coop]\n")
    with pytest.raises(ConfigError, match="needs a `sweep:` section"):
        load_sweep(plain)


def test_missing_dataset_stops_the_sweep_before_any_run(tmp_path):
    sweep, base, run_overrides = load_sweep(FULL, [f"data.root={tmp_path / 'nowhere'}", "sweep.datasets=[dtd]"])
    with pytest.raises(DataError):
        plan_runs(sweep, base, run_overrides)


def test_shipped_sweep_configs():
    sweep, base, _ = load_sweep(FULL)
    assert sweep.shots == [1, 2, 4, 8, 16] and sweep.seeds == [1, 2, 3] and len(sweep.datasets) == 11
    assert all(name in DATASETS for name in sweep.datasets)  # each a registered dataset, template included
    assert (base.backbone.model, base.backbone.pretrained, base.methods) == ("RN50", "openai", ALL_METHODS)
    assert base.train.epochs is None  # the protocol's epochs per shot count
    quick, quick_base, _ = load_sweep(QUICK)
    assert quick.shots == [1, 2, 4, 8, 16] and quick.seeds == [1, 2, 3] and quick_base.methods == ALL_METHODS
    assert (quick_base.backbone.model, quick_base.backbone.pretrained) == ("tiny-clip", "none")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sweep_leaves_runs_another_process_is_using_and_does_the_free_ones(tmp_path, capsys, monkeypatch,
                                                                             workers):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = small_sweep(tmp_path, "sweep.shots=[1]", "methods=[zeroshot]", "sweep.plots=false")
    out = tmp_path / "sweep" / "fashion_mnist_sample" / "1-shot"
    (out / "seed-1").mkdir(parents=True)
    command = ["sweep", "--config", str(QUICK), "--workers", str(workers), *overrides]
    with RunLock(out / "seed-1"):  # another sweep is running seed 1 (flock: a second open of .lock is refused)
        with pytest.raises(SystemExit) as stop:
            entry(command)
    err = capsys.readouterr().err
    assert stop.value.code == 3, err  # the report is built, but not everything was done
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "1 of 2 sweep run(s) were left because another promptlearn process is using" in errors[0]
    assert f"seed 1 ({out / 'seed-1'})" in errors[0] and "again once those processes have ended" in errors[0]
    assert (out / "seed-2" / COMPLETE_MARKER).is_file() and not (out / "seed-1" / COMPLETE_MARKER).exists()
    assert [r["seed"] for r in read_csv(tmp_path / "sweep" / "results.csv")] == ["2"]

    with pytest.raises(SystemExit) as stop:  # the other process has ended: the left run is done now
        entry(command)
    assert stop.value.code == 0 and (out / "seed-1" / COMPLETE_MARKER).is_file()


def test_a_run_folder_config_with_mapping_aliases_is_refused_unexpanded(tmp_path):
    """A run folder's saved config.yaml is read as a config file is: a mapping alias is one line, not billions of keys."""
    sweep, base, run_overrides = load_sweep(QUICK, small_sweep(tmp_path))
    run = plan_runs(sweep, base, run_overrides)[0]
    run.folder.mkdir(parents=True)
    levels = ["l0: &l0 {x: 1}", *(f"l{i}: &l{i} {{a: *l{i - 1}, b: *l{i - 1}}}" for i in range(1, 16))]
    (run.folder / "config.yaml").write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=r"config.yaml, line 2: \*l0 repeats a mapping"):
        sweep_module.setup_changes(run)
