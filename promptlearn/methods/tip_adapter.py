"""Tip-Adapter (training-free cache model) and Tip-Adapter-F (the cache keys fine-tuned).

keys = L2-normalised few-shot image features averaged over the augmented passes, values = one-hot
labels; logits = zero-shot logits + alpha * exp(-beta * (1 - f @ keys^T)) @ values. alpha and beta are
chosen on the few-shot validation set, never on the test set (the published code searched them on
ImageNet's test set and picked Tip-Adapter-F's epoch by test accuracy).

tip_adapter.protocol=reference follows the published code's protocol otherwise: per-dataset search
grids and initial alpha, 100 epochs on EuroSAT, a cosine schedule stepped every iteration with no
dropped last batch, crops of area (0.5, 1), keys averaged over the features before normalisation, and
ImageNet's 7-template zero-shot classifier.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TRAINING_KEYS, TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.data.transforms import HALF_AREA_CROP_SCALE
from promptlearn.errors import ConfigError, DataError
from promptlearn.features import SplitFeatures, TrainingFeatures
from promptlearn.methods.base import Capabilities, protocol_problems, register_method
from promptlearn.methods.zeroshot import ZeroShot
from promptlearn.progress import progress

# Tip-Adapter's published protocol, per dataset: search_scale [S_beta, S_alpha] and -F's initial alpha
REFERENCE_SEARCH_SCALE = {
    "imagenet": (7, 3), "oxford_pets": (7, 3), "ucf101": (7, 3), "caltech101": (12, 5), "dtd": (13, 13),
    "eurosat": (12, 10), "sun397": (12, 10), "fgvc_aircraft": (30, 30), "food101": (10, 10),
    "oxford_flowers": (50, 50), "stanford_cars": (20, 10)}
REFERENCE_INIT_ALPHA = {
    "imagenet": 1.17, "oxford_pets": 1.17, "food101": 1.17, "sun397": 1.17, "caltech101": 3.0, "ucf101": 3.0,
    "stanford_cars": 3.0, "dtd": 2.0, "eurosat": 2.0, "fgvc_aircraft": 5.0, "oxford_flowers": 10.0}
REFERENCE_INIT_BETA = 1.0
REFERENCE_EPOCHS, REFERENCE_DEFAULT_EPOCHS = {"eurosat": 100}, 20
REFERENCE_SEARCH_STEPS = (200, 20)  # beta, alpha


@dataclass
class TipAdapterConfig(TrainingKeys):
    protocol: str = "promptlearn"  # promptlearn | reference (the published code's grids, schedule, crops)
    alpha_range: list[float] = field(default_factory=lambda: [0.1, 10.0])  # searched on the validation set
    alpha_steps: int = 20
    beta_range: list[float] = field(default_factory=lambda: [0.1, 12.0])
    beta_steps: int = 200
    init_alpha: float = 1.0  # alpha and beta where nothing is searched, and while Tip-Adapter-F fine-tunes the keys
    init_beta: float = 1.0

    section = "tip_adapter"

    def problems(self) -> list[str]:
        found = []
        found += protocol_problems(self.section, self.protocol)
        for name in ("alpha", "beta"):
            lo_hi = getattr(self, f"{name}_range")
            if not (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1]):
                found.append(f"{self.section}.{name}_range must be [low, high] with 0 <= low <= high, got {lo_hi}")
        return found


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    section = "tip_adapter_f"
    epochs: Optional[int] = 20  # Tip-Adapter-F's recipe: AdamW, cosine, batch 256
    lr: Optional[float] = 0.001
    batch_size: Optional[int] = 256
    eps: Optional[float] = 1e-4
    weight_decay: Optional[float] = 0.01
    optimizer: Optional[str] = "adamw"
    warmup_epochs: Optional[int] = 0


def search_grid(low_high: list[float], steps: int) -> list[float]:
    """`steps` evenly spaced values from low to high inclusive (just low for one step)."""
    return [float(v) for v in np.linspace(low_high[0], low_high[1], steps)]


def reference_grid(upper: float, steps: int) -> list[float]:
    """The published code's grid: 0.1 + i (upper - 0.1) / steps for i < steps (upper end excluded)."""
    return [0.1 + i * (upper - 0.1) / steps for i in range(steps)]


