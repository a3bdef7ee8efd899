"""Linear probe (CLIP paper, CoOp's baseline): L-BFGS logistic regression on frozen features,
with the inverse regularisation C chosen on the few-shot validation set only."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from promptlearn.errors import DataError
from promptlearn.methods.base import Capabilities, Method, register_method

COARSE_C = [10.0 ** k for k in range(-6, 7)]  # 1e-6 .. 1e6


def refine_grid(best: float, steps: int = 4) -> list[float]:
    """Log-spaced values between the neighbours of the best coarse value (a decade each side)."""
    return [float(c) for c in np.logspace(np.log10(best) - 1, np.log10(best) + 1, 2 * steps + 1)]


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.exceptions import ConvergenceWarning  # scikit-learn loads only when a probe is fitted
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=1000, solver="lbfgs").fit(x, y)


@dataclass
class LinearProbeConfig:
    c: Optional[float] = None  # a fixed inverse regularisation (no search, no validation split); None: searched

    def problems(self) -> list[str]:
        return [] if self.c is None or self.c > 0 else [f"linear_probe.c must be positive (or unset), got {self.c}"]


@register_method("linear_probe", config=LinearProbeConfig)
class LinearProbe(Method):
    capabilities = Capabilities(learns=True, uses_validation=True)

    @classmethod
    def capabilities_for(cls, cfg) -> Capabilities:
        """A fixed C needs no validation split (selection=none)."""
        return dataclasses.replace(cls.capabilities, uses_validation=cfg.linear_probe.c is None)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.register_buffer("weight", torch.zeros(len(classnames), backbone.embed_dim))
        self.register_buffer("bias", torch.zeros(len(classnames)))

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        if self.cfg.linear_probe.c is not None:
            self.set_classifier(fit_logistic(bank.train.features.numpy(), bank.train.labels.numpy(),
                                             self.cfg.linear_probe.c), bank.train.features.shape[1])
            return {"C": self.cfg.linear_probe.c}
        train, val = bank.train, bank.val
        if len(val) == 0:
            raise DataError("the linear probe needs a few-shot validation set to choose C, but the draw has "
                            "none; the dataset has no val split and no training images left over")
        x, y = train.features.numpy(), train.labels.numpy()
        xv, yv = val.features.numpy(), val.labels.numpy()
        scores: dict[float, float] = {}

        def score(c: float) -> float:
            if c not in scores:
                scores[c] = float((fit_logistic(x, y, c).predict(xv) == yv).mean())
            return scores[c]

        best = max(COARSE_C, key=score)  # first of the best, so ties favour stronger regularisation
        best = max(refine_grid(best), key=score)
        self.set_classifier(fit_logistic(x, y, best), x.shape[1])
        return {"C": best, "searched_C": sorted(scores), "val_accuracy": 100.0 * scores[best]}

    def set_classifier(self, model, dim: int) -> None:
        """The fitted logistic regression as weight and bias rows of every class."""
        full_w = np.zeros((len(self.classnames), dim), dtype=np.float32)
        full_b = np.full(len(self.classnames), -1e4, dtype=np.float32)  # classes absent from training
        classes = model.classes_
        if len(classes) == 2:  # sklearn keeps one row for two classes: logits (0, w.x + b)
            full_w[classes[1]], full_b[classes[1]] = model.coef_[0], model.intercept_[0]
            full_b[classes[0]] = 0.0
        else:
            full_w[classes], full_b[classes] = model.coef_, model.intercept_
        self.weight.copy_(torch.from_numpy(full_w))
        self.bias.copy_(torch.from_numpy(full_b))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features @ self.weight.t() + self.bias
