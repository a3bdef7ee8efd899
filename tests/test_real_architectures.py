"""The real open_clip architectures of every family, with random weights (no weights exist offline): each
builds through load_backbone and every registered method runs one forward on a handful of images, with
CoOp's prompts through the model's own text tower. SigLIP's tokenizer files come from the hub: where they
are not in the local cache, the tiny SentencePiece-style double of test_families stands in (SigLIP's rules,
checked there; the ids of SigLIP2's Gemma tokenizer cannot be compared offline)."""
import pytest
import torch
from helpers import hf_tokenizer_cached, quick_config, tiny_siglip_tokenizer

from promptlearn.backbone import FrozenCLIP, hf_names, load_backbone
from promptlearn.config import BackboneConfig
from promptlearn.errors import ConfigError
from promptlearn.methods import METHODS, build_method

ARCHITECTURES = ["RN50", "ViT-B-16", "EVA02-B-16", "MobileCLIP-S1", "convnext_base", "PE-Core-B-16",
                 "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "coca_ViT-B-32"]
CLASSNAMES = ["trouser", "ankle boot", "bag"]
IMAGES = 3


def real_backbone(model: str, monkeypatch) -> FrozenCLIP:
    repo = hf_names(model).get("hf_tokenizer_name")
    if repo and not hf_tokenizer_cached(repo):
        monkeypatch.setattr("promptlearn.backbone.load_tokenizer", lambda cfg: tiny_siglip_tokenizer())
    return load_backbone(BackboneConfig(model=model, pretrained="none", device="cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ARCHITECTURES)
def test_every_method_runs_on_the_real_architecture(tmp_path, monkeypatch, model):
    backbone = real_backbone(model, monkeypatch)
    torch.manual_seed(0)
    features = backbone.encode_images(torch.randn(IMAGES, 3, backbone.image_size, backbone.image_size))
    assert features.shape == (IMAGES, backbone.embed_dim)
    cfg = quick_config(tmp_path, f"backbone.model={model}", "coop.n_ctx=4", "coop.ctx_init=")
    labels = torch.arange(IMAGES) % len(CLASSNAMES)
    for name in sorted(METHODS):
        try:
            method = build_method(name, cfg, backbone, CLASSNAMES)
        except ConfigError as e:  # a method that learns inside the towers refuses a tower it cannot reach
            inside = not METHODS[name].capabilities.cached_features or name == "tcp"  # tcp: tokens in the text tower
            assert inside and "tower" in str(e), (model, name, str(e))
            continue
        if hasattr(method, "keys"):  # Tip-Adapter(-F): the handful of images as its cache, as fit() sets it
            method.keys = torch.nn.Parameter(features) if method.fine_tunes else features
            method.values = torch.nn.functional.one_hot(labels, len(CLASSNAMES)).float()
        logits = method.predict(features)
        assert logits.shape == (IMAGES, len(CLASSNAMES)) and torch.isfinite(logits).all(), (model, name)
    # the packed prompts (own lengths, shared start) give the plain 77-token features on the real tower too
    plain_cfg = quick_config(tmp_path, f"backbone.model={model}", "coop.n_ctx=4", "coop.ctx_init=",
                             "coop.class_specific=false", "coop.truncate_prompts=false", "coop.share_prefix=false")
    packed_cfg = quick_config(tmp_path, f"backbone.model={model}", "coop.n_ctx=4", "coop.ctx_init=",
                              "coop.class_specific=false")
    names = [*CLASSNAMES, "hot air balloon", "x"]
    plain, packed = (build_method("coop", c, backbone, names) for c in (plain_cfg, packed_cfg))
    with torch.no_grad():
        packed.prompts.ctx.copy_(plain.prompts.ctx)
        torch.testing.assert_close(packed.text_features(), plain.text_features(), rtol=1e-4, atol=1e-5)
    if backbone.text.can_pack:
        assert packed.packed and packed.text_rows() < plain.text_rows(), model
