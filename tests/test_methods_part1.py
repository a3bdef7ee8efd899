"""CoCoOp, KgCoOp, ProGrad, CLAP and LP++: their formulas on hand-computable cases, CoCoOp's batched
prompts against the original's per-image loop, training lowering the loss, and every method end to
end and on every backbone family."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, quick_config, sample_bank, tiny_backbone

from promptlearn.benchmark_methods import MethodsBenchmarkSpec, measure
from promptlearn.checkpoint import load_checkpoint
from promptlearn.config import RunConfig, load_config
from promptlearn.errors import ConfigError
from promptlearn.features import FeatureBank
from promptlearn.methods import build_method, method_class
from promptlearn.methods.clap import class_adaptive_multipliers, prototype_penalty
from promptlearn.methods.kgcoop import knowledge_guidance, teacher_templates
from promptlearn.methods.lp_pp import blend_step_size, class_sums, initial_blend, visual_step_size
from promptlearn.methods.prograd import distillation, project_conflict
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.runner import run_experiment
from promptlearn.trainer import Trainer

METHODS = ["cocoop", "kgcoop", "prograd", "clap", "lp_pp"]
QUICK = ["train.epochs=3", "cocoop.epochs=3", "cocoop.batch_size=16", "kgcoop.epochs=3", "kgcoop.batch_size=32",
         "clap.epochs=3", "clap.feature_passes=2", "lp_pp.epochs=20", "cocoop.feature_passes=2",
         "kgcoop.feature_passes=2", "prograd.feature_passes=2"]  # lp_pp caches no passes: train.feature_passes is refused


# ----------------------------------------------------------------------------- formulas

def test_knowledge_guidance_value_and_gradient():
    hand = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knowledge_guidance(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), hand).item() == pytest.approx(0.5)
    w = torch.tensor([[1.0, 0.0]], requires_grad=True)  # orthogonal to its hand-crafted feature
    knowledge_guidance(w, torch.tensor([[0.0, 1.0]])).backward()
    assert torch.allclose(w.grad, torch.tensor([[0.0, -1.0]]))  # d(1 - cos)/dw = -t for unit w, t, cos 0


def test_kgcoop_teacher_prompts_are_the_authors(tmp_path):
    """KgCoOp's CUSTOM_TEMPLATES: DTD's teacher is "a photo of a {}, a type of texture." (CoOp's "{} texture." is
    the dataset's zero-shot template); other datasets keep theirs; a template the run sets wins."""
    def teacher(*overrides):
        return teacher_templates(quick_config(tmp_path, "recipe=published", "methods=[kgcoop]", *overrides))

    assert teacher("data.name=dtd", "data.template=null") == ["a photo of a {}, a type of texture."]
    assert teacher("data.name=eurosat", "data.template=null") == ["a centered satellite photo of {}."]
    assert teacher("data.name=dtd", "data.template={} cloth.") == ["{} cloth."]  # the run's template wins
    assert teacher("data.name=dtd", "data.template=null", "recipe=promptlearn") == ["{} texture."]
    assert teacher("data.name=dtd", "kgcoop.templates=['a {} pattern.']") == ["a {} pattern."]


def test_distillation_value_and_gradient():
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[2 * math.log(3), 0.0]])  # at T = 2 the teacher's distribution is (3/4, 1/4)
    loss = distillation(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(4 * math.log(2))
    loss.backward()
    assert torch.allclose(student.grad, torch.tensor([[-0.5, 0.5]]))  # T (q - p) = 2 ((1/2, 1/2) - (3/4, 1/4))


def test_projection_removes_only_the_conflicting_component():
    g, k = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert torch.allclose(project_conflict(g, k, 1.0), torch.tensor([0.5, 0.5]))
    assert torch.dot(project_conflict(g, k, 1.0), k).abs() < 1e-7
    assert torch.allclose(project_conflict(g, k, 0.5), torch.tensor([0.75, 0.25]))
    assert torch.equal(project_conflict(g, torch.tensor([1.0, 1.0]), 1.0), g)  # no conflict: kept
    assert torch.equal(project_conflict(g, torch.zeros(2), 1.0), g)


def test_clap_multipliers_and_penalty():
    logits = torch.log(torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 4.0, 0.0]]))  # rows .75/.25, .5/.5, .2/.8
    multipliers = class_adaptive_multipliers(logits, torch.tensor([0, 0, 1]))
    assert torch.allclose(multipliers, torch.tensor([(0.75 + 0.5) / 2, 0.8, 0.0]))
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    penalty = prototype_penalty(w, torch.zeros(2, 2), torch.tensor([0.5, 1.0]))
    assert penalty.item() == pytest.approx((0.5 * 1 + 1.0 * 4) / 2)
    penalty.backward()
    assert torch.allclose(w.grad, torch.tensor([[0.5, 0.0], [0.0, 2.0]]))  # 2 lambda_c (w_c - t_c) / C


