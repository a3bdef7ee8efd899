"""prograd.protocol=reference follows ProGrad's published code (BeierZhu/Prompt-align,
ProGrad.public/trainers/prograd.py with configs/trainers/ProGrad/*.yaml, CTX_INIT True): the facts below
are the published ones, restated as numbers and rules.

- The zero-shot teacher uses the dataset's own hand-crafted template (PUBLISHED_TEMPLATES).
- The context is N_CTX vectors (16): with W the number of space-separated words of the template before
  " {}.", the first N_CTX - W start at zero and the last W at the embeddings of the first W tokens of those
  words. The prompt's tokens are those of the whole sentence "X .. X <words> <class>." (N_CTX - W "X"),
  so a word that splits ("pet," is "pet" ",") leaves the words' last tokens fixed after the context.
- N_CTX below W is refused; the published runs put the class at the end with one context.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, quick_config, tiny_backbone

from promptlearn.config import load_config
from promptlearn.data import build_dataset
from promptlearn.data.fewshot import load_or_draw
from promptlearn.decoder import UNIFIED_CLASS, decode_method
from promptlearn.errors import ConfigError
from promptlearn.features import FeatureBank, FeatureCache
from promptlearn.methods import build_method
from promptlearn.methods.prograd import REFERENCE_TEMPLATES
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.runner import run_experiment
from promptlearn.trainer import Trainer

PUBLISHED_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.", "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.", "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}."}
N_CTX = 16
NAMES = ["shirt", "ankle boot", "hot air balloon"]
# dataset: (words W before the class, the tokens of those words left fixed after the context)
WORDS_AND_FIXED = {"oxford_pets": (8, ["a"]), "food101": (7, ["of"]), "dtd": (3, []), "eurosat": (5, []),
                   "ucf101": (6, []), "imagenet": (4, [])}


def reference_method(tmp_path, dataset, *overrides, model="tiny-clip", names=NAMES):
    cfg = quick_config(tmp_path, "prograd.protocol=reference", *overrides)
    cfg.data.name = dataset  # the sample's classes, under the named dataset's published prompt
    torch.manual_seed(0)
    return build_method("prograd", cfg, tiny_backbone(model), names)


def test_published_templates():
    assert REFERENCE_TEMPLATES == PUBLISHED_TEMPLATES


@pytest.mark.parametrize("dataset", sorted(WORDS_AND_FIXED))
def test_context_starts_as_zeros_then_the_template_words(tmp_path, dataset):
    method = reference_method(tmp_path, dataset)
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
    method = reference_method(tmp_path, "oxford_pets")
    tok, row = method.backbone.tokenizer, method.prompts.token_ids[0].tolist()
    a, x = tok.encode("a")[0], tok.encode("X")[0]
    assert row[:18] == tok.start_ids + [x] * 8 + tok.encode("a type of pet, a photo of a")
    assert row[17] == a and method.prompts.fixed_ids == [a]
    assert row[18:21] == tok.encode("shirt.") + tok.end_ids
    assert method.prompts.ctx_positions[0].tolist() == list(range(1, 17))


def test_n_ctx_sets_the_zeros(tmp_path):
    exact = reference_method(tmp_path, "oxford_pets", "prograd.n_ctx=8")  # no room left for zeros
    assert exact.prompts.n_ctx == 8 and bool((exact.prompts.ctx.abs().sum(-1) > 0).all())
    longer = reference_method(tmp_path, "dtd", "prograd.n_ctx=20")
    assert longer.prompts.ctx[:17].abs().sum() == 0 and bool((longer.prompts.ctx[17:].abs().sum(-1) > 0).all())
    with pytest.raises(ConfigError, match=r"prograd.n_ctx=7 is fewer than the 8 words of 'a type of pet, a photo "
                                          r"of a'.*set it to 8 or more"):
        reference_method(tmp_path, "oxford_pets", "prograd.n_ctx=7")


def test_teacher_uses_the_published_template(tmp_path):
    method = reference_method(tmp_path, "oxford_pets")
    published = text_classifier(method.backbone, NAMES, ["a type of pet, a photo of a {}."])
    torch.testing.assert_close(method.zero_shot, published, atol=0, rtol=0)
    cfg = quick_config(tmp_path)  # promptlearn's protocol: the run's template
    plain = build_method("prograd", cfg, method.backbone, NAMES)
    torch.testing.assert_close(plain.zero_shot, text_classifier(method.backbone, NAMES, [cfg.data.template]))
    assert plain.prompts.n_ctx == 4 and plain.prompts.fixed_ids == []


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-rn-clip"])
def test_packed_shared_start_is_exact_with_the_zero_padded_context(tmp_path, model):
    """The context is still one learned context with the class at the end: the shared start and packed
    prompts give the logits and gradients of every prompt at the full context length."""
    x = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    results = []
    for shortcuts in ("true", "false"):
        method = reference_method(tmp_path, "oxford_pets", f"backbone.model={model}",
                                  f"prograd.truncate_prompts={shortcuts}", f"prograd.share_prefix={shortcuts}",
                                  model=model)
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
    cfg = quick_config(tmp_path, "prograd.protocol=reference", "data.shots=2", "train.epochs=2",
                       "train.feature_passes=1")
    dataset = build_dataset(cfg.data)
    fewshot = load_or_draw(dataset, cfg.data, tmp_path / "fewshot")
    backbone = tiny_backbone()
    bank = FeatureBank(backbone, dataset, fewshot, cache=FeatureCache(cfg.cache_dir), batch_size=128,
                       num_workers=0, skip_bad=False, seed=cfg.data.seed)
    cfg.data.name = "oxford_pets"
    torch.manual_seed(0)
    method = build_method("prograd", cfg, backbone, dataset.classnames)
    decoded = decode_method(method)  # at the start the last 8 vectors are the words' tokens exactly
    assert decoded.contexts[0].prompt.endswith(f"a type of pet , a photo of a [{UNIFIED_CLASS}].")
    info = method.fit(bank, Trainer(cfg.train, 2, cfg.data.seed), tmp_path / "prograd.pt", resume=False)
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    assert method.prompts.ctx[:8].detach().abs().sum() > 0
    assert method.checkpoint_meta()["protocol"] == "reference"
    cfg.prograd.protocol = "promptlearn"  # the default is not named: checkpoints from before the option load
    assert "protocol" not in build_method("prograd", cfg, backbone, dataset.classnames).checkpoint_meta()


def test_a_dataset_without_published_prompts_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="prograd.protocol=reference knows the published prompts of .* only, "
                                          "not data.name=image_folder; use prograd.protocol=promptlearn"):
        reference_method(tmp_path, "image_folder")
    cfg = quick_config(tmp_path, "methods=[zeroshot, prograd]", "prograd.protocol=reference")
    with pytest.raises(ConfigError, match="not data.name=image_folder"):
        run_experiment(cfg)  # before anything loads
    assert not (tmp_path / "run").exists()


def test_config_validation(tmp_path):
    assert load_config([], []).prograd.protocol == "promptlearn"
    with pytest.raises(ConfigError, match="prograd.protocol must be one of promptlearn, reference, got 'published'"):
        quick_config(tmp_path, "prograd.protocol=published")
    for override in ("prograd.class_position=middle", "prograd.class_specific=true"):
        with pytest.raises(ConfigError, match="prograd.protocol=reference lays out the published prompt, one "
                                              "context with the class at the end"):
            quick_config(tmp_path, "prograd.protocol=reference", override)
    with pytest.raises(ConfigError, match="did you mean 'prograd.protocol'"):
        quick_config(tmp_path, "prograd.protocl=reference")


def test_shipped_reference_config_loads():
    cfg = load_config([REPO / "configs" / "coop" / "rn50.yaml", REPO / "configs" / "baselines" / "prograd_reference.yaml"])
    assert cfg.prograd.protocol == "reference" and cfg.methods == ["zeroshot", "prograd"]
