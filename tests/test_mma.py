"""MMA (Yang et al., CVPR 2024) as its authors' code computes it (ZjjConan/Multi-Modal-Adapter: trainers/mmadapter.py,
clip/model.py, clip/gsl.py, configs/trainers/MultiModalAdapter/*.yaml).

reference/mma_authors.json holds the numbers of the authors' code, run outside this repository on tiny-clip's
random weights (their CLIP built at tiny-clip's sizes with its 2 attention heads and GELU, tiny-clip's state dict
loaded into it; Dassl stubbed out, as only CustomCLIP was run): adapters on layers 0..2 (the embeddings and both
blocks), bottleneck 2, scale 0.1, the initial values below copied into both, the classes' "a photo of a {}."
prompts, two images; the logits and cross-entropy of a training forward, the gradients of every adapter tensor,
the adapters after 3 steps of Dassl's SGD (lr 0.1, momentum 0.9, weight decay 5e-4) on the same batch, and the
eval-mode logits then. Rounded to 8 significant digits.
"""
import json
from pathlib import Path

import pytest
import torch
from helpers import SAMPLE, quick_config, sample_bank, tiny_backbone
from test_baselines import NoTestBank, shared_cache  # noqa: F401 (a fixture)
from test_trainer_schedule import cosine, record_steps

from promptlearn.config import load_config
from promptlearn.errors import ConfigError, PromptlearnError
from promptlearn.methods import build_method
from promptlearn.methods.mma import MMA, MMAConfig
from promptlearn.recipes import matching
from promptlearn.settings import run_epochs
from promptlearn.trainer import Trainer, build_optimizer, grad_scaler, optimizer_step

REFERENCE = json.loads((Path(__file__).parent / "reference" / "mma_authors.json").read_text())
TIGHT = {"rtol": 2e-5, "atol": 2e-6}  # fp32 rounding (our text tower runs without the padding after the prompts)


def mma_method(tmp_path, *overrides, model="tiny-clip", names=("hot_dog", "cat", "ankle boot")):
    cfg = quick_config(tmp_path, "methods=[mma]", "mma.adapter_start=1", "mma.adapter_end=2", *overrides,
                       f"backbone.model={model}")
    return build_method("mma", cfg, tiny_backbone(model), list(names))


def reference_method(tmp_path):
    """The reference's setup, with its initial values: 0.2 x standard normals, drawn in the parameters' name order."""
    setup = REFERENCE["setup"]
    method = mma_method(tmp_path, f"mma.adapter_start={setup['start']}", f"mma.adapter_end={setup['end']}",
                        f"mma.adapter_dim={setup['dim']}", f"mma.adapter_scale={setup['scale']}",
                        f"mma.lr={setup['lr']}", names=setup["names"])
    own = dict(method.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(own):
            own[name].copy_(0.2 * torch.randn(own[name].shape, generator=generator))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return method, images, torch.tensor([0, 2])


def test_logits_loss_gradients_and_steps_equal_the_authors_code(tmp_path):
    method, images, labels = reference_method(tmp_path)
    method.train()
    logits, losses = method.training_step(images, labels)
    assert list(losses) == ["cross_entropy"]  # the only loss term
    torch.testing.assert_close(logits, torch.tensor(REFERENCE["logits"]), **TIGHT)
    torch.testing.assert_close(losses["cross_entropy"], torch.tensor(REFERENCE["cross_entropy"]), **TIGHT)
    losses["cross_entropy"].backward()
    params = dict(method.named_parameters())
    assert params.keys() == REFERENCE["grads"].keys()  # every learned tensor, and nothing else learns
    for name, param in params.items():
        expected = torch.tensor(REFERENCE["grads"][name])
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(),
                                   msg=name)

    optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], method.train_config)
    assert isinstance(optimizer, torch.optim.SGD)  # Dassl's: momentum 0.9, weight decay 5e-4
    assert (optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (0.9, 5e-4)
    for _ in range(REFERENCE["setup"]["steps"]):
        optimizer_step(method, method.training_step(images, labels).losses, optimizer, grad_scaler(method.device,
                                                                                                   "fp32"))
    for name, param in method.named_parameters():
        torch.testing.assert_close(param.detach(), torch.tensor(REFERENCE["after_steps"][name]), **TIGHT, msg=name)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method(images), torch.tensor(REFERENCE["eval_logits_after_steps"]), rtol=2e-5,
                                   atol=2e-5)


