"""One run on two processes (torchrun, gloo on the CPU, DistributedDataParallel): CoOp streaming its
training images (train.feature_passes=0) learns what one process learns with the same global batch,
to fp32 rounding; rank 0 alone writes; a run interrupted in one process resumes on two; streamed
images are encoded once across the ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD_S, QUICKSTART, REPO, interrupted_at_epoch, quick_config, tiny_backbone

from promptlearn.data.base import Item
from promptlearn.data.transforms import train_transform
from promptlearn.errors import DataError, PromptlearnError
from promptlearn.features import extract_features
from promptlearn.runner import is_complete, run_experiment
from promptlearn.trainer import Trainer

# 4 shots x 10 classes = 40 images: 5 global batches of 8 per epoch, 4 images per rank and step
RUN_KEYS = ["methods=[coop]", "data.shots=4", "train.batch_size=8", "train.epochs=3", "train.feature_passes=0",
            "train.augment=true"]


def torchrun(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "promptlearn", "train", "-v", "--config", str(QUICKSTART), "--output-dir", str(out),
               f"cache_dir={cache}", f"data.path={REPO / 'datasets' / 'fashion_mnist_sample'}", *RUN_KEYS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)


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


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_gloo_processes_learn_what_one_process_learns(one_process, tmp_path):
    proc = torchrun(tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("4-shot draw (seed 1)") == 2  # both ranks ran
    assert_same_learning(tmp_path / "run", one_process)
    assert is_complete(tmp_path / "run")
    assert proc.stdout.count("| coop |") == 1  # rank 0 alone evaluates and reports
    assert not list((tmp_path / "run").rglob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_interrupted_in_one_process_resumes_on_two(one_process, tmp_path, one_thread):
    with interrupted_at_epoch(2), pytest.raises(PromptlearnError, match="interrupted; saved the state after epoch 2"):
        run_experiment(quick_config(tmp_path, *RUN_KEYS))
    assert learned(tmp_path / "run")["epoch"] == 2
    proc = torchrun(tmp_path / "run", tmp_path / "cache", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    assert_same_learning(tmp_path / "run", one_process)


class CountingTransform:
    """The backbone's transform, counting the images it prepares in this process."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


