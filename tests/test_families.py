"""Every method on every open_clip tower kind: one tiny registered config per kind (OpenAI ResNet and
ViT, timm ViT and ConvNet, Hugging Face text tower, SigLIP-style, CoCa), each run end to end; the text
tower run on embeddings equals each family's own encode_text; Hugging Face tokenizers and what is
missing named; the model listing."""
import importlib.util
import json
import math

import open_clip
import pytest
import torch
from helpers import SIGLIP_TOKENIZER, hf_tokenizer_cached, quick_config, tiny_backbone, tiny_siglip_tokenizer

from promptlearn.backbone import MODEL_CONFIG_DIR, backbone_problems, load_tokenizer, model_listing
from promptlearn.config import BackboneConfig
from promptlearn.errors import PromptlearnError
from promptlearn.methods import METHODS
from promptlearn.runner import run_experiment
from promptlearn.text_tower import TextTower
from promptlearn.tokens import PromptTokenizer

TOWER_KINDS = {"openai-resnet": "tiny-rn-clip", "openai-vit": "tiny-clip", "timm-vit": "tiny-timm-vit-clip",
               "timm-convnet": "tiny-timm-convnet-clip", "hf-text": "tiny-hf-clip", "siglip": "tiny-siglip-clip",
               "coca": "tiny-coca"}
