"""TCP (Yao et al., CVPR 2024) against its authors' code, htyao89/Textual-based_Class-aware_prompt_tuning:
trainers/tcp.py (PromptLearner, TextEncoder, CustomCLIP.forward) and trainers/clip_text/model.py
(ResidualAttentionBlock_MaPLe.forward, `layers=[8]`, `weights=[1.0]`).

`authors_forward` below restates their computation step by step on the frozen CLIP's own modules, over the
whole 77-token prompts as they run them: the prompt "X X X X <class><words>" tokenised whole, its 4 context
positions after SOS set to ctx; meta_net = Linear(E, E/4), QuickGELU, Linear(E/4, 4 x width) on the
normalised hand-crafted class features, reshaped to [C, 4, width]; at the input of block 8 (counter == 8)
positions 1..4 replaced by those tokens (weight 1.0: replaced outright); ln_final, the EOT token, the text
projection; logits = exp(logit_scale) x cosines; loss = CE + 8.0 x (1 - mean_c cos(w_c, w_c^clip), eps 1e-7);
Adam(lr 0.002, eps 1e-3, weight decay 5e-4). The restatement was checked against the authors' files run
unchanged (dassl stubbed, a 12-layer tiny text tower with quick GELU, identical weights, fp32 on the CPU):
logits agree to 2e-6, both loss terms to 1e-6, the gradients of ctx and of the four meta_net tensors to 9e-6
(of 18) and 3e-7, and the parameters after 4 Adam steps to 2e-7.
"""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import quick_config, tiny_backbone

from promptlearn.backbone import load_backbone
from promptlearn.checkpoint import save_checkpoint
from promptlearn.config import BackboneConfig, load_config
from promptlearn.errors import ConfigError
from promptlearn.methods import build_method
from promptlearn.methods.tcp import TCP, TCPConfig
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.recipes import matching
from promptlearn.trainer import build_optimizer

NAMES = ["abyssinian", "american_bulldog", "great pyrenees"]
NOVEL = ["ankle boot", "hot air balloon"]
PETS_PROMPT, PETS_TEACHER = "{}, a type of pet.", "a photo of a {}, a type of pet."


@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory):
    """A tiny OpenAI-style CLIP whose text tower has the 12 blocks of ViT-B/16's, so that block 8 exists."""
    folder = tmp_path_factory.mktemp("model-configs")
    (folder / "tiny12-clip.json").write_text(json.dumps({
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 12}}))
    open_clip.add_model_config(folder)
    return load_backbone(BackboneConfig(model="tiny12-clip", pretrained="none", device="cpu"))


def tcp_method(tmp_path, backbone, names=NAMES, *overrides):
    cfg = quick_config(tmp_path, f"backbone.model={backbone.name}", "methods=[tcp]",
                       f"tcp.prompt_template='{PETS_PROMPT}'", f"tcp.templates=['{PETS_TEACHER}']", *overrides)
    torch.manual_seed(0)
    return build_method("tcp", cfg, backbone, names)


def authors_meta_net(params: dict, features: torch.Tensor, width: int) -> torch.Tensor:
    h = features @ params["linear1.weight"].t() + params["linear1.bias"]
    h = h * torch.sigmoid(1.702 * h)
    out = h @ params["linear2.weight"].t() + params["linear2.bias"]
    return out.reshape(out.shape[0], -1, width)


def authors_forward(backbone, ctx, meta, names, images, labels, layer):
    """Their logits and loss terms (CustomCLIP.forward in training)."""
    model = backbone.model
    prompts = ["X X X X " + PETS_PROMPT.format(n.replace("_", " ")) for n in names]
    ids = backbone.tokenizer(prompts)  # 77 tokens, as clip.tokenize
    with torch.no_grad():
        hand = F.normalize(model.encode_text(backbone.tokenizer([PETS_TEACHER.format(n.replace("_", " "))
                                                                  for n in names])), dim=-1)
    embeds = model.token_embedding(ids)
    x = torch.cat([embeds[:, :1], ctx[None].expand(len(names), -1, -1), embeds[:, 5:]], dim=1)
    x = x + model.positional_embedding
    class_feature = authors_meta_net(meta, hand, x.shape[-1])
    first = model.transformer.batch_first
    x = x if first else x.permute(1, 0, 2)
    for counter, block in enumerate(model.transformer.resblocks):
        if counter == layer:
            n = class_feature.shape[1]
            tokens = class_feature if first else class_feature.permute(1, 0, 2)
            x = (torch.cat([x[:, :1], tokens, x[:, 1 + n:]], dim=1) if first
                 else torch.cat([x[:1], tokens, x[1 + n:]], dim=0))
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x if first else x.permute(1, 0, 2))
    text = x[torch.arange(len(names)), ids.argmax(dim=-1)] @ model.text_projection
    text = text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp().detach() * images @ text.t()
    score = 1.0 - torch.mean(torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, hand))
    return logits, F.cross_entropy(logits, labels), 8.0 * score


