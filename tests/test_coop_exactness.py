"""With the context initialised from phrase P, CoOp's class features equal open_clip's encode_text
of the sentence the layout spells, for every family and class position."""
import pytest
import torch
from helpers import FAMILIES, no_start_backbone, tiny_backbone

from promptlearn.config import RunConfig
from promptlearn.errors import ConfigError, PromptlearnError
from promptlearn.methods import build_method
from promptlearn.methods.zeroshot import text_classifier

CLASSES = ["dog", "golden retriever", "x-ray machine", "café au lait"]
SENTENCES = {"end": "a photo of a {}.", "middle": "a photo {} of a.", "front": "{} a photo of a."}


def coop(backbone, **coop_keys):
    cfg = RunConfig()
    cfg.coop.ctx_init = "a photo of a"
    for k, v in coop_keys.items():
        setattr(cfg.coop, k, v)
    return build_method("coop", cfg, backbone, CLASSES)


@pytest.mark.parametrize("model", FAMILIES + ["no-start-token"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_phrase_init_equals_encode_text(model, position, class_specific):
    b = no_start_backbone() if model == "no-start-token" else tiny_backbone(model)
    method = coop(b, class_position=position, class_specific=class_specific)
    with torch.no_grad():
        learned = method.text_features()
    expected = text_classifier(b, CLASSES, [SENTENCES[position]])
    torch.testing.assert_close(learned, expected, atol=1e-6, rtol=0)
    if class_specific:
        assert method.prompts.ctx.shape[0] == len(CLASSES)  # class-specific mode kept with a phrase


def test_no_start_token_layout():
    b = no_start_backbone()
    method = coop(b)
    assert b.tokenizer.start_ids == []
    assert method.prompts.ctx_positions[0].tolist() == [0, 1, 2, 3]


def test_random_init_shape_and_scale():
    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.coop.n_ctx, cfg.coop.class_specific = 16, True
    method = build_method("coop", cfg, tiny_backbone(), CLASSES)
    ctx = method.prompts.ctx
    assert ctx.shape == (4, 16, 64) and 0.015 < ctx.std().item() < 0.025
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["prompts.ctx"]


def test_conflicting_n_ctx_is_an_error():
    cfg = RunConfig()
    cfg.coop.ctx_init, cfg.coop.n_ctx = "a photo of a", 16
    with pytest.raises(ConfigError, match="n_ctx=16 conflicts with coop.ctx_init 'a photo of a', which is 4 tokens"):
        build_method("coop", cfg, tiny_backbone(), CLASSES)


def test_prompt_longer_than_context_names_the_class():
    cfg = RunConfig()
    cfg.coop.n_ctx = 16
    long_name = " ".join(["extraordinarily"] * 70)
    with pytest.raises(PromptlearnError, match="prompt for class 'extraordinarily .* context length 77"):
        build_method("coop", cfg, tiny_backbone(), ["dog", long_name])
    cfg.coop.n_ctx = 80
    with pytest.raises(PromptlearnError, match="context length"):
        build_method("coop", cfg, tiny_backbone(), ["dog"])
