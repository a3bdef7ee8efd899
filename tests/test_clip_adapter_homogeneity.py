"""CLIP-Adapter on raw image features (the reference) and on L2-normalised ones (promptlearn's cache):
the bias-free adapter is positively homogeneous, so logits and gradients are equal."""
import torch
from helpers import tiny_backbone

from promptlearn.config import RunConfig
from promptlearn.methods import build_method


def test_raw_and_normalised_features_give_equal_logits_and_gradients():
    backbone = tiny_backbone()
    torch.manual_seed(0)
    adapter = build_method("clip_adapter", RunConfig(), backbone, ["dog", "cat", "car", "ship"])
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(16, backbone.embed_dim, generator=g) * torch.linspace(0.5, 30, 16)[:, None]
    labels = torch.randint(0, 4, (16,), generator=g)
    results = []
    for features in (raw, torch.nn.functional.normalize(raw, dim=-1)):
        adapter.zero_grad()
        logits = adapter(features)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), [p.grad.clone() for p in adapter.adapter.parameters()]))
    (logits_raw, grads_raw), (logits_unit, grads_unit) = results
    torch.testing.assert_close(logits_raw, logits_unit, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_raw, grads_unit):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
