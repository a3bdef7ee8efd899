import logging

import pytest
import torch
from helpers import FAMILIES, tiny_backbone

from promptlearn import backbone as backbone_module
from promptlearn.backbone import FrozenCLIP, load_backbone
from promptlearn.config import BackboneConfig
from promptlearn.errors import PromptlearnError


@pytest.mark.parametrize("model", FAMILIES)
def test_frozen_features_are_normalised(model):
    b = tiny_backbone(model)
    assert not b.model.training
    assert all(not p.requires_grad for p in b.model.parameters())
    images = torch.randn(3, 3, b.image_size, b.image_size)
    f = b.encode_images(images)
    assert f.shape == (3, b.embed_dim) and torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    t = b.encode_texts(["a photo of a dog.", "a photo of a cat."])
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert b.logits(f, t).shape == (3, 2)


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        tiny_backbone()
    assert "RANDOM weights" in caplog.text and "meaningless" in caplog.text


def test_siglip_style_logit_bias_is_kept():
    assert tiny_backbone("tiny-bidir-clip").logit_bias == pytest.approx(-10.0)
    assert tiny_backbone("tiny-clip").logit_bias == 0.0


def test_logit_scale_non_finite_becomes_100(caplog):
    b = tiny_backbone()
    with torch.no_grad():
        b.model.logit_scale.fill_(float("inf"))
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        scale = FrozenCLIP._logit_scale(b.model, BackboneConfig(model="tiny-clip"))
    assert scale == 100.0 and "EVA-CLIP" in caplog.text
    assert FrozenCLIP._logit_scale(b.model, BackboneConfig(model="tiny-clip", logit_scale=42.0)) == 42.0


def test_local_checkpoint_path_loads(tmp_path):
    b = tiny_backbone()
    path = tmp_path / "tiny.pt"
    torch.save(b.model.state_dict(), path)
    loaded = load_backbone(BackboneConfig(model="tiny-clip", pretrained=str(path), device="cpu"))
    for (k, v), (_, w) in zip(b.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(v, w), k
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PromptlearnError, match="could not load the checkpoint .*tiny.pt"):
        load_backbone(BackboneConfig(model="tiny-clip", pretrained=str(path), device="cpu"))


@pytest.mark.parametrize("cfg, message", [
    (dict(model="RN5O"), r"unknown open_clip model 'RN5O'; did you mean 'RN50'"),
    (dict(model="RN50", pretrained="opneai"), r"'opneai' is not an open_clip pretrained tag for RN50. Known tags: openai"),
    (dict(model="RN50", pretrained="/no/such/file.pt"), r"checkpoint file /no/such/file.pt does not exist"),
    (dict(model="tiny-clip", pretrained="none", device="cuda:3"), "no CUDA GPU"),
])
def test_bad_backbone_settings(cfg, message):
    if "cuda" in cfg.get("device", "") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PromptlearnError, match=message):
        load_backbone(BackboneConfig(**cfg))


def test_failed_download_says_what_to_do(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': connection refused")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    monkeypatch.setattr(backbone_module, "download_problem", lambda cfg: None)  # the hub answered, the download failed
    with pytest.raises(PromptlearnError, match="--pretrained PATH.*cache_dir.*--pretrained none"):
        load_backbone(BackboneConfig(model="RN50", pretrained="openai", device="cpu"))


@pytest.mark.parametrize("model", FAMILIES)
def test_text_tower_matches_encode_text(model):
    b = tiny_backbone(model)
    ids = b.tokenizer(["a photo of a dog.", "an origami golden retriever."])
    assert torch.equal(b.text.encode(b.text.embed(ids), ids), b.model.encode_text(ids))


def test_random_backbones_are_identical_and_leave_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu"))
    assert torch.equal(torch.rand(1), expected_next)
    b = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
