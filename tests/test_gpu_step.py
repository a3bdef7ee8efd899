"""The training step without host reads: losses and hits stay on the device and are read every
train.sync_every steps; a non-finite loss is still found at its own step; "auto" precision; packed prompts
move rows by unique indices only (checked on the CPU); and, on a GPU, CUDA-graph replay of CoOp's step against the eager step (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import QUICKSTART, tiny_backbone

from promptlearn import backbone as backbone_module
from promptlearn.backbone import load_backbone, resolved_precision
from promptlearn.checkpoint import load_checkpoint
from promptlearn.config import load_config
from promptlearn.features import EpochFeatures, SplitFeatures
from promptlearn.methods import build_method
from promptlearn.trainer import EpochTotals, NonFiniteLoss, Trainer

NAMES = ["cat", "dog", "hot air balloon"]


class RandomFeatures(EpochFeatures):
    """`images` random training features per epoch; from (epoch, step) `bad` on, NaN."""

    draw = {"dataset": "synthetic", "shots": 4}

    def __init__(self, dim: int, images: int = 40, bad: tuple[int, int] | None = None, batch_size: int = 4):
        self.dim, self.count, self.bad, self.batch_size = dim, images, bad, batch_size

    def epoch(self, e: int) -> SplitFeatures:
        x = F.normalize(torch.randn(self.count, self.dim, generator=torch.Generator().manual_seed(e)), dim=-1)
        if self.bad is not None and e == self.bad[0]:
            from promptlearn.features import batch_order
            x[batch_order(self.count, self.batch_size, 1, e)[self.bad[1] - 1]] = float("nan")
        return SplitFeatures(x, torch.arange(self.count) % len(NAMES), [f"{i}.png" for i in range(self.count)])


def coop(*overrides: str):
    cfg = load_config([QUICKSTART], ["coop.class_specific=false", "train.batch_size=4", *overrides])
    torch.manual_seed(0)
    return cfg, build_method("coop", cfg, tiny_backbone(), NAMES)


def test_the_epoch_is_read_every_sync_every_steps_with_the_per_step_history(tmp_path, monkeypatch):
    reads = []
    original = EpochTotals.read
    monkeypatch.setattr(EpochTotals, "read", lambda self: reads.append(self.seen) or original(self))
    histories = []
    for sync_every in (1, 4):
        cfg, method = coop(f"train.sync_every={sync_every}")
        reads.clear()
        fit = Trainer(cfg.train, epochs=2, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim),
                                                      tmp_path / f"{sync_every}.pt")
        histories.append((fit["history"], method.prompts.ctx.detach().clone()))
        steps = 40 // 4
        per_epoch = steps // sync_every + 1  # every sync_every steps, and at the epoch's end
        assert len(reads) == 2 * per_epoch
    (every_step, ctx1), (every_fourth, ctx4) = histories
    assert torch.equal(ctx1, ctx4)  # reading less often changes nothing that is computed
    for a, b in zip(every_step, every_fourth):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["accuracy"] == b["accuracy"]
        assert 0 < a["loss"] and 0 <= a["accuracy"] <= 100


def test_a_non_finite_loss_between_reads_names_its_step_and_sets_the_parameters_back(tmp_path):
    cfg, method = coop("train.sync_every=50", "train.checkpoint_every=5")
    data = RandomFeatures(method.backbone.embed_dim, bad=(1, 3))  # epoch 2, step 3 of 10
    checkpoint = tmp_path / "coop.pt"
    trainer = Trainer(cfg.train, epochs=3, seed=1)
    with pytest.raises(NonFiniteLoss, match=r"the loss became nan at epoch 2, step 3; training stopped and the "
                                            r"parameters went back to the state after epoch 1"):
        trainer.fit(method, data, checkpoint)
    saved = load_checkpoint(checkpoint)
    assert saved["epoch"] == 1 and torch.isfinite(method.prompts.ctx).all()
    assert torch.equal(method.prompts.ctx.detach().cpu(), saved["state"]["prompts.ctx"])


def test_auto_precision_is_bf16_where_the_gpu_has_it_and_fp32_on_the_cpu(monkeypatch, caplog):
    cuda = torch.device("cuda")
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(backbone_module.torch.cuda, "is_bf16_supported", lambda: supported)
        assert resolved_precision("auto", cuda) == expected
    assert resolved_precision("fp32", cuda) == "fp32" and resolved_precision("fp16", cuda) == "fp16"
    assert resolved_precision("auto", torch.device("cpu")) == "fp32"
    assert resolved_precision("fp16_reference", torch.device("cpu")) == "fp16_reference"
    assert tiny_backbone().precision == "fp32" and "needs a GPU" not in caplog.text  # auto is the default


def test_cuda_graphs_on_the_cpu_run_the_eager_step(tmp_path):
    results = []
    for graphs in ("false", "true"):
        cfg, method = coop(f"train.cuda_graphs={graphs}")
        Trainer(cfg.train, epochs=1, seed=1).fit(method, RandomFeatures(method.backbone.embed_dim), tmp_path / graphs)
        results.append(method.prompts.ctx.detach().clone())
    assert torch.equal(*results)


def gathers_with_repeated_indices(output: torch.Tensor) -> list[str]:
    """The row gathers in the autograd graph of `output` that read some row more than once: their backward
    adds all those rows into one, which a GPU does serially (the first packed version's gather through
    one padding row made a 1000-class step 110 ms on an H200)."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node).__name__
        indices = ([node._saved_index] if kind == "IndexSelectBackward0" else
                   [i for i in node._saved_indices if i is not None] if kind == "IndexBackward0" else [])
        if any(len(torch.unique(i)) < i.numel() for i in indices):
            found.append(kind)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("method_name, overrides", [
    ("coop", ["coop.class_specific=false"]), ("coop", ["coop.class_specific=false", "coop.share_prefix=false"]),
    ("coop", ["coop.class_specific=true"]), ("coop", ["coop.class_specific=false", "coop.class_position=middle"]),
    ("cocoop", []), ("cocoop", ["cocoop.class_position=middle"]),
    ("ivlp", ["ivlp.depth_vision=2", "ivlp.depth_text=2"]), ("maple", ["maple.depth_vision=2", "maple.depth_text=2"])])
