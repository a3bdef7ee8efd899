"""Tip-Adapter's published protocol (its per-dataset configs and training script), which `recipe: published`
(the default) applies for the run's dataset at 16 shots, still choosing alpha and beta on the few-shot
validation split: the facts below are the published numbers. The embedded sample's features stand in for each
dataset's images."""
import math

import pytest
import torch
import yaml
from helpers import interrupted_at_epoch, tiny_backbone
from test_baselines import NoTestBank, setup, shared_cache  # noqa: F401 (a fixture)

from promptlearn import trainer as trainer_module
from promptlearn.config import load_config
from promptlearn.data.registry import ensemble
from promptlearn.data.transforms import train_transform
from promptlearn.errors import CheckpointError, ConfigError, PromptlearnError
from promptlearn.features import batch_order
from promptlearn.methods import build_method
from promptlearn.methods.tip_adapter import TipAdapterConfig, TipAdapterFConfig, search_grid
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.recipes import RECIPE_DIR
from promptlearn.settings import run_epochs
from promptlearn.trainer import Trainer

# [S_beta, S_alpha] and Tip-Adapter-F's initial alpha per dataset, from the published configs
SEARCH_SCALE = {"imagenet": (7, 3), "oxford_pets": (7, 3), "ucf101": (7, 3), "caltech101": (12, 5),
                "dtd": (13, 13), "eurosat": (12, 10), "sun397": (12, 10), "fgvc_aircraft": (30, 30),
                "food101": (10, 10), "oxford_flowers": (50, 50), "stanford_cars": (20, 10)}
INIT_ALPHA = {"imagenet": 1.17, "oxford_pets": 1.17, "food101": 1.17, "sun397": 1.17, "caltech101": 3,
              "ucf101": 3, "stanford_cars": 3, "dtd": 2, "eurosat": 2, "fgvc_aircraft": 5, "oxford_flowers": 10}
IMAGENET_7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
NAMES = ["cat", "dog"]  # class names where no training happens


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


def published_config(tmp_path, dataset, *overrides):
    """`dataset` at 16 shots under the published recipe. No train.<key> is given: it would reach the methods'
    sections over the recipe."""
    return load_config([], [f"data.name={dataset}", "data.shots=16", "methods=[tip_adapter, tip_adapter_f]",
                            "backbone.model=tiny-clip", "backbone.pretrained=none", "backbone.device=cpu",
                            f"output_dir={tmp_path / 'run'}", *overrides])


def published_setup(tmp_path, shared_cache, dataset, *overrides):  # noqa: F811
    """(cfg, backbone, bank): the published config of `dataset`, and the sample's 16-shot features."""
    _, backbone, bank, _ = setup(tmp_path, shared_cache, "data.shots=16")
    return published_config(tmp_path, dataset, *overrides), backbone, bank


def fitted(name, cfg, backbone, bank, checkpoint, resume=False):
    """The method fitted as the runner fits it: with a trainer of its own training settings and epochs."""
    method = build_method(name, cfg, backbone, bank.dataset.classnames)
    settings = method.train_config
    trainer = Trainer(settings, run_epochs(cfg, settings), cfg.data.seed, backbone.precision)
    return method, method.fit(NoTestBank(bank), trainer, checkpoint, resume=resume)


def recipe_settings(method: str) -> dict[str, dict]:
    """Dataset -> the settings of its entry in the method's recipe file, read as plain YAML."""
    tree = yaml.safe_load((RECIPE_DIR / f"{method}.yaml").read_text())
    return {dataset: entry["settings"] for entry in tree["recipes"] for dataset in entry["datasets"]}


@pytest.mark.parametrize("dataset", sorted(SEARCH_SCALE))
def test_initial_alpha_grids_and_epochs_per_dataset(tmp_path, backbone, dataset):
    cfg = published_config(tmp_path, dataset)
    s_beta, s_alpha = SEARCH_SCALE[dataset]
    for name in ("tip_adapter", "tip_adapter_f"):
        tip = build_method(name, cfg, backbone, NAMES)
        assert (tip.alpha, tip.beta) == (INIT_ALPHA[dataset], 1.0)
        alphas, betas = tip.grids()
        assert len(betas) == 200 and len(alphas) == 20
        # 0.1 + i (S - 0.1) / steps, upper end excluded
        assert betas[0] == pytest.approx(0.1) and betas[1] == pytest.approx(0.1 + (s_beta - 0.1) / 200)
        assert betas[-1] == pytest.approx(s_beta - (s_beta - 0.1) / 200) and max(betas) < s_beta
        assert alphas[-1] == pytest.approx(s_alpha - (s_alpha - 0.1) / 20) and max(alphas) < s_alpha
    assert run_epochs(cfg, tip.train_config) == (100 if dataset == "eurosat" else 20)


