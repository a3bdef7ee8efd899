"""Tip-Adapter (training-free cache model) and Tip-Adapter-F (the cache keys fine-tuned).

keys = L2-normalised few-shot image features averaged over the augmented passes, values = one-hot
labels; logits = zero-shot logits + alpha * exp(-beta * (1 - f @ keys^T)) @ values. alpha and beta are
chosen on the few-shot validation set, never on the test set (the published code searched them on
ImageNet's test set and picked Tip-Adapter-F's epoch by test accuracy).

The published per-dataset settings (search grids, initial alpha, epochs, schedule, crops, raw-feature
keys, ImageNet's templates, fresh training crops) are recipe data: promptlearn/recipes/tip_adapter.yaml
and tip_adapter_f.yaml, applied under `recipe: published`.
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
from promptlearn.errors import DataError
from promptlearn.features import SplitFeatures, TrainingFeatures
from promptlearn.methods.base import Capabilities, register_method
from promptlearn.methods.zeroshot import ZeroShot
from promptlearn.progress import progress

# how `steps` values span a [low, high] search range
GRIDS = ("linspace", "arange")  # both ends included | low + i (high - low) / steps, i < steps (Tip-Adapter's code)


@dataclass
class TipAdapterConfig(TrainingKeys):
    alpha_range: list[float] = field(default_factory=lambda: [0.1, 10.0])  # searched on the validation set
    alpha_steps: int = 20
    beta_range: list[float] = field(default_factory=lambda: [0.1, 12.0])
    beta_steps: int = 200
    grid: str = "linspace"  # see GRIDS: linspace, or arange (the high end excluded, as the published search)
    init_alpha: float = 1.0  # alpha and beta where nothing is searched, and while Tip-Adapter-F fine-tunes the keys
    init_beta: float = 1.0
    # cache keys: the mean of the passes' raw (unnormalised) image features, normalised (the published code);
    # false: the mean of the normalised features, normalised
    raw_keys: bool = False
    templates: list[str] = field(default_factory=list)  # zero-shot templates; empty: the run's (data.template(s))

    section = "tip_adapter"

    def problems(self) -> list[str]:
        found = []
        for name in ("alpha", "beta"):
            lo_hi = getattr(self, f"{name}_range")
            if not (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1]):
                found.append(f"{self.section}.{name}_range must be [low, high] with 0 <= low <= high, got {lo_hi}")
        if self.grid not in GRIDS:
            found.append(f"{self.section}.grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        return found  # templates: checked with every section's (config.template_problems)


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
    # epoch e trains on augmented pass P + e (P: the feature_passes that built the cache), crops never seen by
    # the cache and new every epoch, as the published loader draws them; false: cached pass e mod P
    fresh_crops: bool = False


def search_grid(low_high: list[float], steps: int, grid: str = "linspace") -> list[float]:
    """`steps` values over [low, high]: evenly spaced from low to high inclusive (linspace; just low for one
    step), or low + i (high - low) / steps for i < steps, the high end excluded (arange, the published form)."""
    low, high = low_high
    if grid == "arange":
        return [low + i * (high - low) / steps for i in range(steps)]
    return [float(v) for v in np.linspace(low, high, steps)]


class FreshCropPasses(TrainingFeatures):
    """Tip-Adapter-F's published training data: epoch e trains on augmented pass P + e, P being the passes its
    cache averages, so that no epoch sees the crops the cache was built from and every epoch has new ones. The
    pass depends on the epoch alone: a resumed run trains on the very crops an uninterrupted one would. Without
    augmentation every pass is the plain features."""

    def epoch(self, epoch: int) -> SplitFeatures:
        cache_passes = max(self.passes, 1)  # as cached_passes() builds the cache
        return self.bank.train_pass(cache_passes + epoch, self.augment, cached=self.passes > 0,
                                    crop_scale=self.crop_scale)


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
        """Validation-free (selection=none): alpha and beta stay at init_alpha and init_beta, nothing is searched."""
        return dataclasses.replace(cls.capabilities, uses_validation=cfg.selection != "none")

    def __init__(self, cfg, backbone, classnames):
        self.own = cfg.sections[self.section]  # before ZeroShot builds the classifier from templates()
        super().__init__(cfg, backbone, classnames)
        self.alpha, self.beta = self.own.init_alpha, self.own.init_beta
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
        keys = data.mean_over_passes(raw=self.own.raw_keys).to(self.device)
        labels = bank.train_pass(0, data.augment, crop_scale=data.crop_scale).labels
        self.keys = nn.Parameter(keys) if self.fine_tunes else keys
        self.values = F.one_hot(labels, len(self.classnames)).float().to(self.device)
        # Tip-Adapter-F's recipe at the initial alpha and beta: the trainer runs the section's training keys
        info = trainer.fit(self, data, checkpoint, resume) if self.fine_tunes else {}
        chosen = self.search(bank.val) if self.caps.uses_validation else {"alpha": self.alpha, "beta": self.beta}
        return {**info, **chosen, "cache_size": len(keys)}

    def training_features(self, bank) -> TrainingFeatures:
        train = self.train_config
        return TrainingFeatures(bank, train.feature_passes, train.augment, train.crop_scale)

    def templates(self) -> list[str]:
        """The section's templates (a recipe's yield to a given data.template(s)), else the run's."""
        return list(self.own.templates) or dataset_templates(self.cfg.data)

    def grids(self) -> tuple[list[float], list[float]]:
        """The alphas and the betas searched."""
        own = self.own
        return (search_grid(own.alpha_range, own.alpha_steps, own.grid),
                search_grid(own.beta_range, own.beta_steps, own.grid))

    @torch.no_grad()
    def search(self, val: SplitFeatures) -> dict:
        """The (alpha, beta) of the grid with the best validation accuracy; ties keep the smallest."""
        own = self.own
        alpha_grid, betas = self.grids()
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
                "searched_alpha": [*own.alpha_range, own.alpha_steps],
                "searched_beta": [*own.beta_range, own.beta_steps], "grid": own.grid}

    def checkpoint_meta(self) -> dict:
        # how the keys started changes what the fine-tune computes; None, not False, so that checkpoints
        # written before the key existed (keys from normalised features) agree
        return {**super().checkpoint_meta(), "cache_size": len(self.keys), "init_alpha": self.own.init_alpha,
                "init_beta": self.own.init_beta, "raw_keys": self.own.raw_keys or None}


@register_method("tip_adapter_f", config=TipAdapterFConfig)
class TipAdapterF(TipAdapter):
    capabilities = Capabilities(learns=True, trains=True, uses_validation=True)
    training_keys = frozenset(TRAINING_KEYS)
    fine_tunes = True

    def training_features(self, bank) -> TrainingFeatures:
        train = self.train_config
        passes = FreshCropPasses if self.own.fresh_crops else TrainingFeatures
        return passes(bank, train.feature_passes, train.augment, train.crop_scale)

    def checkpoint_meta(self) -> dict:
        # the crops it trains on; None, not False, as for raw_keys (checkpoints from before trained on pass e mod P)
        return {**super().checkpoint_meta(), "fresh_crops": self.own.fresh_crops or None}