def encode_shared(rank: int, store: str, items: list, result: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    backbone = tiny_backbone()
    transform = CountingTransform(train_transform(backbone))
    split = extract_features(backbone, items, transform, batch_size=4, num_workers=0, skip_bad=False,
                             aug_seed=(1, 0), shared=True)
    torch.save({"features": split.features, "paths": split.paths, "encoded": transform.calls}, f"{result}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.subprocess
def test_streamed_images_are_encoded_once_across_the_ranks(tmp_path, one_thread):
    images = sorted((REPO / "datasets" / "fashion_mnist_sample").rglob("*.png"))[:7]  # odd: unequal shares
    items = [Item(str(path), label, path.parent.name) for label, path in enumerate(images)]
    torch.multiprocessing.spawn(encode_shared, args=(str(tmp_path / "store"), items, str(tmp_path / "part")),
                                nprocs=2)
    backbone = tiny_backbone()
    alone = extract_features(backbone, items, train_transform(backbone), batch_size=4, num_workers=0,
                             skip_bad=False, aug_seed=(1, 0))
    parts = [torch.load(tmp_path / f"part.{rank}", weights_only=True) for rank in (0, 1)]
    assert [p["encoded"] for p in parts] == [4, 3]  # each rank prepared only its share
    for part in parts:  # and both got every image, in order, with its own augmentation
        assert part["paths"] == alone.paths
        torch.testing.assert_close(part["features"], alone.features, rtol=1e-5, atol=1e-6)


def streamed_batches(rank: int, world: int, store: str, items: list, result: str, skip_bad: bool = True) -> None:
    """Rank `rank`'s batches of TrainingImages for two epochs (world 1: the whole run in one process)."""
    from promptlearn.data.base import DatasetSplits
    from promptlearn.data.fewshot import FewShotSplit
    from promptlearn.features import FeatureBank, FeatureCache, TrainingImages

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dataset = DatasetSplits("sample", [str(i) for i in range(len(items))], train=items)
    bank = FeatureBank(tiny_backbone(), dataset, FewShotSplit("sample", 1, 1, items, []), cache=FeatureCache(None),
                       batch_size=4, num_workers=0, skip_bad=skip_bad, seed=1)
    data = TrainingImages(bank, augment=True)
    try:
        batches = [(b.inputs, b.labels, b.size) for epoch in (0, 1)
                   for b in data.batches(epoch, 5, seed=1, device=torch.device("cpu"))]
    except DataError as error:
        batches = str(error)
    torch.save(batches, f"{result}.{rank}")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.subprocess
def test_streamed_training_images_are_decoded_once_across_the_ranks(tmp_path, one_thread):
    """Methods that learn inside the image encoder stream their images: each rank loads only its share of
    every global batch (the ranks' shares together are the one-process batch), and with data.skip_bad_images the
    ranks agree on the global batch's size when an image does not load."""
    images = sorted((REPO / "datasets" / "fashion_mnist_sample").rglob("*.png"))[:14]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [str(p) for p in images[:6]] + [str(broken)] + [str(p) for p in images[6:]]
    items = [Item(path, label, str(label)) for label, path in enumerate(paths)]  # the label names the image
    streamed_batches(0, 1, "", items, str(tmp_path / "alone"))
    torch.multiprocessing.spawn(streamed_batches, args=(2, str(tmp_path / "store"), items, str(tmp_path / "part")),
                                nprocs=2)
    alone = torch.load(tmp_path / "alone.0", weights_only=True)
    parts = [torch.load(tmp_path / f"part.{rank}", weights_only=True) for rank in (0, 1)]
    assert len(alone) == len(parts[0]) == len(parts[1]) == 2 * (len(items) // 5)
    skipped = 0
    for (x, y, size), (x0, y0, size0), (x1, y1, size1) in zip(alone, *parts):
        assert len(y0) + len(y1) == len(y) == size == size0 == size1  # shares, one global size
        assert len(y0) <= 3 and len(y1) <= 3  # never the whole batch of 5
        assert sorted(torch.cat([y0, y1]).tolist()) == sorted(y.tolist())
        for label, image in zip(torch.cat([y0, y1]), torch.cat([x0, x1])):  # the same crop of the same image
            torch.testing.assert_close(image, x[(y == label).nonzero()[0, 0]])
        skipped += size < 5
    assert skipped == 2  # the broken image, once per epoch

    # without data.skip_bad_images both ranks stop at that step, not only the rank that read the image
    torch.multiprocessing.spawn(streamed_batches, args=(2, str(tmp_path / "store2"), items, str(tmp_path / "stop"),
                                                        False), nprocs=2)
    errors = [torch.load(tmp_path / f"stop.{rank}", weights_only=True) for rank in (0, 1)]
    assert all(isinstance(e, str) for e in errors)
    assert sum("broken.png" in e for e in errors) == 1 and sum("another process" in e for e in errors) == 1


def test_a_global_batch_smaller_than_the_processes_is_refused(tmp_path, monkeypatch):
    from promptlearn import distributed
    from promptlearn.methods import build_method

    cfg = quick_config(tmp_path, "methods=[cocoop]")
    method = build_method("cocoop", cfg, tiny_backbone(), ["a", "b"])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)

    class FiveImages:
        images, draw = 5, {}

    trainer = Trainer(cfg.train, epochs=1, seed=1)
    trainer.cfg.batch_size = 1  # CoCoOp's own batch
    with pytest.raises(PromptlearnError, match="a global batch of 1 images cannot be shared by 2 processes"):
        trainer.fit(method, FiveImages(), tmp_path / "checkpoint.pt")