def test_eurosat_grid_numbers(tmp_path, backbone):
    alphas, betas = build_method("tip_adapter", published_config(tmp_path, "eurosat"), backbone, NAMES).grids()
    assert betas[:3] == pytest.approx([0.1, 0.1595, 0.219]) and betas[-1] == pytest.approx(11.9405)
    assert alphas[:2] == pytest.approx([0.1, 0.595]) and alphas[-1] == pytest.approx(9.505)


def test_the_published_grid_form_and_promptlearn_s():
    """grid=arange is the published search's list, i (S - 0.1) / steps + 0.1 for i < steps, to the last bit;
    linspace (promptlearn's) includes both ends."""
    for scale, steps in ((7, 200), (3, 20), (12, 200), (50, 20), (13, 20)):
        published = [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]
        assert search_grid([0.1, float(scale)], steps, "arange") == published
    assert search_grid([0.1, 10.0], 20) == pytest.approx([0.1 + j * 9.9 / 19 for j in range(20)])
    assert search_grid([0.1, 10.0], 20)[-1] == 10.0 and search_grid([2.0, 5.0], 1) == [2.0]
    with pytest.raises(ConfigError, match="tip_adapter.grid must be one of linspace, arange, got 'log'"):
        load_config([], ["tip_adapter.grid=log"])


def test_the_recipes_set_every_published_value_per_dataset(tmp_path):
    """Each dataset's run takes its entry's values, read here from the recipe files themselves; the facts in
    the files are the published ones (EuroSAT 100 epochs, the initial alpha, the grids' upper ends)."""
    files = {name: recipe_settings(name) for name in ("tip_adapter", "tip_adapter_f")}
    assert set(files["tip_adapter"]) == set(files["tip_adapter_f"]) == set(SEARCH_SCALE)
    for dataset in SEARCH_SCALE:
        cfg = published_config(tmp_path, dataset)
        for name, entries in files.items():
            for key, value in entries[dataset].items():
                section, _, leaf = key.partition(".")
                assert section == name and getattr(cfg.sections[name], leaf) == value, (dataset, key)
            assert cfg.sections[name].init_alpha == INIT_ALPHA[dataset]
            assert cfg.sections[name].alpha_range == [0.1, SEARCH_SCALE[dataset][1]]
            assert cfg.sections[name].beta_range == [0.1, SEARCH_SCALE[dataset][0]]
        assert cfg.tip_adapter_f.epochs == files["tip_adapter_f"][dataset]["tip_adapter_f.epochs"]
    assert files["tip_adapter_f"]["eurosat"]["tip_adapter_f.epochs"] == 100
    assert files["tip_adapter_f"]["imagenet"]["tip_adapter_f.templates"] == ensemble("imagenet_7") == IMAGENET_7
    f = published_config(tmp_path, "dtd").tip_adapter_f
    assert (f.optimizer, f.lr, f.eps, f.weight_decay, f.batch_size, f.warmup_epochs, f.min_lr) == \
        ("adamw", 0.001, 1e-4, 0.01, 256, 0, 0.0)
    assert (f.lr_per_step, f.drop_last, f.crop_scale, f.feature_passes, f.raw_keys, f.fresh_crops, f.grid) == \
        (True, False, [0.5, 1.0], 10, True, True, "arange")


def test_recipe_promptlearn_and_datasets_without_a_published_entry_run_the_code_defaults(tmp_path):
    for dataset, recipe in (("eurosat", "promptlearn"), ("imagenet", "promptlearn"), ("image_folder", "published")):
        cfg = published_config(tmp_path, dataset, f"recipe={recipe}")
        assert cfg.tip_adapter == TipAdapterConfig() and cfg.tip_adapter_f == TipAdapterFConfig(), dataset
    defaults = TipAdapterFConfig()
    assert (defaults.grid, defaults.raw_keys, defaults.fresh_crops, defaults.templates, defaults.epochs) == \
        ("linspace", False, False, [], 20)


def test_the_retired_protocol_switch_names_the_recipe():
    for section in ("tip_adapter", "tip_adapter_f"):
        with pytest.raises(ConfigError, match=rf"{section}.protocol was removed: .*`recipe: published`"):
            load_config([], [f"{section}.protocol=reference"])


