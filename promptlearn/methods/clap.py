"""CLAP (Silva-Rodríguez et al., CVPR 2024): a linear probe initialised from the zero-shot class
prototypes and kept near them by a class-adaptive penalty; no validation set is used.

Prototypes w_c start at t_c, the class's raw text features averaged over the templates (not
normalised); logits = logit_scale * cos(f, w_c). The loss is cross-entropy +
mean_c lambda_c ||w_c - t_c||^2, where lambda_c is zero-shot CLIP's mean softmax probability of the
true class over the training features of class c (all augmented passes). Recipe: SGD lr 0.1,
momentum 0.9, no weight decay, batch 256, 300 epochs (the first at the trainer's warm-up lr 1e-5, then a
cosine stepped per epoch), 20 augmented passes of cached features.
`clap.constraint=false` is the authors' ZS-LP baseline (the same probe with no penalty). Loaded for
other classes (base-to-novel, a checkpoint), a class it never trained on keeps its zero-shot prototype.

Epochs (`clap.batches`): `passes` trains epoch e on cached pass e mod `clap.feature_passes`; `pooled` draws every
epoch from the pool of all the passes as the authors' code does (features.PooledPasses: N // B batches, at least
one, of a fresh shuffle of the pool; the lr schedule still steps per epoch, as there). The prototypes average
`clap.templates` (empty: the run's data.template(s), else the dataset's own), and with `clap.underscores` spell
every space of a class name as "_", as the authors' code formats the underscored names of its datasets.
The published recipe (promptlearn/recipes/clap.yaml) sets all three.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.checkpoint import check_meta, load_checkpoint
from promptlearn.config import TRAINING_KEYS, TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.errors import CheckpointError
from promptlearn.features import PooledPasses, TrainingFeatures
from promptlearn.methods.base import Capabilities, Method, register_method
from promptlearn.methods.zeroshot import raw_text_classifier
from promptlearn.prompts import prompt_names
from promptlearn.trainer import StepLosses

PROTOTYPE_NAMES = "prototype_classnames"  # in the trainable state: the class of each prototype row
BATCHES = {"passes": TrainingFeatures, "pooled": PooledPasses}  # clap.batches: how epochs draw the cached passes


@dataclass
class ClapConfig(TrainingKeys):
    constraint: bool = True  # the class-adaptive penalty (false: ZS-LP)
    batches: str = "passes"  # passes: epoch e on cached pass e mod P | pooled: every epoch from the pool of all P
    templates: list[str] = field(default_factory=list)  # the prototypes'; empty: the run's, else the dataset's
    underscores: bool = False  # spell every space of a class name as "_" in the prototypes' prompts
    lr: Optional[float] = 0.1
    batch_size: Optional[int] = 256
    epochs: Optional[int] = 300
    weight_decay: Optional[float] = 0.0
    feature_passes: Optional[int] = 20  # augmented passes of the training images

    def problems(self) -> list[str]:
        if self.batches not in BATCHES:
            return [f"clap.batches must be one of {', '.join(BATCHES)}, got {self.batches!r}"]
        if self.batches == "pooled" and self.feature_passes == 0:
            return ["clap.batches=pooled draws from a pool of cached passes: clap.feature_passes must be at least 1 "
                    "(the published recipe's is 20), or use clap.batches=passes"]
        return []


def prototype_templates(cfg) -> list[str]:
    """clap.templates as given; else the run's data.template(s), else the dataset's own."""
    return list(cfg.clap.templates) or dataset_templates(cfg.data)


def class_adaptive_multipliers(zero_shot_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lambda_c: mean zero-shot softmax probability of class c over the training features of class c
    (0 for a class without training features)."""
    one_hot = F.one_hot(labels, zero_shot_logits.shape[-1]).float()
    confidence = (F.softmax(zero_shot_logits.float(), dim=-1) * one_hot).sum(0)
    return confidence / one_hot.sum(0).clamp(min=1)


def prototype_penalty(prototypes: torch.Tensor, anchors: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """mean_c lambda_c ||w_c - t_c||^2."""
    return (multipliers * (prototypes - anchors).pow(2).sum(-1)).mean()


@register_method("clap", config=ClapConfig)
class Clap(Method):
    capabilities = Capabilities(learns=True, trains=True, unseen_classes=True, eval_from_checkpoint=True)
    training_keys = frozenset(TRAINING_KEYS)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        anchors = raw_text_classifier(backbone, prompt_names(classnames, cfg.clap.underscores),
                                      prototype_templates(cfg))
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("multipliers", torch.zeros(len(classnames), device=anchors.device), persistent=False)
        self.prototypes = nn.Parameter(anchors.clone())

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, F.normalize(self.prototypes, dim=-1))

    def training_step(self, image_features, labels) -> StepLosses:
        logits = self(image_features)
        losses = {"cross_entropy": F.cross_entropy(logits.float(), labels)}
        if self.cfg.clap.constraint:
            losses["constraint"] = prototype_penalty(self.prototypes, self.anchors, self.multipliers)
        return StepLosses(logits, losses)

    def training_features(self, bank) -> TrainingFeatures:
        train = self.train_config
        return BATCHES[self.cfg.clap.batches](bank, train.feature_passes, train.augment, train.crop_scale)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        data = self.training_features(bank)
        pool = data.pooled()  # every cached pass: the multipliers see all augmented views
        features, labels = pool.features.to(self.device), pool.labels.to(self.device)
        with torch.no_grad():  # the prototypes are still the zero-shot ones here, also on --resume
            zero_shot = self.backbone.logits(features, F.normalize(self.anchors, dim=-1))
        self.multipliers = class_adaptive_multipliers(zero_shot, labels)
        info = trainer.fit(self, data, checkpoint, resume)
        return {**info, "multipliers_mean": float(self.multipliers.mean())}

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "constraint": self.cfg.clap.constraint}

    def trainable_state(self) -> dict:
        return {**super().trainable_state(), PROTOTYPE_NAMES: list(self.classnames)}

    def load_trainable_state(self, state: dict, source) -> None:
        """Prototypes matched by class name: a class the state never trained (a novel class) keeps its
        zero-shot prototype, where CLAP starts and what its penalty pulls towards."""
        trained, names = state.get("prototypes"), state.get(PROTOTYPE_NAMES)
        if trained is None or names is None or tuple(trained.shape) != (len(names), self.prototypes.shape[-1]):
            raise CheckpointError(f"{source} holds no CLAP prototypes of width {self.prototypes.shape[-1]} "
                                  "with their class names")
        rows = {name: i for i, name in enumerate(names)}
        with torch.no_grad():
            for i, name in enumerate(self.classnames):
                if name in rows:
                    self.prototypes[i] = trained[rows[name]].to(self.prototypes.device)

    def restore(self, path) -> dict:
        """A checkpoint for any class list of the same setup (see load_trainable_state)."""
        payload = load_checkpoint(path)
        check_meta(path, payload.get("meta", {}), {k: v for k, v in self.checkpoint_meta().items()
                                                    if k != "classnames"})
        self.load_trainable_state(payload.get("state", {}), path)
        return payload
