"""train.min_lr and train.max_steps: where the cosine ends and how many optimizer steps training takes,
for every method; both off by default."""
import math

import pytest
import torch
from helpers import interrupted_at_epoch
from test_gpu_step import RandomFeatures, coop

from promptlearn import trainer as trainer_module
from promptlearn.checkpoint import load_checkpoint
from promptlearn.config import TrainConfig
from promptlearn.trainer import Trainer, lr_factor


def cosine(lr0: float, eta_min: float, i: int, total: int) -> float:
    """CosineAnnealingLR's lr after i of total steps."""
    return eta_min + (lr0 - eta_min) * 0.5 * (1 + math.cos(math.pi * i / total))


def record_steps(monkeypatch) -> tuple[list[float], list[torch.optim.Optimizer]]:
    """Lists that fill, as training goes, with each optimizer step's lr (as the step is taken) and optimizer."""
    lrs, optimizers = [], []
    original = trainer_module.apply_gradients

    def recording(method, optimizer, scaler):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizers.append(optimizer)
        original(method, optimizer, scaler)

    monkeypatch.setattr(trainer_module, "apply_gradients", recording)
    return lrs, optimizers


def test_the_schedule_is_unchanged_by_default():
    cfg = TrainConfig(warmup_epochs=0)
    assert (cfg.min_lr, cfg.max_steps) == (0.0, None)
    for epoch in (0, 0.3, 1, 2.5, 4):
        assert lr_factor(epoch, cfg, 5) == 0.5 * (1.0 + math.cos(math.pi * epoch / 5))


def test_min_lr_is_where_the_cosine_ends_for_any_method(tmp_path):
    cfg, method = coop("train.min_lr=1e-4", "train.lr=0.002", "train.warmup_epochs=0")
    fit = Trainer(cfg.train, epochs=4, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim), tmp_path / "c.pt")
    assert [h["lr"] for h in fit["history"]] == pytest.approx([cosine(0.002, 1e-4, e, 4) for e in range(4)],
                                                              rel=1e-12)
    assert load_checkpoint(tmp_path / "c.pt")["scheduler"]["_last_lr"] == pytest.approx([1e-4], rel=1e-12)


def test_max_steps_stops_mid_epoch_and_the_per_step_cosine_ends_there(tmp_path, monkeypatch):
    cfg, method = coop("train.max_steps=13", "train.lr_per_step=true", "train.warmup_epochs=0")
    lrs, _ = record_steps(monkeypatch)
    fit = Trainer(cfg.train, epochs=5, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim), tmp_path / "c.pt")
    assert len(lrs) == 13  # 10 steps per epoch: one epoch and 3 steps of the second
    assert lrs == pytest.approx([cosine(cfg.train.lr, 0.0, i, 13) for i in range(13)], rel=1e-12, abs=0)
    assert fit["epochs"] == 2 and len(fit["history"]) == 2
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 2


def test_a_run_cut_by_max_steps_resumes_to_the_same_state(tmp_path):
    keys = ("train.max_steps=23", "train.lr_per_step=true", "train.checkpoint_every=1")
    cfg, method = coop(*keys)
    Trainer(cfg.train, epochs=5, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim), tmp_path / "one.pt")
    in_one_go = method.prompts.ctx.detach().clone()

    cfg, method = coop(*keys)
    with interrupted_at_epoch(2), pytest.raises(Exception, match="interrupted; saved the state after epoch 2"):
        Trainer(cfg.train, epochs=5, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim), tmp_path / "two.pt")
    cfg, method = coop(*keys)
    fit = Trainer(cfg.train, epochs=5, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim),
                                                   tmp_path / "two.pt", resume=True)
    assert fit["epochs"] == 3 and [h["epoch"] for h in fit["history"]] == [1, 2, 3]
    torch.testing.assert_close(method.prompts.ctx.detach(), in_one_go, rtol=0, atol=0)


def test_a_checkpoint_written_before_the_new_keys_resumes(tmp_path):
    """A recipe without min_lr / max_steps (written before they existed) is read as their defaults; a
    checkpoint that did set another value is still refused."""
    cfg, method = coop("train.checkpoint_every=1")
    data = RandomFeatures(method.backbone.embed_dim)
    Trainer(cfg.train, epochs=1, seed=1).fit(method, data, tmp_path / "c.pt")
    payload = torch.load(tmp_path / "c.pt", weights_only=False)
    for key in ("min_lr", "max_steps"):
        del payload["recipe"][key]
    torch.save(payload, tmp_path / "old.pt")
    cfg, method = coop("train.checkpoint_every=1")
    fit = Trainer(cfg.train, epochs=2, seed=1).fit(method, data, tmp_path / "old.pt", resume=True)
    assert [h["epoch"] for h in fit["history"]] == [1, 2]
    cfg, method = coop("train.checkpoint_every=1", "train.min_lr=1e-4")
    with pytest.raises(Exception, match="min_lr: 0.0 in the checkpoint, 0.0001 now"):
        Trainer(cfg.train, epochs=2, seed=1).fit(method, data, tmp_path / "c.pt", resume=True)


def test_a_min_lr_above_a_methods_own_lr_is_refused(tmp_path):
    cfg, method = coop("train.min_lr=1e-3")
    recipe = cfg.train.__class__(**{**cfg.train.__dict__, "lr": 2e-4})  # a method's own lr below train.min_lr
    with pytest.raises(Exception, match=r"train.min_lr \(0.001\) is above coop's learning rate \(0.0002\)"):
        Trainer(recipe, epochs=1, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim), tmp_path / "c.pt")


def test_steps_per_epoch_counts_the_batches_batch_order_draws():
    from promptlearn.features import batch_order, steps_per_epoch

    for n in range(0, 40):
        for batch_size in (1, 4, 8, 32):
            for drop_last in (True, False):
                assert steps_per_epoch(n, batch_size, drop_last) == len(batch_order(n, batch_size, 3, 1, drop_last))
    assert batch_order(0, 4, 0, 0) == [] and steps_per_epoch(5, 4) == 1 and steps_per_epoch(5, 4, False) == 2