def test_lp_pp_step_sizes_and_initialisation():
    x, y, text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 0]), torch.eye(2)
    assert visual_step_size(x) == pytest.approx(4 * 3 / 2)  # F^T F = diag(2, 1)
    assert blend_step_size(x, text) == pytest.approx(3 / (4 * 2))
    # the authors' calculate_init_alpha gives 250 here: each class's mean score against its own text is 1
    assert initial_blend(x, y, text, 250.0) == pytest.approx(250.0)
    # own-class scores only: class 0 images (f.t0 = 0.6, 0.2; f.t1 = 0.9) and class 1 (f.t1 = 0.5) -> mean(0.4, 0.5)
    x2, y2 = torch.tensor([[0.6, 0.9], [0.2, 0.9], [0.3, 0.5]]), torch.tensor([0, 0, 1])
    assert initial_blend(x2, y2, text, 250.0) == pytest.approx(250 * (0.4 + 0.5) / 2)
    assert torch.equal(class_sums(x, y, 2), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))  # sums, not means


# ----------------------------------------------------------------------------- CoCoOp batched = per image

@pytest.mark.parametrize("model", ["tiny-clip", "tiny-bidir-clip"])
def test_cocoop_batched_chunks_match_the_per_image_loop(tmp_path, model):
    cfg = quick_config(tmp_path, f"backbone.model={model}", "cocoop.prompts_per_pass=7")
    backbone = tiny_backbone(model)
    torch.manual_seed(0)
    method = build_method("cocoop", cfg, backbone, ["shirt", "ankle boot", "bag", "sandal", "coat"])
    with torch.no_grad():  # a non-trivial meta-network bias
        for p in method.meta_net.parameters():
            p.normal_(std=0.5)
    x = F.normalize(torch.randn(6, backbone.embed_dim), dim=-1)
    batched = method(x)
    loop = method.per_image_logits(x)
    assert batched.shape == (6, 5) and torch.allclose(batched, loop, atol=1e-5)
    grads = []
    for logits in (method(x), method.per_image_logits(x)):
        method.zero_grad()
        (logits * torch.arange(30.0).view(6, 5)).sum().backward()
        grads.append([p.grad.clone() for p in (method.prompts.ctx, *method.meta_net.parameters())])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-rn-clip"])
