"""MMRL (Guo & Gu, CVPR 2025) against its authors' formulas (github.com/yunncheng/MMRL: clip/model_mmrl.py,
trainers/mmrl.py), restated below literally on the tiny model's own modules, in the authors' order: the
representation tokens projected per layer, concatenated after the first token at the input of the first listed
layer and replacing it at later ones (ResidualAttentionBlock, "MMRL" branch), the text run at its full 77 tokens
with the causal mask rebuilt over the grown sequence from the first listed layer on and the end token read at its
position + n (TextEncoder_MMRL), the representation feature ln_post(tokens 1..n).mean @ proj_rep
(VisionTransformer.forward), logits 100 x cosines, MMRL_Loss, AdamW. The method runs the same through hooks on
open_clip's modules (the text cut to its longest prompt): logits, every loss term, every gradient and the
parameters after AdamW steps agree to fp32 rounding. The restatement was checked against the authors' own
model_mmrl.py and MMRL_Loss, run outside this repository on the same weights."""
import pytest
import torch
import torch.nn.functional as F
from helpers import quick_config, tiny_backbone

from promptlearn.config import load_config
from promptlearn.errors import ConfigError
from promptlearn.methods import build_method
from promptlearn.methods.mmrl import MMRLConfig

CLASSES = ["dog", "ankle boot", "hot air balloon"]
LAYERS = [1, 2]
ALPHA, REG = 0.7, 0.5


def setup(tmp_path, layers=LAYERS, model="tiny-clip"):
    backbone = tiny_backbone(model)
    backbone.logit_scale = 100.0  # the authors' logits are 100 x the cosines
    cfg = quick_config(tmp_path, f"backbone.model={model}", "methods=[mmrl]", "data.template=a photo of a {}.",
                       f"mmrl.rep_layers=[{','.join(map(str, layers))}]", f"mmrl.alpha={ALPHA}",
                       f"mmrl.reg_weight={REG}")
    torch.manual_seed(0)
    method = build_method("mmrl", cfg, backbone, CLASSES)
    with torch.no_grad():  # distinct layers' projections (they start as copies), a non-zero bias
        for p in [*method.to_image.parameters(), *method.to_text.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    return backbone, method


def authors_forward(backbone, method, images, layers):
    """logits, logits_rep, image_features, text_features (normalised) as the authors' CustomCLIP.forward."""
    model, n = backbone.model, method.rep_tokens.shape[0]
    text_tokens = [p(method.rep_tokens) for p in method.to_text]
    image_tokens = [p(method.rep_tokens) for p in method.to_image]

    def run(blocks, x, tokens, mask_for):  # x: [L, N, D] as the authors'; open_clip's blocks are batch-first
        counter = 0
        for i, block in enumerate(blocks):
            layer = i + 1
            if layer in layers:
                prefix, suffix = x[:1], (x[1:] if layer == layers[0] else x[1 + n:])
                context = tokens[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
                x = torch.cat([prefix, context, suffix], dim=0)
                counter += 1
            x = block(x.permute(1, 0, 2), attn_mask=mask_for(layer, x.shape[0])).permute(1, 0, 2)
        return x

    visual = model.visual
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding).permute(1, 0, 2)
    x = run(visual.transformer.resblocks, x, image_tokens, lambda layer, width: None).permute(1, 0, 2)
    image_rep = visual.ln_post(x[:, 1:1 + n]).mean(dim=1) @ method.proj_rep
    image = visual.ln_post(x[:, 0]) @ visual.proj

    ids = backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])  # 77 tokens
    t = (model.token_embedding(ids) + model.positional_embedding).permute(1, 0, 2)

    def mask_for(layer, width):
        if layer >= layers[0]:
            return torch.empty(width, width).fill_(float("-inf")).triu_(1)
        return model.attn_mask

    t = model.ln_final(run(model.transformer.resblocks, t, text_tokens, mask_for).permute(1, 0, 2))
    text = t[torch.arange(t.shape[0]), ids.argmax(dim=-1) + n] @ model.text_projection
    image, image_rep, text = (f / f.norm(dim=-1, keepdim=True) for f in (image, image_rep, text))
    return 100. * image @ text.t(), 100. * image_rep @ text.t(), image, text


