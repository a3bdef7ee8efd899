"""TaskRes follows its authors' code (geekyutao/TaskRes, trainers/taskres.py; Dassl's optim/ for Adam and the
schedule). The numbers below were printed by that code, run outside this repository on these tiny values
(TaskResLearner and CustomCLIP.forward with an identity image encoder and logit_scale log(1 / 0.07), the
loss of forward_backward, Dassl's build_optimizer and build_lr_scheduler for the optimizer steps):

- the classifier is base + alpha * residual, the base the raw text features averaged over the templates,
  the residual starting at zero; it is L2-normalised, then logits = logit_scale * cos;
- Adam (betas 0.9, 0.999, eps 1e-8) with weight decay 5e-4 added to the gradient, lr 1e-5 for the
  warm-up epoch, then a cosine over all epochs stepped once per epoch.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import quick_config, tiny_backbone

from promptlearn.config import load_config, training_settings
from promptlearn.data import dataset_templates
from promptlearn.data.base import DatasetSplits
from promptlearn.errors import ConfigError
from promptlearn.methods import build_method, method_class
from promptlearn.protocols import NotApplicable, Target, scorer_for
from promptlearn.recipes import matching
from promptlearn.runner import run_experiment
from promptlearn.trainer import build_optimizer, lr_factor

BASE = torch.tensor([[1.5, -0.5, 2.0, 0.25], [-1.0, 2.5, 0.5, -1.5], [0.75, 1.0, -2.0, 1.25]])
IMAGES = F.normalize(torch.tensor([[0.3, -0.2, 0.9, 0.1], [-0.5, 0.8, 0.1, -0.3], [0.2, 0.4, -0.7, 0.6],
                                   [0.9, 0.1, 0.3, -0.2]]), dim=-1)
LABELS = torch.tensor([0, 1, 2, 1])
RESIDUAL = torch.tensor([[0.1, -0.2, 0.05, 0.3], [-0.4, 0.0, 0.2, 0.1], [0.25, -0.15, -0.3, 0.0]])
NAMES = ["shirt", "ankle boot", "hot air balloon"]

# (alpha, initial residual): the authors' logits, loss and residual gradient
PUBLISHED = {
    (0.5, "zero"): (
        [[13.58842468, -2.34697223, -9.06007195], [-5.74478149, 13.79441643, -0.80683184],
         [-6.25850296, -2.00917435, 14.10193157], [10.58466721, -0.93878841, -0.41182208]],
        2.88087082,
        [[3.41234058e-01, 1.72319800e-01, -1.88666314e-01, -1.93434075e-01],
         [-5.16027749e-01, -8.87627825e-02, -1.82038948e-01, 1.35400876e-01],
         [1.03022157e-05, 1.52142081e-06, 3.22216147e-06, -2.24300788e-06]]),
    (0.5, "R"): (
        [[13.53622913, -2.13898015, -9.08850002], [-6.35231495, 13.94628429, -1.47740948],
         [-5.82620621, -2.31897879, 13.97153378], [10.30080700, -1.65598369, -0.07868922]],
        2.98920703,
        [[3.38010877e-01, 1.79128617e-01, -1.63853109e-01, -2.11592868e-01],
         [-4.93025154e-01, -1.08470902e-01, -1.84730440e-01, 1.44561842e-01],
         [1.83140564e-05, 2.17524939e-06, 6.02376804e-06, -4.06864274e-06]]),
    (1.0, "R"): (
        [[13.43765545, -1.93032372, -9.08447266], [-6.89510727, 14.02802181, -2.08380008],
         [-5.40181351, -2.60470462, 13.80664635], [9.99825478, -2.33434391, 0.22523445]],
        3.08316493,
        [[6.70391262e-01, 3.64881933e-01, -2.78293103e-01, -4.48559523e-01],
         [-9.33405101e-01, -2.49090493e-01, -3.75004262e-01, 3.01098466e-01],
         [6.37420744e-05, 6.89794888e-06, 2.22316576e-05, -1.47780147e-05]]),
}
# 4 epochs (1 warm-up) of 2 batches (images 0-1, then 2-3), alpha 0.5, residual from zero: the lr of each epoch
# and the residual after the 8 steps
PUBLISHED_LRS = [1e-5, 0.002, 0.0017071067811865474, 0.001]
PUBLISHED_AFTER_STEPS = [[-0.00639278, -0.00638837, 0.00639104, 0.00638669],
                         [0.00637477, 0.00638989, 0.00637446, -0.00637451],
                         [-0.00605885, -0.00516155, -0.00566971, 0.00544521]]


def taskres_config(tmp_path, *overrides, dataset="oxford_pets"):
    return load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none", "methods=[taskres]",
                            f"data.name={dataset}", f"output_dir={tmp_path / 'run'}",
                            f"cache_dir={tmp_path / 'cache'}", *overrides])


def tiny_taskres(tmp_path, alpha, residual, *overrides):
    """TaskRes with the reference's base (4 wide) and residual copied in; the tiny tower's logit scale is
    1 / 0.07, as the reference's."""
    method = build_method("taskres", taskres_config(tmp_path, f"taskres.alpha={alpha}", *overrides),
                          tiny_backbone(), NAMES)
    assert math.isclose(method.backbone.logit_scale, 1 / 0.07, rel_tol=1e-6)
    method.base = BASE.clone()
    method.residuals = torch.nn.Parameter(residual.clone())
    return method


