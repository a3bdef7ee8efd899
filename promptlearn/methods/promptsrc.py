"""PromptSRC: IVLP prompts regularised towards the frozen model (Khattak et al.).

On top of IVLP's cross-entropy, each step adds three self-regulating terms against the frozen CLIP:
an L1 loss between the prompted and the frozen image features (weight 10), an L1 loss between the
prompted text features and the frozen text features averaged over 60 ImageNet templates (weight 25:
the textual diversity), and a KL divergence between the prompted and the frozen logits (summed,
divided by the number of logits). The prompts kept at the end are a Gaussian-weighted average of
the prompts after every epoch (mean epoch 15, std 1, weights normalised over the epochs run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from promptlearn.data.registry import ensemble
from promptlearn.methods.base import register_method
from promptlearn.methods.ivlp import IVLP, DeepPromptConfig
from promptlearn.trainer import StepLosses

GPA_PREFIX = "gpa."  # the running Gaussian-weighted sums, saved with the prompts so --resume continues them


@dataclass
class PromptSRCConfig(DeepPromptConfig):
    section = "promptsrc"
    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    depth_text: int = 9
    depth_vision: int = 9
    lr: Optional[float] = 0.0025
    epochs: Optional[int] = 20
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0

    def problems(self) -> list[str]:
        found = super().problems()
        found += [f"promptsrc.{k} must be 0 or more, got {getattr(self, k)}"
                  for k in ("text_loss_weight", "image_loss_weight") if getattr(self, k) < 0]
        if self.gpa_std <= 0:
            found.append(f"promptsrc.gpa_std must be positive, got {self.gpa_std}")
        return found


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """The weight of the prompts after epoch 1..epochs: a Gaussian density at the epoch, normalised.
    Computed in log space so that epochs far from the mean (a short run) still normalise."""
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    return [w / sum(weights) for w in weights]


def teacher_text_features(backbone, classnames: list[str]) -> torch.Tensor:
    """Frozen text features averaged (unnormalised) over the templates, then normalised."""
    total, templates = 0, ensemble("imagenet_60")  # PromptSRC's 60 ImageNet templates, for every dataset
    with torch.no_grad():
        for template in templates:
            ids = backbone.tokenizer([template.format(c) for c in classnames]).to(backbone.device)
            total = total + backbone.model.encode_text(ids).float()
    return F.normalize(total / len(templates), dim=-1)


@register_method("promptsrc", config=PromptSRCConfig)
class PromptSRC(IVLP):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("teacher_text", teacher_text_features(backbone, classnames), persistent=False)
        self.gpa: dict[str, torch.Tensor] = {}

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepLosses:
        own = self.own
        image, text = self.encode_images(images), self.text_features()
        logits = self.backbone.logits(image, text).float()
        with torch.no_grad():
            frozen_image = self.backbone.encode_images(images)  # the hooks are off outside encode_images
            frozen_logits = self.backbone.logits(frozen_image, self.teacher_text).float()
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(frozen_logits, dim=1), reduction="sum",
                      log_target=True) / logits.numel()
        return StepLosses(logits, {
            "cross_entropy": F.cross_entropy(logits, labels), "kl_to_frozen": kl,
            "text_l1": F.l1_loss(text.float(), self.teacher_text) * own.text_loss_weight,
            "image_l1": F.l1_loss(image.float(), frozen_image) * own.image_loss_weight})

    def end_of_epoch(self, epoch: int, epochs: int) -> None:
        """Add this epoch's prompts to the Gaussian-weighted sum; after the last epoch, keep the sum."""
        weight = gpa_weights(epochs, self.own.gpa_mean, self.own.gpa_std)[epoch - 1]
        for name, param in self.named_parameters():
            if param.requires_grad:
                self.gpa[name] = self.gpa.get(name, 0) + weight * param.detach().clone()
        if epoch == epochs:
            with torch.no_grad():
                for name, param in self.named_parameters():
                    if name in self.gpa:
                        param.copy_(self.gpa[name])

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {**super().trainable_state(), **{GPA_PREFIX + n: t.cpu().clone() for n, t in self.gpa.items()}}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source) -> None:
        self.gpa = {n[len(GPA_PREFIX):]: t.to(self.device) for n, t in state.items() if n.startswith(GPA_PREFIX)}
        super().load_trainable_state({n: t for n, t in state.items() if not n.startswith(GPA_PREFIX)}, source)
