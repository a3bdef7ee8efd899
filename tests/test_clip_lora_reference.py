"""CLIP-LoRA under its published recipe (the default, `recipe: published`) follows its published training loop
(Zanella & Ben Ayed). The numbers below are the published code's: AdamW (betas 0.9, 0.999, weight decay 0.01,
lr 2e-4), CosineAnnealingLR with T_max = 500 x shots and eta_min = 1e-6 stepped after every optimizer step, no
warm-up, batches of 32 with the last short one kept, training stopped after exactly 500 x shots steps even
mid-epoch, the template "a photo of a {}." for every dataset, and logits 100 x the cosines (main.py, lora.py,
run_utils.py, datasets/*.py of github.com/MaxZanella/CLIP-LoRA). The recipe states them as clip_lora.* keys
(promptlearn/recipes/clip_lora.yaml); `recipe=promptlearn` runs the code defaults instead."""
import pytest
import torch
import torch.nn.functional as F
from helpers import SAMPLE, sample_bank, tiny_backbone
from test_baselines import NoTestBank, shared_cache  # noqa: F401 (a fixture)
from test_trainer_schedule import cosine, record_steps

from promptlearn.checkpoint import load_checkpoint
from promptlearn.config import load_config
from promptlearn.errors import ConfigError
from promptlearn.methods import build_method
from promptlearn.methods.clip_lora import ClipLora, ClipLoraConfig
from promptlearn.settings import run_epochs
from promptlearn.trainer import Trainer

ETA_MIN = 1e-6
ITERATIONS = 7  # iterations_per_shot x shots in lora_setup


def record_batch_sizes(monkeypatch, method) -> list[int]:
    sizes, original = [], method.training_step
    monkeypatch.setattr(method, "training_step", lambda x, y: sizes.append(len(y)) or original(x, y))
    return sizes


def lora_config(tmp_path, cache, *overrides):
    """A run listing clip_lora on 1 shot of the sample's 10 classes, so that its recipe applies (no
    data.template given)."""
    return load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none", "methods=[clip_lora]",
                            f"data.path={SAMPLE}", "data.shots=1", "data.num_workers=0", f"cache_dir={cache}",
                            f"output_dir={tmp_path / 'run'}", *overrides])


def lora_setup(tmp_path, shared_cache, *overrides, iterations: bool = True):  # noqa: F811
    """clip_lora in batches of 4, for 7 iterations: with the last short batch kept, 2 epochs of 3 batches (4, 4,
    2) and 1 batch of a third; with it dropped, 2 batches an epoch. The method, its bank and a trainer."""
    cfg = lora_config(tmp_path, shared_cache, "clip_lora.batch_size=4",
                      *(["clip_lora.iterations_per_shot=7"] if iterations else []), *overrides)
    dataset, backbone, bank = sample_bank(cfg, tmp_path)
    assert len(bank.fewshot.train) == 10
    method = build_method("clip_lora", cfg, backbone, dataset.classnames)
    settings = method.train_config  # the runner's trainer for it
    return method, NoTestBank(bank), Trainer(settings, run_epochs(cfg, settings), cfg.data.seed, backbone.precision)


def test_the_code_defaults():
    own = ClipLoraConfig()
    assert (own.rank, own.alpha, own.dropout, own.projections, own.layers, own.encoder) == (2, 1, 0.25, "qkv", "all",
                                                                                            "both")
    assert (own.lr, own.weight_decay, own.batch_size, own.iterations_per_shot) == (2e-4, 0.01, 32, 500)
    assert (own.stop, own.templates, own.logit_scale, own.lr_per_step, own.min_lr, own.drop_last) == \
        ("epochs", [], None, None, None, None)


def test_published_steps_a_cosine_to_1e6_every_iteration_and_stops_after_exactly_500_k(tmp_path, shared_cache,  # noqa: F811
                                                                                      monkeypatch):
    method, bank, trainer = lora_setup(tmp_path, shared_cache)
    (lrs, optimizers), sizes = record_steps(monkeypatch), record_batch_sizes(monkeypatch, method)
    info = method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    assert sizes == [4, 4, 2, 4, 4, 2, 4]  # the last short batch kept; stopped mid-epoch at the 7th step
    assert lrs == pytest.approx([cosine(2e-4, ETA_MIN, i, ITERATIONS) for i in range(ITERATIONS)], rel=1e-12, abs=0)
    assert info["history"][-1]["lr"] == pytest.approx(ETA_MIN, rel=1e-9)  # the cosine ends at eta_min
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3] and info["epochs"] == 3
    optimizer = optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        "lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    assert load_checkpoint(tmp_path / "lora.pt")["epoch"] == 3


