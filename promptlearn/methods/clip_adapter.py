"""CLIP-Adapter (visual): a bottleneck MLP on the frozen image feature, blended with the feature itself
at residual ratio alpha, classified by the zero-shot text weights of the dataset's template(s).

The reference applies the adapter to the unnormalised feature and normalises afterwards. The adapter
(bias-free linear layers and ReLUs) is positively homogeneous, so feeding it the L2-normalised cached
feature gives the same normalised blend, hence the same logits and the same gradients (they do not
scale with the feature norm): one cache serves every method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TRAINING_KEYS, TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.methods.base import Capabilities, Method, register_method
from promptlearn.methods.zeroshot import text_classifier


@dataclass
class ClipAdapterConfig(TrainingKeys):
    alpha: float = 0.2  # residual ratio: alpha * adapter(f) + (1 - alpha) * f
    reduction: int = 4  # bottleneck width: feature width // reduction

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.alpha <= 1:
            found.append(f"clip_adapter.alpha must be in [0, 1], got {self.alpha}")
        return found


def bottleneck(width: int, reduction: int) -> nn.Sequential:
    """Linear d -> d/r, ReLU, Linear d/r -> d, ReLU, no biases; any feature width d."""
    hidden = max(1, width // reduction)
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(),
                         nn.Linear(hidden, width, bias=False), nn.ReLU())


@register_method("clip_adapter", config=ClipAdapterConfig)
class ClipAdapter(Method):
    capabilities = Capabilities(learns=True, trains=True, unseen_classes=True)
    training_keys = frozenset(TRAINING_KEYS)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.alpha = cfg.clip_adapter.alpha
        self.adapter = bottleneck(backbone.embed_dim, cfg.clip_adapter.reduction)
        self.register_buffer("weights", text_classifier(backbone, classnames, dataset_templates(cfg.data)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        mixed = self.alpha * self.adapter(image_features) + (1 - self.alpha) * image_features
        return self.backbone.logits(F.normalize(mixed, dim=-1), self.weights)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        return trainer.fit(self, self.training_features(bank), checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "alpha": self.alpha, "reduction": self.cfg.clip_adapter.reduction}
