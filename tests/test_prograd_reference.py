"""ProGrad under its published recipe (the default, `recipe: published`) follows its published code
(BeierZhu/Prompt-align, ProGrad.public/trainers/prograd.py with configs/trainers/ProGrad/*.yaml, CTX_INIT True):
the facts below are the published ones, restated as numbers and rules.

- The zero-shot teacher uses the dataset's own hand-crafted template (PUBLISHED_TEMPLATES).
- The context is N_CTX vectors (16): with W the number of space-separated words of the template before
  " {}.", the first N_CTX - W start at zero and the last W at the embeddings of the first W tokens of those
  words. The prompt's tokens are those of the whole sentence "X .. X <words> <class>." (N_CTX - W "X"),
  so a word that splits ("pet," is "pet" ",") leaves the words' last tokens fixed after the context.
- N_CTX below W is refused; the published runs put the class at the end with one context.

The recipe states them as prograd.templates, prograd.ctx_init (the words), prograd.ctx_init_words and
prograd.n_ctx (promptlearn/recipes/prograd.yaml); `recipe=promptlearn` runs the code defaults instead.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import SAMPLE, quick_config, tiny_backbone

from promptlearn.config import load_config
from promptlearn.data import build_dataset
from promptlearn.data.base import DatasetSplits
from promptlearn.data.fewshot import load_or_draw
from promptlearn.decoder import UNIFIED_CLASS, decode_method
from promptlearn.errors import ConfigError
from promptlearn.features import FeatureBank, FeatureCache
from promptlearn.methods import build_method
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.protocols import Target, scorer_for
from promptlearn.recipes import matching, recipes_for
from promptlearn.settings import effective
from promptlearn.trainer import Trainer

PUBLISHED_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.", "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.", "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}."}
EVALUATION_ONLY = ("imagenet_sketch", "imagenet_v2", "imagenet_a", "imagenet_r")  # "a photo of a {}." too
N_CTX = 16
NAMES = ["shirt", "ankle boot", "hot air balloon"]
# dataset: (words W before the class, the tokens of those words left fixed after the context)
WORDS_AND_FIXED = {"oxford_pets": (8, ["a"]), "food101": (7, ["of"]), "dtd": (3, []), "eurosat": (5, []),
                   "ucf101": (6, []), "imagenet": (4, [])}


def prograd_config(tmp_path, dataset, *overrides, model="tiny-clip"):
    """A config that lists prograd on `dataset` with no data.template, so that its published recipe applies."""
    return load_config([], [f"backbone.model={model}", "backbone.pretrained=none", "methods=[zeroshot, prograd]",
                            f"data.name={dataset}", f"output_dir={tmp_path / 'run'}",
                            f"cache_dir={tmp_path / 'cache'}", *overrides])


def published_method(tmp_path, dataset, *overrides, model="tiny-clip", names=NAMES):
    """ProGrad for the sample's classes under the named dataset's published recipe."""
    cfg = prograd_config(tmp_path, dataset, *overrides, model=model)
    torch.manual_seed(0)
    return build_method("prograd", cfg, tiny_backbone(model), names)


@pytest.mark.parametrize("protocol, shots", [("fewshot", 1), ("fewshot", 16), ("base2novel", 4)])
def test_published_templates_are_recipe_data(protocol, shots):
    for dataset, template in PUBLISHED_TEMPLATES.items():
        settings = {k: v for r in matching("prograd", protocol, dataset, shots) for k, v in r.settings.items()}
        assert settings["prograd.templates"] == [template], dataset
        assert settings["prograd.ctx_init"] == template.replace(" {}.", ""), dataset  # the words before the class
        assert settings["prograd.ctx_init_words"] is True
    imagenet = [r for r in recipes_for("prograd") if r.datasets == ("imagenet",) and "prograd.templates" in r.settings]
    assert "ImageNet-Sketch, -V2, -A and -R" in imagenet[0].note  # evaluated only: never trained on
    assert not any(set(r.datasets) & set(EVALUATION_ONLY) for r in recipes_for("prograd"))


@pytest.mark.parametrize("dataset", sorted(WORDS_AND_FIXED))
def test_context_starts_as_zeros_then_the_template_words(tmp_path, dataset):
    method = published_method(tmp_path, dataset)
    tok, prompts = method.backbone.tokenizer, method.prompts
    phrase = PUBLISHED_TEMPLATES[dataset].replace(" {}.", "")
    words, fixed = WORDS_AND_FIXED[dataset]
    zeros = N_CTX - words
    assert prompts.n_ctx == N_CTX and prompts.ctx.shape == (N_CTX, method.backbone.text.width)
    assert [tok.decode([i]).strip() for i in prompts.fixed_ids] == fixed
    for row, name in zip(prompts.token_ids, NAMES):
        sentence = " ".join(["X"] * zeros + [phrase, name]) + "."  # tokenised whole, as the published code does
        expected_ids = tok([sentence])[0][:len(row)]
        assert torch.equal(row, expected_ids)
        # [SOS], the context at 1..16, the fixed words, the class name, ".", [EOS]
        assert row[N_CTX + 1:N_CTX + 1 + len(fixed)].tolist() == prompts.fixed_ids
    embeds = method.prompts()
    expected = method.backbone.text.embed(prompts.token_ids).float()
    expected[:, 1:1 + zeros] = 0  # zeros at positions 1..16 - W, then the embeddings of the words' first W tokens
    torch.testing.assert_close(embeds, expected, atol=0, rtol=0)
    words_ids = tok.encode(phrase)[:words]
    torch.testing.assert_close(prompts.ctx[zeros:].detach(), method.backbone.text.embed(torch.tensor(words_ids)),
                               atol=0, rtol=0)
    assert prompts.ctx[:zeros].abs().sum() == 0


def test_pets_context_in_numbers(tmp_path):
    """'a type of pet, a photo of a': 8 words, 9 tokens; zeros at 1..8, 'a type of pet , a photo of' at 9..16,
    the last 'a' fixed at 17, the class name from 18."""
    method = published_method(tmp_path, "oxford_pets")
    tok, row = method.backbone.tokenizer, method.prompts.token_ids[0].tolist()
    a, x = tok.encode("a")[0], tok.encode("X")[0]
    assert row[:18] == tok.start_ids + [x] * 8 + tok.encode("a type of pet, a photo of a")
    assert row[17] == a and method.prompts.fixed_ids == [a]
    assert row[18:21] == tok.encode("shirt.") + tok.end_ids
    assert method.prompts.ctx_positions[0].tolist() == list(range(1, 17))


def test_n_ctx_sets_the_zeros(tmp_path):
    exact = published_method(tmp_path, "oxford_pets", "prograd.n_ctx=8")  # no room left for zeros
    assert exact.prompts.n_ctx == 8 and bool((exact.prompts.ctx.abs().sum(-1) > 0).all())
    unset = published_method(tmp_path, "oxford_pets", "prograd.n_ctx=null")  # CoOp's count: the phrase's words
    torch.testing.assert_close(unset.prompts.ctx, exact.prompts.ctx, atol=0, rtol=0)
    longer = published_method(tmp_path, "dtd", "prograd.n_ctx=20")
    assert longer.prompts.ctx[:17].abs().sum() == 0 and bool((longer.prompts.ctx[17:].abs().sum(-1) > 0).all())
    with pytest.raises(ConfigError, match=r"prograd.n_ctx=7 is fewer than the 8 words of prograd.ctx_init 'a type "
                                          r"of pet, a photo of a'.*set it to 8 or more"):
        published_method(tmp_path, "oxford_pets", "prograd.n_ctx=7")


def test_the_zero_padded_start_is_ctx_init_words_with_a_larger_n_ctx(tmp_path):
    """The recipe's keys do it, on any dataset and phrase: ctx_init counted in words, n_ctx above the words."""
    own = published_method(tmp_path, "image_folder", "prograd.ctx_init=a type of pet, a photo of a")
    pets = published_method(tmp_path, "oxford_pets")
    assert own.prompts.fixed_ids == pets.prompts.fixed_ids
    torch.testing.assert_close(own.prompts.ctx, pets.prompts.ctx, atol=0, rtol=0)
    assert torch.equal(own.prompts.token_ids, pets.prompts.token_ids)
    with pytest.raises(ConfigError, match="prograd.n_ctx=16 conflicts with prograd.ctx_init 'a photo of a', which "
                                          "is 4 tokens"):  # counted in tokens, n_ctx must agree (CoOp's rule)
        published_method(tmp_path, "image_folder", "prograd.ctx_init_words=false")


