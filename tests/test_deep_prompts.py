"""Deep prompts and LoRA inside open_clip's towers: exactness against straightforward loops over the
towers' own modules, zero-effect insertions, gradients, training, runs and refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, SAMPLE, interrupted_at_epoch, quick_config, tiny_backbone

from promptlearn import deep_benchmark
from promptlearn.data.registry import ensemble
from promptlearn.deep_benchmark import reference_image_features, reference_text_features
from promptlearn.deep_prompts import image_tower, text_prompts, vision_prompts
from promptlearn.errors import ConfigError
from promptlearn.lora import LoRAAttention, attached
from promptlearn.methods import build_method
from promptlearn.methods.promptsrc import gpa_weights
from promptlearn.runner import run_experiment
from promptlearn.sweep import load_sweep, plan_runs, run_sweep

QUICK = REPO / "configs" / "sweeps" / "quick_sample.yaml"

VIT_FAMILIES = ["tiny-clip", "tiny-custom-clip", "tiny-bidir-clip"]
IMAGE_METHODS = ["vpt_deep", "ivlp", "maple", "promptsrc", "clip_lora"]
PROMPTED = ("vpt_deep", "ivlp", "maple", "promptsrc")
SHALLOW = [f"{m}.depth_vision=2" for m in PROMPTED] + [f"{m}.depth_text=2" for m in PROMPTED if m != "vpt_deep"]
CLASSES = ["cat", "dog", "traffic light"]


@pytest.fixture(scope="module")
def backbones():
    return {name: tiny_backbone(name) for name in VIT_FAMILIES}


def reference_vision(visual, images, prompts):
    """What the authors' prompted ViT computes, written out over open_clip's modules: prompts[0]
    appended after the positional embedding, before ln_pre; prompts[i] replacing the last n tokens
    before block i; the class token read after the last block."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0]
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1))
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_vision_prompts_match_the_straightforward_loop(backbones, family):
    visual = backbones[family].model.visual
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    prompts = [torch.randn(4, visual.transformer.width) for _ in range(2)]
    with torch.no_grad(), vision_prompts(image_tower(backbones[family].model, "test"), prompts):
        hooked = visual(images)
    torch.testing.assert_close(hooked, reference_vision(visual, images, prompts), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the hooks are gone after the `with`: the tower is the frozen one again
        torch.testing.assert_close(visual(images), backbones[family].model.encode_image(images), rtol=0, atol=0)
        with vision_prompts(image_tower(backbones[family].model, "test"), []):
            torch.testing.assert_close(visual(images), backbones[family].model.encode_image(images), rtol=0, atol=0)


def test_timm_vit_towers_take_prompts_like_the_straightforward_loop():
    """A timm ViT trunk: prompts appended after the position embedding (before norm_pre), replaced
    before each block, dropped before the final norm, the class token pooled by timm's head."""
    backbone = tiny_backbone("tiny-timm-clip")
    visual, trunk = backbone.model.visual, backbone.model.visual.trunk
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    prompts = [torch.randn(3, trunk.embed_dim) for _ in range(3)]
    with torch.no_grad():
        with vision_prompts(image_tower(backbone.model, "test"), prompts):
            hooked = visual(images)
        x = trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images)))
        x = trunk.norm_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1))
        for i, block in enumerate(trunk.blocks):
            if 0 < i < len(prompts):
                x = torch.cat([x[:, :-3], prompts[i].expand(len(x), -1, -1)], dim=1)
            x = block(x)
        expected = visual.head(trunk.forward_head(trunk.norm(x[:, :-3])))
        torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(visual(images), backbone.model.encode_image(images), rtol=0, atol=0)
    method = build_method("maple", quick_config_for("tiny-timm-clip"), backbone, CLASSES)
    sum(method.training_step(images, torch.tensor([0, 1])).losses.values()).backward()
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["tiny-clip", "tiny-custom-clip"])
def test_text_deep_prompts_equal_to_the_hidden_states_change_nothing(backbones, family):
    """Under a causal mask the context positions 1..n hold the same hidden states in every prompt;
    deep prompts equal to those states are a zero-effect insertion."""
    backbone = backbones[family]
    tower = backbone.text
    method = build_method("ivlp", quick_config_for(family), backbone, CLASSES)
    ids, embeds, n = method.text.token_ids, method.text.embeddings().detach(), method.text.ctx.shape[0]
    seen = {}
    blocks = tower.transformer.resblocks
    handle = blocks[1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        plain = tower.encode(embeds, ids)
    handle.remove()
    states = seen["x"] if tower.transformer.batch_first else seen["x"].transpose(0, 1)
    with torch.no_grad(), text_prompts(tower.transformer, 1, [states[0, 1:1 + n]]):
        same = tower.encode(embeds, ids)
        different = None
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), text_prompts(tower.transformer, 1, [torch.randn(n, tower.width)]):
        different = tower.encode(embeds, ids)
    assert not torch.allclose(different, plain, atol=1e-3)  # the hook does reach the block


