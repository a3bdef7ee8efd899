"""Every speed shortcut of CoOp against the plain computation it replaces, on a tiny backbone of each
family: cached image features against per-step encoding, prompts at the longest real length against
the full context length, the shared prompt start computed once against every prompt in full, and
chunks of classes under checkpointing against all classes at once (features and gradients)."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from promptlearn.backbone import FrozenCLIP, load_backbone
from promptlearn.benchmark import BenchmarkSpec, build_coop, reference_training, run_config, synthetic_images
from promptlearn.config import BackboneConfig, RunConfig
from promptlearn.data.base import DatasetSplits
from promptlearn.data.fewshot import FewShotSplit
from promptlearn.features import FeatureBank, FeatureCache
from promptlearn.trainer import Trainer

CAUSAL = ["tiny-clip", "tiny-custom-clip", "tiny-rn-clip"]
FAMILIES = CAUSAL + ["tiny-bidir-clip"]
NAMES = ["cat", "golden retriever", "sea lion", "x", "hot air balloon"]


@pytest.fixture(scope="module")
def backbones() -> dict[str, FrozenCLIP]:
    return {name: load_backbone(BackboneConfig(model=name, pretrained="none", device="cpu")) for name in FAMILIES}


def coop_config(**coop) -> RunConfig:
    cfg = RunConfig()
    cfg.coop.truncate_prompts = cfg.coop.share_prefix = False  # the plain computation unless asked
    for key, value in coop.items():
        setattr(cfg.coop, key, value)
    return cfg


def features_and_grad(backbone: FrozenCLIP, cfg: RunConfig, names=NAMES):
    """Text features of CoOp's prompts and the gradient of a fixed random loss on its context."""
    method = build_coop(cfg, backbone, names)
    features = method.text_features()
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(0))
    (features * weights).sum().backward()
    return method, features.detach(), method.prompts.ctx.grad


