"""One run on two processes (torchrun, gloo on the CPU, DistributedDataParallel): CoOp streaming its
training images (train.feature_passes=0) learns what one process learns with the same global batch,
to fp32 rounding; rank 0 alone writes; a run interrupted in one process resumes on two."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, REPO, quick_config, tiny_backbone

from promptlearn.errors import PromptlearnError
from promptlearn.runner import is_complete, run_experiment
from promptlearn.trainer import Trainer

# 4 shots x 10 classes = 40 images: 5 global batches of 8 per epoch, 4 images per rank and step
RUN_KEYS = ["methods=[coop]", "data.shots=4", "train.batch_size=8", "train.epochs=3", "train.feature_passes=0",
            "train.augment=true"]


def torchrun(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "promptlearn", "train", "--config", str(QUICKSTART), "--output-dir", str(out),
               f"cache_dir={cache}", f"data.path={REPO / 'datasets' / 'fashion_mnist_sample'}", *RUN_KEYS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def learned(run: Path) -> dict:
    payload = torch.load(run / "coop" / "checkpoint.pt", weights_only=True)
    return {"ctx": payload["state"]["prompts.ctx"], "losses": [h["loss"] for h in payload["history"]],
            "epoch": payload["epoch"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_thread) -> Path:
    root = tmp_path_factory.mktemp("one-process")
    run_experiment(quick_config(root, *RUN_KEYS))
    return root / "run"


def assert_same_learning(run: Path, reference: Path) -> None:
    got, want = learned(run), learned(reference)
    assert got["epoch"] == want["epoch"] == 3
    torch.testing.assert_close(got["ctx"], want["ctx"], rtol=1e-5, atol=1e-6)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    # the test could fail: training moved the context far more than the tolerance
    backbone = tiny_backbone()
    start = backbone.text.embed(torch.tensor(backbone.tokenizer.encode("a photo of a"))).float()
    assert (want["ctx"] - start).abs().max() > 1e-3


def test_two_gloo_processes_learn_what_one_process_learns(one_process, tmp_path):
    proc = torchrun(tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("4-shot draw (seed 1)") == 2  # both ranks ran
    assert_same_learning(tmp_path / "run", one_process)
    assert is_complete(tmp_path / "run")
    assert proc.stdout.count("| coop |") == 1  # rank 0 alone evaluates and reports
    assert not list((tmp_path / "run").rglob(".*.tmp"))


def test_run_interrupted_in_one_process_resumes_on_two(one_process, tmp_path, monkeypatch, one_thread):
    real_epoch = Trainer._epoch

    def stop_at_epoch_two(self, method, model, data, optimizer, scaler, epoch, checkpoint_epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, method, model, data, optimizer, scaler, epoch, checkpoint_epoch)

    monkeypatch.setattr(Trainer, "_epoch", stop_at_epoch_two)
    with pytest.raises(PromptlearnError, match="interrupted; saved the state after epoch 2"):
        run_experiment(quick_config(tmp_path, *RUN_KEYS))
    assert learned(tmp_path / "run")["epoch"] == 2
    proc = torchrun(tmp_path / "run", tmp_path / "cache", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    assert_same_learning(tmp_path / "run", one_process)
