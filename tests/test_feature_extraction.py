"""Feature extraction at the data pipeline's limit: run_info.json records the images the frozen backbone
encoded (per split, apart from those read from the feature cache) and how fast; convolutional towers run
channels_last on a GPU only, so the CPU's features stay as they were; GPU features (channels_last, bf16
autocast, pinned batches, collected on the device) match the CPU's fp32 features."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import SAMPLE, quick_config, tiny_backbone

from promptlearn.backbone import image_memory_format, load_backbone
from promptlearn.config import BackboneConfig
from promptlearn.data import build_dataset
from promptlearn.data.base import Item
from promptlearn.data.transforms import eval_transform
from promptlearn.features import extract_features
from promptlearn.runner import run_experiment

# two augmented training passes, both used; three methods read the test features
RUN = ["methods=[zeroshot, linear_probe, coop]", "train.augment=true", "train.feature_passes=2", "train.epochs=2"]


def test_run_info_records_the_images_encoded_and_those_read_from_the_cache(tmp_path, one_thread):
    cfg = quick_config(tmp_path, *RUN)
    run_experiment(cfg)
    draw = json.loads((tmp_path / "run" / "fewshot" / "shot_16-seed_1.json").read_text())
    train, val, test = len(draw["train"]), len(draw["val"]), len(build_dataset(cfg.data).test)
    first = json.loads((tmp_path / "run" / "run_info.json").read_text())["feature_extraction"]
    # linear_probe: plain train and val; coop: the passes; test once for the three methods that score it
    encoded = {"train": train, "train passes": 2 * train, "val": val, "test": test}
    assert first["encoded_by_split"] == encoded and first["images_encoded"] == sum(encoded.values())
    assert first["from_cache_by_split"] == {} and first["images_from_cache"] == 0
    assert first["seconds"] > 0 and first["images_per_second"] > 0
    assert first["num_workers"] == cfg.data.num_workers and first["batch_size"] == cfg.data.eval_batch_size

    run_experiment(quick_config(tmp_path, *RUN, f"output_dir={tmp_path / 'again'}"))  # the same cache
    again = json.loads((tmp_path / "again" / "run_info.json").read_text())["feature_extraction"]
    assert again["images_encoded"] == 0 and again["encoded_by_split"] == {}
    assert again["seconds"] == 0 and again["images_per_second"] is None
    assert again["from_cache_by_split"] == encoded
    assert again["images_from_cache"] == first["images_encoded"]


def test_without_a_feature_cache_the_test_images_are_encoded_once_for_every_method(tmp_path, one_thread):
    cfg = quick_config(tmp_path, *RUN, "cache_dir=none")
    run_experiment(cfg)
    record = json.loads((tmp_path / "run" / "run_info.json").read_text())["feature_extraction"]
    assert record["encoded_by_split"]["test"] == len(build_dataset(cfg.data).test)
    assert record["images_from_cache"] == 0


@pytest.mark.parametrize("model, convolutional", [("tiny-rn-clip", True), ("tiny-timm-convnet-clip", True),
                                                  ("tiny-clip", False), ("tiny-timm-vit-clip", False)])
def test_channels_last_is_for_convolutional_towers_on_a_gpu(model, convolutional):
    visual = tiny_backbone(model).model.visual
    on_gpu = torch.channels_last if convolutional else torch.preserve_format  # a ViT: one patch-embedding conv
    assert image_memory_format(visual, torch.device("cuda")) == on_gpu
    assert image_memory_format(visual, torch.device("cpu")) == torch.preserve_format


def test_a_convolutional_tower_on_the_cpu_keeps_its_layout():
    """On the CPU neither the weights nor the batches become channels_last: features stay bit-identical to
    those cached before."""
    backbone = tiny_backbone("tiny-rn-clip")
    kernels = [m.weight for m in backbone.model.visual.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]  # a 1x1 kernel is in both layouts
    assert kernels and all(w.is_contiguous() for w in kernels)
    received = []
    hook = backbone.model.visual.register_forward_pre_hook(lambda _, inputs: received.append(inputs[0]))
    try:
        backbone.encode_images(torch.rand(2, 3, backbone.image_size, backbone.image_size))
    finally:
        hook.remove()
    assert received[0].is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["tiny-rn-clip", "tiny-clip"])
def test_gpu_features_match_the_cpu_features(model):
    images = sorted((SAMPLE / "test").rglob("*.png"))[:20]
    items = [Item(str(path), label, path.parent.name) for label, path in enumerate(images)]
    cpu = tiny_backbone(model)
    gpu = load_backbone(BackboneConfig(model=model, pretrained="none", device="cuda", precision="bf16"))
    if model == "tiny-rn-clip":
        kernels = [m.weight for m in gpu.model.visual.modules()
                   if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kernels)
    expected = extract_features(cpu, items, eval_transform(cpu), batch_size=8, num_workers=2, skip_bad=False)
    found = extract_features(gpu, items, eval_transform(gpu), batch_size=8, num_workers=2, skip_bad=False)
    assert found.paths == expected.paths and torch.equal(found.labels, expected.labels)
    assert found.features.device.type == "cpu" and found.features.dtype == torch.float32
    torch.testing.assert_close(found.features.norm(dim=-1), torch.ones(len(items)))
    assert (found.features * expected.features).sum(-1).min() > 0.99  # bf16 autocast against fp32
    torch.testing.assert_close(found.norms, expected.norms, rtol=0.05, atol=0.0)


def test_the_cache_check_creates_nothing_so_processes_starting_together_never_collide(tmp_path):
    """Checking a cache folder that does not exist yet creates nothing (its first write will): before, each
    process made the folder and removed it again, and a second process starting at once (torchrun) could
    find its probe's folder gone."""
    from promptlearn.features import FeatureCache

    cache = FeatureCache(tmp_path / "not" / "yet")
    cache.check()
    assert not (tmp_path / "not").exists()
    (tmp_path / "not" / "yet").mkdir(parents=True)
    cache.check()
    assert list((tmp_path / "not" / "yet").iterdir()) == []  # the probe is gone again
