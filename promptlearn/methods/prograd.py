"""ProGrad (Zhu et al., ICCV 2023): CoOp whose cross-entropy gradient is projected so that it never
conflicts with the gradient of the distillation loss towards zero-shot CLIP's predictions.

Per parameter, with g the cross-entropy gradient and k the distillation gradient: if g . k < 0,
g <- g - lambda (g . k^) k^ with k^ = k / |k|; otherwise g is kept. The distillation loss is
T^2 * mean_i sum_c -softmax(z_i / T)_c log softmax(s_i / T)_c (z: zero-shot logits, s: the prompt's).
Code defaults (recipe=promptlearn): lambda 1, T 1, CoOp's recipe, the context from "a photo of a", the
teacher on the run's template.

The published prompts are recipe data (promptlearn/recipes/prograd.yaml): per dataset, the teacher's template
(prograd.templates) and its words before the class as the context's start (prograd.ctx_init, counted in words:
prograd.ctx_init_words) in prograd.n_ctx = 16 vectors. With ctx_init_words, an n_ctx above the phrase's W words
starts as n_ctx - W zeros followed by the embeddings of the words' first W tokens; where a word splits into
more tokens ("pet," is "pet" ","), the tokens left over stay fixed words between the context and the class.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from promptlearn.config import origins
from promptlearn.data import dataset_templates
from promptlearn.data.registry import chosen_templates
from promptlearn.errors import ConfigError
from promptlearn.methods.base import register_method
from promptlearn.methods.coop import (
    ContextStart,
    CoOp,
    CoOpConfig,
    context_from_config,
    word_context,
    word_count,
)
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.prompts import spoken_name
from promptlearn.trainer import StepLosses


@dataclass
class ProGradConfig(CoOpConfig):
    section: ClassVar[str] = "prograd"
    ctx_init: str = "a photo of a"
    # the zero-shot teacher's template(s), averaged; empty: the run's (data.template(s), else the dataset's own)
    templates: list[str] = field(default_factory=list)
    projection: float = 1.0  # lambda: the share of the conflicting component removed (1: all of it)
    temperature: float = 1.0  # of the distillation towards zero-shot CLIP

    def problems(self) -> list[str]:
        found = super().problems()
        if not 0 <= self.projection <= 1:
            found.append(f"prograd.projection must be in [0, 1], got {self.projection}")
        if self.temperature <= 0:
            found.append(f"prograd.temperature must be positive, got {self.temperature}")
        return found


def teacher_templates(cfg) -> list[str]:
    """The zero-shot teacher's template(s): prograd.templates, else the run's. A given data.template(s) wins over
    the recipe's teacher (recipes.apply_recipes); the published context start (prograd.ctx_init from the recipe,
    that teacher's words) is then refused beside a teacher it was not taken from, rather than kept silently.
    (A named target's data sets no template (protocols.target_data): a context moved there is not refused.)"""
    own, data = cfg.prograd, cfg.data
    templates = list(own.templates) or dataset_templates(data)
    published = f"{own.ctx_init} {{}}."  # the template whose words a recipe's ctx_init is
    if (origins(cfg).get("prograd.ctx_init", "").startswith("recipe ") and not own.templates
            and chosen_templates(data) and templates != [published]):
        given = f"data.templates {templates}" if data.templates else f"data.template {templates[0]!r}"
        raise ConfigError(
            f"prograd: {given} replaces ProGrad's published teacher template {published!r} for data.name={data.name}, "
            f"but the context would still start from that template's words, prograd.ctx_init {own.ctx_init!r} (set "
            f"by the published recipe); set prograd.ctx_init to your prompt's words before the class ('' for a random "
            f"start), or keep the published teacher with prograd.templates=['{published}'], or run recipe=promptlearn")
    return templates


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
        teacher_templates(cfg)  # a context start its teacher does not match stops here, before anything loads
        return super().capabilities_for(cfg)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("zero_shot", text_classifier(backbone, classnames, teacher_templates(cfg)),
                             persistent=False)

    def context_start(self) -> ContextStart:
        """CoOp's, except that with ctx_init_words an n_ctx above the phrase's W words is allowed: the context
        starts as n_ctx - W zeros, then the embeddings of the words' first W tokens (the published code)."""
        own = self.own
        phrase = spoken_name(own.ctx_init)
        words = word_count(phrase) if own.ctx_init_words and own.ctx_init.strip() else None
        if words is None or own.n_ctx is None or own.n_ctx == words:
            return super().context_start()
        if own.n_ctx < words:
            raise ConfigError(f"prograd.n_ctx={own.n_ctx} is fewer than the {words} words of prograd.ctx_init "
                              f"{own.ctx_init!r}, which start the context (prograd.ctx_init_words); set it to "
                              f"{words} or more, or leave it unset (then {words})")
        context_from_config(self.backbone, dataclasses.replace(own, n_ctx=None))  # CoOp's checks of the phrase
        return word_context(self.backbone, phrase, own.n_ctx)

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
        # named only when set, so checkpoints written before the key still load
        return {**meta, "templates": list(self.own.templates)} if self.own.templates else meta
