"""clap.protocol=reference trains CLAP's epochs as the published code does (jusiro/CLAP,
trainers/adapters.py, run_epoch; Dassl's loader over the N training images gives the batch count): every
epoch shuffles the pool of all augmented passes afresh and trains on its first (N // B, at least 1)
batches of B. The facts below are that rule's numbers; the default protocol keeps one pass per epoch."""
from types import SimpleNamespace

import pytest
import torch
from helpers import interrupted_at_epoch, quick_config, tiny_backbone

from promptlearn import distributed
from promptlearn.checkpoint import load_checkpoint
from promptlearn.errors import CheckpointError, ConfigError
from promptlearn.features import PooledPasses, SplitFeatures, TrainingFeatures, batch_order
from promptlearn.methods import build_method
from promptlearn.methods.clap import raw_text_prototypes
from promptlearn.runner import run_experiment

CPU = torch.device("cpu")
IMAGENET_8 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of a {}."]


class NumberedPasses:
    """A feature bank whose pass p holds, for training image i, the feature (p * N + i): its position in
    the pool of passes, so that a batch names the features it drew."""

    def __init__(self, images: int, classes: int = 4):
        self.images, self.classes = images, classes
        self.fewshot = SimpleNamespace(train=list(range(images)), dataset="numbered", shots=1)
        self.asked: list[int] = []

    def train_pass(self, index: int, augment: bool, cached: bool = True, crop_scale=None) -> SplitFeatures:
        self.asked.append(index)
        ids = torch.arange(self.images) + index * self.images
        return SplitFeatures(ids[:, None].float(), torch.arange(self.images) % self.classes,
                             [f"img{i}" for i in range(self.images)])


def drawn(data, epoch: int, batch_size: int, seed: int = 1) -> list[list[int]]:
    """The pool positions of each batch of `epoch`, checked against the labels that came with them."""
    batches = []
    for inputs, labels, size in data.batches(epoch, batch_size, seed, CPU):
        ids = inputs[:, 0].long()
        assert torch.equal(labels, ids % data.images % 4) and size == len(ids)
        batches.append(ids.tolist())
    return batches