def test_teacher_uses_the_published_template(tmp_path):
    method = published_method(tmp_path, "oxford_pets")
    published = text_classifier(method.backbone, NAMES, ["a type of pet, a photo of a {}."])
    torch.testing.assert_close(method.zero_shot, published, atol=0, rtol=0)
    cfg = quick_config(tmp_path, "methods=[prograd]", "recipe=promptlearn")  # the code defaults: the run's template
    plain = build_method("prograd", cfg, method.backbone, NAMES)
    torch.testing.assert_close(plain.zero_shot, text_classifier(method.backbone, NAMES, [cfg.data.template]))
    assert plain.prompts.n_ctx == 4 and plain.prompts.fixed_ids == []


def test_a_dataset_without_published_prompts_runs_the_common_settings(tmp_path):
    """No entry for a custom dataset: its own template teaches, and the context of 16 starts as 12 zeros then
    "a photo of a" (prograd.ctx_init's default, counted in words as the recipe says)."""
    method = published_method(tmp_path, "image_folder", "data.template=a sketch of a {}.")
    tok, prompts = method.backbone.tokenizer, method.prompts
    assert prompts.n_ctx == N_CTX and prompts.fixed_ids == []
    assert prompts.ctx[:12].abs().sum() == 0
    torch.testing.assert_close(prompts.ctx[12:].detach(), method.backbone.text.embed(
        torch.tensor(tok.encode("a photo of a"))), atol=0, rtol=0)
    torch.testing.assert_close(method.zero_shot, text_classifier(method.backbone, NAMES, ["a sketch of a {}."]),
                               atol=0, rtol=0)


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-rn-clip"])
def test_packed_shared_start_is_exact_with_the_zero_padded_context(tmp_path, model):
    """The context is still one learned context with the class at the end: the shared start and packed
    prompts give the logits and gradients of every prompt at the full context length."""
    x = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    results = []
    for shortcuts in ("true", "false"):
        method = published_method(tmp_path, "oxford_pets", f"prograd.truncate_prompts={shortcuts}",
                                  f"prograd.share_prefix={shortcuts}", model=model)
        assert method.share_prefix == method.packed == (shortcuts == "true")
        assert method.shared_start == (1 + N_CTX if shortcuts == "true" else 0)
        logits = method(x[:, :method.backbone.embed_dim])
        (logits * torch.arange(12.0).view(4, 3)).sum().backward()
        results.append((logits.detach(), method.prompts.ctx.grad))
    (packed, packed_grad), (plain, plain_grad) = results
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_grad, plain_grad, rtol=1e-4, atol=1e-4 * plain_grad.abs().max().item())
    assert plain_grad[:N_CTX - 8].abs().sum() > 0  # the zero vectors learn too