def test_initialised_as_the_authors_kaiming_normal_fan_out_with_zero_biases(tmp_path):
    """Built in their order (the text tower's layers, down then up; the image tower's; the shared layers) and
    re-initialised in it, the same seed gives the same values."""
    torch.manual_seed(3)
    method = mma_method(tmp_path, "mma.adapter_start=1", "mma.adapter_end=2", "mma.adapter_dim=8")
    torch.manual_seed(3)
    text_width = image_width = 64  # tiny-clip
    built = [torch.nn.Linear(a, b) for width in (text_width, image_width) for _ in (1, 2)
             for a, b in ((width, 8), (8, width))] + [torch.nn.Linear(8, 8) for _ in (1, 2)]
    for linear in built:
        torch.nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
    ours = [method.text["1"].down, method.text["1"].up, method.text["2"].down, method.text["2"].up,
            method.image["1"].down, method.image["1"].up, method.image["2"].down, method.image["2"].up,
            method.shared["1"], method.shared["2"]]
    for mine, theirs in zip(ours, built):
        torch.testing.assert_close(mine.weight, theirs.weight, rtol=0, atol=0)
        assert not mine.bias.any()


def test_layers_are_counted_from_one_and_0_is_the_embeddings(tmp_path):
    method = mma_method(tmp_path, "mma.adapter_start=2", "mma.adapter_end=2")
    visual, text = method.backbone.model.visual.transformer.resblocks, method.backbone.text.transformer.resblocks
    assert method.blocks == {"image": {2: visual[1]}, "text": {2: text[1]}}
    assert list(method.text) == list(method.image) == list(method.shared) == ["2"]
    embeddings = mma_method(tmp_path, "mma.adapter_start=0", "mma.adapter_end=1")
    assert list(embeddings.shared) == ["0", "1"] and list(embeddings.blocks["image"]) == [1]