def test_packed_prompts_have_no_gather_whose_backward_adds_rows_into_one(method_name, overrides):
    """Checked on the CPU, for the GPU: the packed text passes move rows by unique indices only (ImageNet's
    real names, so the prompts' lengths vary from 1 to 14 name tokens)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    rows = torch.randn(3, 2, requires_grad=True)  # the detector finds what it looks for
    assert gathers_with_repeated_indices(rows[torch.tensor([0, 2, 2])].sum()) == ["IndexBackward0"]
    assert gathers_with_repeated_indices(rows.index_select(0, torch.tensor([1, 1])).sum()) == ["IndexSelectBackward0"]
    assert gathers_with_repeated_indices(rows.index_select(0, torch.tensor([2, 0])).sum()) == []

    backbone = "tiny-clip" if method_name in ("ivlp", "maple") else "tiny-rn-clip"
    cfg = load_config([QUICKSTART], [f"backbone.model={backbone}", f"methods=[{method_name}]", *overrides])
    method = build_method(method_name, cfg, tiny_backbone(backbone), list(IMAGENET_CLASSNAMES[::25]))
    assert (method.text.packing is not None) if method_name in ("ivlp", "maple") else method.packed
    if method_name == "cocoop":
        logits = method(F.normalize(torch.randn(3, method.backbone.embed_dim), dim=-1))
    else:
        logits = method.text_features()
    assert gathers_with_repeated_indices(logits) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method_name", ["coop", "prograd"])
def test_cuda_graph_replay_trains_like_the_eager_step(tmp_path, monkeypatch, method_name):
    replays = []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or original(self))
    results = []
    for graphs in ("false", "true"):
        cfg = load_config([QUICKSTART], ["coop.class_specific=false", "train.batch_size=4", "backbone.device=cuda",
                                         "backbone.pretrained=none", "backbone.model=tiny-clip",
                                         f"train.cuda_graphs={graphs}", "train.drop_last=false"])
        backbone = load_backbone(cfg.backbone)
        torch.manual_seed(0)
        method = build_method(method_name, cfg, backbone, NAMES)
        start = method.prompts.ctx.detach().float().cpu()
        data = RandomFeatures(backbone.embed_dim, images=42)  # 10 full batches and a short one per epoch
        fit = Trainer(cfg.train, epochs=3, seed=1, precision=backbone.precision).fit(method, data,
                                                                                     tmp_path / f"{graphs}.pt")
        results.append((method.prompts.ctx.detach().float().cpu(), fit["history"]))
    (eager, eager_history), (graphed, graphed_history) = results
    assert len(replays) == 3 * 10 - 2  # every full batch after the two warm-up steps (the third is captured)
    assert (eager - start).abs().max() > 1e-3  # training moved the context
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-4)
    for a, b in zip(eager_history, graphed_history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
