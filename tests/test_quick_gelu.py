"""The backbone is built with the activation its weights were trained with: QuickGELU for OpenAI's CLIP
(by tag, by -quickgelu name, by OpenAI's TorchScript file format), GELU otherwise."""
import logging

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from promptlearn import backbone as backbone_module
from promptlearn.backbone import is_openai_checkpoint, load_backbone, quick_gelu_for
from promptlearn.config import BackboneConfig
from promptlearn.errors import ConfigError

OPENAI_ARCHITECTURES = ["RN50", "RN101", "ViT-B-32", "ViT-B-16"]


def activation(model) -> type:
    return type(model.transformer.resblocks[0].mlp.gelu)


@pytest.mark.parametrize("model", OPENAI_ARCHITECTURES)
def test_openai_tag_builds_quick_gelu(model, monkeypatch):
    """open_clip 3.x builds these four with nn.GELU; the openai tag must force QuickGELU."""
    seen = {}

    def capture(name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("no download in tests")

    monkeypatch.setattr(backbone_module.open_clip, "create_model_and_transforms", capture)
    monkeypatch.setattr(backbone_module, "download_problem", lambda cfg: None)  # as if the hub were reachable
    assert open_clip.get_model_config(model).get("quick_gelu", False) is False  # the trap
    with pytest.raises(Exception, match="no download in tests"):
        load_backbone(BackboneConfig(model=model, pretrained="openai", device="cpu"))
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"


@pytest.mark.parametrize("model, tag, expected", [
    ("RN50", "openai", True), ("RN50", "yfcc15m", True), ("RN101", "openai", True),
    ("ViT-B-32", "openai", True), ("ViT-B-16", "openai", True), ("ViT-B-32", "laion400m_e32", True),
    ("ViT-B-32", "laion2b_s34b_b79k", False), ("ViT-B-16", "laion2b_s34b_b88k", False),
    ("RN50-quickgelu", "openai", True), ("ViT-B-32-quickgelu", None, True), ("ViT-B-32", None, False),
])
def test_activation_from_tag_and_name(model, tag, expected):
    assert quick_gelu_for(BackboneConfig(model=model, pretrained=tag or "none"), tag) is expected


def test_explicit_setting_decides_and_warns_against_the_weights(caplog):
    assert quick_gelu_for(BackboneConfig(model="ViT-B-32", quick_gelu=True), None) is True
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        assert quick_gelu_for(BackboneConfig(model="RN50", quick_gelu=False), "openai") is False
    assert "trained with QuickGELU" in caplog.text


def test_false_with_a_quickgelu_name_is_an_error():
    with pytest.raises(ConfigError, match="backbone.quick_gelu=false conflicts with backbone.model=RN50-quickgelu"):
        quick_gelu_for(BackboneConfig(model="RN50-quickgelu", quick_gelu=False), None)


def test_explicit_setting_builds_quick_gelu_on_random_weights():
    b = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu", quick_gelu=True))
    assert activation(b.model) is QuickGELU
    b = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu"))
    assert activation(b.model) is torch.nn.GELU


@pytest.fixture(scope="module")
def openai_style_files(tmp_path_factory):
    """The same weights as an OpenAI-style TorchScript archive and as an open_clip state dict."""
    folder = tmp_path_factory.mktemp("checkpoints")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = open_clip.create_model("tiny-clip", force_quick_gelu=True)
    archive, state = folder / "tiny-openai.pt", folder / "tiny-state.pt"
    torch.jit.save(torch.jit.script(model), archive)
    torch.save(model.state_dict(), state)
    return model, str(archive), str(state)


def test_openai_file_format_is_recognised(openai_style_files):
    _, archive, state = openai_style_files
    assert is_openai_checkpoint(archive) and not is_openai_checkpoint(state)


def test_openai_archive_loads_into_a_quick_gelu_tower(openai_style_files):
    source, archive, _ = openai_style_files
    b = load_backbone(BackboneConfig(model="tiny-clip", pretrained=archive, device="cpu"))
    assert activation(b.model) is QuickGELU
    ids = b.tokenizer(["a photo of a dog."])
    with torch.no_grad():
        torch.testing.assert_close(b.model.encode_text(ids), source.eval().encode_text(ids), atol=1e-6, rtol=0)


def test_unrecognised_file_warns_naming_the_setting(openai_style_files, caplog):
    _, _, state = openai_style_files
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        b = load_backbone(BackboneConfig(model="tiny-clip", pretrained=state, device="cpu"))
    assert activation(b.model) is torch.nn.GELU and "backbone.quick_gelu=true" in caplog.text
    b = load_backbone(BackboneConfig(model="tiny-clip", pretrained=state, device="cpu", quick_gelu=True))
    assert activation(b.model) is QuickGELU
