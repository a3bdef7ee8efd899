"""tip_adapter.protocol=reference follows Tip-Adapter's published protocol (its per-dataset configs and
its training script), still choosing alpha and beta on the few-shot validation split: the facts below
are the published numbers."""
import math

import pytest
import torch
from helpers import REPO, quick_config
from test_baselines import NoTestBank, setup, shared_cache  # noqa: F401 (a fixture)

from promptlearn import trainer as trainer_module
from promptlearn.config import load_config
from promptlearn.data import build_dataset
from promptlearn.data.transforms import train_transform
from promptlearn.errors import ConfigError
from promptlearn.features import batch_order
from promptlearn.methods import build_method
from promptlearn.methods.zeroshot import text_classifier
from promptlearn.runner import run_experiment

# [S_beta, S_alpha] and Tip-Adapter-F's initial alpha per dataset, from the published configs
SEARCH_SCALE = {"imagenet": (7, 3), "oxford_pets": (7, 3), "ucf101": (7, 3), "caltech101": (12, 5),
                "dtd": (13, 13), "eurosat": (12, 10), "sun397": (12, 10), "fgvc_aircraft": (30, 30),
                "food101": (10, 10), "oxford_flowers": (50, 50), "stanford_cars": (20, 10)}
INIT_ALPHA = {"imagenet": 1.17, "oxford_pets": 1.17, "food101": 1.17, "sun397": 1.17, "caltech101": 3,
              "ucf101": 3, "stanford_cars": 3, "dtd": 2, "eurosat": 2, "fgvc_aircraft": 5, "oxford_flowers": 10}
IMAGENET_7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def reference_setup(tmp_path, shared_cache, dataset, *overrides):  # noqa: F811
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "tip_adapter.protocol=reference", *overrides)
    classnames = build_dataset(cfg.data).classnames
    cfg.data.name = dataset  # the sample's features, under the named dataset's published settings
    return cfg, backbone, bank, trainer, classnames


@pytest.mark.parametrize("dataset", sorted(SEARCH_SCALE))
def test_initial_alpha_and_beta_per_dataset(tmp_path, shared_cache, dataset):  # noqa: F811
    cfg, backbone, _, _, classnames = reference_setup(tmp_path, shared_cache, dataset)
    tip_f = build_method("tip_adapter_f", cfg, backbone, classnames)
    assert (tip_f.alpha, tip_f.beta) == (INIT_ALPHA[dataset], 1.0)
    assert tip_f.protocol.epochs() == (100 if dataset == "eurosat" else 20)
    alphas, betas, searched = tip_f.protocol.grids()
    s_beta, s_alpha = SEARCH_SCALE[dataset]
    assert searched["search_scale"] == [s_beta, s_alpha]
    assert len(betas) == 200 and len(alphas) == 20
    # 0.1 + i (S - 0.1) / steps, upper end excluded
    assert betas[0] == pytest.approx(0.1) and betas[1] == pytest.approx(0.1 + (s_beta - 0.1) / 200)
    assert betas[-1] == pytest.approx(s_beta - (s_beta - 0.1) / 200) and max(betas) < s_beta
    assert alphas[-1] == pytest.approx(s_alpha - (s_alpha - 0.1) / 20) and max(alphas) < s_alpha


