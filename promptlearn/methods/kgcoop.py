"""KgCoOp (Yao et al., CVPR 2023): CoOp plus a penalty that keeps the learned class text features near
the hand-crafted prompt's: loss = cross-entropy + weight * (1 - mean_c cos(w_c, w_c^clip)).

Defaults are the authors' base-to-novel recipe: context "a photo of a" (4 tokens), weight 8.0,
SGD lr 0.002, batch 128, 100 epochs, CoOp's warm-up and cosine schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from promptlearn.data import dataset_templates
from promptlearn.methods.base import register_method
from promptlearn.methods.coop import CoOp, CoOpConfig
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.trainer import StepLosses


@dataclass
class KgCoOpConfig(CoOpConfig):
    section: ClassVar[str] = "kgcoop"
    ctx_init: str = "a photo of a"
    weight: float = 8.0  # of the knowledge-guidance penalty
    lr: Optional[float] = 0.002
    batch_size: Optional[int] = 128
    epochs: Optional[int] = 100
    templates: list[str] = field(default_factory=list)  # the teacher's hand-crafted prompts; empty: the dataset's

    def problems(self) -> list[str]:
        found = super().problems()
        if self.weight < 0:
            found.append(f"{self.section}.weight must be 0 or more, got {self.weight}")
        return found


def teacher_templates(cfg, section: str = "kgcoop") -> list[str]:
    """The hand-crafted prompt(s) the learned class features are kept near: <section>.templates (the authors' where
    they differ from the dataset's, set by the published recipe), else the run's zero-shot template(s)."""
    return list(getattr(cfg, section).templates) or dataset_templates(cfg.data)


def knowledge_guidance(text_features: torch.Tensor, hand_crafted: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the cosine between learned and hand-crafted class text features."""
    return 1.0 - F.cosine_similarity(text_features, hand_crafted, dim=-1, eps=1e-7).mean()


@register_method("kgcoop", config=KgCoOpConfig)
class KgCoOp(CoOp):  # CoOp's capabilities

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        hand_crafted = text_classifier(backbone, classnames, teacher_templates(cfg, self.section))
        self.register_buffer("hand_crafted", hand_crafted, persistent=False)

    def training_step(self, image_features, labels) -> StepLosses:
        text = self.text_features()
        logits = self.backbone.logits(image_features, text)
        return StepLosses(logits, {"cross_entropy": F.cross_entropy(logits.float(), labels),
                                   "knowledge_guidance": self.own.weight * knowledge_guidance(text, self.hand_crafted)})

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "weight": self.own.weight}
