"""ProGrad (Zhu et al., ICCV 2023): CoOp whose cross-entropy gradient is projected so that it never
conflicts with the gradient of the distillation loss towards zero-shot CLIP's predictions.

Per parameter, with g the cross-entropy gradient and k the distillation gradient: if g . k < 0,
g <- g - lambda (g . k^) k^ with k^ = k / |k|; otherwise g is kept. The distillation loss is
T^2 * mean_i sum_c -softmax(z_i / T)_c log softmax(s_i / T)_c (z: zero-shot logits, s: the prompt's).
Defaults are the authors': lambda 1, T 1, CoOp's recipe (SGD lr 0.002, batch 32, the protocol's epochs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from promptlearn.data import dataset_templates
from promptlearn.methods.base import register_method
from promptlearn.methods.coop import CoOp, CoOpConfig
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.trainer import StepLosses


@dataclass
class ProGradConfig(CoOpConfig):
    section: ClassVar[str] = "prograd"
    ctx_init: str = "a photo of a"
    projection: float = 1.0  # lambda: the share of the conflicting component removed (1: all of it)
    temperature: float = 1.0  # of the distillation towards zero-shot CLIP

    def problems(self) -> list[str]:
        found = super().problems()
        if not 0 <= self.projection <= 1:
            found.append(f"prograd.projection must be in [0, 1], got {self.projection}")
        if self.temperature <= 0:
            found.append(f"prograd.temperature must be positive, got {self.temperature}")
        return found


def distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over images of the cross-entropy from the teacher's softened distribution."""
    target = F.softmax(teacher / temperature, dim=-1)
    return -(target * F.log_softmax(logits / temperature, dim=-1)).sum(-1).mean() * temperature ** 2


def project_conflict(grad: torch.Tensor, guide: torch.Tensor, lambda_: float) -> torch.Tensor:
    """`grad` without (lambda times) its component against `guide` when the two conflict (a zero guide
    removes nothing). Decided on the device: a training step never waits for the host."""
    norm = torch.linalg.vector_norm(guide)
    unit = guide / torch.where(norm == 0, 1.0, norm)
    dot = torch.dot(grad.flatten(), unit.flatten())
    return grad - torch.where(dot < 0, lambda_ * dot, 0.0) * unit


@register_method("prograd", config=ProGradConfig)
class ProGrad(CoOp):  # CoOp's capabilities

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("zero_shot", text_classifier(backbone, classnames, dataset_templates(cfg.data)),
                             persistent=False)

    def training_step(self, image_features, labels) -> StepLosses:
        logits = self(image_features).float()
        teacher = self.backbone.logits(image_features, self.zero_shot).float()
        return StepLosses(logits, {"cross_entropy": F.cross_entropy(logits, labels),
                                   "distillation": distillation(logits, teacher, self.own.temperature)})

    def backward(self, losses, scale) -> None:
        """The distillation gradient guides; only the projected cross-entropy gradient is applied."""
        params = [p for p in self.parameters() if p.requires_grad]
        guides = torch.autograd.grad(scale(losses["distillation"]), params, retain_graph=True)
        scale(losses["cross_entropy"]).backward()
        for p, guide in zip(params, guides):
            p.grad = project_conflict(p.grad, guide, self.own.projection)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "projection": self.own.projection, "temperature": self.own.temperature}
