"""Experiment tracking (log_to / --log-to): TensorBoard event files and an offline W&B run are written by a run
and read back; each method's epochs are reported once; a missing package or an unknown tracker is one line;
neither package is imported unless asked for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, quick_config

from promptlearn import tracking
from promptlearn.errors import ConfigError
from promptlearn.runner import run_experiment
from promptlearn.tracking import Tracking, check_trackers

METHODS = "methods=[zeroshot, linear_probe, coop]"


def tracked_run(tmp_path: Path, tracker: str) -> tuple[Path, dict, list[dict]]:
    """A run logging to `tracker`: its folder, metrics.json and CoOp's history.json."""
    cfg = quick_config(tmp_path, METHODS, "train.epochs=3", f"log_to=[{tracker}]")
    run_experiment(cfg)
    out = Path(cfg.output_dir)
    return (out, json.loads((out / "metrics.json").read_text()),
            json.loads((out / "coop" / "history.json").read_text()))


def test_tensorboard_event_files_hold_each_epoch_the_results_and_the_table(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, metrics, history = tracked_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("coop/loss") == [(h["epoch"], pytest.approx(h["loss"])) for h in history] and len(history) == 3
    assert scalars("coop/train_accuracy") == [(h["epoch"], pytest.approx(h["accuracy"])) for h in history]
    assert scalars("coop/lr") == [(h["epoch"], pytest.approx(h["lr"])) for h in history]
    for method in ("zeroshot", "linear_probe", "coop"):
        assert scalars(f"test/{method}/accuracy") == [(0, pytest.approx(metrics[method]["accuracy"]))]
    assert scalars("test/linear_probe/val_accuracy") == [(0, pytest.approx(metrics["linear_probe"]["val_accuracy"]))]
    table = events.Tensors("results/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.strip() == (out / "summary.md").read_text().strip()


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then records in
    LevelDB's log format: 32 KiB blocks of (crc32c, length, type, data) chunks, one record over one or more."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_an_offline_wandb_run_holds_each_epoch_and_the_results(tmp_path, one_thread, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, metrics, history = tracked_run(tmp_path, "wandb")
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    rows = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in wandb_records(run_file)
            if r.WhichOneof("record_type") == "history"]
    coop = [row for row in rows if "coop/loss" in row]
    assert [(r["coop/epoch"], r["coop/loss"], r["coop/train_accuracy"], r["coop/lr"]) for r in coop] == [
        (h["epoch"], pytest.approx(h["loss"]), pytest.approx(h["accuracy"]), pytest.approx(h["lr"])) for h in history]
    summary = {key(i): json.loads(i.value_json) for r in wandb_records(run_file)
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    for method in ("zeroshot", "linear_probe", "coop"):
        assert summary[f"test/{method}/accuracy"] == pytest.approx(metrics[method]["accuracy"])
    assert summary["test/linear_probe/val_accuracy"] == pytest.approx(metrics["linear_probe"]["val_accuracy"])
    (table,) = run_file.parent.glob("files/media/html/results_*.html")
    assert "zeroshot" in table.read_text() and "linear_probe" in table.read_text()


class Recorded:
    def __init__(self):
        self.calls = []

    def scalars(self, method, values, epoch):
        self.calls.append((method, epoch, values))

    def results(self, method, values):
        self.calls.append((method, "results", values))

    def text(self, name, text):
        self.calls.append((name, "text", text))

    def close(self):
        self.calls.append("closed")


def test_each_epoch_is_reported_once_whether_live_or_from_the_history():
    backend = Recorded()
    with Tracking([backend]) as tracked:
        tracked.epoch("coop", {"epoch": 3, "loss": 0.5, "accuracy": 80.0, "lr": 0.002, "cross_entropy": 0.5})
        # after training: a resumed run's earlier epochs, and the one already reported live
        tracked.history("coop", [{"epoch": e, "loss": 1.0 / e, "accuracy": 50.0, "lr": 0.002} for e in (1, 2, 3)])
        tracked.history("lp_pp", [{"epoch": 1, "loss": 0.9, "val_accuracy": 61.0}])  # a method's own loop
        tracked.result("coop", {"accuracy": 71.5, "ece": 3.0, "history": [], "na": {}, "phases": {}})
    assert [(m, e) for m, e, *_ in backend.calls[:4]] == [("coop", 3), ("coop", 1), ("coop", 2), ("lp_pp", 1)]
    assert backend.calls[0][2] == {"loss": 0.5, "train_accuracy": 80.0, "lr": 0.002, "cross_entropy": 0.5}
    assert backend.calls[3][2] == {"loss": 0.9, "val_accuracy": 61.0}
    assert backend.calls[4] == ("coop", "results", {"accuracy": 71.5, "ece": 3.0})
    assert backend.calls[-1] == "closed"


def test_unknown_tracker_or_missing_package_is_one_line_naming_the_extra(monkeypatch, train_coop, capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"log_to: unknown tracker 'tensorbord'; use tensorboard or wandb"):
        check_trackers(["tensorbord"])
    monkeypatch.setattr(tracking, "installed", lambda package: package != "wandb")
    run = train_coop.call(capsys, "--log-to", "wandb", "--output-dir", str(tmp_path / "run"))
    assert run.error() == ("error: log_to=wandb needs the wandb package, which is not installed: "
                           "pip install 'promptlearn[wandb]'")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_promptlearn_imports_neither_tracker_unless_asked_for(tmp_path):
    """A run without log_to, watched by an import finder that notes every import of either package made
    from promptlearn's own code (other libraries may look for them: timm imports wandb when it is there)."""
    code = f"""
import sys, traceback
from pathlib import Path
asked = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("wandb", "tensorboard") or name.startswith("torch.utils.tensorboard"):
            asked.extend(f"{{f.filename}}:{{f.lineno}}" for f in traceback.extract_stack()
                         if "{REPO / 'promptlearn'}" in f.filename)
sys.meta_path.insert(0, Watch())
sys.path.insert(0, "{REPO / 'tests'}")
from helpers import REPO, quick_config
from promptlearn.commands import COMMANDS
from promptlearn.runner import run_experiment
run_experiment(quick_config(Path("{tmp_path}"), "methods=[zeroshot]"))
print("imports of a tracker from promptlearn:", asked)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imports of a tracker from promptlearn: []" in proc.stdout
