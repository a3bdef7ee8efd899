"""Tip-Adapter (training-free cache model) and Tip-Adapter-F (the cache keys fine-tuned).

keys = L2-normalised few-shot image features averaged over the augmented passes, values = one-hot
labels; logits = zero-shot logits + alpha * exp(-beta * (1 - f @ keys^T)) @ values. alpha and beta are
chosen on the few-shot validation set (the published code searched them on the test set).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from promptlearn.errors import DataError
from promptlearn.features import SplitFeatures, TrainingFeatures
from promptlearn.methods.base import Capabilities, register_method
from promptlearn.methods.zeroshot import ZeroShot


@dataclass
class TipAdapterConfig:
    alpha_range: list[float] = field(default_factory=lambda: [0.1, 10.0])  # searched on the validation set
    alpha_steps: int = 20
    beta_range: list[float] = field(default_factory=lambda: [0.1, 12.0])
    beta_steps: int = 200
    init_alpha: float = 1.0  # alpha and beta while Tip-Adapter-F fine-tunes the keys
    init_beta: float = 1.0
    epochs: int = 20  # Tip-Adapter-F's recipe: AdamW, cosine, batch 256
    lr: float = 0.001
    batch_size: int = 256
    eps: float = 1e-4
    weight_decay: float = 0.01

    def problems(self) -> list[str]:
        found = []
        for name in ("alpha", "beta"):
            lo_hi, steps = getattr(self, f"{name}_range"), getattr(self, f"{name}_steps")
            if not (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1]):
                found.append(f"tip_adapter.{name}_range must be [low, high] with 0 <= low <= high, got {lo_hi}")
            if steps < 1:
                found.append(f"tip_adapter.{name}_steps must be at least 1, got {steps}")
        if not (self.epochs >= 0 and self.batch_size >= 1 and self.lr > 0):
            found.append("tip_adapter.epochs must be 0 or more, tip_adapter.batch_size at least 1 and "
                         "tip_adapter.lr positive")
        if self.eps <= 0:
            found.append(f"tip_adapter.eps must be positive, got {self.eps}")
        return found


def search_grid(low_high: list[float], steps: int) -> list[float]:
    """`steps` evenly spaced values from low to high inclusive (just low for one step)."""
    return [float(v) for v in np.linspace(low_high[0], low_high[1], steps)]


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class sums of exp(-beta * (1 - cosine)) over the cached shots."""
    return torch.exp(-beta * (1 - affinity)) @ values


@register_method("tip_adapter", config=TipAdapterConfig)
class TipAdapter(ZeroShot):
    capabilities = Capabilities(learns=True, uses_validation=True)
    fine_tunes = False  # Tip-Adapter-F learns the keys

    @classmethod
    def capabilities_for(cls, cfg) -> Capabilities:
        """Validation-free (selection=none): alpha and beta stay at init_alpha and init_beta, nothing is searched."""
        return dataclasses.replace(cls.capabilities, uses_validation=cfg.selection != "none")

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        tip = cfg.tip_adapter
        self.alpha, self.beta = tip.init_alpha, tip.init_beta
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
        keys = data.mean_over_passes().to(self.device)
        labels = bank.train_pass(0, self.cfg.train.augment).labels
        self.keys = nn.Parameter(keys) if self.fine_tunes else keys
        self.values = F.one_hot(labels, len(self.classnames)).float().to(self.device)
        info = self.fine_tune(data, trainer, checkpoint, resume) if self.fine_tunes else {}
        chosen = self.search(bank.val) if self.caps.uses_validation else {"alpha": self.alpha, "beta": self.beta}
        return {**info, **chosen, "cache_size": len(keys)}

    def fine_tune(self, data: TrainingFeatures, trainer, checkpoint, resume) -> dict:
        """Tip-Adapter-F's recipe: AdamW with a cosine schedule and no warm-up, at the initial alpha and beta."""
        tip = self.cfg.tip_adapter
        recipe = dataclasses.replace(self.cfg.train, optimizer="adamw", lr=tip.lr, eps=tip.eps,
                                     weight_decay=tip.weight_decay, batch_size=tip.batch_size, warmup_epochs=0)
        return trainer.with_recipe(recipe, tip.epochs).fit(self, data, checkpoint, resume)

    @torch.no_grad()
    def search(self, val: SplitFeatures) -> dict:
        """The (alpha, beta) of the grid with the best validation accuracy; ties keep the smallest."""
        tip = self.cfg.tip_adapter
        alpha_grid = search_grid(tip.alpha_range, tip.alpha_steps)
        alphas = torch.tensor(alpha_grid, device=self.device)
        betas = search_grid(tip.beta_range, tip.beta_steps)
        self.eval()
        x, y = val.features.to(self.device), val.labels.to(self.device)
        zero_shot, affinity = super().forward(x), x @ self.keys.t()
        best_correct, best_alpha, best_beta = -1, 0.0, 0.0
        for beta in tqdm(betas, desc=f"{self.name} alpha/beta search", leave=False, dynamic_ncols=True):
            logits = zero_shot + alphas[:, None, None] * cache_logits(affinity, self.values, beta)
            correct = (logits.argmax(-1) == y).sum(-1)  # per alpha
            i = int(correct.argmax())
            if int(correct[i]) > best_correct:
                best_correct, best_alpha, best_beta = int(correct[i]), alpha_grid[i], beta
        self.alpha, self.beta = best_alpha, best_beta
        return {"alpha": best_alpha, "beta": best_beta, "val_accuracy": 100.0 * best_correct / len(y),
                "searched_alpha": [*tip.alpha_range, tip.alpha_steps],
                "searched_beta": [*tip.beta_range, tip.beta_steps]}

    def checkpoint_meta(self) -> dict:
        tip = self.cfg.tip_adapter
        return {**super().checkpoint_meta(), "cache_size": len(self.keys),
                "init_alpha": tip.init_alpha, "init_beta": tip.init_beta}


@register_method("tip_adapter_f", section="tip_adapter")
class TipAdapterF(TipAdapter):
    capabilities = Capabilities(learns=True, trains=True, uses_validation=True)
    fine_tunes = True