def own_params(method) -> dict:
    meta = {n: p for n, p in method.class_tokens.net.named_parameters()}
    return {"ctx": method.prompts.ctx, **meta}


def test_the_defaults_are_the_authors():
    own = TCPConfig()
    assert (own.n_ctx, own.ctx_init, own.layer, own.weight, own.prompt_template, own.templates) == \
        (4, "", 8, 8.0, "{}.", [])
    assert (own.optimizer, own.eps, own.lr, own.batch_size, own.epochs, own.weight_decay) == \
        ("adam", 1e-3, 0.002, 32, 50, None)  # weight decay: train's 5e-4, Dassl's default


def test_the_prompt_is_the_authors_sentence_with_the_context_after_sos(tmp_path):
    method = tcp_method(tmp_path, tiny_backbone(), NAMES, "tcp.layer=1")
    sentences = ["X X X X " + PETS_PROMPT.format(n.replace("_", " ")) for n in NAMES]
    whole = method.backbone.tokenizer(sentences)[:, :method.prompts.token_ids.shape[1]]
    assert torch.equal(method.prompts.token_ids, whole)
    assert method.prompts.ctx_positions.tolist() == [[1, 2, 3, 4]] * len(NAMES)
    assert method.class_tokens(method.hand_crafted).shape == (len(NAMES), 4, 64)
    assert torch.equal(method.hand_crafted, text_classifier(method.backbone, NAMES, [PETS_TEACHER]))


@pytest.mark.parametrize("model, layer", [("tiny12", 8), ("tiny-clip", 1), ("tiny-clip", 0)])
def test_logits_losses_gradients_and_adam_steps_are_the_authors(tmp_path, twelve_layers, model, layer):
    backbone = twelve_layers if model == "tiny12" else tiny_backbone(model)
    method = tcp_method(tmp_path, backbone, NAMES, f"tcp.layer={layer}")
    method.train()
    theirs = {k: v.detach().clone().requires_grad_(True) for k, v in own_params(method).items()}
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(6, backbone.embed_dim, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    optimizer = build_optimizer(list(own_params(method).values()), method.train_config)
    reference = torch.optim.Adam(list(theirs.values()), lr=0.002, eps=1e-3, weight_decay=5e-4)
    for step in range(4):
        logits, ce, kg = authors_forward(backbone, theirs["ctx"], theirs, NAMES, images, labels, layer)
        out = method.training_step(images, labels)
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=2e-5)
        torch.testing.assert_close(out.losses["cross_entropy"], ce, rtol=0, atol=2e-6)
        torch.testing.assert_close(out.losses["knowledge_guidance"], kg, rtol=0, atol=2e-6)
        optimizer.zero_grad(), reference.zero_grad()
        sum(out.losses.values()).backward()
        (ce + kg).backward()
        for name, param in own_params(method).items():
            scale = float(theirs[name].grad.abs().max())
            torch.testing.assert_close(param.grad, theirs[name].grad, rtol=0, atol=1e-5 * max(scale, 1.0)), name
        optimizer.step(), reference.step()
    for name, param in own_params(method).items():
        torch.testing.assert_close(param, theirs[name], rtol=0, atol=1e-6), name