def test_the_adapters_act_only_inside_the_method_s_own_forward(tmp_path):
    """With their up projections at zero the towers are the frozen ones; nothing stays attached afterwards."""
    method = mma_method(tmp_path, "mma.adapter_start=0", "mma.adapter_end=2")
    backbone = method.backbone
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted = method.encode_images(images)
    with torch.no_grad():
        for tower in (method.text, method.image):
            for adapter in tower.values():
                adapter.up.weight.zero_()
        torch.testing.assert_close(method.encode_images(images), backbone.encode_images(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(method.text_features(), backbone.encode_texts(
            ["a photo of a hot dog.", "a photo of a cat.", "a photo of a ankle boot."]), rtol=0, atol=1e-6)
    assert not torch.allclose(adapted, backbone.encode_images(images), atol=1e-4)  # their biases still differ
    modules = [*backbone.model.visual.modules(), *backbone.text.transformer.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for flag in ("false", "true"):
        method, images, labels = reference_method(tmp_path / flag)
        method.own.grad_checkpointing = flag == "true"
        method.training_step(images, labels).losses["cross_entropy"].backward()
        grads.append([p.grad for p in method.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("model, tower", [("tiny-rn-clip", "ModifiedResNet"), ("tiny-timm-convnet-clip", "ConvNeXt"),
                                          ("tiny-hf-clip", "HFTextEncoder")])
def test_towers_without_transformer_blocks_are_refused_by_name(tmp_path, model, tower):
    with pytest.raises(ConfigError, match=f"tower is a .*{tower}"):
        mma_method(tmp_path, model=model)


@pytest.mark.parametrize("model", ["tiny-timm-vit-clip", "tiny-siglip-clip", "tiny-coca"])
def test_other_transformer_towers_take_the_adapters(tmp_path, model):
    method = mma_method(tmp_path, "mma.adapter_start=0", "mma.adapter_end=2", model=model)
    images = torch.randn(2, 3, method.backbone.image_size, method.backbone.image_size)
    logits = method(images)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_layers_beyond_a_tower_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="mma.adapter_end=12 exceeds the text tower's 2 layers"):
        mma_method(tmp_path, "mma.adapter_start=5", "mma.adapter_end=12")


@pytest.mark.parametrize("override, message", [
    ("mma.adapter_start=3", "0 <= start <= end"), ("mma.adapter_start=-1", "0 <= start <= end"),
    ("mma.adapter_dim=0", "adapter_dim must be at least 1"), ("mma.adapter_scale=0", "adapter_scale must be positive"),
])
def test_bad_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path, "methods=[mma]", "mma.adapter_end=2", override)


def test_code_defaults_are_the_authors_vit_b16_config():
    own = MMAConfig()
    assert (own.adapter_start, own.adapter_end, own.adapter_dim, own.adapter_scale, own.ctx_init) == (
        5, 12, 32, 0.001, "a photo of a")
    assert (own.lr, own.batch_size, own.epochs, own.warmup_epochs) == (0.0015, 16, 5, 0)
    assert MMA.capabilities.unseen_classes and MMA.capabilities.eval_from_checkpoint
    assert not MMA.capabilities.cached_features


@pytest.mark.parametrize("protocol, dataset, batch", [("base2novel", "dtd", 16), ("base2novel", "imagenet", 128),
                                                      ("cross_dataset", "imagenet", 128),
                                                      ("domain_generalization", "imagenet", 128)])
def test_published_recipes(protocol, dataset, batch):
    settings = {}
    for recipe in matching("mma", protocol, dataset, 16):
        settings.update(recipe.settings)
    assert settings == {"mma.epochs": 5, "mma.lr": 0.0015, "mma.batch_size": batch, "mma.warmup_epochs": 0,
                        "mma.adapter_start": 5, "mma.adapter_end": 12, "mma.adapter_dim": 32,
                        "mma.adapter_scale": 0.001, "mma.ctx_init": "a photo of a", "mma.optimizer": "sgd",
                        "mma.momentum": 0.9, "mma.weight_decay": 0.0005}


def test_trains_with_the_authors_schedule_and_evaluates_new_classes_from_its_checkpoint(tmp_path, shared_cache,  # noqa: F811
                                                                                         monkeypatch):
    """Dassl's cosine stepped once an epoch from lr to 0, no warm-up, SGD; the checkpoint scores other classes."""
    cfg = load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none", "methods=[mma]",
                           f"data.path={SAMPLE}", "data.shots=1", "data.num_workers=0", f"cache_dir={shared_cache}",
                           f"output_dir={tmp_path / 'run'}", "mma.adapter_start=1", "mma.adapter_end=2",
                           "mma.epochs=3", "mma.batch_size=4"])
    dataset, backbone, bank = sample_bank(cfg, tmp_path)
    method = build_method("mma", cfg, backbone, dataset.classnames)
    settings = method.train_config
    trainer = Trainer(settings, run_epochs(cfg, settings), cfg.data.seed, backbone.precision)
    lrs, optimizers = record_steps(monkeypatch)
    method.fit(NoTestBank(bank), trainer, tmp_path / "mma.pt", resume=False)
    steps = len(bank.fewshot.train) // 4  # the last short batch dropped, as Dassl's loader
    assert lrs == pytest.approx([cosine(0.0015, 0.0, e, 3) for e in range(3) for _ in range(steps)], rel=1e-12)
    assert isinstance(optimizers[0], torch.optim.SGD)

    other = build_method("mma", cfg, backbone, ["kite", "sea urchin"])
    other.restore(tmp_path / "mma.pt")
    for name, param in other.named_parameters():
        torch.testing.assert_close(param, dict(method.named_parameters())[name], rtol=0, atol=0)
    assert other(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    mismatched = build_method("mma", load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none",
                                                      "methods=[mma]", "mma.adapter_start=1", "mma.adapter_end=2",
                                                      "mma.adapter_scale=0.5"]), backbone, ["kite"])
    with pytest.raises(PromptlearnError, match="adapter_scale"):
        mismatched.restore(tmp_path / "mma.pt")