def test_training_moves_the_zero_vectors_and_the_decoded_prompt_keeps_the_fixed_word(tmp_path):
    cfg = prograd_config(tmp_path, "oxford_pets", "data.shots=2", "train.epochs=2", "train.feature_passes=1",
                         "data.num_workers=0")
    sample = dataclasses.replace(cfg.data, name="image_folder", path=str(SAMPLE))  # the sample's images
    dataset = build_dataset(sample)
    fewshot = load_or_draw(dataset, sample, tmp_path / "fewshot")
    backbone = tiny_backbone()
    bank = FeatureBank(backbone, dataset, fewshot, cache=FeatureCache(cfg.cache_dir), batch_size=128,
                       num_workers=0, skip_bad=False, seed=cfg.data.seed)
    torch.manual_seed(0)
    method = build_method("prograd", cfg, backbone, dataset.classnames)
    decoded = decode_method(method)  # at the start the last 8 vectors are the words' tokens exactly
    assert decoded.contexts[0].prompt.endswith(f"a type of pet , a photo of a [{UNIFIED_CLASS}].")
    info = method.fit(bank, Trainer(method.train_config, 2, cfg.data.seed), tmp_path / "prograd.pt", resume=False)
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    assert method.prompts.ctx[:8].detach().abs().sum() > 0
    meta = method.checkpoint_meta()
    assert meta["templates"] == ["a type of pet, a photo of a {}."] and meta["n_ctx"] == N_CTX
    assert meta["ctx_init"] == "a type of pet, a photo of a"
    plain = build_method("prograd", prograd_config(tmp_path, "oxford_pets", "recipe=promptlearn"), backbone,
                         dataset.classnames)
    assert "templates" not in plain.checkpoint_meta()  # unset: not named, so checkpoints from before the key load


