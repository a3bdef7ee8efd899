"""ProGrad (Zhu et al., ICCV 2023): CoOp whose cross-entropy gradient is projected so that it never
conflicts with the gradient of the distillation loss towards zero-shot CLIP's predictions.

Per parameter, with g the cross-entropy gradient and k the distillation gradient: if g . k < 0,
g <- g - lambda (g . k^) k^ with k^ = k / |k|; otherwise g is kept. The distillation loss is
T^2 * mean_i sum_c -softmax(z_i / T)_c log softmax(s_i / T)_c (z: zero-shot logits, s: the prompt's).
Defaults are the authors': lambda 1, T 1, CoOp's recipe (SGD lr 0.002, batch 32, the protocol's epochs).

prograd.protocol=reference follows the published code's prompts: the zero-shot teacher uses its
per-dataset template, and the context (n_ctx, 16 when unset) starts as zeros followed by the embeddings
of the template's first W tokens before the class, W its number of words; where a word splits into more
tokens ("pet," is "pet" ","), the tokens left over stay fixed words between the context and the class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from promptlearn.data import dataset_templates
from promptlearn.errors import ConfigError
from promptlearn.methods.base import protocol_problems, register_method
from promptlearn.methods.coop import (
    DEFAULT_N_CTX,
    ContextStart,
    CoOp,
    CoOpConfig,
    word_context,
    word_count,
)
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.trainer import StepLosses

# The published code's hand-crafted prompt per dataset: the zero-shot teacher's template, whose words
# before the class also start the context under protocol=reference
REFERENCE_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.", "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.", "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}."}


@dataclass
class ProGradConfig(CoOpConfig):
    section: ClassVar[str] = "prograd"
    protocol: str = "promptlearn"  # promptlearn | reference (the published code's per-dataset prompts and context)
    ctx_init: str = "a photo of a"  # not read under protocol=reference
    projection: float = 1.0  # lambda: the share of the conflicting component removed (1: all of it)
    temperature: float = 1.0  # of the distillation towards zero-shot CLIP

    def problems(self) -> list[str]:
        found = super().problems()
        if not 0 <= self.projection <= 1:
            found.append(f"prograd.projection must be in [0, 1], got {self.projection}")
        if self.temperature <= 0:
            found.append(f"prograd.temperature must be positive, got {self.temperature}")
        found += protocol_problems("prograd", self.protocol)
        if self.protocol == "reference" and (self.class_specific or self.class_position != "end"):
            found.append("prograd.protocol=reference lays out the published prompt, one context with the class "
                         "at the end; drop prograd.class_specific and prograd.class_position")
        return found


def context_phrase(template: str) -> str:
    """The template's words before the class."""
    return template.replace(" {}.", "")


def reference_template(cfg) -> str | None:
    """The published template of the run's dataset under prograd.protocol=reference (None otherwise);
    refused for a dataset without one, or a context shorter than its words."""
    own = cfg.prograd
    if own.protocol != "reference":
        return None
    template = REFERENCE_TEMPLATES.get(cfg.data.name)
    if template is None:
        raise ConfigError(
            f"prograd.protocol=reference knows the published prompts of {', '.join(REFERENCE_TEMPLATES)} only, not "
            f"data.name={cfg.data.name}; use prograd.protocol=promptlearn (data.template and prograd.ctx_init "
            "give your own prompt)")
    phrase, n_ctx = context_phrase(template), own.n_ctx or DEFAULT_N_CTX
    words = word_count(phrase)
    if n_ctx < words:
        raise ConfigError(f"prograd.n_ctx={n_ctx} is fewer than the {words} words of {phrase!r}, which start the "
                          f"context on {cfg.data.name} under prograd.protocol=reference; set it to {words} or more "
                          f"(the published code uses {DEFAULT_N_CTX})")
    return template


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

    @classmethod
    def capabilities_for(cls, cfg):
        reference_template(cfg)  # a reference protocol it cannot follow stops here, before anything loads
        return super().capabilities_for(cfg)

    def __init__(self, cfg, backbone, classnames):
        self.template = reference_template(cfg)  # before CoOp's __init__, whose context_start reads it
        super().__init__(cfg, backbone, classnames)
        templates = [self.template] if self.template else dataset_templates(cfg.data)
        self.register_buffer("zero_shot", text_classifier(backbone, classnames, templates), persistent=False)

    def context_start(self) -> ContextStart:
        if self.template is None:
            return super().context_start()
        return word_context(self.backbone, context_phrase(self.template), self.own.n_ctx or DEFAULT_N_CTX)

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
        meta = {**super().checkpoint_meta(), "projection": self.own.projection, "temperature": self.own.temperature}
        # named only when not the default, so checkpoints written before the option still load
        return meta if self.own.protocol == "promptlearn" else {**meta, "protocol": self.own.protocol}