def test_eurosat_grid_numbers(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, _, _, classnames = reference_setup(tmp_path, shared_cache, "eurosat")
    alphas, betas, _ = build_method("tip_adapter", cfg, backbone, classnames).protocol.grids()
    assert betas[:3] == pytest.approx([0.1, 0.1595, 0.219]) and betas[-1] == pytest.approx(11.9405)
    assert alphas[:2] == pytest.approx([0.1, 0.595]) and alphas[-1] == pytest.approx(9.505)


def test_search_picks_from_the_reference_grid_on_validation(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank, trainer, classnames = reference_setup(tmp_path, shared_cache, "dtd")
    tip = build_method("tip_adapter", cfg, backbone, classnames)
    info = tip.fit(NoTestBank(bank), trainer, tmp_path / "tip.pt", resume=False)
    grid = [0.1 + i * 12.9 / 200 for i in range(200)]
    assert info["protocol"] == "reference" and any(math.isclose(info["beta"], b) for b in grid)
    assert any(math.isclose(info["alpha"], 0.1 + j * 12.9 / 20) for j in range(20))


def test_imagenet_zero_shot_averages_seven_templates(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, _, _, classnames = reference_setup(tmp_path, shared_cache, "imagenet")
    cfg.data.template = None
    tip = build_method("tip_adapter", cfg, backbone, classnames)
    torch.testing.assert_close(tip.weights, text_classifier(backbone, classnames, IMAGENET_7), atol=0, rtol=0)
    cfg.tip_adapter.protocol = "promptlearn"
    plain = build_method("tip_adapter", cfg, backbone, classnames)
    torch.testing.assert_close(plain.weights, text_classifier(backbone, classnames, ["a photo of a {}."]))


def test_cache_and_training_crops_cover_half_the_image_or_more(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank, _, classnames = reference_setup(tmp_path, shared_cache, "eurosat")
    data = build_method("tip_adapter", cfg, backbone, classnames).training_features(bank)
    assert data.crop_scale == (0.5, 1.0)
    assert train_transform(backbone, crop_scale=data.crop_scale).transforms[0].scale == (0.5, 1.0)
    assert train_transform(backbone).transforms[0].scale == (0.08, 1.0)  # CoOp's and promptlearn's default


def test_fine_tuning_steps_a_cosine_every_iteration_and_keeps_the_last_batch(tmp_path, shared_cache,  # noqa: F811
                                                                              monkeypatch):
    cfg, backbone, bank, trainer, classnames = reference_setup(
        tmp_path, shared_cache, "eurosat", "data.shots=16", "tip_adapter.batch_size=64", "tip_adapter.lr=0.001")
    lrs = []
    original_step = trainer_module.apply_gradients

    def recording_step(*args):
        optimizer = next(a for a in args if isinstance(a, torch.optim.Optimizer))
        lrs.append(optimizer.param_groups[0]["lr"])
        original_step(*args)

    monkeypatch.setattr(trainer_module, "apply_gradients", recording_step)
    tip_f = build_method("tip_adapter_f", cfg, backbone, classnames)
    info = tip_f.fit(NoTestBank(bank), trainer, tmp_path / "tip_f.pt", resume=False)
    n = len(bank.train)
    steps = math.ceil(n / 64)  # no dropped last batch
    assert n % 64 and [len(b) for b in batch_order(n, 64, 1, 0, drop_last=False)][-1] == n % 64
    assert len(info["history"]) == 100 and len(lrs) == 100 * steps
    total = 100 * steps  # CosineAnnealingLR(T_max = epochs x iterations), stepped every iteration
    expected = [0.001 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_reference_needs_a_dataset_with_published_settings(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, _, _, classnames = reference_setup(tmp_path, shared_cache, "image_folder")
    with pytest.raises(ConfigError, match="tip_adapter.protocol=reference knows the published settings"):
        build_method("tip_adapter", cfg, backbone, classnames)


def test_keys_average_the_raw_features_of_the_passes(tmp_path, shared_cache):  # noqa: F811
    cfg, backbone, bank, trainer, classnames = reference_setup(tmp_path, shared_cache, "eurosat")
    tip = build_method("tip_adapter", cfg, backbone, classnames)
    tip.fit(NoTestBank(bank), trainer, tmp_path / "tip.pt", resume=False)
    passes = [bank.train_pass(p, True, crop_scale=(0.5, 1.0)) for p in range(cfg.train.feature_passes)]
    images = torch.stack([p.features * p.norms[:, None] for p in passes])  # the encoder's raw outputs
    expected = torch.nn.functional.normalize(images.mean(0), dim=-1)
    torch.testing.assert_close(tip.keys, expected, atol=1e-6, rtol=0)
    averaged_normalised = torch.nn.functional.normalize(torch.stack([p.features for p in passes]).mean(0), dim=-1)
    assert not torch.allclose(tip.keys, averaged_normalised, atol=1e-6, rtol=0)  # the difference is real


def test_cached_norms_are_those_of_the_encoder_output(tmp_path, shared_cache):  # noqa: F811
    _, backbone, bank, _ = setup(tmp_path, shared_cache)
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    raw = backbone.encode_images(images, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), backbone.encode_images(images))
    split = bank.train
    assert split.norms is not None and split.norms.shape == (len(split),) and bool((split.norms > 0).all())


def test_shipped_reference_config_loads():


    cfg = load_config([REPO / "configs" / "coop" / "rn50.yaml", REPO / "configs" / "baselines" / "tip_adapter_reference.yaml"])
    assert cfg.tip_adapter.protocol == "reference" and "tip_adapter_f" in cfg.methods


def test_an_unknown_dataset_is_refused_before_anything_loads(tmp_path):
    cfg = quick_config(tmp_path, "methods=[zeroshot, tip_adapter_f]", "tip_adapter.protocol=reference")
    with pytest.raises(ConfigError, match="not data.name=image_folder"):
        run_experiment(cfg)
    assert not (tmp_path / "run").exists()