def test_recipe_promptlearn_steps_the_cosine_per_epoch_to_zero_over_whole_epochs(tmp_path, shared_cache,  # noqa: F811
                                                                                monkeypatch):
    method, bank, trainer = lora_setup(tmp_path, shared_cache, "recipe=promptlearn")
    (lrs, _), sizes = record_steps(monkeypatch), record_batch_sizes(monkeypatch, method)
    info = method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    epochs = 4  # ceil(7 / 2 full batches)
    assert sizes == [4] * 8
    assert lrs == pytest.approx([cosine(2e-4, 0.0, e, epochs) for e in range(epochs) for _ in range(2)],
                                rel=1e-12, abs=0)
    assert info["epochs"] == epochs
    assert load_checkpoint(tmp_path / "lora.pt")["scheduler"]["_last_lr"] == pytest.approx([0.0], abs=1e-20)


def test_stop_epochs_trains_whole_epochs_under_the_published_schedule(tmp_path, shared_cache, monkeypatch):  # noqa: F811
    method, bank, trainer = lora_setup(tmp_path, shared_cache, "clip_lora.stop=epochs")
    (lrs, _), sizes = record_steps(monkeypatch), record_batch_sizes(monkeypatch, method)
    info = method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    assert sizes == [4, 4, 2] * 3 and info["epochs"] == 3  # ceil(7 / 3 batches), every epoch whole
    assert lrs == pytest.approx([cosine(2e-4, ETA_MIN, i, 9) for i in range(9)], rel=1e-12, abs=0)


