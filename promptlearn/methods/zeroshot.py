"""Zero-shot CLIP: classifier weights from one template or an ensemble of templates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from promptlearn.backbone import FrozenCLIP
from promptlearn.methods import register_method
from promptlearn.methods.base import Method


def text_classifier(backbone: FrozenCLIP, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D] weights: per-template features (normalised) averaged over templates, normalised again."""
    per_template = torch.stack([backbone.encode_texts([t.format(c) for c in classnames]) for t in templates])
    return F.normalize(per_template.mean(dim=0), dim=-1)


def dataset_templates(cfg) -> list[str]:
    return list(cfg.data.templates) or [cfg.data.template]


@register_method("zeroshot")
class ZeroShot(Method):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("weights", text_classifier(backbone, classnames, dataset_templates(cfg)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.weights)
