"""clap.batches=pooled (the published recipe) trains CLAP's epochs as the published code does (jusiro/CLAP,
trainers/adapters.py, run_epoch; Dassl's loader over the N training images gives the batch count): every
epoch shuffles the pool of all augmented passes afresh and trains on its first (N // B, at least 1)
batches of B. The facts below are that rule's numbers; clap.batches=passes keeps one pass per epoch. Also the
recipe's other CLAP keys: the prototypes' templates and class names, min_lr, and every training key."""
from types import SimpleNamespace

import pytest
import torch
from helpers import interrupted_at_epoch, quick_config, tiny_backbone

from promptlearn import distributed
from promptlearn.checkpoint import load_checkpoint
from promptlearn.config import load_config
from promptlearn.errors import CheckpointError, ConfigError
from promptlearn.features import PooledPasses, SplitFeatures, TrainingFeatures, batch_order
from promptlearn.methods import build_method
from promptlearn.methods.zeroshot import raw_text_classifier
from promptlearn.prompts import prompt_names
from promptlearn.runner import run_experiment
from promptlearn.settings import effective
from promptlearn.trainer import Trainer

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


def test_without_drop_last_an_epoch_draws_one_full_batch_more():
    """clap.drop_last=false: as many batches as the loader over the N images would give with its short one kept,
    every one full from the pool: 42 images in batches of 8, 6 batches of 8 (5 with drop_last)."""
    data = PooledPasses(NumberedPasses(42), 20, True)
    batches = [b.inputs[:, 0].long().tolist() for b in data.batches(0, 8, 1, CPU, drop_last=False)]
    assert [len(b) for b in batches] == [8] * 6
    assert batches == [b.tolist() for b in batch_order(840, 8, 1, 0, drop_last=False)[:6]]


def test_passes_batches_are_unchanged():
    """clap.batches=passes: epoch e is pass e mod P alone, in batch_order's batches, the short one dropped."""
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


def test_the_published_recipe_pools_the_passes_and_promptlearns_keeps_one_per_epoch(tmp_path):
    published = quick_config(tmp_path, "recipe=published", "methods=[clap]")
    assert published.clap.batches == "pooled" and published.clap.feature_passes == 20
    assert effective(published)["clap"]["batches"]["from"].startswith("recipe jusiro/CLAP")
    assert quick_config(tmp_path, "recipe=published", "methods=[clap]", "recipe=promptlearn").clap.batches == "passes"


def test_pooled_without_cached_passes_is_refused(tmp_path):
    message = "clap.batches=pooled draws from a pool of cached passes: clap.feature_passes must be at least 1"
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path, "clap.batches=pooled", "clap.feature_passes=0")
    with pytest.raises(ConfigError, match=message):  # the published recipe pools; a given train.feature_passes reaches it
        quick_config(tmp_path, "recipe=published", "methods=[clap]", "train.feature_passes=0")
    assert quick_config(tmp_path, "clap.batches=passes", "clap.feature_passes=0").clap.feature_passes == 0
    with pytest.raises(ConfigError, match="clap.batches must be one of passes, pooled, got 'pool'"):
        quick_config(tmp_path, "clap.batches=pool")


def test_the_retired_protocol_key_names_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"clap.protocol was removed: .*`recipe: published`.*promptlearn list "
                                          r"recipes clap.*`recipe: promptlearn`"):
        quick_config(tmp_path, "clap.protocol=reference")


NAMES = ["shirt", "ankle boot", "bag"]


def anchors(backbone, *overrides, names=NAMES):
    """CLAP's zero-shot prototypes under a config of `overrides` (no config file: the recipe's templates apply)."""
    return build_method("clap", load_config([], ["methods=[clap]", *overrides]), backbone, names).anchors


def test_the_published_prototypes_on_imagenet_average_the_authors_eight_templates():
    backbone = tiny_backbone()
    torch.testing.assert_close(anchors(backbone, "data.name=imagenet"), raw_text_classifier(backbone, NAMES, IMAGENET_8))
    torch.testing.assert_close(anchors(backbone, "data.name=imagenet", "recipe=promptlearn"),
                               raw_text_classifier(backbone, NAMES, ["a photo of a {}."]), atol=0, rtol=0)
    # a template the run sets wins over the recipe's; clap.templates given is used as given
    torch.testing.assert_close(anchors(backbone, "data.name=imagenet", "data.template=a {} photo."),
                               raw_text_classifier(backbone, NAMES, ["a {} photo."]), atol=0, rtol=0)
    torch.testing.assert_close(anchors(backbone, "data.name=imagenet", "data.template=a {} photo.",
                                       "clap.templates=art of the {}.,a {} sketch."),
                               raw_text_classifier(backbone, NAMES, ["art of the {}.", "a {} sketch."]), atol=0, rtol=0)
    # another dataset: its own template (the recipe gives ImageNet alone its templates)
    torch.testing.assert_close(anchors(backbone, "data.name=dtd"), raw_text_classifier(backbone, NAMES, ["{} texture."]),
                               atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"clap.templates 'a photo' must contain \{\}"):
        load_config([], ["clap.templates=[a photo]"])


