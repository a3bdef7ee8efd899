"""LP++ (Huang et al., CVPR 2024): a linear probe whose class scores blend visual prototypes and the
zero-shot text embeddings with a learned class-wise weight:
    logits(f) = f W^T + b + alpha_c * (f . t_c),
trained full batch on one augmented pass of the few-shot features with the authors' data-driven step sizes and start:
    W starts at the per-class *sums* of the training features, b at nn.Linear's default,
    lr_W = 4 N / lambda_max(F^T F) (SGD, momentum 0.9),
    alpha_c starts at 250 * mean over classes c of the class-c mean of f . t_c (each class against its own text),
    lr_alpha = N / (4 max_k sum_i (f_i . t_k)^2), alpha updated every 10 epochs by plain gradient
    descent on its gradient accumulated since the start (the authors' code never clears it).
The state of the last epoch with the best few-shot validation accuracy is kept (300 epochs). The authors
validate on K images per class (`data.val_shots=shots`), not the protocol's min(K, 4).

The training pass is cropped to `lp_pp.crop_scale` (the published recipe: area (0.5, 1)); the text embeddings
average `lp_pp.templates` (empty: the run's data.template(s), else the dataset's own; the published recipe gives
ImageNet the authors' 7 templates).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.errors import DataError
from promptlearn.methods.base import Capabilities, Method, register_method
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.progress import progress
from promptlearn.settings import run_epochs


@dataclass
class LpPlusPlusConfig(TrainingKeys):
    templates: list[str] = field(default_factory=list)  # the text embeddings'; empty: the run's, else the dataset's
    epochs: Optional[int] = 300
    alpha_every: int = 10  # epochs between updates of the blending weights
    alpha_init_scale: float = 250.0

    def problems(self) -> list[str]:
        if self.alpha_init_scale < 0:
            return [f"lp_pp.alpha_init_scale must be 0 or more, got {self.alpha_init_scale}"]
        return []


def class_sums(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(labels, n_classes).to(features.dtype).t() @ features


def visual_step_size(features: torch.Tensor) -> float:
    """4 N / the largest eigenvalue of F^T F."""
    gram = (features.t() @ features).double()
    return 4 * len(features) / float(torch.linalg.eigvalsh(gram).max())


def blend_step_size(features: torch.Tensor, text: torch.Tensor) -> float:
    """N / (4 max_k sum_i (f_i . t_k)^2)."""
    return len(features) / (4 * float((features @ text.t()).pow(2).sum(0).max()))


def initial_blend(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """scale * the mean over classes c (those present) of the class-c mean of f . t_c: each class's images
    against their own class's text only, as the authors' compute_centroids_alpha + calculate_init_alpha."""
    own = (features * text[labels]).sum(-1)  # f_i . t_{y_i}
    present, index = labels.unique(return_inverse=True)
    sums = torch.zeros(len(present), dtype=own.dtype, device=own.device).index_add_(0, index, own)
    means = sums / torch.bincount(index)
    return scale * float(means.mean())


@register_method("lp_pp", config=LpPlusPlusConfig)
class LinearProbePlusPlus(Method):
    capabilities = Capabilities(learns=True, uses_validation=True)
    training_keys = frozenset({"epochs", "augment", "crop_scale"})
    unread_training = ("it takes full-batch SGD steps (momentum 0.9, no schedule, no weight decay) whose sizes it "
                       "computes from the features, on one augmented pass, keeping the epoch of best validation "
                       "accuracy")

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        templates = list(cfg.lp_pp.templates) or dataset_templates(cfg.data)
        self.register_buffer("text", text_classifier(backbone, classnames, templates))
        self.visual = nn.Linear(backbone.embed_dim, len(classnames)).to(self.text.device)
        self.alpha = nn.Parameter(torch.zeros(len(classnames), device=self.text.device))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.visual(image_features) + self.alpha * (image_features @ self.text.t())

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        # one augmented pass of the training images, as the authors' loader gives
        settings = self.train_config
        own, train, val = self.cfg.lp_pp, bank.train_pass(0, settings.augment, crop_scale=settings.crop_scale), bank.val
        if len(val) == 0:
            raise DataError("lp_pp needs a few-shot validation set to choose its epoch, but the draw has none; "
                            "the dataset has no val split and no training images left over")
        x, y = train.features.to(self.device), train.labels.to(self.device)
        xv, yv = val.features.to(self.device), val.labels.to(self.device)
        lr_visual, lr_alpha = visual_step_size(x), blend_step_size(x, self.text)
        with torch.no_grad():
            self.visual.weight.copy_(class_sums(x, y, len(self.classnames)))
            self.alpha.fill_(initial_blend(x, y, self.text, own.alpha_init_scale))
        optimizer = torch.optim.SGD(self.visual.parameters(), lr=lr_visual, momentum=0.9)
        best, best_epoch, best_state = -1.0, 0, copy.deepcopy(self.state_dict())
        history = []
        for epoch in progress(range(run_epochs(self.cfg, settings)), desc="lp_pp", leave=False):
            self.train()
            loss = F.cross_entropy(self(x), y)
            optimizer.zero_grad()
            loss.backward()  # alpha's gradient accumulates: it is never cleared, as in the authors' code
            optimizer.step()
            if (epoch + 1) % own.alpha_every == 0:
                with torch.no_grad():
                    self.alpha -= lr_alpha * self.alpha.grad
            self.eval()
            with torch.no_grad():
                accuracy = 100.0 * float((self(xv).argmax(-1) == yv).float().mean())
            history.append({"epoch": epoch + 1, "loss": loss.item(), "val_accuracy": accuracy})
            if accuracy >= best:  # the last of the best, as the authors keep it
                best, best_epoch, best_state = accuracy, epoch + 1, copy.deepcopy(self.state_dict())
        self.load_state_dict(best_state)
        self.alpha.grad = None
        return {"epoch": best_epoch, "val_accuracy": best, "lr_visual": lr_visual, "lr_alpha": lr_alpha,
                "history": history}