@pytest.mark.parametrize("alpha, start", list(PUBLISHED))
def test_logits_loss_and_gradient_are_the_authors(tmp_path, alpha, start):
    logits, loss, grad = PUBLISHED[(alpha, start)]
    method = tiny_taskres(tmp_path, alpha, torch.zeros(3, 4) if start == "zero" else RESIDUAL)
    out, losses = method.training_step(IMAGES, LABELS)
    assert list(losses) == ["cross_entropy"]
    losses["cross_entropy"].backward()
    torch.testing.assert_close(out, torch.tensor(logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["cross_entropy"], torch.tensor(loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.residuals.grad, torch.tensor(grad), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(method.scorer()(IMAGES), torch.tensor(logits), rtol=1e-5, atol=1e-5)


def test_adam_steps_and_schedule_are_the_authors(tmp_path):
    method = tiny_taskres(tmp_path, 0.5, torch.zeros(3, 4), "taskres.epochs=4")
    train = training_settings(method.cfg, "taskres")
    assert (train.optimizer, train.lr, train.weight_decay, train.warmup_epochs, train.warmup_lr, train.eps,
            train.batch_size) == ("adam", 0.002, 5e-4, 1, 1e-5, 1e-8, 256)
    optimizer = build_optimizer([method.residuals], train)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.9, 0.999)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, train, 4))
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        for batch in (slice(0, 2), slice(2, 4)):
            optimizer.zero_grad()
            method.training_step(IMAGES[batch], LABELS[batch]).losses["cross_entropy"].backward()
            optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(PUBLISHED_LRS, rel=1e-12)
    torch.testing.assert_close(method.residuals.detach(), torch.tensor(PUBLISHED_AFTER_STEPS), rtol=1e-4, atol=1e-7)


def test_base_is_the_raw_text_features_averaged_and_the_residual_starts_at_zero(tmp_path):
    templates = ["a photo of a {}.", "art of the {}."]
    cfg = taskres_config(tmp_path, f"taskres.templates={templates}", "taskres.underscores=true")
    backbone = tiny_backbone()
    method = build_method("taskres", cfg, backbone, NAMES)
    spelt = ["shirt", "ankle_boot", "hot_air_balloon"]
    raw = torch.stack([backbone.encode_texts([t.format(c) for c in spelt], normalize=False) for t in templates])
    torch.testing.assert_close(method.base, raw.mean(0))
    assert method.base.norm(dim=-1).sub(1).abs().min() > 1e-3  # not normalised
    assert torch.equal(method.residuals.detach(), torch.zeros_like(raw[0]))
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["residuals"]
    # untrained, TaskRes is zero-shot CLIP on the base
    features = F.normalize(torch.randn(5, raw.shape[-1]), dim=-1)
    torch.testing.assert_close(method.predict(features), backbone.logits(features, F.normalize(raw.mean(0), dim=-1)))
    plain = build_method("taskres", taskres_config(tmp_path, dataset="dtd"), backbone, NAMES)  # "{} texture."
    expected = backbone.encode_texts([dataset_templates(plain.cfg.data)[0].format(c) for c in NAMES], normalize=False)
    torch.testing.assert_close(plain.base, expected)