def test_a_published_context_moves_to_a_custom_target(tmp_path):
    """Trained under a dataset's published prompt, the context scores any other class list (the teacher is
    for training only)."""
    method = published_method(tmp_path, "oxford_pets")
    custom = dataclasses.replace(method.cfg.data, name="image_folder")
    score = scorer_for(method, Target("mine", DatasetSplits("mine", ["horse", "cat"]), custom), method.cfg)
    logits = score(F.normalize(torch.randn(2, method.backbone.embed_dim), dim=-1))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_a_given_template_replaces_the_teacher_and_must_meet_the_context_start(tmp_path):
    """data.template(s) wins over the recipe's teacher; the published context start (its words) is then refused
    unless it still matches the teacher, or prograd.ctx_init is given too."""
    with pytest.raises(ConfigError, match=r"prograd: data.template '\{\} texture.' replaces ProGrad's published "
                                          r"teacher template 'a texture of \{\}.' for data.name=dtd, but the context "
                                          r"would still start from that template's words, prograd.ctx_init 'a "
                                          r"texture of'.*set prograd.ctx_init to your prompt's words.*"
                                          r"prograd.templates=\['a texture of \{\}.'\].*recipe=promptlearn"):
        published_method(tmp_path, "dtd", "data.template={} texture.")
    with pytest.raises(ConfigError, match=r"data.templates \['a photo of a \{\}.', 'itap of a \{\}.'\] replaces"):
        published_method(tmp_path, "imagenet", 'data.templates=["a photo of a {}.", "itap of a {}."]')
    same = published_method(tmp_path, "dtd", "data.template=a texture of {}.")  # the published one: no conflict
    assert same.prompts.n_ctx == N_CTX and same.cfg.prograd.templates == []
    own = published_method(tmp_path, "dtd", "data.template=a photo of a {}, a type of texture.",
                           "prograd.ctx_init=a photo of a")
    torch.testing.assert_close(own.zero_shot, text_classifier(
        own.backbone, NAMES, ["a photo of a {}, a type of texture."]), atol=0, rtol=0)
    assert own.prompts.n_ctx == N_CTX and own.prompts.ctx[:12].abs().sum() == 0  # still the recipe's 16, in words
    kept = published_method(tmp_path, "dtd", "data.template={} texture.", 'prograd.templates=["a texture of {}."]')
    torch.testing.assert_close(kept.zero_shot, same.zero_shot, atol=0, rtol=0)  # the section's own key wins


def test_class_layouts_with_the_published_start(tmp_path):
    """A word that splits leaves fixed tokens before the class: another class position is refused; a
    class-specific context starts every class from the published start."""
    with pytest.raises(ConfigError, match="prograd.ctx_init_words leaves 1 of the tokens of 'a type of pet, a photo "
                                          "of a' fixed before the class, which needs prograd.class_position=end"):
        published_method(tmp_path, "oxford_pets", "prograd.class_position=middle")
    specific = published_method(tmp_path, "oxford_pets", "prograd.class_specific=true")
    unified = published_method(tmp_path, "oxford_pets")
    assert specific.prompts.ctx.shape == (len(NAMES), N_CTX, unified.backbone.text.width)
    for row in specific.prompts.ctx:
        torch.testing.assert_close(row, unified.prompts.ctx, atol=0, rtol=0)


def test_config(tmp_path):
    with pytest.raises(ConfigError, match="prograd.protocol was removed: .*`recipe: published`.*promptlearn list "
                                          "recipes prograd.*`recipe: promptlearn`"):
        prograd_config(tmp_path, "dtd", "prograd.protocol=reference")
    published = prograd_config(tmp_path, "dtd", "data.shots=16").prograd
    assert (published.templates, published.ctx_init, published.ctx_init_words, published.n_ctx,
            published.projection) == (["a texture of {}."], "a texture of", True, 16, 0.8)
    code = prograd_config(tmp_path, "dtd", "recipe=promptlearn").prograd
    assert (code.templates, code.ctx_init, code.ctx_init_words, code.n_ctx, code.projection, code.temperature) == \
        ([], "a photo of a", False, None, 1.0, 1.0)
    shown = effective(prograd_config(tmp_path, "dtd"))["prograd"]
    assert shown["templates"]["from"].startswith("recipe BeierZhu/Prompt-align ProGrad.public/trainers/prograd.py")
    for bad, message in (("prograd.templates=[a photo]", "prograd.templates 'a photo' must contain {}"),
                         ('prograd.templates=["{x} {}"]', "prograd.templates '{x} {}' must hold exactly one {}")):
        with pytest.raises(ConfigError, match=message):
            prograd_config(tmp_path, "dtd", bad)
