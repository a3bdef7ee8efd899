"""Linear probe (CLIP paper, CoOp's baseline): logistic regression on frozen features, with the inverse
regularisation C chosen on the few-shot validation set only.

The search (validation hits compared as counts) takes the best of `linear_probe.c_grid` (ties: the first in the
grid's order), then either refines it (`search=refine`, promptlearn's: the best of 9 log-spaced values from a
decade below to a decade above, ties to the smaller C) or bisects around it (`search=bisection`, CoOp's lpclip:
`bisection_steps` steps in log10 space from [C/10, 10 C], see `bisected`).

promptlearn's recipe is the same on any CPU, BLAS build and thread count: L2-normalised float64 features,
Newton-CG run to a gradient of 1e-10 (the unique optimum, not wherever L-BFGS stopped: float32 L-BFGS chose a
different C under another BLAS kernel), the 13 decades 1e-6..1e6 ascending (ties to the smaller C). The published
recipe (lpclip) fits the raw image features with L-BFGS at scikit-learn's tolerance: its last digits, and so a C,
may depend on the machine."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from promptlearn.errors import DataError
from promptlearn.features import SplitFeatures
from promptlearn.methods.base import Capabilities, Method, register_method

COARSE_C = [float(f"1e{k}") for k in range(-6, 7)]  # 1e-6 .. 1e6, parsed: the same bits on every machine
SEARCHES = ("refine", "bisection")
FEATURES = ("normalised", "raw")


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


class Scores:
    """Validation hits of the fit at each C tried, each C fitted once. Newton-CG fits start from the fit at the
    nearest C tried (it runs to the unique optimum: only the time changes); L-BFGS, stopped at a tolerance, starts
    from zero every time, as scikit-learn does, so that the order of the search cannot change a fit."""

    def __init__(self, x, y, xv, yv, solver: str):
        self.x, self.y, self.xv, self.yv, self.solver = x, y, xv, yv, solver
        self.fits: dict[float, object] = {}
        self.hits: dict[float, int] = {}

    def __call__(self, c: float) -> int:
        if c not in self.hits:
            nearest = min(self.fits, key=lambda tried: abs(np.log(tried / c)), default=None)
            start = self.fits.get(nearest) if self.solver == "newton-cg" else None
            self.fits[c] = fit_logistic(self.x, self.y, c, self.solver, start)
            self.hits[c] = hits(self.fits[c], self.xv, self.yv)
        return self.hits[c]

    def best(self, values: list[float]) -> float:
        """The value with the most hits; ties: the first in `values`' order."""
        return max(values, key=self)


def bisected(score: Scores, best: float, steps: int) -> float:
    """CoOp's lpclip search around the grid's best C: the interval starts at [C / 10, 10 C]; each step fits both
    ends, chooses the end with more hits (ties: the left, smaller C) and moves the other end to the midpoint of
    the two in log10 space. The C chosen at the last step (with no steps: `best`)."""
    left, right, chosen = best / 10, best * 10, best
    for _ in range(steps):
        low, high = np.log10(left), np.log10(right)
        middle = 0.5 * (high + low)
        if score(left) < score(right):
            chosen, left, right = right, float(np.power(10, middle)), float(np.power(10, high))
        else:
            chosen, left, right = left, float(np.power(10, low)), float(np.power(10, middle))
    return chosen


def search_c(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, solver: str = "newton-cg",
             grid: list[float] = COARSE_C, search: str = "refine",
             steps: int = 8) -> tuple[float, dict[float, int], object]:
    """The C with the most validation hits over `grid` (ties: the first), then refined or bisected (`search`,
    `steps` bisection steps) around it. Returns that C, the hits of every C tried, and the fit at that C."""
    score = Scores(x, y, xv, yv, solver)
    best = score.best(grid)
    best = score.best(refine_grid(best)) if search == "refine" else bisected(score, best, steps)
    return best, score.hits, score.fits[best]


def raw_features(split: SplitFeatures) -> SplitFeatures:
    """The split's features before their L2 normalisation: the image encoder's output (to float32 rounding)."""
    return dataclasses.replace(split, features=split.features * split.norms[:, None])


@dataclass
class LinearProbeConfig:
    c: Optional[float] = None  # a fixed inverse regularisation (no search, no validation split); None: searched
    # newton-cg: fitted to its optimum, the same on every machine; lbfgs: L-BFGS stopped at scikit-learn's default
    # tolerance, many times faster on thousands of classes, its last digits (and so a C) depending on the BLAS
    solver: str = "newton-cg"
    features: str = "normalised"  # normalised: the L2-normalised image features | raw: the image encoder's output
    c_grid: list[float] = field(default_factory=lambda: list(COARSE_C))  # the search's first values, in tie order
    search: str = "refine"  # around the grid's best: refine (9 values over two decades) | bisection (lpclip's)
    bisection_steps: int = 8  # steps of search=bisection

    def problems(self) -> list[str]:
        found = [] if self.c is None or self.c > 0 else [f"linear_probe.c must be positive (or unset), got {self.c}"]
        for key, value, known in (("solver", self.solver, SOLVERS), ("features", self.features, FEATURES),
                                  ("search", self.search, SEARCHES)):
            if value not in known:
                found.append(f"linear_probe.{key} must be one of {', '.join(known)}, got {value!r}")
        if not self.c_grid or min(self.c_grid) <= 0:
            found.append(f"linear_probe.c_grid must hold at least one value, every one positive, got {self.c_grid}")
        if self.bisection_steps < 0:
            found.append(f"linear_probe.bisection_steps must be 0 or more, got {self.bisection_steps}")
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

    def features_of(self, split: SplitFeatures) -> SplitFeatures:
        """The features the probe fits and scores (linear_probe.features)."""
        return raw_features(split) if self.cfg.linear_probe.features == "raw" else split

    def test_features(self, bank, dataset=None) -> SplitFeatures:
        return self.features_of(bank.test_of(dataset))

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        own, train = self.cfg.linear_probe, self.features_of(bank.train)
        x, y = train.features.numpy(), train.labels.numpy()
        if own.c is not None:
            self.set_classifier(fit_logistic(x, y, own.c, own.solver), x.shape[1])
            return {"C": own.c}
        if len(bank.val) == 0:
            raise DataError("the linear probe needs a few-shot validation set to choose C, but the draw has "
                            "none; the dataset has no val split and no training images left over")
        val = self.features_of(bank.val)
        best, scores, model = search_c(x, y, val.features.numpy(), val.labels.numpy(), own.solver, own.c_grid,
                                       own.search, own.bisection_steps)
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
