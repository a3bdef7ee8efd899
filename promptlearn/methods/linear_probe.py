"""Linear probe (CLIP paper, CoOp's baseline): logistic regression on frozen features, with the inverse
regularisation C chosen on the few-shot validation set only.

The fit is the same on any CPU, BLAS build and thread count: float64 features, Newton-CG run to a gradient
of 1e-10 (the unique optimum, not wherever L-BFGS stopped: float32 L-BFGS chose a different C under another
BLAS kernel), validation hits compared as counts, ties to the smaller C, and a grid of decimal values."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from promptlearn.errors import DataError
from promptlearn.methods.base import Capabilities, Method, register_method

COARSE_C = [float(f"1e{k}") for k in range(-6, 7)]  # 1e-6 .. 1e6, parsed: the same bits on every machine


def refine_grid(best: float, steps: int = 4) -> list[float]:
    """Log-spaced values between the neighbours of the best coarse value (a decade each side), rounded to six
    significant digits so that no machine's pow() changes a C by one unit in the last place."""
    return [float(f"{c:.6g}") for c in np.logspace(np.log10(best) - 1, np.log10(best) + 1, 2 * steps + 1)]


SOLVERS = {"newton-cg": 1e-10, "lbfgs": 1e-4}  # solver: its stopping tolerance (largest gradient entry)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, solver: str = "newton-cg", start=None):
    """Logistic regression at inverse regularisation c, in float64; `start`: a fit at a nearby C to start from
    (the optimum is unique, so only the time changes)."""
    from sklearn.exceptions import ConvergenceWarning  # scikit-learn loads only when a probe is fitted
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=1000, tol=SOLVERS[solver], solver=solver, warm_start=start is not None)
    if start is not None:
        model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.asarray(x, dtype=np.float64), y)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif solver == "newton-cg":
            warnings.warn(f"the linear probe's fit at C={c:g} stopped before its optimum (1000 Newton steps); its "
                          "result may differ in the last digits between machines", RuntimeWarning, stacklevel=2)
    return model


def hits(model, x: np.ndarray, y: np.ndarray) -> int:
    """Correct predictions as a count: exact, where a mean of floats could tie differently."""
    return int((model.predict(np.asarray(x, dtype=np.float64)) == y).sum())


def search_c(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray,
             solver: str = "newton-cg") -> tuple[float, dict[float, int], object]:
    """The C with the most validation hits over the decades, then over a finer grid around the best; ties go
    to the first in ascending C (stronger regularisation). Each fit starts from the fit at the nearest C tried.
    Returns that C, the hits of every C tried, and the fit at that C."""
    fits: dict[float, object] = {}
    scores: dict[float, int] = {}

    def score(c: float) -> int:
        if c not in scores:
            nearest = min(fits, key=lambda tried: abs(np.log(tried / c)), default=None)
            fits[c] = fit_logistic(x, y, c, solver, fits.get(nearest))
            scores[c] = hits(fits[c], xv, yv)
        return scores[c]

    best = max(refine_grid(max(COARSE_C, key=score)), key=score)
    return best, scores, fits[best]


@dataclass
class LinearProbeConfig:
    c: Optional[float] = None  # a fixed inverse regularisation (no search, no validation split); None: searched
    # newton-cg: fitted to its optimum, the same on every machine; lbfgs: L-BFGS stopped at scikit-learn's default
    # tolerance, many times faster on thousands of classes, its last digits (and so a C) depending on the BLAS
    solver: str = "newton-cg"

    def problems(self) -> list[str]:
        found = [] if self.c is None or self.c > 0 else [f"linear_probe.c must be positive (or unset), got {self.c}"]
        if self.solver not in SOLVERS:
            found.append(f"linear_probe.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        return found


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
        own = self.cfg.linear_probe
        if own.c is not None:
            self.set_classifier(fit_logistic(bank.train.features.numpy(), bank.train.labels.numpy(), own.c,
                                             own.solver), bank.train.features.shape[1])
            return {"C": own.c}
        train, val = bank.train, bank.val
        if len(val) == 0:
            raise DataError("the linear probe needs a few-shot validation set to choose C, but the draw has "
                            "none; the dataset has no val split and no training images left over")
        x, y = train.features.numpy(), train.labels.numpy()
        best, scores, model = search_c(x, y, val.features.numpy(), val.labels.numpy(), own.solver)
        self.set_classifier(model, x.shape[1])
        return {"C": best, "searched_C": sorted(scores), "val_accuracy": 100.0 * scores[best] / len(val)}

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