class Protocol:
    """Where Tip-Adapter's settings come from: its config section, or, for protocol=reference, the
    published code's per-dataset values (the config's grid, init and recipe keys are then not read)."""

    def __init__(self, cfg, section: str):
        self.tip, self.dataset = cfg.sections[section], cfg.data.name
        self.reference = self.tip.protocol == "reference"
        if self.reference and self.dataset not in REFERENCE_SEARCH_SCALE:
            raise ConfigError(
                f"tip_adapter.protocol=reference knows the published settings of {', '.join(REFERENCE_SEARCH_SCALE)} "
                f"only, not data.name={self.dataset}; use tip_adapter.protocol=promptlearn and set the grids")

    def grids(self) -> tuple[list[float], list[float], dict]:
        """alpha grid, beta grid, and how they were made (for the report)."""
        tip = self.tip
        if self.reference:
            scale_beta, scale_alpha = REFERENCE_SEARCH_SCALE[self.dataset]
            steps_beta, steps_alpha = REFERENCE_SEARCH_STEPS
            return (reference_grid(scale_alpha, steps_alpha), reference_grid(scale_beta, steps_beta),
                    {"search_scale": [scale_beta, scale_alpha], "search_step": [steps_beta, steps_alpha]})
        return (search_grid(tip.alpha_range, tip.alpha_steps), search_grid(tip.beta_range, tip.beta_steps),
                {"searched_alpha": [*tip.alpha_range, tip.alpha_steps],
                 "searched_beta": [*tip.beta_range, tip.beta_steps]})

    def init(self) -> tuple[float, float]:
        if self.reference:
            return REFERENCE_INIT_ALPHA[self.dataset], REFERENCE_INIT_BETA
        return self.tip.init_alpha, self.tip.init_beta

    def epochs(self) -> int:
        return REFERENCE_EPOCHS.get(self.dataset, REFERENCE_DEFAULT_EPOCHS) if self.reference else None

    def recipe(self, train):
        """Tip-Adapter-F's training recipe: AdamW, cosine, no warm-up; the reference steps the cosine every
        iteration and keeps the last short batch."""
        recipe = train
        if self.reference:
            recipe = dataclasses.replace(recipe, lr_per_step=True, drop_last=False, min_lr=0.0, max_steps=None,
                                         crop_scale=list(HALF_AREA_CROP_SCALE))
        return recipe

    def crop_scale(self, train) -> tuple:
        return HALF_AREA_CROP_SCALE if self.reference else tuple(train.crop_scale)

    def templates(self, data) -> list[str]:
        """ImageNet's 7-template ensemble under the reference, unless data.template(s) is set."""
        return dataset_templates(data, imagenet_ensemble=self.reference)


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class sums of exp(-beta * (1 - cosine)) over the cached shots."""
    return torch.exp(-beta * (1 - affinity)) @ values


@register_method("tip_adapter", config=TipAdapterConfig)
class TipAdapter(ZeroShot):
    capabilities = Capabilities(learns=True, uses_validation=True)
    training_keys = frozenset({"augment", "crop_scale", "feature_passes"})  # the passes its cache averages
    unread_training = "it trains nothing (tip_adapter_f.* sets Tip-Adapter-F's training)"
    fine_tunes = False  # Tip-Adapter-F learns the keys

    @classmethod
    def capabilities_for(cls, cfg) -> Capabilities:
        """Validation-free (selection=none): alpha and beta stay at init_alpha and init_beta, nothing is searched.
        A reference protocol for a dataset without published settings stops here, before anything loads."""
        Protocol(cfg, cls.section)
        return dataclasses.replace(cls.capabilities, uses_validation=cfg.selection != "none")

    def __init__(self, cfg, backbone, classnames):
        self.protocol = Protocol(cfg, self.section)
        super().__init__(cfg, backbone, classnames)
        self.alpha, self.beta = self.protocol.init()
        empty_keys = torch.zeros(0, backbone.embed_dim)  # filled from the few-shot draw in fit()
        if self.fine_tunes:
            self.keys = nn.Parameter(empty_keys)
        else:
            self.register_buffer("keys", empty_keys)
        self.register_buffer("values", torch.zeros(0, len(classnames)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        cache = cache_logits(image_features @ self.keys.t(), self.values, self.beta)
        return super().forward(image_features) + self.alpha * cache

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        if self.caps.uses_validation and len(bank.val) == 0:
            raise DataError(f"{self.name} needs a few-shot validation set to choose alpha and beta, but the "
                            "draw has none; the dataset has no val split and no training images left over")
        data = self.training_features(bank)
        keys = data.mean_over_passes(raw=self.protocol.reference).to(self.device)
        labels = bank.train_pass(0, data.augment, crop_scale=data.crop_scale).labels
        self.keys = nn.Parameter(keys) if self.fine_tunes else keys
        self.values = F.one_hot(labels, len(self.classnames)).float().to(self.device)
        info = self.fine_tune(data, trainer, checkpoint, resume) if self.fine_tunes else {}
        chosen = self.search(bank.val) if self.caps.uses_validation else {"alpha": self.alpha, "beta": self.beta}
        return {**info, **chosen, "cache_size": len(keys)}

    def training_features(self, bank) -> TrainingFeatures:
        train = self.train_config
        return TrainingFeatures(bank, train.feature_passes, train.augment, self.protocol.crop_scale(train))

    def templates(self) -> list[str]:
        return self.protocol.templates(self.cfg.data)

    def fine_tune(self, data: TrainingFeatures, trainer, checkpoint, resume) -> dict:
        """Tip-Adapter-F's recipe (see Protocol.recipe), at the initial alpha and beta."""
        epochs = self.protocol.epochs()
        recipe = self.protocol.recipe(trainer.cfg)
        return trainer.with_recipe(recipe, trainer.epochs if epochs is None else epochs).fit(self, data, checkpoint,
                                                                                           resume)

    @torch.no_grad()
    def search(self, val: SplitFeatures) -> dict:
        """The (alpha, beta) of the grid with the best validation accuracy; ties keep the smallest."""
        alpha_grid, betas, searched = self.protocol.grids()
        alphas = torch.tensor(alpha_grid, device=self.device)
        self.eval()
        x, y = val.features.to(self.device), val.labels.to(self.device)
        zero_shot, affinity = super().forward(x), x @ self.keys.t()
        best_correct, best_alpha, best_beta = -1, 0.0, 0.0
        for beta in progress(betas, desc=f"{self.name} alpha/beta search", leave=False):
            logits = zero_shot + alphas[:, None, None] * cache_logits(affinity, self.values, beta)
            correct = (logits.argmax(-1) == y).sum(-1)  # per alpha
            i = int(correct.argmax())
            if int(correct[i]) > best_correct:
                best_correct, best_alpha, best_beta = int(correct[i]), alpha_grid[i], beta
        self.alpha, self.beta = best_alpha, best_beta
        return {"alpha": best_alpha, "beta": best_beta, "val_accuracy": 100.0 * best_correct / len(y),
                "protocol": self.protocol.tip.protocol, **searched}

    def checkpoint_meta(self) -> dict:
        init_alpha, init_beta = self.protocol.init()
        return {**super().checkpoint_meta(), "cache_size": len(self.keys), "init_alpha": init_alpha,
                "init_beta": init_beta, "protocol": self.protocol.tip.protocol}


@register_method("tip_adapter_f", config=TipAdapterFConfig)
class TipAdapterF(TipAdapter):
    capabilities = Capabilities(learns=True, trains=True, uses_validation=True)
    training_keys = frozenset(TRAINING_KEYS)
    fine_tunes = True
