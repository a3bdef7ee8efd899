"""The `promptlearn` command, the tools/ shims, a plug-in method from outside the package, and the wheel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUICKSTART, REPO

from promptlearn.commands import main
from promptlearn.data import DATASETS
from promptlearn.errors import ConfigError
from promptlearn.methods import METHODS

SAMPLE = REPO / "datasets" / "fashion_mnist_sample"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def quickstart_args(out: Path) -> list[str]:
    """The README's quickstart, runnable from any folder: its data and output named absolutely."""
    return ["train", "--config", str(QUICKSTART), f"data.path={SAMPLE}", f"output_dir={out}", "cache_dir=none",
            "--epochs", "3"]


def test_list_methods_and_datasets(capsys):
    main(["list", "methods", "--wide"])
    methods = capsys.readouterr().out
    assert all(f"\n{name} " in methods for name in METHODS)
    assert "eval from checkpoint" in methods.split("\ncoop ")[1].splitlines()[0]
    main(["list", "datasets", "--wide"])
    datasets = capsys.readouterr().out
    dtd = next(line for line in datasets.splitlines() if line.startswith("dtd "))
    assert "{} texture." in dtd and "dtd/images/" in dtd
    assert sum(line.split(" ")[0] in DATASETS for line in datasets.splitlines()) == len(DATASETS)


def test_list_protocols(capsys):
    main(["list", "protocols", "--wide"])
    protocols = capsys.readouterr().out
    assert "base2novel" in protocols and "ceil(n/2)" in protocols
    assert "imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r" in protocols.split("domain_generalization")[1]


def test_list_models_shows_widths_and_tags(capsys):
    main(["list", "models", "--filter", "RN50", "--parameters"])
    rn50 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("RN50 "))
    assert "1024" in rn50 and "openai" in rn50 and " 102." in rn50  # RN50 CLIP: 102.0M parameters


def test_promptlearn_help_imports_neither_torch_nor_the_registries():
    code = ("import sys; from promptlearn.commands import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'open_clip', 'sklearn', 'promptlearn.methods') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    usage, imported = proc.stdout.rstrip().rsplit("\n", 1)
    assert "promptlearn COMMAND" in usage and imported == "[]"


def test_list_models_fits_a_terminal_unless_wide(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # what a listing fills where stdout is not a terminal
    main(["list", "models"])
    listed = capsys.readouterr().out.splitlines()
    assert max(map(len, listed)) <= 100
    rn50 = listed.index(next(line for line in listed if line.startswith("RN50 ")))
    assert "yfcc15m" in " ".join(listed[rn50:rn50 + 3])  # its tags wrapped below it, none dropped
    main(["list", "models", "--wide"])
    wide = capsys.readouterr().out.splitlines()
    assert max(map(len, wide)) > 100 and "yfcc15m" in next(line for line in wide if line.startswith("RN50 "))


def test_unknown_command_names_the_nearest():
    with pytest.raises(ConfigError, match="unknown command 'trian'; did you mean 'train'"):
        main(["trian"])


@pytest.mark.subprocess
def test_console_entry_and_shims_give_one_error_line(tmp_path):
    for command in (["-m", "promptlearn", "train"], [str(REPO / "tools" / "train_coop.py")]):
        proc = subprocess.run([sys.executable, *command, "--config", str(QUICKSTART), "methods=[coop,foo]"],
                              capture_output=True, text=True, cwd=tmp_path, env=ENV)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown method 'foo'")


@pytest.mark.subprocess
def test_a_method_from_outside_the_package_runs_without_touching_promptlearn(tmp_path):
    """The docs' example: one module, one config section; the runner, trainer and CLI are unchanged."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nearest_prototype; "
            "from promptlearn.commands import entry; entry(sys.argv[2:])")
    args = quickstart_args(tmp_path / "run") + ["methods=[zeroshot,nearest_prototype]", "nearest_prototype.weight=1"]
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "docs" / "examples"), *args],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["nearest_prototype"]["shots_used"] == 160  # 16 shots x 10 classes
    assert metrics["nearest_prototype"]["accuracy"] != metrics["zeroshot"]["accuracy"]
    bad = subprocess.run([sys.executable, "-c", code, str(REPO / "docs" / "examples"), *args[:-1],
                          "nearest_prototype.weight=2"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "nearest_prototype.weight must be in [0, 1], got 2.0" in bad.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_built_wheel_runs_the_quickstart_like_the_clone(tmp_path):
    """A wheel holds everything a run needs (dataset facts, model configs, the console script): installed
    apart from the clone and run from another folder, it gives the clone's results."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, env=ENV)
    wheel = next(wheels.glob("promptlearn-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, env=ENV)
    recipes = sorted(p.name for p in (target / "promptlearn" / "recipes").glob("*.yaml"))
    assert recipes == sorted(p.name for p in (REPO / "promptlearn" / "recipes").glob("*.yaml"))  # package data
    entry_points = next(target.glob("promptlearn-*.dist-info")) / "entry_points.txt"
    assert "promptlearn = promptlearn.commands:entry" in entry_points.read_text()
    where = tmp_path / "elsewhere"
    where.mkdir()
    installed = subprocess.run([sys.executable, "-m", "promptlearn", *quickstart_args(tmp_path / "wheel-run")],
                               capture_output=True, text=True, cwd=where, env={**ENV, "PYTHONPATH": str(target)})
    assert installed.returncode == 0, installed.stderr[-3000:]
    code = ("import promptlearn; from promptlearn.config import load_config; from promptlearn.data import "
            "dataset_templates as t; print(promptlearn.__file__); print(t(load_config([], ['data.name=dtd']).data))")
    which = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=where,
                           env={**ENV, "PYTHONPATH": str(target)})
    path, templates = which.stdout.strip().splitlines()
    assert path.startswith(str(target)) and templates == "['{} texture.']"  # the wheel's copy, with its facts
    clone = subprocess.run([sys.executable, "-m", "promptlearn", *quickstart_args(tmp_path / "clone-run")],
                           capture_output=True, text=True, cwd=REPO, env=ENV)
    assert clone.returncode == 0, clone.stderr[-3000:]
    ran = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("wheel-run", "clone-run")]
    for method in ran[0]:
        assert ran[0][method]["accuracy"] == ran[1][method]["accuracy"], method
        assert ran[0][method]["macro_f1"] == ran[1][method]["macro_f1"], method


@pytest.mark.subprocess
def test_a_reader_that_goes_away_ends_a_listing_quietly():
    """`promptlearn list models | head -1`: the closed pipe stops the listing without a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "promptlearn", "list", "models", "--wide"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err
