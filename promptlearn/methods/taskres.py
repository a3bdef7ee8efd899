"""TaskRes (Yu et al., CVPR 2023): a task residual added to the frozen zero-shot text classifier.

The base t_c of class c is the class's raw text features (not normalised) averaged over the templates; the
classifier is t_c + alpha * x_c with x a learned [C, D] residual that starts at zero; it is L2-normalised
before the logits, logit_scale * cos(f, t_c + alpha * x_c), and trained by cross-entropy on the cached image
features. The residual is one row per class: a class it never trained on has no residual row, as in the
authors' code, so TaskRes scores only its training classes (and subsets of them: ImageNet-A and -R).

`taskres.templates` (empty: the run's data.template(s), else the dataset's own) and `taskres.underscores`
(class names spelt with "_" for spaces, as the authors' code formats the underscored names of its datasets)
give the base's prompts; `taskres.enhanced_base`, the path of one of the authors' enhanced bases (a text
projection learned on the task, strong_base/<Dataset>/<backbone>_<K>shots/model.pth.tar), computes the base
through that projection in place of the tower's own ("enhanced TaskRes"). The published recipe sets them
(promptlearn/recipes/taskres.yaml).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TRAINING_KEYS, TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.errors import ConfigError
from promptlearn.methods.base import Capabilities, Method, register_method
from promptlearn.methods.zeroshot import raw_text_classifier
from promptlearn.prompts import prompt_names


@dataclass
class TaskResConfig(TrainingKeys):
    alpha: float = 0.5  # RESIDUAL_SCALE: the classifier is t + alpha * x (the scripts' 0.5; Flowers 1.0)
    templates: list[str] = field(default_factory=list)  # the base's; empty: the run's, else the dataset's
    underscores: bool = False  # spell every space of a class name as "_" in the base's prompts
    enhanced_base: str = ""  # an enhanced base's text projection (the authors' model.pth.tar); empty: the tower's own
    optimizer: Optional[str] = "adam"  # Dassl's Adam: weight decay as L2 in the gradient
    lr: Optional[float] = 0.002
    batch_size: Optional[int] = 256
    weight_decay: Optional[float] = 5e-4
    warmup_epochs: Optional[int] = 1
    warmup_lr: Optional[float] = 1e-5

    def problems(self) -> list[str]:
        found = []
        if self.alpha <= 0:
            found.append(f"taskres.alpha must be above 0 (the residual's scale), got {self.alpha}")
        if self.enhanced_base and not Path(self.enhanced_base).expanduser().is_file():
            found.append(f"taskres.enhanced_base: no file {self.enhanced_base} (an enhanced base of the authors, "
                         "strong_base/<Dataset>/<backbone>_<K>shots/model.pth.tar); empty for the regular base")
        return found


def enhanced_projection(path: str) -> torch.Tensor:
    """The text projection [D, width] of an enhanced base: the weight of the linear layer its checkpoint
    holds (state_dict.weight, as the authors' code reads it)."""
    try:
        payload = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
        weight = payload["state_dict"]["weight"]
    except Exception as error:  # a file of another kind: say what was expected
        raise ConfigError(f"taskres.enhanced_base {path}: not an enhanced base (a checkpoint whose state_dict "
                          f"holds the projection's 'weight'): {error}") from None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(f"taskres.enhanced_base {path}: state_dict.weight must be a [D, width] matrix")
    return weight.float()


def projected_text_features(backbone, texts: list[str], projection: torch.Tensor) -> torch.Tensor:
    """[N, D] raw text features of sentences, the tower's pooled output mapped by `projection` [D, width] in
    place of its own text projection."""
    tower = backbone.text
    own = tower.text_projection
    if own is None or isinstance(own, nn.Linear) or own.dim() != 2:
        kind = "Hugging Face text tower" if tower.hf else "text tower"
        raise ConfigError(f"taskres.enhanced_base replaces the text projection matrix, which {backbone.name}'s {kind} "
                          "does not have (use the regular base: taskres.enhanced_base empty)")
    if tuple(projection.t().shape) != tuple(own.shape):
        raise ConfigError(f"taskres.enhanced_base: its projection is {tuple(projection.shape)}, {backbone.name}'s "
                          f"text projection maps {own.shape[0]} to {own.shape[1]} (expects {own.shape[1]} x "
                          f"{own.shape[0]})")
    swapped = copy.copy(tower)
    swapped.text_projection = projection.t().to(own.device, own.dtype)
    ids = backbone.tokenizer(texts).to(backbone.device)
    with torch.no_grad(), backbone.autocast():
        return swapped.encode(swapped.embed(ids), ids).float()


def base_classifier(backbone, names: list[str], templates: list[str], enhanced_base: str = "") -> torch.Tensor:
    """[C, D] the base t: each class's raw text features averaged over the templates (the enhanced base's
    projection in place of the tower's, if given)."""
    if enhanced_base:
        projection = enhanced_projection(enhanced_base)
        return torch.stack([projected_text_features(backbone, [t.format(c) for c in names], projection)
                            for t in templates]).mean(0)
    return raw_text_classifier(backbone, names, templates)


@register_method("taskres", config=TaskResConfig)
class TaskRes(Method):
    capabilities = Capabilities(learns=True, trains=True, eval_from_checkpoint=True, static_step=True)
    training_keys = frozenset(TRAINING_KEYS)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        own = cfg.taskres
        self.alpha = own.alpha
        names = prompt_names(classnames, own.underscores)
        base = base_classifier(backbone, names, list(own.templates) or dataset_templates(cfg.data), own.enhanced_base)
        self.register_buffer("base", base, persistent=False)
        self.residuals = nn.Parameter(torch.zeros_like(base))

    def classifier(self) -> torch.Tensor:
        """[C, D] the adapted classifier t + alpha * x, L2-normalised."""
        return F.normalize(self.base + self.alpha * self.residuals, dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.classifier())

    def scorer(self):
        weights = self.classifier()  # once for all test images
        return lambda image_features: self.backbone.logits(image_features, weights)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        return trainer.fit(self, self.training_features(bank), checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        own = self.cfg.taskres
        return {**super().checkpoint_meta(), "alpha": self.alpha, "underscores": own.underscores,
                "templates": list(own.templates) or dataset_templates(self.cfg.data),
                "enhanced_base": own.enhanced_base}