def assert_same(plain, shortcut):
    _, f0, g0 = plain
    _, f1, g1 = shortcut
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-4 * g0.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_at_the_longest_real_length_match_the_full_context_length(backbones, family):
    backbone = backbones[family]
    plain = features_and_grad(backbone, coop_config())
    short = features_and_grad(backbone, coop_config(truncate_prompts=True))
    length = short[0].prompts.token_ids.shape[1]
    if backbone.text.can_truncate:
        assert length < backbone.text.context_length
    else:  # a bidirectional tower reads the padding: it keeps the full length
        assert family == "tiny-bidir-clip" and length == backbone.text.context_length
    assert_same(plain, short)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("ctx_init", ["", "a photo of a"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_prefix_computed_once_matches_every_prompt_in_full(backbones, family, ctx_init, truncate):
    backbone = backbones[family]
    plain = features_and_grad(backbone, coop_config(ctx_init=ctx_init, truncate_prompts=truncate))
    shared = features_and_grad(backbone, coop_config(ctx_init=ctx_init, truncate_prompts=truncate, share_prefix=True))
    assert shared[0].share_prefix == (family in CAUSAL)  # no shortcut under a bidirectional mask
    assert_same(plain, shared)


@pytest.mark.parametrize("layout", [{"class_specific": True}, {"class_position": "middle"},
                                    {"class_position": "front"}])
def test_no_shared_prefix_where_prompts_start_differently(backbones, layout):
    method = build_coop(coop_config(share_prefix=True, **layout), backbones["tiny-clip"], NAMES)
    assert not method.share_prefix


def test_an_unknown_block_type_falls_back_to_the_plain_computation():
    backbone = load_backbone(BackboneConfig(model="tiny-clip", pretrained="none", device="cpu"))
    plain = features_and_grad(backbone, coop_config(truncate_prompts=True))
    block = backbone.text.transformer.resblocks[0]
    block.__class__ = type("PatchedBlock", (ResidualAttentionBlock,), {})  # same arithmetic, unknown type
    fallback = features_and_grad(backbone, coop_config(truncate_prompts=True, share_prefix=True))
    assert not fallback[0].share_prefix
    assert_same(plain, fallback)


@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("family", ["tiny-clip", "tiny-bidir-clip"])
def test_chunks_of_classes_give_the_unchunked_features_and_gradients(backbones, family, share_prefix):
    backbone = backbones[family]
    whole = features_and_grad(backbone, coop_config(truncate_prompts=True, share_prefix=share_prefix))
    chunked = features_and_grad(backbone, coop_config(truncate_prompts=True, share_prefix=share_prefix, class_chunk=2))
    assert_same(whole, chunked)
    with torch.no_grad():  # prediction runs chunked without checkpointing
        torch.testing.assert_close(chunked[0].text_features(), whole[1], rtol=1e-5, atol=1e-6)


def test_training_on_cached_features_reaches_the_context_of_per_step_encoding(backbones, tmp_path):
    """With augmentation off, promptlearn (cached features, every text shortcut) and the reference
    loop (images encoded at every step, full-length prompts) must learn the same context."""
    backbone, epochs, shots = backbones["tiny-clip"], 3, 16
    items = synthetic_images(tmp_path / "images", len(NAMES), shots, unique=len(NAMES) * shots)
    spec = BenchmarkSpec(model="tiny-clip", classes=len(NAMES), shots=shots, class_chunk=2, device="cpu")
    cfg, reference_cfg = run_config(spec, reference=False), run_config(spec, reference=True)
    for c in (cfg, reference_cfg):
        c.train.augment, c.train.warmup_epochs = False, 0  # warm-up's tiny lr would hide a difference

    ours = build_coop(cfg, backbone, NAMES)
    assert ours.share_prefix and ours.prompts.token_ids.shape[1] < backbone.text.context_length
    dataset = DatasetSplits("synthetic", NAMES, train=items)
    bank = FeatureBank(backbone, dataset, FewShotSplit("synthetic", shots, 1, items, []), cache=FeatureCache(None),
                       batch_size=64, num_workers=0, skip_bad=False, seed=cfg.data.seed)
    ours.fit(bank, Trainer(cfg.train, epochs, cfg.data.seed), tmp_path / "coop.pt", resume=False)

    theirs = build_coop(reference_cfg, backbone, NAMES)
    start = theirs.prompts.ctx.detach().clone()
    reference_training(theirs, items, reference_cfg, epochs, augment=False)

    moved = (theirs.prompts.ctx - start).abs().max().item()
    assert moved > 1e-3  # training did change the context
    torch.testing.assert_close(ours.prompts.ctx, theirs.prompts.ctx, rtol=0, atol=1e-4 * moved)


def test_packing_lays_prompts_out_without_padding():
    from promptlearn.text_tower import Packing

    lengths, pooled, prefix = torch.tensor([5, 3, 6, 4]), torch.tensor([4, 2, 5, 3]), 2
    packing = Packing.of(lengths, pooled, prefix)
    tails = (lengths - prefix).tolist()
    assert packing.rows == sum(tails) and (packing.prompts, packing.width) == (4, max(tails))
    start = 0
    for i, tail in enumerate(tails):  # each prompt's rows in order, in its own attention slots
        rows = torch.arange(start, start + tail)
        assert (packing.source[rows] == i).all() and packing.column[rows].tolist() == list(range(tail))
        assert packing.real[rows].tolist() == [i * packing.width + j for j in range(tail)]
        assert packing.pooled[i] == start + pooled[i] - prefix
        start += tail
    # three copies read the same embedding rows and are laid out as three copies packed afresh
    tripled, fresh = packing.repeat(3), Packing.of(lengths.repeat(3), pooled.repeat(3), prefix)
    assert (tripled.source == fresh.source % len(lengths)).all()
    assert torch.equal(packing.repeat(3, sources=len(lengths)).source, fresh.source)  # each copy its own rows
    for field in ("column", "real", "pooled", "prompts", "width"):
        assert torch.equal(torch.as_tensor(getattr(tripled, field)), torch.as_tensor(getattr(fresh, field))), field


@pytest.mark.parametrize("share_prefix", [False, True])
def test_real_imagenet_names_run_at_their_own_lengths_with_the_plain_features(backbones, share_prefix):
    """ImageNet's class names (open_clip ships them) vary from 1 to 14 BPE tokens: packed, every prompt
    runs through its own length, exactly, and the rows per step are the sum of the prompts' lengths."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    backbone, names = backbones["tiny-clip"], list(IMAGENET_CLASSNAMES)
    method = build_coop(coop_config(truncate_prompts=True, share_prefix=share_prefix), backbone, names)
    ((_, packing),) = method.chunks
    lengths = backbone.text.pooled_positions(method.prompts.token_ids) + 1
    skip = method.prompts.prefix_length if share_prefix else 0
    padded_rows = len(names) * (method.prompts.token_ids.shape[1] - skip)
    assert packing.rows == int((lengths - skip).sum()) < (0.45 if share_prefix else 0.75) * padded_rows
    assert method.text_rows() == skip + packing.rows
    sample = names[::40]  # 25 names of many lengths, punctuation included, for the gradient comparison
    plain = features_and_grad(backbone, coop_config(), sample)
    packed = features_and_grad(backbone, coop_config(truncate_prompts=True, share_prefix=share_prefix), sample)
    assert len(torch.unique(packed[0].chunks[0][1].pooled.diff())) > 3  # many different lengths
    assert_same(plain, packed)
