"""Prompts are tokenised as whole sentences, as zero-shot CLIP and the original CoOp tokenise them:
a class name ending in punctuation merges with the final "." (")." is one BPE token), and class-name
underscores are read as spaces, at every class position."""
import pytest
import torch
from helpers import tiny_backbone

from promptlearn.config import RunConfig
from promptlearn.methods import build_method
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.prompts import layout_prompt

# the six ImageNet classes whose names end in ")" and two with underscores
PUNCTUATED = ["kite (bird of prey)", "Mexican hairless dog (xoloitzcuintli)", "ram (adult male sheep)",
              "impala (antelope)", "military hat (bearskin or shako)", "cherimoya (custard apple)"]
UNDERSCORED = ["golden_retriever", "Annual_Crop_Land"]
CLASSES = PUNCTUATED + UNDERSCORED + ["dog"]
PHRASE = "a photo of a"
SENTENCES = {"end": "a photo of a {}.", "middle": "a photo {} of a.", "front": "{} a photo of a."}


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


def test_punctuated_names_merge_with_the_final_dot(backbone):
    """The fact the layout must respect: "name." is one token shorter than "name" then "."."""
    tok = backbone.tokenizer
    for name in PUNCTUATED:
        assert len(tok.encode(name + ".")) == len(tok.encode(name))
        assert tok.encode(name + ".")[-1] not in (tok.encode(")") + tok.encode("."))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("name", CLASSES)
def test_layout_ids_are_the_ids_of_the_whole_sentence(backbone, name, position):
    tok = backbone.tokenizer
    ids, ctx_positions = layout_prompt(tok, tok.encode(PHRASE), name, position)
    sentence = SENTENCES[position].format(name.replace("_", " "))
    assert ids == tok.start_ids + tok.encode(sentence) + tok.end_ids
    assert [ids[i] for i in ctx_positions] == tok.encode(PHRASE)


def test_underscores_read_as_spaces_in_zero_shot(backbone):
    spaced = [name.replace("_", " ") for name in UNDERSCORED]
    torch.testing.assert_close(text_classifier(backbone, UNDERSCORED, ["a photo of a {}."]),
                               text_classifier(backbone, spaced, ["a photo of a {}."]), atol=0, rtol=0)


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_at_init_equals_zero_shot(backbone, class_specific):
    """CoOp initialised from "a photo of a" is zero-shot CLIP with the template "a photo of a {}.":
    same predictions and probabilities, punctuated and underscored names included."""
    cfg = RunConfig()
    cfg.coop.ctx_init, cfg.coop.class_specific = PHRASE, class_specific
    coop = build_method("coop", cfg, backbone, CLASSES)
    cfg.data.template = "a photo of a {}."
    zeroshot = build_method("zeroshot", cfg, backbone, CLASSES)
    images = torch.nn.functional.normalize(torch.randn(64, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        ours, theirs = coop(images), zeroshot(images)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-5, rtol=0)
