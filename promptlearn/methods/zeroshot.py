"""Zero-shot CLIP: classifier weights from one template or an ensemble of templates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from promptlearn.backbone import FrozenCLIP
from promptlearn.data import dataset_templates
from promptlearn.methods.base import Capabilities, Method, register_method
from promptlearn.prompts import spoken_name


def text_classifier(backbone: FrozenCLIP, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D] weights: per-template features (normalised) averaged over templates, normalised again.
    Each sentence is tokenised whole, class name underscores read as spaces."""
    names = [spoken_name(c) for c in classnames]
    per_template = torch.stack([backbone.encode_texts([t.format(c) for c in names]) for t in templates])
    return F.normalize(per_template.mean(dim=0), dim=-1)


def raw_text_classifier(backbone: FrozenCLIP, names: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D] text features averaged over the templates, unnormalised, names used as given (CLAP's prototypes,
    TaskRes's base)."""
    return torch.stack([backbone.encode_texts([t.format(c) for c in names], normalize=False)
                        for t in templates]).mean(0)


@register_method("zeroshot")
class ZeroShot(Method):
    capabilities = Capabilities(unseen_classes=True)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("weights", text_classifier(backbone, classnames, self.templates()))

    def templates(self) -> list[str]:
        """The zero-shot template(s) of the run's dataset (data.template / data.templates override)."""
        return dataset_templates(self.cfg.data)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.weights)
