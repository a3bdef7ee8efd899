"""The baselines beside CoOp on the embedded sample and the tiny backbones: CLIP-Adapter, Tip-Adapter,
Tip-Adapter-F and the linear probe learn, choose their hyperparameters on the validation split only,
and Tip-Adapter with alpha 0 is zero-shot CLIP exactly."""
import json

import numpy as np
import pytest
import torch
from helpers import FAMILIES, quick_config, sample_bank

from promptlearn.config import TrainConfig, load_config
from promptlearn.data import build_dataset
from promptlearn.errors import ConfigError, DataError
from promptlearn.features import SplitFeatures, TrainingFeatures
from promptlearn.methods import build_method
from promptlearn.methods.linear_probe import COARSE_C, bisected, search_c
from promptlearn.methods.tip_adapter import search_grid
from promptlearn.runner import run_experiment
from promptlearn.settings import run_epochs
from promptlearn.trainer import Trainer, build_optimizer


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One feature cache for the module: its keys tell every backbone, split and pass apart."""
    return tmp_path_factory.mktemp("feature-cache")


def setup(tmp_path, shared_cache, *overrides, model="tiny-clip"):
    """(cfg, backbone, bank, trainer) for a few-shot draw of the sample."""
    cfg = quick_config(tmp_path, "data.shots=4", "train.feature_passes=2", "train.augment=true",
                       f"backbone.model={model}", f"cache_dir={shared_cache}", *overrides)
    dataset, backbone, bank = sample_bank(cfg, tmp_path, model)
    return cfg, backbone, bank, Trainer(cfg.train, cfg.train.epochs, cfg.data.seed, backbone.precision)


class NoTestBank:
    """A feature bank whose test split cannot be read: selection must happen on train and val."""

    def __init__(self, bank, val: SplitFeatures | None = None):
        self.bank, self._val = bank, val

    @property
    def test(self):
        raise AssertionError("a method read the test split while fitting")

    @property
    def val(self):
        return self.bank.val if self._val is None else self._val

    def __getattr__(self, name):
        return getattr(self.bank, name)


def fitted(name, cfg, backbone, bank, trainer, tmp_path):
    """The method fitted as the runner fits it: `trainer` under the method's own training settings and epochs."""
    torch.manual_seed(cfg.data.seed)
    method = build_method(name, cfg, backbone, build_dataset(cfg.data).classnames)
    own = trainer.with_recipe(method.train_config, run_epochs(cfg, method.train_config))
    info = method.fit(NoTestBank(bank), own, tmp_path / name / "checkpoint.pt", resume=False)
    return method, info


def accuracy(method, split: SplitFeatures) -> float:
    return 100.0 * int((method.predict(split.features).argmax(-1) == split.labels).sum()) / len(split)


def test_tip_adapter_with_alpha_zero_is_zero_shot_exactly(tmp_path, shared_cache):
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "tip_adapter.alpha_range=[0, 0]",
                                         "tip_adapter.alpha_steps=1")
    tip, info = fitted("tip_adapter", cfg, backbone, bank, trainer, tmp_path)
    assert info["alpha"] == 0.0 and len(tip.keys) == len(bank.train) > 0
    zero_shot = build_method("zeroshot", cfg, backbone, tip.classnames)
    assert torch.equal(tip.predict(bank.test.features), zero_shot.predict(bank.test.features))


def test_tip_adapter_cache_and_search_on_validation(tmp_path, shared_cache):
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "tip_adapter.beta_steps=30")
    tip, info = fitted("tip_adapter", cfg, backbone, bank, trainer, tmp_path)
    expected_keys = TrainingFeatures(bank, 2, True).mean_over_passes()
    assert torch.allclose(tip.keys, expected_keys) and torch.allclose(tip.keys.norm(dim=-1), torch.ones(len(tip.keys)))
    assert torch.equal(tip.values.argmax(-1), bank.train.labels) and torch.all(tip.values.sum(-1) == 1)
    assert info["alpha"] in search_grid(cfg.tip_adapter.alpha_range, cfg.tip_adapter.alpha_steps)
    assert info["beta"] in search_grid(cfg.tip_adapter.beta_range, 30)
    assert info["val_accuracy"] == pytest.approx(accuracy(tip, bank.val))
    # no grid point does better on the validation set than the chosen one
    for alpha in (0.1, 5.0, 10.0):
        tip.alpha = alpha
        assert accuracy(tip, bank.val) <= info["val_accuracy"]