def test_reference_epoch_draws_n_over_b_full_batches_from_the_pool_of_all_passes():
    bank = NumberedPasses(40)
    data = PooledPasses(bank, 20, True)
    assert data.images == 40  # the trainer counts an epoch's steps on one pass of the images
    for epoch in range(3):
        batches = drawn(data, epoch, 8)
        # 40 // 8 = 5 batches of 8, no pooled feature twice in an epoch, drawn from all 800 of the pool
        assert [len(b) for b in batches] == [8] * 5
        used = [i for b in batches for i in b]
        assert len(set(used)) == 40 and all(0 <= i < 800 for i in used) and len({i // 40 for i in used}) > 1
        # a fresh shuffle of the whole pool each epoch (it does not continue the last epoch's), first 5 batches
        assert batches == [b.tolist() for b in batch_order(800, 8, 1, epoch)[:5]]
    assert sorted(set(bank.asked)) == list(range(20))  # every pass is pooled, each read once
    assert len(bank.asked) == 20


def test_reference_batch_count_and_size_at_the_edges():
    assert [len(b) for b in drawn(PooledPasses(NumberedPasses(42), 20, True), 0, 8)] == [8] * 5  # 42 // 8
    assert [len(b) for b in drawn(PooledPasses(NumberedPasses(40), 20, True), 0, 16)] == [16] * 2  # 32 of 800
    # fewer images than a batch: one step, a full batch of the pool's 100
    assert [len(b) for b in drawn(PooledPasses(NumberedPasses(5), 20, True), 0, 8)] == [8]
    # a pool smaller than a batch: one step on all of it
    batches = drawn(PooledPasses(NumberedPasses(5), 1, True), 0, 8)
    assert len(batches) == 1 and sorted(batches[0]) == list(range(5))


def test_default_protocol_batches_are_unchanged():
    """promptlearn's default: epoch e is pass e mod P alone, in batch_order's batches, the short one dropped."""
    data = TrainingFeatures(NumberedPasses(42), 20, True)
    for epoch in (0, 1, 21):
        expected = [(b + 42 * (epoch % 20)).tolist() for b in batch_order(42, 8, 1, epoch)]
        assert drawn(data, epoch, 8) == expected and len(expected) == 5


def test_under_torchrun_the_ranks_shares_make_the_global_batch(monkeypatch):
    data = PooledPasses(NumberedPasses(40), 20, True)
    whole = drawn(data, 2, 8)
    shares = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append([(b.inputs[:, 0].long().tolist(), b.size) for b in data.batches(2, 8, 1, CPU)])
    for batch, (first, size), (second, _) in zip(whole, *shares):
        assert size == 8 and len(first) == len(second) == 4 and sorted(first + second) == sorted(batch)


def test_reference_without_cached_passes_is_refused(tmp_path):
    """(A bad clap.protocol is refused naming the key: tests/test_config.py.)"""
    with pytest.raises(ConfigError, match="clap.protocol=reference draws from a pool of cached passes: "
                                          "clap.feature_passes must be at least 1"):
        quick_config(tmp_path, "clap.protocol=reference", "clap.feature_passes=0")


def test_reference_prototypes_on_imagenet_average_the_published_eight_templates(tmp_path):
    names = ["shirt", "ankle boot", "bag"]
    cfg = quick_config(tmp_path, "methods=[clap]", "clap.protocol=reference")
    cfg.data.name, cfg.data.template = "imagenet", None  # the templates follow the dataset's name
    backbone = tiny_backbone()
    reference = build_method("clap", cfg, backbone, names)
    torch.testing.assert_close(reference.anchors, raw_text_prototypes(backbone, names, IMAGENET_8))
    cfg.clap.protocol = "promptlearn"
    torch.testing.assert_close(build_method("clap", cfg, backbone, names).anchors,
                               raw_text_prototypes(backbone, names, ["a photo of a {}."]), atol=0, rtol=0)
    cfg.clap.protocol, cfg.data.template = "reference", "a {} photo."  # a template the user sets wins
    torch.testing.assert_close(build_method("clap", cfg, backbone, names).anchors,
                               raw_text_prototypes(backbone, names, ["a {} photo."]), atol=0, rtol=0)


def prototypes(folder):
    return load_checkpoint(folder / "clap" / "checkpoint.pt")["state"]["prototypes"]


def test_reference_resumes_to_the_same_prototypes_and_refuses_the_other_protocol(tmp_path):
    common = ["methods=[clap]", "clap.epochs=4", "clap.feature_passes=3", "clap.batch_size=16", "train.augment=true"]
    reference = [*common, "clap.protocol=reference"]
    run_experiment(quick_config(tmp_path, *reference, f"output_dir={tmp_path / 'full'}"))
    interrupted = quick_config(tmp_path, *reference, f"output_dir={tmp_path / 'resumed'}")
    with interrupted_at_epoch(2), pytest.raises(Exception, match="interrupted; saved the state after epoch 2"):
        run_experiment(interrupted)
    with pytest.raises(CheckpointError, match="pools_passes: True in the checkpoint, None now"):
        run_experiment(quick_config(tmp_path, *common, f"output_dir={tmp_path / 'resumed'}"), resume=True)
    run_experiment(interrupted, resume=True)
    assert torch.equal(prototypes(tmp_path / "resumed"), prototypes(tmp_path / "full"))
    run_experiment(quick_config(tmp_path, *common, f"output_dir={tmp_path / 'plain'}"))
    with pytest.raises(CheckpointError, match="pools_passes: None in the checkpoint, True now"):
        run_experiment(quick_config(tmp_path, *reference, f"output_dir={tmp_path / 'plain'}"), resume=True)


def test_clap_reference_recipe_ignores_train_min_lr_and_max_steps(tmp_path, monkeypatch):
    from promptlearn.trainer import Trainer

    recipes, original = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: recipes.append(self.cfg) or original(self, *a, **k))
    for protocol in ("reference", "promptlearn"):
        run_experiment(quick_config(tmp_path / protocol, "methods=[clap]", f"clap.protocol={protocol}",
                                    "clap.epochs=2", "clap.feature_passes=2", "train.min_lr=1e-4",
                                    "train.max_steps=3"))
    assert [(r.min_lr, r.max_steps) for r in recipes] == [(0.0, None), (1e-4, 3)]


@pytest.mark.parametrize("protocol", ["promptlearn", "reference"])
def test_clap_honours_train_crop_scale(tmp_path, protocol):
    """train.crop_scale reaches CLAP's augmented passes (it used to build them with the default (0.08, 1))."""
    cfg = quick_config(tmp_path, "methods=[clap]", f"clap.protocol={protocol}", "clap.feature_passes=2",
                       "train.augment=true", "train.crop_scale=[0.3,1.0]")
    data = build_method("clap", cfg, tiny_backbone(), ["a", "b"]).training_features(NumberedPasses(8))
    assert data.crop_scale == (0.3, 1.0)