@pytest.mark.parametrize("position", ["end", "middle"])
def test_cocoop_packed_prompts_match_the_plain_computation(tmp_path, model, position):
    """Packed prompts (a start run once per image, with the class at the end) against every prompt at the
    full context length: the same logits and gradients."""
    names = ["shirt", "ankle boot", "bag", "hot air balloon", "x"]
    x = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    results = []
    for shortcuts in ("true", "false"):
        cfg = quick_config(tmp_path, f"backbone.model={model}", f"cocoop.class_position={position}",
                           f"cocoop.truncate_prompts={shortcuts}", f"cocoop.share_prefix={shortcuts}")
        torch.manual_seed(0)
        method = build_method("cocoop", cfg, tiny_backbone(model), names)
        assert method.packed == (shortcuts == "true") and method.share_prefix == (shortcuts == "true" and
                                                                                   position == "end")
        with torch.no_grad():
            for p in method.meta_net.parameters():
                p.normal_(std=0.5)
        logits = method(x[:, :method.backbone.embed_dim])
        (logits * torch.arange(15.0).view(3, 5)).sum().backward()
        results.append((logits.detach(), [p.grad for p in (method.prompts.ctx, *method.meta_net.parameters())]))
    (packed, packed_grads), (plain, plain_grads) = results
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(packed_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_cocoop_refuses_a_class_specific_context(tmp_path):
    with pytest.raises(ConfigError, match="cocoop.class_specific must be false"):
        quick_config(tmp_path, "cocoop.class_specific=true")


# ----------------------------------------------------------------------------- ProGrad's backward

def test_prograd_applies_the_projected_cross_entropy_gradient(tmp_path):
    cfg = quick_config(tmp_path)
    backbone = tiny_backbone()
    torch.manual_seed(0)
    method = build_method("prograd", cfg, backbone, ["shirt", "ankle boot", "bag"])
    with torch.no_grad():
        method.prompts.ctx.normal_(std=0.5)  # away from the zero-shot prompt: the two losses disagree
    x, y = F.normalize(torch.randn(8, backbone.embed_dim), dim=-1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = method.training_step(x, y).losses
    ce_grad, = torch.autograd.grad(losses["cross_entropy"], method.prompts.ctx, retain_graph=True)
    kd_grad, = torch.autograd.grad(losses["distillation"], method.prompts.ctx, retain_graph=True)
    assert torch.dot(ce_grad.flatten(), kd_grad.flatten()) < 0  # a conflict to remove
    method.backward(losses, lambda loss: loss)
    applied = method.prompts.ctx.grad
    assert torch.allclose(applied, project_conflict(ce_grad, kd_grad, 1.0))
    assert torch.dot(applied.flatten(), kd_grad.flatten()) >= -1e-6 * kd_grad.norm() * applied.norm()


# ----------------------------------------------------------------------------- end to end

def test_every_method_runs_end_to_end_and_training_lowers_the_loss(tmp_path):
    metrics = run_experiment(quick_config(tmp_path, f"methods=[zeroshot, {', '.join(METHODS)}]", *QUICK))
    assert list(metrics) == ["zeroshot", *METHODS]
    for name in METHODS:
        assert 0 <= metrics[name]["accuracy"] <= 100
        history = json.loads((tmp_path / "run" / name / "history.json").read_text())
        assert history[-1]["loss"] < history[0]["loss"], name
    kgcoop = json.loads((tmp_path / "run" / "kgcoop" / "history.json").read_text())
    assert {"cross_entropy", "knowledge_guidance"} <= set(kgcoop[0])
    assert 1 <= metrics["lp_pp"]["epoch"] <= 20 and metrics["lp_pp"]["lr_visual"] > 0
    assert 0 < metrics["clap"]["multipliers_mean"] < 1


def test_lp_pp_selects_its_epoch_on_k_validation_images_per_class_with_val_shots(tmp_path):
    """The authors validate LP++ on K images per class; data.val_shots=shots gives it that set, saved apart."""
    metrics = run_experiment(quick_config(tmp_path, "methods=[lp_pp]", "data.shots=6", "data.val_shots=shots",
                                          "lp_pp.epochs=3"))
    saved = json.loads((tmp_path / "run" / "fewshot" / "shot_6-seed_1-val_6.json").read_text())
    assert saved["val_shots"] == 6 and len(saved["val"]) == 60 and 1 <= metrics["lp_pp"]["epoch"] <= 3
    assert not (tmp_path / "run" / "fewshot" / "shot_6-seed_1.json").exists()


def test_capabilities_declared():
    cfg = RunConfig()
    for name in ["cocoop", "kgcoop", "prograd", "clap"]:
        caps = method_class(name).capabilities_for(cfg)
        assert caps.learns and caps.trains and caps.unseen_classes, name
    lp = method_class("lp_pp").capabilities_for(cfg)
    assert lp.learns and lp.uses_validation and not lp.unseen_classes and not lp.trains


def test_published_defaults():
    cfg = RunConfig()
    cocoop, kgcoop, prograd, clap, lp = cfg.cocoop, cfg.kgcoop, cfg.prograd, cfg.clap, cfg.lp_pp
    assert (cocoop.ctx_init, cocoop.lr, cocoop.batch_size, cocoop.epochs) == ("a photo of a", 0.002, 1, 10)
    assert (kgcoop.weight, kgcoop.ctx_init, kgcoop.lr, kgcoop.batch_size, kgcoop.epochs) == \
        (8.0, "a photo of a", 0.002, 128, 100)
    assert (prograd.ctx_init, prograd.projection, prograd.temperature, prograd.templates) == \
        ("a photo of a", 1.0, 1.0, [])
    assert (clap.lr, clap.batch_size, clap.epochs, clap.feature_passes, clap.weight_decay, clap.batches) == \
        (0.1, 256, 300, 20, 0.0, "passes")
    assert (clap.templates, clap.underscores, clap.min_lr) == ([], False, None)  # the run's templates and train.min_lr
    assert (lp.epochs, lp.alpha_every, lp.alpha_init_scale, lp.templates, lp.crop_scale) == (300, 10, 250.0, [], None)


@pytest.mark.parametrize("dataset", ["imagenet", "oxford_pets", "image_folder"])
def test_recipe_promptlearn_gives_the_code_defaults_of_clap_lp_pp_and_the_linear_probe(dataset):
    listed = ["methods=[clap,lp_pp,linear_probe]", f"data.name={dataset}"]
    promptlearn, published = load_config([], [*listed, "recipe=promptlearn"]), load_config([], listed)
    for name in ("clap", "lp_pp", "linear_probe"):
        default = type(getattr(promptlearn, name))()
        assert getattr(promptlearn, name) == default and getattr(published, name) != default, name


def test_bad_values_name_their_own_section(tmp_path):
    with pytest.raises(ConfigError, match="kgcoop.n_ctx must be at least 1.*prograd.projection must be in"):
        quick_config(tmp_path, "kgcoop.n_ctx=0", "prograd.projection=2")
    with pytest.raises(ConfigError, match="cocoop.n_ctx=3 conflicts with cocoop.ctx_init 'a photo of a'"):
        run_experiment(quick_config(tmp_path, "methods=[cocoop]", "cocoop.n_ctx=3"))


def test_cocoop_evaluates_from_its_checkpoint(tmp_path):
    common = ["methods=[cocoop]", "cocoop.epochs=2", "cocoop.batch_size=32"]
    trained = run_experiment(quick_config(tmp_path, *common, f"output_dir={tmp_path / 'train'}"))
    ckpt = str(tmp_path / "train" / "cocoop" / "checkpoint.pt")
    again = run_experiment(quick_config(tmp_path, *common, f"output_dir={tmp_path / 'eval'}"), eval_only=ckpt)
    assert again["cocoop"]["accuracy"] == trained["cocoop"]["accuracy"]
    assert any(k.startswith("meta_net.") for k in load_checkpoint(ckpt)["state"])


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.mark.parametrize("model", FAMILIES)
def test_every_method_on_every_family(tmp_path, shared_cache, model):
    cfg = quick_config(tmp_path, "data.shots=2", f"backbone.model={model}", f"cache_dir={shared_cache}", *QUICK,
                       "train.epochs=1", "cocoop.epochs=1", "kgcoop.epochs=1", "clap.epochs=1", "lp_pp.epochs=3")
    dataset, backbone, bank = sample_bank(cfg, tmp_path, model)
    trainer = Trainer(cfg.train, 1, cfg.data.seed, backbone.precision)
    for name in METHODS:
        torch.manual_seed(cfg.data.seed)
        method = build_method(name, cfg, backbone, dataset.classnames)
        method.fit(bank, trainer, tmp_path / name / "checkpoint.pt", resume=False)
        logits = method.predict(bank.test.features[:16])
        assert logits.shape == (16, len(dataset.classnames)) and torch.isfinite(logits).all(), (model, name)


def test_methods_benchmark_measures_both_paths():
    """The measurements in this process (the tool runs each in a process of its own); timings are not asserted."""
    spec = MethodsBenchmarkSpec(steps=1)
    theirs, ours = measure(spec, "cocoop", 3, reference=True), measure(spec, "cocoop", 3, reference=False)
    assert theirs["prompt_length"] == 77 > ours["prompt_length"]
    assert theirs["images_per_step"] == ours["images_per_step"] == spec.cocoop_batch_size
    lp = measure(spec, "lp_pp", 3, reference=False)
    for path in (theirs, ours, lp):
        assert path["time_per_step_s"] > 0 and path["step_memory_mb"] >= 0 and "peak RSS" in path["memory_kind"]


def test_clap_restored_for_other_classes_keeps_zero_shot_prototypes_for_novel_ones(tmp_path):
    cfg = quick_config(tmp_path, "data.shots=2", "clap.epochs=2", "clap.feature_passes=1", "train.augment=false")
    dataset, backbone, bank = sample_bank(cfg, tmp_path)
    base = build_method("clap", cfg, backbone, dataset.classnames)
    base.fit(bank, Trainer(cfg.train, 5, cfg.data.seed), tmp_path / "clap.pt", resume=False)
    names = [dataset.classnames[2], "hot air balloon", dataset.classnames[0]]
    other = build_method("clap", cfg, backbone, names)
    other.restore(tmp_path / "clap.pt")
    assert torch.equal(other.prototypes[0], base.prototypes[2]) and torch.equal(other.prototypes[2], base.prototypes[0])
    assert torch.equal(other.prototypes[1], other.anchors[1])  # the novel class: its zero-shot prototype
    assert not torch.equal(base.prototypes[0], base.anchors[0])  # training moved the trained ones
    moved = build_method("clap", cfg, backbone, names)  # what base2novel does: the trained state, other classes
    moved.load_trainable_state(base.trainable_state(), "base")
    assert torch.equal(moved.prototypes, other.prototypes)


# the published code's ImageNet ensemble (LP++'s datasets/imagenet.py, as Tip-Adapter's)
IMAGENET_7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def test_lp_pp_published_recipe_uses_imagenet_seven_templates_and_crops_of_half_the_image(tmp_path):
    names = ["shirt", "ankle boot", "bag"]
    backbone = tiny_backbone()

    def text(*overrides):  # no config file: the recipe's templates apply unless the overrides set data.template
        return build_method("lp_pp", load_config([], ["methods=[lp_pp]", *overrides]), backbone, names).text

    torch.testing.assert_close(text("data.name=imagenet"), text_classifier(backbone, names, IMAGENET_7), atol=0, rtol=0)
    # a template the user sets wins; lp_pp.templates given is used as given
    assert torch.equal(text("data.name=imagenet", "data.template=a {} photo."),
                       text_classifier(backbone, names, ["a {} photo."]))
    assert torch.equal(text("data.name=imagenet", "data.template=a {} photo.", "lp_pp.templates=art of the {}."),
                       text_classifier(backbone, names, ["art of the {}."]))
    for other in (["data.name=imagenet", "recipe=promptlearn"], ["data.name=caltech101"]):
        torch.testing.assert_close(text(*other), text_classifier(backbone, names, ["a photo of a {}."]), atol=0, rtol=0)

    crops = []
    runs = {"published": [], "promptlearn": ["recipe=promptlearn"],
            "promptlearn with train.crop_scale": ["recipe=promptlearn", "train.crop_scale=[0.3,1.0]"],
            "published with train.crop_scale": ["train.crop_scale=[0.3,1.0]"], "own": ["lp_pp.crop_scale=[0.2,1.0]"]}
    for name, overrides in runs.items():
        run = quick_config(tmp_path / name, "recipe=published", "methods=[lp_pp]", "lp_pp.epochs=2", "train.augment=true",
                           *overrides)
        seen = []
        original = FeatureBank.train_pass
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(FeatureBank, "train_pass", lambda self, i, augment, cached=True, crop_scale=None:
                          seen.append(tuple(crop_scale)) or original(self, i, augment, cached, crop_scale))
            run_experiment(run)
        crops.append(seen)
    # the recipe's (0.5, 1); promptlearn's train.crop_scale; a given train.crop_scale or lp_pp.crop_scale is honoured
    assert crops == [[(0.5, 1.0)], [(0.08, 1.0)], [(0.3, 1.0)], [(0.3, 1.0)], [(0.2, 1.0)]]


def test_lp_pp_reads_only_epochs_augment_and_crop_scale(tmp_path):
    with pytest.raises(ConfigError, match=r"lp_pp.batch_size is read by no method: lp_pp reads no batch_size: it takes "
                                          r"full-batch SGD steps \(momentum 0.9, no schedule, no weight decay\)"):
        quick_config(tmp_path, "lp_pp.batch_size=8")
    with pytest.raises(ConfigError, match=r"train.lr would not reach lp_pp \(lp_pp reads no lr: .*whose sizes it "
                                          r"computes from the features"):
        quick_config(tmp_path, "methods=[lp_pp]", "train.lr=0.1")
    with pytest.raises(ConfigError, match=r"lp_pp.protocol was removed: .*`recipe: promptlearn`"):
        quick_config(tmp_path, "lp_pp.protocol=reference")