def test_tip_adapter_f_fine_tuning_raises_training_accuracy(tmp_path, shared_cache):
    # alpha and beta held at 1 so that only the fine-tuned keys differ from the training-free cache
    fixed = [f"{section}.{key}" for section in ("tip_adapter", "tip_adapter_f")
             for key in ("alpha_range=[1, 1]", "alpha_steps=1", "beta_range=[1, 1]", "beta_steps=1")]
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "data.shots=16", "train.augment=false",
                                         "tip_adapter_f.lr=0.01", "tip_adapter_f.epochs=20", *fixed)
    tip, _ = fitted("tip_adapter", cfg, backbone, bank, trainer, tmp_path)
    tip_f, info = fitted("tip_adapter_f", cfg, backbone, bank, trainer, tmp_path)
    history = info["history"]
    assert len(history) == 20 and history[-1]["loss"] < history[0]["loss"]
    assert tip_f.keys.requires_grad and not torch.allclose(tip_f.keys, tip.keys)
    assert accuracy(tip_f, bank.train) > accuracy(tip, bank.train) + 15


def test_clip_adapter_learning_raises_training_accuracy(tmp_path, shared_cache):
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "data.shots=16", "train.augment=false",
                                         "train.epochs=30", "clip_adapter.lr=0.1", "clip_adapter.alpha=0.6")
    torch.manual_seed(cfg.data.seed)
    untrained = build_method("clip_adapter", cfg, backbone, build_dataset(cfg.data).classnames)
    adapter, info = fitted("clip_adapter", cfg, backbone, bank, trainer, tmp_path)
    assert len(info["history"]) == 30
    assert accuracy(adapter, bank.train) > accuracy(untrained, bank.train) + 10
    first, second = adapter.adapter[0], adapter.adapter[2]
    assert first.bias is None and second.bias is None
    assert (first.in_features, first.out_features, second.out_features) == (32, 8, 32)


def test_linear_probe_chooses_a_searched_c(tmp_path, shared_cache):
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "recipe=promptlearn")
    _, info = fitted("linear_probe", cfg, backbone, bank, trainer, tmp_path)
    assert info["C"] in info["searched_C"] and set(COARSE_C) <= set(info["searched_C"])


LPCLIP_GRID = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]


def test_the_published_linear_probe_is_lpclips_search_on_raw_features(tmp_path, shared_cache):
    """CoOp's lpclip: the encoder's raw (unnormalised) features, L-BFGS, the 7-value grid, 8 bisection steps; the
    test images are scored on their raw features too."""
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "recipe=published")
    own = cfg.linear_probe
    assert (own.features, own.solver, own.c_grid, own.search, own.bisection_steps) == (
        "raw", "lbfgs", LPCLIP_GRID, "bisection", 8)
    probe, info = fitted("linear_probe", cfg, backbone, bank, trainer, tmp_path)

    def raw(split):
        return (split.features * split.norms[:, None]).numpy()

    best, hits, model = search_c(raw(bank.train), bank.train.labels.numpy(), raw(bank.val), bank.val.labels.numpy(),
                                 "lbfgs", LPCLIP_GRID, "bisection", 8)
    assert info["C"] == best and info["searched_C"] == sorted(hits) and set(LPCLIP_GRID) <= set(hits)
    test = probe.test_features(bank)
    assert np.array_equal(test.features.numpy(), raw(bank.test))
    assert probe.predict(test.features).argmax(-1).tolist() == model.predict(raw(bank.test).astype(np.float64)).tolist()