@pytest.mark.parametrize("name", ["ivlp", "maple", "promptsrc"])
@pytest.mark.parametrize("family", ["tiny-clip", "tiny-custom-clip"])
def test_packed_text_prompts_match_the_full_pass_with_hooks(backbones, family, name):
    """The text side packed (the [SOS] [context] start run once, deep prompts replaced in it, every class
    through its own length) against every prompt in full with the hooks: features and gradients."""
    backbone = backbones[family]
    method = build_method(name, quick_config_for(family), backbone,
                          [*CLASSES, "hot air balloon", "x"])
    assert method.text.packing is not None and method.text.packing.prefix == 1 + method.text.ctx.shape[0]
    with torch.no_grad():
        for p in (method.text.ctx, method.text.deep):
            p.normal_(std=0.5)
    weights = torch.randn(5, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    results = []
    for packing in (method.text.packing, None):
        method.text.packing = packing
        method.zero_grad(set_to_none=True)
        features = method.text_features()
        (features * weights).sum().backward()
        learned = [p for p in method.parameters() if p.requires_grad and p.grad is not None]
        results.append((features.detach(), [p.grad.clone() for p in learned]))
    (packed, packed_grads), (full, full_grads) = results
    torch.testing.assert_close(packed, full, rtol=1e-5, atol=1e-6)
    assert len(packed_grads) == len(full_grads) >= 2
    for a, b in zip(packed_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def quick_config_for(family: str, *extra: str):
    import tempfile
    from pathlib import Path
    return quick_config(Path(tempfile.mkdtemp()), f"backbone.model={family}", *SHALLOW, *extra)


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_lora_with_zero_b_leaves_both_towers_unchanged(backbones, family):
    backbone = backbones[family]
    method = build_method("clip_lora", quick_config_for(family), backbone, CLASSES).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.encode_images(images), backbone.encode_images(images), rtol=1e-5, atol=1e-6)
        expected = F.normalize(backbone.model.encode_text(method.token_ids), dim=-1)
        torch.testing.assert_close(method.text_features(), expected, rtol=1e-5, atol=1e-6)


def test_lora_equals_merged_weights(backbones):
    """In eval mode (no dropout) a LoRA on q, k, v, o is the frozen attention with W + s B A."""
    backbone = backbones["tiny-clip"]
    block = backbone.model.visual.transformer.resblocks[0]
    torch.manual_seed(1)
    adapter = LoRAAttention(block.attn, "qkvo", rank=2, alpha=1.0, dropout=0.25).eval()
    for lora in adapter.lora.values():
        torch.nn.init.normal_(lora.B)
    merged = copy.deepcopy(block)
    width = block.attn.embed_dim
    with torch.no_grad():
        for i, p in enumerate("qkv"):
            lora = adapter.lora[p]
            merged.attn.in_proj_weight[i * width:(i + 1) * width] += lora.scaling * lora.B @ lora.A
        merged.attn.out_proj.weight += adapter.lora["o"].scaling * adapter.lora["o"].B @ adapter.lora["o"].A
        assert adapter.lora["q"].scaling == pytest.approx(2 ** -0.5)  # CLIP-LoRA: alpha / sqrt(rank)
        x = torch.randn(2, 17, width)
        with attached([block], [adapter]):
            adapted = block(x)
        torch.testing.assert_close(adapted, merged(x), rtol=1e-5, atol=1e-5)
        assert block.attn is not adapter  # swapped back


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_only_the_learned_parameters_get_gradients(backbones, name):
    backbone = backbones["tiny-clip"]
    method = build_method(name, quick_config_for("tiny-clip"), backbone, CLASSES)
    logits, losses = method.training_step(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    loss = sum(losses.values())
    loss.backward()
    learned = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert learned and [n for n, p in learned if p.grad is None] == []
    # every learned tensor moves (LoRA's A has no gradient while B is zero, as in any LoRA)
    assert [n for n, p in learned if p.grad.abs().sum() == 0 and not n.endswith(".A")] == []
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    assert logits.shape == (3, len(CLASSES))


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(backbones, name):
    backbone = backbones["tiny-clip"]
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        method = build_method(name, quick_config_for("tiny-clip", f"{name}.grad_checkpointing={flag}"),
                              backbone, CLASSES).eval()  # eval: no LoRA dropout
        torch.manual_seed(1)
        sum(method.training_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 2])).losses.values()).backward()
        grads.append([p.grad for p in method.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_towers_that_cannot_be_reached_are_refused(name):
    with pytest.raises(ConfigError, match="ModifiedResNet"):
        build_method(name, quick_config_for("tiny-rn-clip"), tiny_backbone("tiny-rn-clip"), CLASSES)


def test_gpa_weights_and_the_kept_prompts_are_the_gaussian_weighted_average(backbones):
    weights = gpa_weights(20, 15, 1)  # the published recipe: 20 epochs, mean 15, std 1
    assert max(range(20), key=weights.__getitem__) == 14 and sum(weights) == pytest.approx(1)
    assert weights[13] == pytest.approx(weights[15]) and weights[14] == pytest.approx(0.3989, abs=1e-4)
    assert sum(gpa_weights(3, 15, 1)) == pytest.approx(1)  # far from the mean it still normalises
    method = build_method("promptsrc", quick_config_for("tiny-clip", "promptsrc.gpa_mean=2"), backbones["tiny-clip"],
                          CLASSES)
    seen = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            method.vision.fill_(float(epoch))
        seen.append(method.vision.detach().clone())
        method.end_of_epoch(epoch, 3)
    expected = sum(w * v for w, v in zip(gpa_weights(3, 2, 1), seen))
    torch.testing.assert_close(method.vision.detach(), expected)
    sixty = ensemble("imagenet_60")  # PromptSRC's IMAGENET_TEMPLATES: the first 60 of CLIP's 80
    assert len(sixty) == 60 and sixty[0] == "a photo of a {}." and sixty[-1] == "itap of the {}."


def test_promptsrc_adds_nothing_to_the_loss_at_the_frozen_model(backbones):
    """With no prompt tokens the image side is the frozen one and, with the teacher's text features
    set to the prompt's own, the three self-regulating terms vanish: the loss is the cross-entropy.
    With the real teacher (60 templates) they do not."""
    cfg = quick_config_for("tiny-clip", "promptsrc.n_ctx_text=0", "promptsrc.n_ctx_vision=0")
    method = build_method("promptsrc", cfg, backbones["tiny-clip"], CLASSES)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with torch.no_grad():
        logits, losses = method.training_step(images, labels)
        loss = sum(losses.values())
        assert loss > F.cross_entropy(logits, labels) + 1e-3
        method.teacher_text = method.text_features()
        logits, losses = method.training_step(images, labels)
        loss = sum(losses.values())
        torch.testing.assert_close(loss, F.cross_entropy(logits, labels), rtol=1e-6, atol=1e-6)


def test_a_class_name_longer_than_the_context_is_refused(backbones):
    with pytest.raises(ConfigError, match="'word word .*' is \\d+ tokens, more than the text tower's context length 77"):
        build_method("ivlp", quick_config_for("tiny-clip"), backbones["tiny-clip"], ["word " * 80])


@pytest.mark.parametrize("name", ["ivlp", "maple", "promptsrc"])
def test_a_prompt_deeper_than_the_tower_is_refused(backbones, name):
    with pytest.raises(ConfigError, match="depth"):
        build_method(name, quick_config_for("tiny-clip", f"{name}.depth_vision=5", f"{name}.depth_text=5"),
                     backbones["tiny-clip"], CLASSES)


def test_runs_train_on_streamed_images_and_evaluate_through_their_own_encoder(tmp_path):
    """One run with every image method beside zero-shot: each trains on streamed images (the loss
    falls), saves its checkpoint and is evaluated through its own encoder."""
    cfg = quick_config(tmp_path, *SHALLOW, f"methods=[zeroshot,{','.join(IMAGE_METHODS)}]", "data.shots=4",
                       *[f"{m}.epochs=6" for m in PROMPTED], *[f"{m}.lr=0.05" for m in PROMPTED], "promptsrc.lr=0.005",
                       "clip_lora.epochs=null", "clip_lora.iterations_per_shot=3", "clip_lora.lr=0.01", "clip_lora.batch_size=8")
    metrics = run_experiment(cfg)
    for name in IMAGE_METHODS:
        history = json.loads((tmp_path / "run" / name / "history.json").read_text())
        assert history[-1]["loss"] < history[0]["loss"], (name, [h["loss"] for h in history])
        assert (tmp_path / "run" / name / "checkpoint.pt").is_file()
        assert 0 <= metrics[name]["accuracy"] <= 100


def test_a_sweep_runs_an_image_method_and_the_shipped_sweep_loads(tmp_path):
    sweep, base, run_overrides = load_sweep(QUICK, [
        f"sweep.output_dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}", f"data.path={SAMPLE}",
        "sweep.shots=[1]", "sweep.seeds=[1]", "methods=[zeroshot, clip_lora]", "clip_lora.iterations_per_shot=2"])
    rows = run_sweep(sweep, plan_runs(sweep, base, run_overrides))
    assert sorted(r["method"] for r in rows) == ["clip_lora", "zeroshot"]
    shipped, shipped_base, _ = load_sweep(REPO / "configs" / "sweeps" / "vit_b16_deep_prompts.yaml")
    assert set(IMAGE_METHODS) <= set(shipped_base.methods) and len(shipped.datasets) == 11
    assert shipped_base.backbone.model == "ViT-B-16-quickgelu"  # the authors' CLIP uses QuickGELU


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_the_benchmark_reference_loop_computes_what_the_hooks_compute(backbones, name):
    method = build_method(name, quick_config_for("tiny-clip"), backbones["tiny-clip"], CLASSES)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference_image_features(method, images), method.encode_images(images),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reference_text_features(method), method.text_features(), rtol=1e-5, atol=1e-6)


def test_the_benchmark_measures_a_step_of_each_kind():
    """`_measure` is what each benchmark process runs (in-process here: spawning is slow on 2 cores)."""
    figures = []
    for reference in (False, True):
        deep_benchmark._measure("maple", "tiny-clip", reference, False, 2, 1,
                                ["maple.depth_vision=2", "maple.depth_text=2"], FakeQueue(figures))
    assert all(f["time_per_step_s"] > 0 and f["peak_memory_mb"] > 0 and f["image_size"] == 32 for f in figures)


class FakeQueue(list):
    def __init__(self, into: list):
        self.put = into.append


def test_promptsrc_resumes_to_the_same_prompts_and_evaluates_from_its_checkpoint(tmp_path):
    """The Gaussian-weighted sums travel in the checkpoint: a run interrupted after 2 of 3 epochs and
    resumed keeps the same prompts as an uninterrupted one; --eval-only gives its accuracy again."""
    from promptlearn.checkpoint import load_checkpoint

    def config(folder):
        return quick_config(tmp_path, *SHALLOW, "methods=[promptsrc]", "data.shots=2", "promptsrc.epochs=3",
                            "promptsrc.gpa_mean=2", f"output_dir={tmp_path / folder}")
    full = run_experiment(config("full"))
    with interrupted_at_epoch(2), pytest.raises(Exception, match="interrupted; saved the state after epoch 2"):
        run_experiment(config("resumed"))
    resumed = run_experiment(config("resumed"), resume=True)
    states = [load_checkpoint(tmp_path / f / "promptsrc" / "checkpoint.pt")["state"] for f in ("full", "resumed")]
    assert states[0].keys() == states[1].keys() and any(k.startswith("gpa.") for k in states[0])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert resumed["promptsrc"]["accuracy"] == full["promptsrc"]["accuracy"]
    again = run_experiment(config("eval"), eval_only=str(tmp_path / "full" / "promptsrc" / "checkpoint.pt"))
    assert again["promptsrc"]["accuracy"] == full["promptsrc"]["accuracy"]
