"""A whole method in one module: the nearest class prototype (the mean few-shot feature of each class),
blended with zero-shot CLIP. Import it before running (or list it under the `promptlearn.methods`
entry-point group of your package) and name it in `methods:`."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptlearn.data import dataset_templates
from promptlearn.methods import Capabilities, Method, register_method
from promptlearn.methods.zeroshot import text_classifier


@dataclass
class NearestPrototypeConfig:
    weight: float = 0.5  # share of the prototypes in the classifier; the rest is zero-shot

    def problems(self) -> list[str]:
        return [] if 0 <= self.weight <= 1 else [f"nearest_prototype.weight must be in [0, 1], got {self.weight}"]


@register_method("nearest_prototype", config=NearestPrototypeConfig)
class NearestPrototype(Method):
    capabilities = Capabilities(learns=True)  # learns from the shots; no trainer, no validation split

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("text", text_classifier(backbone, classnames, dataset_templates(cfg.data)))
        self.register_buffer("prototypes", torch.zeros_like(self.text))

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        features, labels = bank.train.features.to(self.device), bank.train.labels.to(self.device)
        self.prototypes = F.normalize(torch.zeros_like(self.text).index_add_(0, labels, features), dim=-1)
        return {"shots_used": len(labels)}

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        weight = self.cfg.nearest_prototype.weight
        classifier = F.normalize(weight * self.prototypes + (1 - weight) * self.text, dim=-1)
        return self.backbone.logits(image_features, classifier)