def test_the_trainer_runs_the_authors_adam(tmp_path):
    method = tcp_method(tmp_path, tiny_backbone(), NAMES, "tcp.layer=1")
    optimizer = build_optimizer(list(method.parameters()), method.train_config)
    assert type(optimizer) is torch.optim.Adam
    assert {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == \
        {"lr": 0.002, "betas": (0.9, 0.999), "eps": 1e-3, "weight_decay": 5e-4}
    train = method.train_config
    assert (train.warmup_epochs, train.warmup_lr, train.min_lr, train.lr_per_step, train.drop_last) == \
        (1, 1e-5, 0.0, False, True)  # a constant 1e-5 epoch, then Dassl's per-epoch cosine to 0


def test_novel_classes_get_tokens_from_their_own_hand_crafted_features(tmp_path, twelve_layers):
    """Base-to-novel: a checkpoint of the base classes evaluates classes it never saw, their tokens the
    projection of their own hand-crafted features (the authors' eval-only run rebuilds the model on them)."""
    base = tcp_method(tmp_path, twelve_layers, NAMES)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p)) if p.requires_grad else None
    save_checkpoint(tmp_path / "tcp.pt", {"state": base.trainable_state(), "meta": base.checkpoint_meta()})
    novel = tcp_method(tmp_path, twelve_layers, NOVEL)
    novel.restore(tmp_path / "tcp.pt")
    assert novel.caps.unseen_classes and novel.caps.eval_from_checkpoint and novel.caps.cached_features
    images = F.normalize(torch.randn(3, 32), dim=-1)
    params = {k: v.detach() for k, v in own_params(base).items()}
    with torch.no_grad():
        expected, _, _ = authors_forward(twelve_layers, params["ctx"], params, NOVEL, images, torch.zeros(3).long(), 8)
    torch.testing.assert_close(novel.predict(images), expected, rtol=0, atol=2e-5)


def test_towers_it_cannot_reach_and_bad_settings_are_refused(tmp_path):
    hf = tiny_backbone("tiny-hf-clip")  # after this module's add_model_config, which rescans every config
    with pytest.raises(ConfigError, match="text tower is a HFTextEncoder .*Hugging Face"):
        tcp_method(tmp_path, hf)
    with pytest.raises(ConfigError, match="tcp.layer=8: the text tower of tiny-clip has 2 blocks"):
        tcp_method(tmp_path, tiny_backbone())
    for override, message in [("tcp.class_position=middle", "class_position must be end"),
                              ("tcp.class_specific=true", "class_specific must be false"),
                              ("tcp.share_prefix=true", "share_prefix must be false"),
                              ("tcp.prompt_template='a {} b {}'", "must hold exactly one {} and no other braces"),
                              ("tcp.layer=-1", "tcp.layer must be 0 or more")]:
        with pytest.raises(ConfigError, match=message):
            quick_config(tmp_path, "methods=[tcp]", override)


def test_the_published_recipe(tmp_path):
    def settings(dataset, protocol="base2novel", shots=16):
        return {k: v for r in matching("tcp", protocol, dataset, shots) for k, v in r.settings.items()}

    pets = settings("oxford_pets")
    assert (pets["tcp.layer"], pets["tcp.weight"], pets["tcp.n_ctx"], pets["tcp.ctx_init"]) == (8, 8.0, 4, "")
    assert (pets["tcp.optimizer"], pets["tcp.eps"], pets["tcp.lr"], pets["tcp.batch_size"], pets["tcp.epochs"]) == \
        ("adam", 1e-3, 0.002, 32, 50)
    assert pets["tcp.prompt_template"] == PETS_PROMPT and "tcp.templates" not in pets
    assert settings("dtd")["tcp.templates"] == ["a photo of a {}, a type of texture."]
    assert settings("fgvc_aircraft")["tcp.templates"] == ["a photo of an aircraft {}."]
    assert settings("food101")["tcp.templates"] == ["a photo of a {}, a type of food."]
    assert settings("stanford_cars")["tcp.prompt_template"] == "{}, a type of car"
    assert settings("ucf101")["tcp.prompt_template"] == "person doing {}."
    assert "tcp.prompt_template" not in settings("imagenet")  # "{}.", the code default
    cfg = load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none", "methods=[tcp]", "data.name=dtd",
                           "protocol=base2novel", "data.shots=16", "tcp.layer=1", f"output_dir={tmp_path / 'run'}"])
    assert (cfg.tcp.prompt_template, cfg.tcp.templates) == ("{} texture.", ["a photo of a {}, a type of texture."])
    assert (cfg.tcp.optimizer, cfg.tcp.epochs, cfg.tcp.layer) == ("adam", 50, 1)  # the command line over the recipe
    assert isinstance(build_method("tcp", cfg, tiny_backbone(), NAMES), TCP)