def probe_inputs(tmp_path, shared_cache) -> tuple[np.ndarray, ...]:
    """The quickstart's probe inputs (16 shots, no crops): train and validation features and labels."""
    _, _, bank, _ = setup(tmp_path, shared_cache, "data.shots=16", "train.augment=false")
    return bank.train.features.numpy(), bank.train.labels.numpy(), bank.val.features.numpy(), bank.val.labels.numpy()


def probe_result(x, y, xv, yv) -> tuple:
    """What the probe decides and predicts: the chosen C, the validation hits of every C tried, and the
    predicted class of every train and validation image."""
    best, hits, model = search_c(x, y, xv, yv)
    return best, hits, model.predict(np.concatenate([x, xv]).astype(np.float64)).tolist()


def test_the_linear_probe_is_the_same_under_one_and_two_blas_threads(tmp_path, shared_cache):
    from threadpoolctl import threadpool_limits

    inputs = probe_inputs(tmp_path, shared_cache)
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            results.append(probe_result(*inputs))
    assert results[0] == results[1]


def test_the_linear_probe_is_the_same_when_features_move_in_the_last_bit(tmp_path, shared_cache):
    """Another CPU's kernels give features that differ in the last bit; the probe must not notice. (Its float32
    L-BFGS fit did: the hits at C = 1e5 and 1e6 changed on these very features, and another BLAS kernel changed
    the chosen C, so the README's quickstart table held on one kind of machine only.)"""
    x, y, xv, yv = probe_inputs(tmp_path, shared_cache)
    rng = np.random.default_rng(0)

    def nudged(a: np.ndarray) -> np.ndarray:
        return np.where(rng.random(a.shape) < 0.5, np.nextafter(a, np.float32(np.inf)), a)

    assert probe_result(x, y, xv, yv) == probe_result(nudged(x), y, nudged(xv), yv)


def test_the_linear_probe_breaks_ties_towards_stronger_regularisation():
    """Validation hits are counts; among equal counts the smallest C wins, at both stages of the search."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    y = np.array([0, 1, 0, 1])
    best, hits, _ = search_c(x, y, x, y)
    assert set(hits.values()) == {4} and best == min(hits)
    # lpclip: ties go to the first of its grid, 1e6 (the larger C); each bisection step's tie to its left end, whose
    # end never moves: after 8 steps from [1e5, 1e7], 1e5
    best, hits, _ = search_c(x, y, x, y, "lbfgs", LPCLIP_GRID, "bisection", 8)
    assert set(hits.values()) == {4} and best == 1e5 and 1e7 in hits
    assert search_c(x, y, x, y, "lbfgs", LPCLIP_GRID, "bisection", 0)[0] == 1e6  # no steps: the grid's best


class LogHits:
    """Validation hits as a function of C: highest at log10 C = 0.3, falling 1000 per decade; records each C asked."""

    def __init__(self):
        self.asked: list[float] = []

    def __call__(self, c: float) -> float:
        self.asked.append(c)
        return -1000 * abs(np.log10(c) - 0.3)


def test_lpclip_bisection_keeps_the_better_end_and_moves_the_other_to_the_log_midpoint():
    """From the grid's best C = 1, the interval starts at [0.1, 10]; each step scores both ends, chooses the better
    (ties: the left) and moves the other end to the midpoint in log10. With hits peaking at log10 C = 0.3 the 8
    steps score, in log10 C: [-1, 1] (right better), [0, 1] (left), [0, 0.5] (right), [0.25, 0.5] (left),
    [0.25, 0.375] (left), [0.25, 0.3125] (right), [0.28125, 0.3125] (right), [0.296875, 0.3125] (left): the last
    step's choice, 10^0.296875, is the C."""
    score = LogHits()
    chosen = bisected(score, 1.0, 8)
    assert len(score.asked) == 16 and np.log10(score.asked).tolist() == pytest.approx(
        [-1, 1, 0, 1, 0, 0.5, 0.25, 0.5, 0.25, 0.375, 0.25, 0.3125, 0.28125, 0.3125, 0.296875, 0.3125])
    assert np.log10(chosen) == pytest.approx(0.296875)
    flat = bisected(lambda c: 7, 1.0, 8)  # every end ties: the left end, 0.1, is chosen at every step
    assert flat == pytest.approx(0.1)


