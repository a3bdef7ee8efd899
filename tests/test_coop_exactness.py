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


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-rn-clip"])
def test_ctx_init_words_learns_the_first_w_tokens_and_keeps_the_rest_as_words(model):
    """The original code's count: M = the phrase's words. "itap of a" is 3 words and 4 tokens ("it" "ap"
    "of" "a"): "it ap of" is learned and "a" stays a fixed word before the class; the features at the start
    are still zero-shot CLIP's for "itap of a {}."; "_" reads as a space."""
    b = tiny_backbone(model)
    method = coop(b, ctx_init="itap_of_a", ctx_init_words=True)
    ids = b.tokenizer.encode("itap of a")
    assert len(ids) == 4 and method.prompts.n_ctx == 3 and method.prompts.fixed_ids == ids[3:]
    torch.testing.assert_close(method.prompts.ctx, b.text.embed(torch.tensor(ids[:3])).float())
    with torch.no_grad():
        learned = method.text_features()
    torch.testing.assert_close(learned, text_classifier(b, CLASSES, ["itap of a {}."]), atol=1e-6, rtol=0)
    tokens = coop(b, ctx_init="itap of a")  # promptlearn's default learns all four tokens
    assert tokens.prompts.n_ctx == 4 and tokens.prompts.fixed_ids == []
    assert coop(b, ctx_init="a photo of a", ctx_init_words=True).prompts.n_ctx == 4  # one token a word: the same


def test_ctx_init_words_refusals():
    b = tiny_backbone()
    with pytest.raises(ConfigError, match="coop.ctx_init_words leaves 1 of the tokens of 'itap of a' fixed before "
                                          "the class, which needs coop.class_position=end"):
        coop(b, ctx_init="itap of a", ctx_init_words=True, class_position="middle")
    with pytest.raises(ConfigError, match="n_ctx=4 conflicts with coop.ctx_init 'itap of a', which is 3 words"):
        coop(b, ctx_init="itap of a", ctx_init_words=True, n_ctx=4)
    with pytest.raises(ConfigError, match="has more words"):
        coop(b, ctx_init="a  photo", ctx_init_words=True)