PROMPTS = ["a photo of a dog.", "an origami golden retriever.", "ankle boot"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


ON_FEATURES = sorted(n for n, m in METHODS.items() if m.capabilities.cached_features)
# on cached image features, but with tokens put inside the text transformer: a Hugging Face text tower is refused
INSIDE_TEXT_TOWER = ("tcp",)
INSIDE_TOWERS = sorted(n for n, m in METHODS.items() if not m.capabilities.cached_features)
# the tiny towers have 2 layers: prompts at depth 2, few iterations
SHALLOW = [f"{m}.depth_vision=2" for m in ("ivlp", "maple", "promptsrc", "vpt_deep")] + \
          [f"{m}.depth_text=2" for m in ("ivlp", "maple", "promptsrc")] + \
          [f"{m}.epochs=1" for m in ("ivlp", "maple", "promptsrc", "vpt_deep", "mmrl", "mma")] + \
          ["clip_lora.epochs=null", "clip_lora.iterations_per_shot=1", "mmrl.rep_layers=[2]", "mma.adapter_start=1", "mma.adapter_end=2"]


@pytest.mark.parametrize("model", TOWER_KINDS.values(), ids=TOWER_KINDS.keys())
def test_every_method_runs_end_to_end(tmp_path, shared_cache, model):
    """Train and evaluate every method on cached features, the decoded prompt included, on the sample; TCP's
    tokens at text block 1 of 2 (a Hugging Face text tower is refused, naming it)."""
    methods = [m for m in ON_FEATURES if model != "tiny-hf-clip" or m not in INSIDE_TEXT_TOWER]
    metrics = run_experiment(quick_config(
        tmp_path, f"backbone.model={model}", f"methods=[{', '.join(methods)}]", "data.shots=1", "tcp.layer=1",
        "train.epochs=1", *[f"{m}.{k}_steps=3" for m in ("tip_adapter", "tip_adapter_f") for k in ("alpha", "beta")],
        "coop.n_ctx=4", "coop.ctx_init=", "coop.class_specific=false", f"cache_dir={shared_cache}"))
    for name in methods:
        assert math.isfinite(metrics[name]["accuracy"]), (model, name)
    if model == "tiny-hf-clip":
        for name in INSIDE_TEXT_TOWER:
            with pytest.raises(PromptlearnError, match="text tower is a HFTextEncoder"):
                run_experiment(quick_config(tmp_path, f"backbone.model={model}", f"methods=[{name}]", "data.shots=1",
                                            f"cache_dir={shared_cache}", f"output_dir={tmp_path / name}"))
    assert json.loads((tmp_path / "run" / "coop" / "decoded_prompt.json").read_text())


@pytest.mark.parametrize("model", TOWER_KINDS.values(), ids=TOWER_KINDS.keys())
def test_methods_inside_the_towers_run_or_name_the_tower_they_cannot_reach(tmp_path, shared_cache, model):
    """Deep prompts and LoRA need open_clip's or timm's transformer blocks: on every tower kind each runs end
    to end, or is refused with a message naming the tower (ResNet, ConvNet, Hugging Face, ...)."""
    ran = []
    for name in INSIDE_TOWERS:
        cfg = quick_config(tmp_path, f"backbone.model={model}", f"methods=[{name}]", "data.shots=1",
                           f"cache_dir={shared_cache}", f"output_dir={tmp_path / name}", *SHALLOW)
        try:
            metrics = run_experiment(cfg)
        except PromptlearnError as refusal:
            assert "tower" in str(refusal) and ("Transformer" in str(refusal) or "tower" in str(refusal)), refusal
            continue
        assert math.isfinite(metrics[name]["accuracy"]), (model, name)
        ran.append(name)
    if model == "tiny-clip":  # an OpenAI-style ViT: every one of them runs
        assert ran == INSIDE_TOWERS


@pytest.mark.parametrize("model", TOWER_KINDS.values(), ids=TOWER_KINDS.keys())
def test_text_tower_on_embeddings_is_encode_text(model):
    b = tiny_backbone(model)
    ids = b.tokenizer(PROMPTS)
    assert torch.equal(b.text.encode(b.text.embed(ids), ids), b.model.encode_text(ids, normalize=False))
    assert b.embed_dim == b.encode_images(torch.zeros(1, 3, b.image_size, b.image_size)).shape[1] == 32


def test_family_facts_are_read_from_the_model():
    siglip, coca, hf = tiny_backbone("tiny-siglip-clip"), tiny_backbone("tiny-coca"), tiny_backbone("tiny-hf-clip")
    assert (siglip.text.context_length, siglip.text.pool_type, siglip.text.causal) == (64, "last", False)
    assert siglip.logit_bias == -10.0 and siglip.tokenizer.start_ids == []
    assert coca.text.context_length == 76 and coca.text.cls_emb is not None and not coca.text.can_truncate
    assert hf.text.token_embedding is hf.model.text.transformer.get_input_embeddings()
    assert hf.tokenizer.start_ids == [0] and hf.tokenizer.end_ids == [2] and hf.tokenizer.pad_id == 1


def check_siglip_tokenizer(tokenizer, context_length: int = 64) -> None:
    """What promptlearn relies on in SigLIP's tokenizer: no start token, the text then </s>, padded with
    </s> to the context length; text cleaned ('canonicalize': lower case, no punctuation) before the ids;
    the prompt layout from plain ids equals the tokenizer's own ids; 'last' pooling reads padding."""
    tok = PromptTokenizer(tokenizer, context_length)
    eos = tok.hf.convert_tokens_to_ids("</s>")
    assert tok.start_ids == [] and tok.end_ids == [eos] and tok.pad_id == eos
    assert tok.encode("A Photo, of a DOG.") == tok.encode("a photo of a dog")
    for text in PROMPTS:
        ids = tok.encode(text) + tok.end_ids
        expected = ids + [tok.pad_id] * (context_length - len(ids))
        assert tok([text])[0].tolist() == expected


def test_siglip_tokenizer_double_follows_the_siglip_rules():
    check_siglip_tokenizer(tiny_siglip_tokenizer())


@pytest.mark.skipif(not hf_tokenizer_cached(), reason=f"{SIGLIP_TOKENIZER} is not in the local HF cache")
def test_real_siglip_tokenizer_follows_the_same_rules():
    check_siglip_tokenizer(load_tokenizer(BackboneConfig(model="ViT-B-16-SigLIP", pretrained="none")))


def test_shipped_tiny_tokenizers_are_the_generated_ones(tmp_path):
    from tiny_tokenizers import FOLDERS, write

    write(tmp_path)
    for folder in FOLDERS:
        for made in (tmp_path / folder).iterdir():
            assert json.loads(made.read_text()) == json.loads((MODEL_CONFIG_DIR / folder / made.name).read_text())


def test_decoder_reads_sentencepiece_and_bpe_tokens():
    siglip, hf = tiny_backbone("tiny-siglip-clip").tokenizer, tiny_backbone("tiny-hf-clip").tokenizer
    assert siglip.token_text(siglip.encode("photo")[0]) == " photo"
    assert siglip.decode(siglip.encode("a photo of a dog")) == "a photo of a dog"
    assert hf.token_text(hf.encode("photo")[0]) == "photo" and hf.special_ids == {0, 1, 2, 3}


def test_missing_transformers_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    cfg = BackboneConfig(model="ViT-B-16-SigLIP", pretrained="none")
    with pytest.raises(PromptlearnError, match=r"transformers.*pip install 'promptlearn\[hf\]'"):
        load_tokenizer(cfg)
    assert any("pip install 'promptlearn[hf]'" in p for p in backbone_problems(cfg))  # checked before a run starts


@pytest.mark.skipif(hf_tokenizer_cached(), reason="the real tokenizer is cached here")
def test_missing_tokenizer_files_are_named(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the hub
    with pytest.raises(PromptlearnError, match=rf"{SIGLIP_TOKENIZER}.*tokenizer files.*local Hugging Face cache "
                                               rf"{tmp_path}.*huggingface-cli download {SIGLIP_TOKENIZER}"):
        load_tokenizer(BackboneConfig(model="ViT-B-16-SigLIP", pretrained="none", cache_dir=str(tmp_path)))


@pytest.mark.skipif(hf_tokenizer_cached("roberta-base", "config.json"), reason="roberta-base is in the local HF cache")
def test_missing_hf_text_model_config_is_named(monkeypatch):
    import huggingface_hub.constants

    from promptlearn.backbone import load_backbone

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("promptlearn.backbone.load_tokenizer", lambda cfg: open_clip.SimpleTokenizer())  # cached
    with pytest.raises(PromptlearnError, match=r"text tower of roberta-ViT-B-32 .* roberta-base, whose model "
                                               r"configuration \(config.json\).*--include config.json"):
        load_backbone(BackboneConfig(model="roberta-ViT-B-32", pretrained="none", device="cpu"))


def test_a_text_tower_that_cannot_take_embeddings_is_refused_for_coop_only():
    class OtherTextTower(torch.nn.Module):
        context_length = 77

    model = open_clip.create_model("tiny-custom-clip")
    model.text = OtherTextTower()
    with pytest.raises(PromptlearnError, match="CustomTextCLIP is a OtherTextTower.*coop and the prompt decoder"):
        TextTower(model)


def test_model_listing_rows():
    rows = {r["model"]: r for r in model_listing(["tiny-coca", "tiny-hf-clip", "tiny-timm-convnet-clip", "RN50"])}
    assert rows["tiny-coca"]["text"].startswith("CoCa") and rows["tiny-hf-clip"]["text"].startswith("Hugging Face")
    assert rows["tiny-timm-convnet-clip"]["vision"] == "timm test_convnext"
    assert rows["RN50"]["vision"] == "ModifiedResNet" and "openai" in rows["RN50"]["tags"]
    assert rows["RN50"]["embed_dim"] == 1024 and rows["RN50"]["cached_tags"] == []
    built = open_clip.create_model("tiny-hf-clip", pretrained_text=False)
    assert rows["tiny-hf-clip"]["parameters"] == sum(p.numel() for p in built.parameters())
    with pytest.raises(PromptlearnError, match="open_clip model"):
        model_listing(["no-such-model"])


def test_a_rescan_of_open_clips_configs_keeps_the_shipped_hugging_face_folders(tmp_path):
    """open_clip.add_model_config rescans every config, turning the tiny configs' folder names relative again
    (read as hub ids, offline a failure); loading a backbone locates them again."""
    open_clip.add_model_config(tmp_path)  # an empty folder: the rescan alone
    assert tiny_backbone("tiny-hf-clip").name == "tiny-hf-clip"