def test_underscores_spell_class_names_as_the_authors_datasets_do():
    """The authors' code formats its datasets' names unchanged: Oxford Pets' "american_bulldog" (promptlearn reads
    "american bulldog"), Flowers102's "pink primrose". clap.underscores writes every space as "_"; the published
    recipe sets it for the datasets whose names the authors spell with underscores."""
    assert prompt_names(["american bulldog", "great_pyrenees", "pug"], True) == ["american_bulldog", "great_pyrenees",
                                                                                  "pug"]
    assert prompt_names(["american bulldog", "great_pyrenees", "pug"], False) == ["american bulldog", "great pyrenees",
                                                                                   "pug"]
    backbone, pets = tiny_backbone(), ["a photo of a {}, a type of pet."]
    torch.testing.assert_close(anchors(backbone, "data.name=oxford_pets"),
                               raw_text_classifier(backbone, ["shirt", "ankle_boot", "bag"], pets), atol=0, rtol=0)
    for spaces in (["data.name=oxford_pets", "clap.underscores=false"], ["data.name=oxford_pets", "recipe=promptlearn"]):
        torch.testing.assert_close(anchors(backbone, *spaces), raw_text_classifier(backbone, NAMES, pets), atol=0, rtol=0)
    assert not load_config([], ["methods=[clap]", "data.name=oxford_flowers"]).clap.underscores
    assert [load_config([], ["methods=[clap]", f"data.name={name}"]).clap.underscores
            for name in ("food101", "caltech101", "ucf101", "sun397", "imagenet", "stanford_cars")] == [
        True, True, True, True, False, False]


def prototypes(folder):
    return load_checkpoint(folder / "clap" / "checkpoint.pt")["state"]["prototypes"]


def test_pooled_resumes_to_the_same_prototypes_and_refuses_the_other_batches(tmp_path):
    common = ["methods=[clap]", "clap.epochs=4", "clap.feature_passes=3", "clap.batch_size=16", "train.augment=true"]
    pooled, passes = [*common, "clap.batches=pooled"], [*common, "clap.batches=passes"]
    run_experiment(quick_config(tmp_path, *pooled, f"output_dir={tmp_path / 'full'}"))
    interrupted = quick_config(tmp_path, *pooled, f"output_dir={tmp_path / 'resumed'}")
    with interrupted_at_epoch(2), pytest.raises(Exception, match="interrupted; saved the state after epoch 2"):
        run_experiment(interrupted)
    with pytest.raises(CheckpointError, match="pools_passes: True in the checkpoint, None now"):
        run_experiment(quick_config(tmp_path, *passes, f"output_dir={tmp_path / 'resumed'}"), resume=True)
    run_experiment(interrupted, resume=True)
    assert torch.equal(prototypes(tmp_path / "resumed"), prototypes(tmp_path / "full"))
    run_experiment(quick_config(tmp_path, *passes, f"output_dir={tmp_path / 'plain'}"))
    with pytest.raises(CheckpointError, match="pools_passes: None in the checkpoint, True now"):
        run_experiment(quick_config(tmp_path, *pooled, f"output_dir={tmp_path / 'plain'}"), resume=True)


def trained_with(monkeypatch) -> list:
    """(trainer settings, epochs, training data) of every Trainer.fit from here on."""
    seen, original = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, method, data, *a, **k:
                        seen.append((self.cfg, self.epochs, data)) or original(self, method, data, *a, **k))
    return seen


def test_clap_ends_its_cosine_at_its_own_min_lr_and_stops_at_the_runs_step_cap(tmp_path, monkeypatch):
    """The published recipe's schedule ends at 0 (Dassl's cosine) as clap.min_lr; a given train.min_lr reaches CLAP
    like every method, clap.min_lr over it; train.max_steps caps the run."""
    seen = trained_with(monkeypatch)
    runs = {"published": [], "train": ["train.min_lr=1e-4", "train.max_steps=3"],
            "own": ["train.min_lr=1e-4", "clap.min_lr=1e-3"]}
    for name, overrides in runs.items():
        run_experiment(quick_config(tmp_path / name, "methods=[clap]", "clap.epochs=2", "clap.feature_passes=2",
                                    *overrides))
    assert [(cfg.min_lr, cfg.max_steps) for cfg, _, _ in seen] == [(0.0, None), (1e-4, 3), (1e-3, None)]


def test_every_training_key_reaches_claps_training(tmp_path, monkeypatch):
    seen = trained_with(monkeypatch)
    run_experiment(quick_config(tmp_path, "recipe=published", "methods=[clap]", "clap.epochs=2", "clap.batch_size=16", "clap.lr=0.05",
                                "clap.weight_decay=1e-4", "clap.warmup_epochs=1",
                                "clap.warmup_lr=1e-4", "clap.optimizer=adamw", "clap.eps=1e-6", "clap.augment=true",
                                "clap.crop_scale=[0.3,1.0]", "clap.lr_per_step=true", "clap.min_lr=1e-3",
                                "clap.drop_last=false", "clap.feature_passes=3"))
    (cfg, epochs, data), = seen
    assert epochs == 2 and (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs, cfg.warmup_lr,
                            cfg.optimizer, cfg.eps, cfg.lr_per_step, cfg.min_lr, cfg.drop_last) == (
        16, 0.05, 0.9, 1e-4, 1, 1e-4, "adamw", 1e-6, True, 1e-3, False)  # AdamW reads no momentum: unset
    assert isinstance(data, PooledPasses) and (data.passes, data.augment, data.crop_scale) == (3, True, (0.3, 1.0))


@pytest.mark.parametrize("batches", ["passes", "pooled"])
def test_clap_honours_train_crop_scale(tmp_path, batches):
    """train.crop_scale reaches CLAP's augmented passes (it used to build them with the default (0.08, 1))."""
    cfg = quick_config(tmp_path, "recipe=published", "methods=[clap]", f"clap.batches={batches}", "clap.feature_passes=2",
                       "train.augment=true", "train.crop_scale=[0.3,1.0]")
    data = build_method("clap", cfg, tiny_backbone(), ["a", "b"]).training_features(NumberedPasses(8))
    assert data.crop_scale == (0.3, 1.0)
