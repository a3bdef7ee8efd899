"""backbone.precision=fp16_reference: the original CoOp's pure fp16 (fp16 weights and context, plain SGD
on fp16 parameters, no loss scaling). It runs on the CPU too, and its small updates round away."""
import logging

import torch
from helpers import quick_config

from promptlearn.backbone import load_backbone
from promptlearn.checkpoint import load_checkpoint
from promptlearn.config import BackboneConfig, RunConfig
from promptlearn.methods import build_method
from promptlearn.runner import run_experiment


def changed_after_one_warmup_step(precision: str) -> tuple[float, torch.dtype]:
    """Fraction of context entries that one SGD step at CoOp's warm-up lr (1e-5) changes."""
    backbone = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu", precision=precision))
    cfg = RunConfig()
    cfg.coop.ctx_init = "a photo of a"
    coop = build_method("coop", cfg, backbone, ["dog", "cat", "car"])
    ctx = coop.prompts.ctx
    optimizer = torch.optim.SGD([ctx], lr=1e-5, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(32, backbone.embed_dim, generator=g), dim=-1)
    labels = torch.randint(0, 3, (32,), generator=g)
    before = ctx.detach().clone()
    torch.nn.functional.cross_entropy(coop(images).float(), labels).backward()
    optimizer.step()
    return float((ctx.detach() != before).float().mean()), ctx.dtype


def test_pure_fp16_context_and_updates_round_away(caplog):
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        fraction16, dtype16 = changed_after_one_warmup_step("fp16_reference")
    assert "fp16_reference: pure fp16" in caplog.text and "recommended" in caplog.text
    fraction32, dtype32 = changed_after_one_warmup_step("fp32")
    assert (dtype16, dtype32) == (torch.float16, torch.float32)
    assert fraction32 == 1.0 and fraction16 < 0.9


def test_pure_fp16_weights_on_the_cpu():
    backbone = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu",
                                            precision="fp16_reference"))
    assert backbone.precision == "fp16_reference"
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float16}
    features = backbone.encode_images(torch.randn(2, 3, backbone.image_size, backbone.image_size))
    assert features.dtype == torch.float32 and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-3)  # fp16 division


def test_a_pure_fp16_run_trains_and_saves_an_fp16_context(tmp_path):
    run_experiment(quick_config(tmp_path, "methods=[coop]", "train.epochs=2", "backbone.precision=fp16_reference"))
    ctx = load_checkpoint(tmp_path / "run" / "coop" / "checkpoint.pt")["state"]["prompts.ctx"]
    assert ctx.dtype == torch.float16 and bool(torch.isfinite(ctx).all())


def test_pure_fp16_scores_are_computed_in_fp16():
    backbone = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu",
                                            precision="fp16_reference"))
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, backbone.embed_dim, generator=g), dim=-1)
    texts = backbone.encode_texts(["a photo of a dog.", "a photo of a cat."])
    logits = backbone.logits(images, texts)
    assert logits.dtype == torch.float16
    assert torch.equal(logits, backbone.logit_scale * images.half() @ texts.half().t())
    raw = torch.randn(3, backbone.embed_dim, generator=g) * 7
    unit = backbone.normalize(raw)
    assert unit.dtype == torch.float32 and torch.equal(unit, (raw.half() / raw.half().norm(dim=-1, keepdim=True)).float())


def test_the_coop_family_trains_in_pure_fp16_with_cocoops_meta_network_in_fp16(tmp_path):
    """The original CoCoOp, KgCoOp and ProGrad run CoOp's PREC fp16: the context (and CoCoOp's meta-network,
    which the original halves) in fp16; under fp32 the meta-network stays fp32."""
    keys = ["methods=[cocoop, kgcoop, prograd]", "train.epochs=1", "cocoop.epochs=1", "kgcoop.epochs=1",
            "cocoop.batch_size=4", "backbone.precision=fp16_reference"]
    run_experiment(quick_config(tmp_path, *keys))
    for name in ("cocoop", "kgcoop", "prograd"):
        state = load_checkpoint(tmp_path / "run" / name / "checkpoint.pt")["state"]
        assert {t.dtype for t in state.values()} == {torch.float16}, name
        assert all(bool(torch.isfinite(t).all()) for t in state.values()), name
    cocoop = load_checkpoint(tmp_path / "run" / "cocoop" / "checkpoint.pt")["state"]
    assert {"meta_net.linear1.weight", "meta_net.linear2.bias"} <= set(cocoop)
    fp32 = build_method("cocoop", RunConfig(), load_backbone(BackboneConfig(model="tiny-clip", pretrained="none",
                                                                           device="cpu")), ["dog", "cat"])
    assert fp32.meta_net.linear1.weight.dtype == torch.float32