def test_search_picks_from_the_published_grid_on_validation(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank = published_setup(tmp_path, shared_cache, "dtd")
    tip, info = fitted("tip_adapter", cfg, backbone, bank, tmp_path / "tip.pt")
    grid = [0.1 + i * 12.9 / 200 for i in range(200)]
    assert info["grid"] == "arange" and any(math.isclose(info["beta"], b) for b in grid)
    assert any(math.isclose(info["alpha"], 0.1 + j * 12.9 / 20) for j in range(20))
    assert info["searched_alpha"] == [0.1, 13.0, 20] and info["searched_beta"] == [0.1, 13.0, 200]


def test_imagenet_zero_shot_averages_seven_templates(tmp_path, backbone):
    cfg = published_config(tmp_path, "imagenet")
    for name in ("tip_adapter", "tip_adapter_f"):
        tip = build_method(name, cfg, backbone, NAMES)
        torch.testing.assert_close(tip.weights, text_classifier(backbone, NAMES, IMAGENET_7), atol=0, rtol=0)
    plain = build_method("tip_adapter", published_config(tmp_path, "imagenet", "recipe=promptlearn"), backbone, NAMES)
    torch.testing.assert_close(plain.weights, text_classifier(backbone, NAMES, ["a photo of a {}."]))
    # a template the run sets wins over the recipe's; templates set in the section itself win over both
    given = published_config(tmp_path, "imagenet", "data.template=a {} here.")
    assert given.tip_adapter.templates == [] and build_method("tip_adapter", given, backbone, NAMES).templates() == \
        ["a {} here."]
    own = published_config(tmp_path, "imagenet", "data.template=a {} here.", "tip_adapter.templates=['a {} there.']")
    assert build_method("tip_adapter", own, backbone, NAMES).templates() == ["a {} there."]
    with pytest.raises(ConfigError, match=r"tip_adapter_f.templates 'no class' must contain \{\}"):
        published_config(tmp_path, "dtd", "tip_adapter_f.templates=[no class]")


def test_cache_and_training_crops_cover_half_the_image_or_more(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank = published_setup(tmp_path, shared_cache, "eurosat")
    for name in ("tip_adapter", "tip_adapter_f"):
        data = build_method(name, cfg, backbone, NAMES).training_features(bank)
        assert data.crop_scale == (0.5, 1.0) and data.passes == 10 and data.augment
    assert train_transform(backbone, crop_scale=data.crop_scale).transforms[0].scale == (0.5, 1.0)
    assert train_transform(backbone).transforms[0].scale == (0.08, 1.0)  # CoOp's and promptlearn's default


def test_fine_tuning_steps_a_cosine_every_iteration_and_keeps_the_last_batch(tmp_path, shared_cache,  # noqa: F811
                                                                              monkeypatch):
    # the schedule alone: the cache's passes cycled, rather than 100 fresh ones to encode
    cfg, backbone, bank = published_setup(tmp_path, shared_cache, "eurosat", "tip_adapter_f.batch_size=64",
                                          "tip_adapter_f.fresh_crops=false")
    lrs = []
    original_step = trainer_module.apply_gradients

    def recording_step(*args):
        optimizer = next(a for a in args if isinstance(a, torch.optim.Optimizer))
        lrs.append(optimizer.param_groups[0]["lr"])
        original_step(*args)

    monkeypatch.setattr(trainer_module, "apply_gradients", recording_step)
    _, info = fitted("tip_adapter_f", cfg, backbone, bank, tmp_path / "tip_f.pt")
    n = len(bank.train)
    steps = math.ceil(n / 64)  # no dropped last batch
    assert n % 64 and [len(b) for b in batch_order(n, 64, 1, 0, drop_last=False)][-1] == n % 64
    assert len(info["history"]) == 100 and len(lrs) == 100 * steps
    total = 100 * steps  # CosineAnnealingLR(T_max = epochs x iterations), stepped every iteration
    expected = [0.001 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_keys_average_the_raw_features_of_the_passes(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank = published_setup(tmp_path, shared_cache, "eurosat")
    tip, _ = fitted("tip_adapter", cfg, backbone, bank, tmp_path / "tip.pt")
    passes = [bank.train_pass(p, True, crop_scale=(0.5, 1.0)) for p in range(10)]
    images = torch.stack([p.features * p.norms[:, None] for p in passes])  # the encoder's raw outputs
    expected = torch.nn.functional.normalize(images.mean(0), dim=-1)
    torch.testing.assert_close(tip.keys, expected, atol=1e-6, rtol=0)
    averaged_normalised = torch.nn.functional.normalize(torch.stack([p.features for p in passes]).mean(0), dim=-1)
    assert not torch.allclose(tip.keys, averaged_normalised, atol=1e-6, rtol=0)  # the difference is real
    plain, _ = fitted("tip_adapter", published_config(tmp_path, "eurosat", "tip_adapter.raw_keys=false"), backbone,
                      bank, tmp_path / "plain.pt")
    torch.testing.assert_close(plain.keys, averaged_normalised, atol=1e-6, rtol=0)


def test_cached_norms_are_those_of_the_encoder_output(tmp_path, shared_cache):  # noqa: F811
    _, backbone, bank, _ = setup(tmp_path, shared_cache)
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    raw = backbone.encode_images(images, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), backbone.encode_images(images))
    split = bank.train
    assert split.norms is not None and split.norms.shape == (len(split),) and bool((split.norms > 0).all())


def passes_read(tmp_path, shared_cache, monkeypatch, *overrides):  # noqa: F811
    """The augmented passes Tip-Adapter-F reads to build its cache and in each training epoch."""
    cfg, backbone, bank = published_setup(tmp_path, shared_cache, "eurosat", "tip_adapter_f.epochs=4",
                                          "tip_adapter_f.feature_passes=3", *overrides)
    read, phase = {"cache": [], "training": []}, ["cache"]
    original_pass, original_fit = type(bank).train_pass, Trainer.fit

    def recording_pass(self, index, augment, *args, **kwargs):
        if augment:
            read[phase[0]].append(index)
        return original_pass(self, index, augment, *args, **kwargs)

    def training(self, *args, **kwargs):
        phase[0] = "training"
        return original_fit(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(bank), "train_pass", recording_pass)
        patch.setattr(Trainer, "fit", training)
        fitted("tip_adapter_f", cfg, backbone, bank, tmp_path / "tip_f.pt")
    return set(read["cache"]), read["training"]


def test_fresh_crops_train_each_epoch_on_a_pass_the_cache_never_used(tmp_path, shared_cache,  # noqa: F811
                                                                      monkeypatch):
    cache, training = passes_read(tmp_path, shared_cache, monkeypatch)
    assert cache == {0, 1, 2} and training == [3, 4, 5, 6]  # pass P + e in epoch e
    assert not cache & set(training)
    cache, training = passes_read(tmp_path / "cycled", shared_cache, monkeypatch, "tip_adapter_f.fresh_crops=false")
    assert cache == {0, 1, 2} and training == [0, 1, 2, 0]  # promptlearn's: the cache's own passes, cycled


def test_fresh_crops_resume_bit_for_bit_and_a_change_is_refused(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank = published_setup(tmp_path, shared_cache, "eurosat", "tip_adapter_f.epochs=4",
                                          "tip_adapter_f.feature_passes=2", "tip_adapter_f.batch_size=64")
    whole, _ = fitted("tip_adapter_f", cfg, backbone, bank, tmp_path / "whole.pt")
    with interrupted_at_epoch(2), pytest.raises(PromptlearnError, match="state after epoch 2"):
        fitted("tip_adapter_f", cfg, backbone, bank, tmp_path / "resumed.pt")
    resumed, info = fitted("tip_adapter_f", cfg, backbone, bank, tmp_path / "resumed.pt", resume=True)
    assert len(info["history"]) == 4 and torch.equal(resumed.keys, whole.keys)
    cycled = published_config(tmp_path, "eurosat", "tip_adapter_f.epochs=4", "tip_adapter_f.feature_passes=2",
                              "tip_adapter_f.batch_size=64", "tip_adapter_f.fresh_crops=false")
    with pytest.raises(CheckpointError, match="fresh_crops: True in the checkpoint, None now"):
        fitted("tip_adapter_f", cycled, backbone, bank, tmp_path / "resumed.pt", resume=True)


def test_every_training_key_given_to_tip_adapter_f_reaches_its_trainer(tmp_path, backbone):
    """tip_adapter_f reads all the training keys from its section, through the trainer the runner builds;
    the training-free tip_adapter reads only those of its cache and refuses the others."""
    cfg = published_config(tmp_path, "dtd", "tip_adapter_f.lr=0.01", "tip_adapter_f.drop_last=true",
                           "tip_adapter_f.lr_per_step=false", "tip_adapter_f.optimizer=sgd",
                           "tip_adapter_f.momentum=0.5", "tip_adapter_f.min_lr=0.001", "tip_adapter_f.epochs=7")
    settings = build_method("tip_adapter_f", cfg, backbone, NAMES).train_config
    assert (settings.lr, settings.drop_last, settings.lr_per_step, settings.optimizer, settings.momentum,
            settings.min_lr, run_epochs(cfg, settings)) == (0.01, True, False, "sgd", 0.5, 0.001, 7)
    with pytest.raises(ConfigError, match="tip_adapter.lr is read by no method: tip_adapter reads no lr"):
        published_config(tmp_path, "dtd", "tip_adapter.lr=0.01")