def test_methods_need_a_validation_set(tmp_path, shared_cache):
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache)
    empty = SplitFeatures(torch.zeros(0, backbone.embed_dim), torch.zeros(0, dtype=torch.long), [])
    for name in ("tip_adapter", "tip_adapter_f", "linear_probe"):
        method = build_method(name, cfg, backbone, build_dataset(cfg.data).classnames)
        with pytest.raises(DataError, match="validation set"):
            method.fit(NoTestBank(bank, val=empty), trainer, tmp_path / "x.pt", resume=False)


@pytest.mark.parametrize("model", FAMILIES)
def test_every_baseline_fits_on_every_tiny_backbone(tmp_path, shared_cache, model):
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "data.shots=2", "train.epochs=2",
                                         "tip_adapter_f.epochs=2", "tip_adapter.beta_steps=5",
                                         "tip_adapter_f.beta_steps=5", model=model)
    for name in ("clip_adapter", "tip_adapter", "tip_adapter_f"):
        method, info = fitted(name, cfg, backbone, bank, trainer, tmp_path)
        logits = method.predict(bank.test.features)
        assert logits.shape == (len(bank.test), len(method.classnames)) and torch.isfinite(logits).all(), name


def test_run_experiment_reports_and_resumes_the_baselines(tmp_path, shared_cache):
    overrides = ["methods=[zeroshot, clip_adapter, tip_adapter, tip_adapter_f]", "train.epochs=3",
                 "tip_adapter_f.epochs=3", "tip_adapter.beta_steps=10", "tip_adapter_f.beta_steps=10",
                 f"cache_dir={shared_cache}"]
    metrics = run_experiment(quick_config(tmp_path, *overrides))
    out = tmp_path / "run"
    for name in ("clip_adapter", "tip_adapter_f"):
        assert (out / name / "checkpoint.pt").is_file()
        assert len(json.loads((out / name / "history.json").read_text())) == 3
    assert {"alpha", "beta", "val_accuracy", "cache_size"} <= set(metrics["tip_adapter"])
    assert metrics["tip_adapter_f"]["cache_size"] == 160
    again = run_experiment(quick_config(tmp_path, *overrides), resume=True)  # finished checkpoints: no training
    for name in ("clip_adapter", "tip_adapter", "tip_adapter_f"):
        assert again[name]["accuracy"] == metrics[name]["accuracy"]
    assert again["tip_adapter_f"]["alpha"] == metrics["tip_adapter_f"]["alpha"]


def test_adamw_recipe_leaves_sgd_as_the_default():
    sgd = build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.002
    adamw = build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="adamw", lr=0.001, eps=1e-4))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["eps"] == 1e-4
    trainer = Trainer(TrainConfig(), 50, seed=3).with_recipe(TrainConfig(optimizer="adamw"), 20)
    assert (trainer.epochs, trainer.seed, trainer.cfg.optimizer) == (20, 3, "adamw")


def test_baseline_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'tip_adapter.alpha_range'"):
        load_config([], ["tip_adapter.alpha_rang=[0, 1]"])
    with pytest.raises(ConfigError, match="tip_adapter.beta_range must be"):
        load_config([], ["tip_adapter.beta_range=[5, 1]"])
    with pytest.raises(ConfigError, match="train.optimizer must be one of sgd, adamw, adam"):
        load_config([], ["train.optimizer=rmsprop"])
    with pytest.raises(ConfigError, match="clip_adapter.alpha must be in"):
        load_config([], ["clip_adapter.alpha=1.5"])
