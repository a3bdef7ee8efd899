"""A new user's first hour and a hostile tester's: every setting checked before work starts, data kept
inside its folder, caches that notice changed files, checkpoints that are refused alike when unusable,
a quiet console with a full log.txt, and the README's quickstart output kept true."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from fixtures_data import make_oxford_pets, write_class_folders, write_lines
from helpers import QUICKSTART, REPO, quick_config

from promptlearn.checkpoint import FORMAT, DamagedCheckpoint, check_meta, load_checkpoint, save_checkpoint
from promptlearn.cli import setup_logging
from promptlearn.commands import main as promptlearn_main
from promptlearn.config import load_config
from promptlearn.data import build_dataset
from promptlearn.data.base import Item
from promptlearn.data.coop_readers import read_split_file
from promptlearn.errors import CheckpointError, ConfigError, DataError
from promptlearn.evaluation import evaluate
from promptlearn.features import STALE_TEMP_SECONDS, FeatureCache, SplitFeatures
from promptlearn.runner import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_COOP = REPO / "tools" / "train_coop.py"


def tool(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(TRAIN_COOP), *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=1800)  # a hang guard only


# ----------------------------------------------------------------------------- checked before anything loads

def test_every_problem_seen_without_data_is_listed_before_anything_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = quick_config(tmp_path, "data.path=/no/such/data", "backbone.model=tiny-clp",
                       f"cache_dir={blocker / 'cache'}", f"output_dir={blocker / 'out'}")
    with pytest.raises(ConfigError) as refused:  # the missing data is never reached
        run_experiment(cfg)
    message = str(refused.value)
    assert message.startswith("3 problems: ")
    assert "unknown open_clip model 'tiny-clp'; did you mean 'tiny-clip'" in message
    assert re.search(r"output folder \S+/a-file/out cannot be written", message)
    assert re.search(r"feature cache folder \S+/a-file/cache \(cache_dir\) cannot be written .*cache_dir=none", message)


def test_unknown_weights_tag_is_refused_before_anything_loads(tmp_path):
    cfg = quick_config(tmp_path, "data.path=/no/such/data", "backbone.model=RN50", "backbone.pretrained=opneai")
    with pytest.raises(ConfigError, match=r"'opneai' is not an open_clip pretrained tag for RN50. Known tags: openai"):
        run_experiment(cfg)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.subprocess
@pytest.mark.parametrize("offline", [{"HF_ENDPOINT": "closed port"}, {"HF_HUB_OFFLINE": "1"}])
def test_the_default_weights_without_a_hub_are_one_error_line_and_no_retries(tmp_path, offline):
    env = {"HF_HOME": str(tmp_path / "hf"), **offline}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}" if "HF_ENDPOINT" in offline else ""
    proc = tool("--config", str(QUICKSTART), "--model", "RN50", "--pretrained", "openai",
                "--output-dir", str(tmp_path / "run"), env={k: v for k, v in env.items() if v})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: backbone RN50 pretrained=openai: its weights are not in the cache")
    assert ("cannot be reached" if "HF_ENDPOINT" in offline else "HF_HUB_OFFLINE is set") in proc.stderr
    for remedy in ("--pretrained PATH", "backbone.cache_dir or HF_HOME", "--pretrained none"):
        assert remedy in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_model_shows_the_nearest_names_not_all_of_them(tmp_path):
    cfg = quick_config(tmp_path, "data.path=/no/such/data", "backbone.model=ViT-B-23")
    with pytest.raises(ConfigError) as refused:
        run_experiment(cfg)
    message = str(refused.value)
    assert "did you mean 'ViT-B-32'" in message and message.endswith("See every name with: promptlearn list models")
    assert len(message) < 250 and "RN50x64" not in message


def test_duplicate_yaml_keys_are_refused_with_the_file_and_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.01\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}, line 4: key 'lr' is given twice \(first on line 2\)"):
        load_config([path])
    path.write_text("train:\n  lr: 0.01\ntrain.lr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: key 'train.lr' is given twice"):
        load_config([path])


def test_more_shots_than_any_class_has_is_refused(tmp_path):
    cfg = quick_config(tmp_path, "data.shots=1000000000", "methods=[zeroshot]")
    with pytest.raises(ConfigError, match=r"data.shots=1000000000, but no class of dataset 'fashion_mnist_sample' "
                                          r"has that many training images \(the largest has \d+\)"):
        run_experiment(cfg)
    # the run folder says why it stopped
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[-1].startswith("error: data.shots=1000000000")


def test_a_complete_run_is_not_replaced_unasked(tmp_path):
    cfg = quick_config(tmp_path, "methods=[zeroshot]")
    first = run_experiment(cfg)
    with pytest.raises(ConfigError, match=r"holds a complete run; --resume shows its results .* a new --output-dir .* --overwrite replaces"):
        run_experiment(cfg)
    assert run_experiment(cfg, overwrite=True)["zeroshot"]["accuracy"] == first["zeroshot"]["accuracy"]
    assert run_experiment(cfg, resume=True)["zeroshot"]["accuracy"] == first["zeroshot"]["accuracy"]


def test_resuming_a_complete_run_redoes_nothing(tmp_path, monkeypatch, capsys):
    cfg = quick_config(tmp_path, "methods=[linear_probe,coop]", "train.epochs=2")
    first = run_experiment(cfg)
    table = (tmp_path / "run" / "summary.md").read_text()
    assert capsys.readouterr().out.startswith(table.rstrip())

    def nothing_loads(*args):
        raise AssertionError("--resume of a complete run loaded the backbone")

    monkeypatch.setattr("promptlearn.runner.load_backbone", nothing_loads)
    monkeypatch.setattr("promptlearn.runner.check_run", nothing_loads)  # nor checks weights or the hub
    assert run_experiment(cfg, resume=True) == json.loads(json.dumps(first))
    assert capsys.readouterr().out == table
    # keys that change no result (the device each torchrun rank is given, loader workers, logging) change nothing
    moved = quick_config(tmp_path, "methods=[linear_probe,coop]", "train.epochs=2", "backbone.device=cpu",
                         "data.num_workers=1", "log_to=[]")
    assert run_experiment(moved, resume=True) == json.loads(json.dumps(first))
    # another method list is another run
    with pytest.raises(AssertionError, match="loaded the backbone"):
        run_experiment(quick_config(tmp_path, "methods=[coop]", "train.epochs=2"), resume=True)


# ----------------------------------------------------------------------------- data

def test_two_folders_with_one_class_name_are_refused(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        write_class_folders(root / split, {"coat": 1, "jacket": 1, "shirt": 1})
    write_lines(root / "classnames.txt", ["coat\touterwear", "jacket\touterwear"])
    cfg = load_config([], ["data.name=image_folder", f"data.path={root}"])
    with pytest.raises(DataError, match=r"classnames.txt: the folders 'coat' and 'jacket' are both named 'outerwear'"):
        build_dataset(cfg.data)


def test_per_class_results_keep_classes_that_share_a_name(tmp_path):
    logits = torch.eye(3)
    result = evaluate(logits, torch.arange(3), ["a", "b", "c"], ["crane", "crane", "heron"], tmp_path)
    assert result["per_class_accuracy"] == {"crane (label 0)": 100.0, "crane (label 1)": 100.0, "heron": 100.0}
    header = (tmp_path / "confusion_matrix.csv").read_text().splitlines()[0]
    assert header.split(",")[1:] == ["crane (label 0)", "crane (label 1)", "heron"]


@pytest.mark.parametrize("entry", ["../../../etc/passwd", "/etc/passwd", "cats/../../outside.jpg"])
def test_split_file_paths_stay_inside_the_dataset_folder(tmp_path, entry):
    path = tmp_path / "split_zhou_OxfordPets.json"
    path.write_text(json.dumps({"train": [["cats/1.jpg", 0, "cat"], [entry, 0, "cat"]], "val": [],
                                "test": [["cats/2.jpg", 0, "cat"]]}))
    with pytest.raises(DataError, match=rf"split file {re.escape(str(path))}: train\[1\] has the path "
                                        rf"'{re.escape(entry)}', which leaves the dataset's folder"):
        read_split_file(str(path))


def test_a_split_file_with_an_empty_train_list_is_called_empty(tmp_path):
    split = {"train": [], "val": [], "test": [["a/1.jpg", 0, "cat"], ["b/1.jpg", 1, "dog"]]}
    make_oxford_pets(tmp_path / "data", split)
    cfg = quick_config(tmp_path, "data.name=oxford_pets", f"data.root={tmp_path / 'data'}", "methods=[zeroshot, coop]")
    with pytest.raises(ConfigError, match=r"dataset 'oxford_pets': its train split is empty, so coop cannot run"):
        run_experiment(cfg)


# ----------------------------------------------------------------------------- caches

def _backbone_stub():
    return SimpleNamespace(name="tiny-clip", pretrained="none", precision="fp32")


def _key(cache: FeatureCache, items: list[Item]) -> str:
    return cache.key(_backbone_stub(), items, "transform", None, False)


def test_cache_key_follows_the_files_not_only_their_names(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    items = [Item(str(image), 0, "a")]
    by_state, by_content = FeatureCache(tmp_path / "c"), FeatureCache(tmp_path / "c", hash_content=True)
    before = _key(by_state, items), _key(by_content, items)
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes
    assert _key(by_state, items) != before[0] and _key(by_content, items) == before[1]
    image.write_bytes(b"fixed")  # re-exported in place, same size
    assert _key(by_content, items) != before[1]


def test_a_stale_cache_entry_is_reported_and_replaced(tmp_path, caplog):
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    items, cache = [Item(str(image), 0, "a")], FeatureCache(tmp_path / "cache")
    features = [SplitFeatures(torch.full((1, 4), float(v)), torch.zeros(1, dtype=torch.long), [str(image)])
                for v in (1, 2)]
    old_key = _key(cache, items)
    cache.get_or_compute(old_key, lambda: features[0])
    image.write_bytes(b"fixed")
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        got = cache.get_or_compute(_key(cache, items), lambda: features[1])
    assert torch.equal(got.features, features[1].features)
    assert f"feature cache {tmp_path / 'cache' / old_key}.pt is stale" in caplog.text
    assert [p.name for p in (tmp_path / "cache").glob("*.pt")] == [f"{_key(cache, items)}.pt"]


def test_temps_of_killed_extractions_are_swept_from_the_cache(tmp_path):
    cache = FeatureCache(tmp_path)
    dead, live = tmp_path / ".k1.pt.abc.tmp", tmp_path / ".k2.pt.def.tmp"
    for tmp in (dead, live):
        tmp.write_bytes(b"cut short")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(dead, (old, old))
    cache.get_or_compute("k3", lambda: SplitFeatures(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), ["x"]))
    assert not dead.exists() and live.exists()  # a recent temp may be another process's write in progress


# ----------------------------------------------------------------------------- checkpoints

def test_non_finite_checkpoint_is_refused_even_with_a_recomputed_checksum(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = torch.randn(4, 8)
    state[1, 2] = float("nan")
    save_checkpoint(path, {"state": {"prompts.ctx": state}, "epoch": 3})
    with pytest.raises(DamagedCheckpoint, match=rf"checkpoint {re.escape(str(path))} holds non-finite values "
                                                r"\(NaN or infinity\) in state.prompts.ctx"):
        load_checkpoint(path)


def test_random_bytes_are_an_unreadable_checkpoint_like_a_truncated_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"state": {"prompts.ctx": torch.randn(4, 8)}, "epoch": 3})
    path.write_bytes(os.urandom(path.stat().st_size).replace(b"\x80", b"\x81").replace(b"PK", b"pk"))
    with pytest.raises(DamagedCheckpoint, match="is not a checkpoint"):  # --resume sets it aside and retrains
        load_checkpoint(path)


def test_resuming_a_random_bytes_checkpoint_sets_it_aside(tmp_path, caplog):
    cfg = quick_config(tmp_path, "methods=[coop]", "train.epochs=1")
    checkpoint = tmp_path / "run" / "coop" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"\x00garbage" * 64)
    run_experiment(cfg, resume=True)
    assert checkpoint.with_name("checkpoint.pt.damaged").read_bytes() == b"\x00garbage" * 64
    assert load_checkpoint(checkpoint)["epoch"] == 1


@pytest.mark.parametrize("target, what", [("folder", "is a folder"), ("/dev/null", "is not a regular file")])
def test_eval_only_on_a_folder_or_device_says_what_it_is(tmp_path, target, what):
    path = tmp_path if target == "folder" else Path(target)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(path))} {what}.*pass the checkpoint file"):
        load_checkpoint(path)


def test_pickled_checkpoint_refusal_is_promptlearns_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "state": SimpleNamespace(a=1), "checksum": "x"}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 400 and "safe_globals" not in message
    assert "it names types.SimpleNamespace" in message


def test_resume_refusal_says_that_a_rerun_without_resume_starts_over(tmp_path):
    with pytest.raises(CheckpointError, match=r"train.lr: 0.1 in the checkpoint, 0.2 now\..*rerunning without "
                                              r"--resume .*starts over"):
        check_meta("ckpt.pt", {"train.lr": 0.1}, {"train.lr": 0.2})


# ----------------------------------------------------------------------------- console and docs

@pytest.mark.subprocess
def test_a_log_file_gets_one_line_per_epoch_and_no_bars_while_log_txt_keeps_everything(tmp_path):
    """stderr to a pipe, as in a SLURM task log or nohup: plain lines that carry the numbers, no '\\r'."""
    out = tmp_path / "run"
    proc = tool("--config", str(QUICKSTART), "--epochs", "3", "--output-dir", str(out),
                f"cache_dir={tmp_path / 'cache'}", "methods=[linear_probe,coop]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("INFO")]
    assert "RANDOM weights" in proc.stderr  # warnings still show
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("coop epoch")]
    assert [line.split(":")[0] for line in epochs] == ["coop epoch 1/3", "coop epoch 2/3", "coop epoch 3/3"]
    assert all(re.search(r": loss \d+\.\d{4}, train accuracy \d+\.\d\d%$", line) for line in epochs), epochs
    assert re.search(r"^coop: 15/15 step in \d+\.\d s$", proc.stderr, re.M)  # the display's closing line
    assert re.search(r"^train features: \d+/\d+ batch in ", proc.stderr, re.M)
    log = (out / "log.txt").read_text()
    assert "coop epoch 3/3" in log and "INFO root: " in log  # open_clip's INFO lines go to the file


@pytest.mark.subprocess
def test_quiet_shows_no_progress_at_all(tmp_path):
    proc = tool("--config", str(QUICKSTART), "--epochs", "2", "--output-dir", str(tmp_path / "run"),
                "cache_dir=none", "methods=[coop]", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert "| coop" in proc.stdout  # the results table is output, not progress


def test_verbosity_flags_set_the_console_level():
    root = logging.getLogger()
    levels = {}
    for name, verbose, quiet in [("default", 0, 0), ("-v", 1, 0), ("-vv", 2, 0), ("-q", 0, 1)]:
        setup_logging(verbose, quiet)
        levels[name] = [h.level for h in root.handlers if getattr(h, "promptlearn_console", False)]
    setup_logging()
    assert levels == {"default": [logging.WARNING], "-v": [logging.INFO], "-vv": [logging.DEBUG], "-q": [logging.ERROR]}


def test_print_config_prints_the_merged_yaml_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert promptlearn_main(["train", "--config", str(QUICKSTART), "--output-dir", str(out), "train.lr=0.5",
                             "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.5 and printed["output_dir"] == str(out)
    assert printed["coop"]["ctx_init"] == "a photo of a"
    assert not out.exists()
    with pytest.raises(SystemExit):
        promptlearn_main(["train", "--help"])
    helped = capsys.readouterr().out
    for flag in ("--print-config", "--overwrite", "--verbose", "--quiet"):
        assert flag in helped
    helped = " ".join(helped.split())  # argparse wraps the help to the terminal's width
    assert "(default: backbone.model, RN50)" in helped and "(default: backbone.pretrained, openai:" in helped
    with pytest.raises(SystemExit):
        promptlearn_main(["benchmark-methods", "--help"])
    assert "measured steps after one warm-up (default: 3)" in " ".join(capsys.readouterr().out.split())
    setup_logging()


def readme_quickstart() -> tuple[list[str], list[str], list[str]]:
    """The README's quickstart command and its results table, and the decoded-prompt table that the documentation's
    "Reading a learned prompt" shows."""
    command, table = main_job(REPO / "README.md")
    text = (REPO / "docs" / "methods" / "reading-a-prompt.md").read_text(encoding="utf-8")
    decoded = text[text.index("The quickstart ends with:"):].split("```")[1].strip().splitlines()
    return command, table, decoded


def main_job(path: Path) -> tuple[list[str], list[str]]:
    """The command and the results table of a page's "## The main job"."""
    text = path.read_text(encoding="utf-8")
    blocks = text[text.index("## The main job"):].split("```")
    command = blocks[1].removeprefix("bash").strip().split()
    table = [line for line in blocks[3].splitlines() if line.startswith("| ")]
    return command, table


def test_the_documentation_shows_the_readme_quickstart():
    """Getting started repeats the README's main job: the same command and the same table."""
    assert main_job(REPO / "docs" / "getting-started.md") == main_job(REPO / "README.md")
    command, table, decoded = readme_quickstart()
    assert command == ["promptlearn", "train", "--config", "configs/quickstart.yaml"]
    assert len(table) == 4 and decoded[0].startswith("mean distance to the nearest token")


def without_time(row: str) -> str:
    return row.rsplit("|", 2)[0] if row.startswith("| ") and "method" not in row else row


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_readme_quickstart_output_is_what_the_quickstart_prints(tmp_path):
    """The README's command, as written; train seconds vary, nothing else does."""
    command, table, decoded = readme_quickstart()
    assert command[:2] == ["promptlearn", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", *command, f"--output-dir={tmp_path / 'run'}",
                           f"cache_dir={tmp_path / 'cache'}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.splitlines()
    assert [without_time(r) for r in printed if r.startswith("| ")] == [without_time(r) for r in table]
    start = printed.index(decoded[0])
    assert printed[start:start + len(decoded)] == decoded
