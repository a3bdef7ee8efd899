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

Epochs: promptlearn trains epoch e on cached pass e mod 20. clap.protocol=reference draws every epoch from the
pool of all 20 passes as the published code does (features.PooledPasses: N // 256 batches, at least one, of a
fresh shuffle of the pool; the lr schedule still steps per epoch, as there), and on ImageNet starts from the
published code's 8 templates: the 7-template ensemble and "a photo of a {}." (unless data.template(s) is set).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.checkpoint import check_meta, load_checkpoint
from promptlearn.config import TRAINING_KEYS, TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.data.registry import IMAGENET_ENSEMBLE, chosen_templates
from promptlearn.errors import CheckpointError
from promptlearn.features import PooledPasses, TrainingFeatures
from promptlearn.methods.base import Capabilities, Method, protocol_problems, register_method
from promptlearn.trainer import StepLosses

PROTOTYPE_NAMES = "prototype_classnames"  # in the trainable state: the class of each prototype row


@dataclass
class ClapConfig(TrainingKeys):
    protocol: str = "promptlearn"  # promptlearn | reference (the published code's epochs and ImageNet templates)
    constraint: bool = True  # the class-adaptive penalty (false: ZS-LP)
    lr: Optional[float] = 0.1
    batch_size: Optional[int] = 256
    epochs: Optional[int] = 300
    weight_decay: Optional[float] = 0.0
    feature_passes: Optional[int] = 20  # augmented passes of the training images

    def problems(self) -> list[str]:
        found = []
        found += protocol_problems("clap", self.protocol)
        if self.protocol == "reference" and self.feature_passes == 0:
            found.append("clap.protocol=reference draws from a pool of cached passes: clap.feature_passes must be "
                         "at least 1 (the published code's is 20)")
        return found


def raw_text_prototypes(backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D] text features averaged over templates, with their norms (CLAP's initialisation)."""
    return torch.stack([backbone.encode_texts([t.format(c) for c in classnames], normalize=False)
                        for t in templates]).mean(0)


def clap_templates(data, reference: bool) -> list[str]:
    """The templates the prototypes average: the dataset's; under the reference on ImageNet, the published
    code's 7-template ensemble followed by ImageNet's own "a photo of a {}." (unless data.template(s) is set)."""
    if reference and data.name == "imagenet" and not chosen_templates(data):
        return [*IMAGENET_ENSEMBLE, *dataset_templates(data)]
    return dataset_templates(data)


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
        anchors = raw_text_prototypes(backbone, classnames,
                                      clap_templates(cfg.data, cfg.clap.protocol == "reference"))
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
        features = PooledPasses if self.cfg.clap.protocol == "reference" else TrainingFeatures
        return features(bank, train.feature_passes, train.augment, train.crop_scale)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        own, data = self.cfg.clap, self.training_features(bank)
        pool = data.pooled()  # every cached pass: the multipliers see all augmented views
        features, labels = pool.features.to(self.device), pool.labels.to(self.device)
        with torch.no_grad():  # the prototypes are still the zero-shot ones here, also on --resume
            zero_shot = self.backbone.logits(features, F.normalize(self.anchors, dim=-1))
        self.multipliers = class_adaptive_multipliers(zero_shot, labels)
        if own.protocol == "reference":  # the published loop: a schedule to 0 over whole epochs
            trainer = trainer.with_recipe(dataclasses.replace(trainer.cfg, min_lr=0.0, max_steps=None), trainer.epochs)
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