def test_enhanced_base_replaces_the_text_projection(tmp_path):
    backbone = tiny_backbone()
    own = backbone.text.text_projection.detach().clone()  # [width, D]
    same, other = tmp_path / "same.pth.tar", tmp_path / "other.pth.tar"
    torch.save({"state_dict": {"weight": own.t()}, "epoch": 50}, same)
    torch.manual_seed(3)
    projection = torch.randn(own.shape[1], own.shape[0]) * 0.1
    torch.save({"state_dict": {"weight": projection}}, other)
    regular = build_method("taskres", taskres_config(tmp_path, dataset="dtd"), backbone, NAMES)
    enhanced = build_method("taskres", taskres_config(tmp_path, f"taskres.enhanced_base={same}", dataset="dtd"),
                            backbone, NAMES)
    torch.testing.assert_close(enhanced.base, regular.base, rtol=1e-5, atol=1e-6)
    moved = build_method("taskres", taskres_config(tmp_path, f"taskres.enhanced_base={other}", dataset="dtd"),
                         backbone, NAMES)
    with torch.no_grad():
        backbone.model.text_projection.copy_(projection.t())
    try:
        template = dataset_templates(moved.cfg.data)[0]
        expected = backbone.encode_texts([template.format(c) for c in NAMES], normalize=False)
    finally:
        with torch.no_grad():
            backbone.model.text_projection.copy_(own)
    torch.testing.assert_close(moved.base, expected, rtol=1e-5, atol=1e-6)
    assert moved.checkpoint_meta()["enhanced_base"] == str(other)
    wrong = tmp_path / "wrong.pth.tar"
    torch.save({"state_dict": {"weight": projection[:, :-1]}}, wrong)
    with pytest.raises(ConfigError, match="text projection maps"):
        build_method("taskres", taskres_config(tmp_path, f"taskres.enhanced_base={wrong}"), backbone, NAMES)
    hf = tiny_backbone("tiny-hf-clip")
    with pytest.raises(ConfigError, match="Hugging Face text tower does not have"):
        build_method("taskres", taskres_config(tmp_path, f"taskres.enhanced_base={same}", "backbone.model=tiny-hf-clip"),
                     hf, NAMES)
    with pytest.raises(ConfigError, match="taskres.enhanced_base: no file"):
        taskres_config(tmp_path, f"taskres.enhanced_base={tmp_path / 'absent.pth.tar'}")


def test_config_problems(tmp_path):
    with pytest.raises(ConfigError, match="taskres.alpha must be above 0"):
        taskres_config(tmp_path, "taskres.alpha=0")
    with pytest.raises(ConfigError, match="must contain {} where the class name goes"):
        taskres_config(tmp_path, "taskres.templates=['a photo']")


def test_published_recipes(tmp_path):
    def settings(dataset, shots, protocol="fewshot"):
        out = {}
        for recipe in matching("taskres", protocol, dataset, shots):
            out.update(recipe.settings)
        return out

    for shots, epochs in [(1, 100), (2, 100), (4, 100), (8, 200), (16, 200)]:
        dtd = settings("dtd", shots)
        assert (dtd["taskres.epochs"], dtd["taskres.lr"], dtd["taskres.alpha"], dtd["taskres.batch_size"],
                dtd["taskres.optimizer"], dtd["taskres.weight_decay"]) == (epochs, 0.002, 0.5, 256, "adam", 5e-4)
        assert "taskres.templates" not in dtd and "taskres.underscores" not in dtd
        assert settings("oxford_flowers", shots)["taskres.alpha"] == 1.0
        imagenet = settings("imagenet", shots)
        assert (imagenet["taskres.lr"], imagenet["taskres.epochs"], len(imagenet["taskres.templates"])) == \
            (0.0002, epochs, 8)
    assert settings("oxford_pets", 16)["taskres.underscores"] is True
    dg = settings("imagenet", 16, "domain_generalization")
    assert (dg["taskres.lr"], dg["taskres.epochs"], dg["taskres.alpha"], dg["taskres.templates"][-1]) == \
        (0.0002, 200, 0.5, "a photo of a {}.")
    cfg = taskres_config(tmp_path, "data.shots=4", dataset="imagenet")  # the default recipe: published
    assert (cfg.taskres.lr, cfg.taskres.epochs, cfg.taskres.alpha) == (0.0002, 100, 0.5)


def test_scores_its_training_classes_and_subsets_only(tmp_path):
    caps = method_class("taskres").capabilities
    assert caps.learns and caps.trains and caps.cached_features and caps.eval_from_checkpoint
    assert not caps.unseen_classes
    method = build_method("taskres", taskres_config(tmp_path), tiny_backbone(), NAMES)
    cfg = method.cfg
    subset = Target("subset", DatasetSplits("subset", NAMES[:2]), cfg.data)
    features = F.normalize(torch.randn(3, method.base.shape[-1]), dim=-1)
    assert torch.equal(scorer_for(method, subset, cfg)(features), method.predict(features)[:, :2])
    other = Target("other", DatasetSplits("other", ["shirt", "kite"]), cfg.data)
    assert isinstance(scorer_for(method, other, cfg), NotApplicable)


def test_trains_end_to_end_and_moves_the_residual(tmp_path):
    metrics = run_experiment(quick_config(tmp_path, "methods=[taskres]", "taskres.epochs=3", "taskres.batch_size=8",
                                          "taskres.lr=0.01"))
    assert 0 <= metrics["taskres"]["accuracy"] <= 100