@pytest.mark.parametrize("max_steps, steps", [(None, 7), (5, 5), (100, 7)])
def test_stop_iterations_under_the_code_defaults(tmp_path, shared_cache, monkeypatch, max_steps, steps):  # noqa: F811
    """Exactly 7 iterations with the last short batch dropped, the per-epoch cosine over the 3.5 epochs they
    take; a smaller train.max_steps still stops training first."""
    extra = [f"train.max_steps={max_steps}"] if max_steps else []
    method, bank, trainer = lora_setup(tmp_path, shared_cache, "recipe=promptlearn", "clip_lora.stop=iterations",
                                       *extra)
    (lrs, _), sizes = record_steps(monkeypatch), record_batch_sizes(monkeypatch, method)
    method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    assert sizes == [4] * steps
    length = min(ITERATIONS, steps) / 2
    assert lrs == pytest.approx([cosine(2e-4, 0.0, i // 2, length) for i in range(steps)], rel=1e-12, abs=0)


GIVEN = {"lr": 0.01, "batch_size": 5, "momentum": 0.5, "weight_decay": 0.2, "warmup_epochs": 1, "warmup_lr": 1e-3,
         "eps": 1e-6, "augment": False, "crop_scale": [0.5, 0.9], "lr_per_step": False, "min_lr": 1e-4,
         "drop_last": True}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_training_key_it_reads_reaches_its_trainer(tmp_path, shared_cache, monkeypatch, optimizer):  # noqa: F811
    unused = "eps" if optimizer == "sgd" else "momentum"  # refused under that optimizer (test_training_keys)
    given = {**{k: v for k, v in GIVEN.items() if k != unused}, "optimizer": optimizer}
    # all it reads but epochs (below): every training key but feature_passes, and the other optimizer's
    assert set(given) == ClipLora.training_keys - {"epochs", unused}
    method, bank, trainer = lora_setup(tmp_path, shared_cache, *(f"clip_lora.{k}={v}" for k, v in given.items()))
    seen = {}
    monkeypatch.setattr(Trainer, "fit", lambda self, method, data, checkpoint, resume: seen.update(
        cfg=self.cfg, epochs=self.epochs, data=data) or {})
    method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    for key in given.keys() - {"augment", "crop_scale"}:
        assert getattr(seen["cfg"], key) == given[key], key
    assert (seen["data"].augment, seen["data"].crop_scale) == (False, (0.5, 0.9))  # the images it streams
    assert seen["epochs"] == 4 and seen["cfg"].max_steps == ITERATIONS  # ceil(7 / 2 batches of 5); the recipe's stop

    monkeypatch.undo()  # and train: the optimizer and the warm-up as given
    lrs, optimizers = record_steps(monkeypatch)
    method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    assert len(lrs) == ITERATIONS and lrs[:2] == [1e-3, 1e-3]  # the warm-up epoch's 2 steps at warmup_lr
    defaults = optimizers[0].defaults
    if optimizer == "sgd":
        assert isinstance(optimizers[0], torch.optim.SGD) and (defaults["momentum"], defaults["weight_decay"]) == (
            0.5, 0.2)
    else:
        assert isinstance(optimizers[0], torch.optim.AdamW) and (defaults["eps"], defaults["weight_decay"]) == (
            1e-6, 0.2)


def test_given_epochs_train_whole_epochs_instead_of_the_iterations(tmp_path, shared_cache, monkeypatch):  # noqa: F811
    method, bank, trainer = lora_setup(tmp_path, shared_cache, "train.epochs=2", iterations=False)
    seen = {}
    monkeypatch.setattr(Trainer, "fit", lambda self, method, data, checkpoint, resume: seen.update(
        cfg=self.cfg, epochs=self.epochs) or {})
    method.fit(bank, trainer, tmp_path / "lora.pt", resume=False)
    assert (seen["epochs"], seen["cfg"].max_steps) == (2, None)  # no stop after the recipe's iterations


@pytest.mark.parametrize("overrides, expected", [
    ([], "a photo of a {}."),  # the published code's, whatever the dataset
    (["data.template={} pattern."], "{} pattern."),  # a given data.template wins over the recipe's
    (["recipe=promptlearn"], "{} texture."),  # the code default: the dataset's own (CoOp's for DTD)
    (['clip_lora.templates=["itap of a {}."]', "data.template={} pattern."], "itap of a {}."),  # its own key
])

def test_templates(tmp_path, overrides, expected):
    cfg = lora_config(tmp_path, tmp_path / "cache", "data.name=dtd", *overrides)
    backbone, classnames = tiny_backbone(), ["banded", "woven"]
    method = build_method("clip_lora", cfg, backbone, classnames)
    assert method.template() == expected
    assert torch.equal(method.token_ids, backbone.tokenizer([expected.format(c) for c in classnames]))


def test_logits_are_100_times_the_cosines_under_the_published_recipe(tmp_path):
    backbone, classnames = tiny_backbone(), ["banded", "woven"]
    images = F.normalize(torch.randn(3, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = F.normalize(torch.randn(2, backbone.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert backbone.logit_scale != pytest.approx(100.0)  # random weights: the checkpoint's own scale differs
    published = build_method("clip_lora", lora_config(tmp_path, tmp_path / "cache"), backbone, classnames)
    assert published.own.logit_scale == 100.0
    torch.testing.assert_close(published.logits(images, text), 100.0 * images @ text.t(), atol=0, rtol=0)
    code = build_method("clip_lora", lora_config(tmp_path, tmp_path / "cache", "recipe=promptlearn"), backbone,
                        classnames)
    torch.testing.assert_close(code.logits(images, text), backbone.logits(images, text), atol=0, rtol=0)


@pytest.mark.parametrize("override, message", [
    ("clip_lora.protocol=reference", "clip_lora.protocol was removed: .*`recipe: published`.*promptlearn list "
                                     "recipes clip_lora.*`recipe: promptlearn`"),
    ("clip_lora.stop=steps", "clip_lora.stop must be one of epochs, iterations, got 'steps'"),
    ('clip_lora.templates=["a {}.", "an {}."]', "clip_lora.templates holds one template .* got 2"),
    ("clip_lora.templates=[a photo]", "clip_lora.templates 'a photo' must contain {}"),
    ("clip_lora.logit_scale=0", "clip_lora.logit_scale must be positive"),
])
def test_bad_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        lora_config(tmp_path, tmp_path / "cache", override)