def authors_loss(backbone, method, images, labels, layers):
    logits, logits_rep, image, text = authors_forward(backbone, method, images, layers)
    frozen_image = backbone.model.encode_image(images)
    frozen_image = frozen_image / frozen_image.norm(dim=-1, keepdim=True)
    frozen_text = backbone.model.encode_text(backbone.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    frozen_text = frozen_text / frozen_text.norm(dim=-1, keepdim=True)
    terms = {"cross_entropy": ALPHA * F.cross_entropy(logits, labels),
             "cross_entropy_rep": (1 - ALPHA) * F.cross_entropy(logits_rep, labels),
             "image_regularisation": REG * (1 - torch.mean(F.cosine_similarity(image, frozen_image, dim=1))),
             "text_regularisation": REG * (1 - torch.mean(F.cosine_similarity(text, frozen_text, dim=1)))}
    return logits, logits_rep, terms


def batch(backbone):
    torch.manual_seed(1)
    return torch.randn(4, 3, backbone.image_size, backbone.image_size), torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("layers", [LAYERS, [2]], ids=["from-layer-1", "from-layer-2"])
def test_logits_losses_and_gradients_are_the_authors(tmp_path, layers):
    backbone, method = setup(tmp_path, layers)
    images, labels = batch(backbone)
    params = [p for p in method.parameters() if p.requires_grad]
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        "proj_rep", "rep_tokens", *[f"to_{t}.{i}.{w}" for t in ("image", "text") for i in range(len(layers))
                                     for w in ("weight", "bias")]}
    ref_logits, ref_rep, ref_terms = authors_loss(backbone, method, images, labels, layers)
    ref_grads = torch.autograd.grad(sum(ref_terms.values()), params)
    step = method.training_step(images, labels)
    grads = torch.autograd.grad(sum(step.losses.values()), params)
    assert step.losses.keys() == ref_terms.keys()
    for name, value in ref_terms.items():
        torch.testing.assert_close(step.losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert value.item() > 0, name
    torch.testing.assert_close(step.logits, ALPHA * ref_logits + (1 - ALPHA) * ref_rep, rtol=1e-5, atol=1e-4)
    for grad, ref, p in zip(grads, ref_grads, params):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())  # fp32 rounding
    # the test-time heads: the blend on the trained classes' images, the class-token head elsewhere
    with torch.no_grad():
        text = method.text_features()
        torch.testing.assert_close(backbone.logits(method.blended_features(images), text),
                                   ALPHA * ref_logits + (1 - ALPHA) * ref_rep, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(backbone.logits(method.encode_images(images), text), ref_logits,
                                   rtol=1e-5, atol=1e-4)


def test_parameters_after_adamw_steps_are_the_authors(tmp_path):
    backbone, method = setup(tmp_path)
    _, reference = setup(tmp_path)
    reference.load_trainable_state(method.trainable_state(), "copy")
    images, labels = batch(backbone)
    own = method.train_config
    optimisers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=own.lr,
                                    weight_decay=own.weight_decay, eps=own.eps) for m in (method, reference)]
    for _ in range(3):
        for optimiser in optimisers:
            optimiser.zero_grad()
        sum(method.training_step(images, labels).losses.values()).backward()
        sum(authors_loss(backbone, reference, images, labels, LAYERS)[2].values()).backward()
        for optimiser in optimisers:
            optimiser.step()
    for (name, p), q in zip(method.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_initialisation_and_defaults_are_the_authors(tmp_path):
    backbone, method = setup(tmp_path, [1, 2])
    own = MMRLConfig()
    assert (own.n_rep_tokens, own.rep_dim, own.rep_layers, own.alpha, own.reg_weight) == (5, 512, list(range(6, 13)),
                                                                                             0.7, 1.0)
    train = build_method("mmrl", quick_config(tmp_path, "methods=[mmrl]", "recipe=promptlearn",
                                              "mmrl.rep_layers=[1]"), backbone, CLASSES).train_config
    assert (train.optimizer, train.lr, train.batch_size, train.warmup_epochs, train.warmup_lr, train.crop_scale,
            train.weight_decay, train.eps) == ("adamw", 0.001, 4, 1, 1e-5, [0.5, 1.0], 5e-4, 1e-8)  # Dassl's AdamW
    assert own.epochs == 10  # (the quick config gives train.epochs)
    torch.manual_seed(0)
    fresh = build_method("mmrl", quick_config(tmp_path, "methods=[mmrl]", "mmrl.rep_layers=[1,2]"), backbone, CLASSES)
    width = backbone.model.visual.transformer.width
    assert fresh.rep_tokens.shape == (5, 512) and abs(fresh.rep_tokens.std().item() - 0.02) < 0.002
    assert fresh.proj_rep.shape == (width, 32) and abs(fresh.proj_rep.std().item() - width ** -0.5) < 0.02
    for maps in (fresh.to_image, fresh.to_text):  # each tower's maps start as copies of one initialisation
        assert all(torch.equal(m.weight, maps[0].weight) and torch.equal(m.bias, maps[0].bias) for m in maps)
    assert fresh.to_image[0].weight.shape == (width, 512)


def test_test_heads_follow_the_authors_protocol_rule(tmp_path):
    """The blend on the dataset and classes trained on; the class-token head on novel classes, other datasets."""
    backbone, method = setup(tmp_path)
    calls = []

    class Bank:
        dataset = type("D", (), {"name": "sample-base", "classnames": CLASSES})()

        def test_of(self, dataset, encode):
            calls.append(encode.__name__)

    other = type("D", (), {"name": "sample-novel", "classnames": ["cat"]})()
    for dataset in (None, Bank.dataset, other):
        method.test_features(Bank(), dataset)
    assert calls == ["_blend_for_test", "_blend_for_test", "_encode_for_test"]


def test_published_recipes_per_protocol_and_dataset(tmp_path):
    def own(*overrides):
        return load_config([], ["methods=[mmrl]", "backbone.pretrained=none", *overrides]).mmrl

    b2n = own("protocol=base2novel", "data.name=eurosat", "data.shots=16")
    assert (b2n.epochs, b2n.batch_size, b2n.reg_weight, b2n.rep_dim) == (10, 4, 0.01, 2048)
    imagenet = own("protocol=base2novel", "data.name=imagenet", "data.shots=16")
    assert (imagenet.epochs, imagenet.batch_size, imagenet.reg_weight) == (5, 32, 0.5)
    few = own("protocol=fewshot", "data.name=dtd", "data.shots=4")
    assert (few.epochs, few.batch_size, few.reg_weight) == (50, 32, 6.0)
    cross = own("protocol=cross_dataset", "data.name=imagenet", "data.shots=16")
    assert (cross.epochs, cross.batch_size, cross.reg_weight, cross.warmup_epochs) == (1, 32, 0.2, 0)


def test_layers_beyond_the_towers_and_bad_values_are_refused(tmp_path):
    backbone = tiny_backbone()
    with pytest.raises(ConfigError, match=r"rep_layers=\[2, 3\] reaches layer 3, beyond the image tower's 2"):
        build_method("mmrl", quick_config(tmp_path, "methods=[mmrl]", "mmrl.rep_layers=[2,3]"), backbone, CLASSES)
    with pytest.raises(ConfigError, match="rep_layers must be increasing"):
        quick_config(tmp_path, "methods=[mmrl]", "mmrl.rep_layers=[2,1]")
    with pytest.raises(ConfigError, match=r"alpha must lie in \[0, 1\]"):
        quick_config(tmp_path, "methods=[mmrl]", "mmrl.alpha=1.5")
