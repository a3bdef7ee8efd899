"""Every method that trains, stopped after an epoch and resumed with --resume, ends bit for bit where an
uninterrupted run ends: every tensor of its checkpoint (parameters, optimiser, random-number states) and
its predictions. Cheap settings: 2 shots of the sample, 3 short epochs, shallow deep prompts."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers import interrupted_at_epoch, quick_config

from promptlearn.checkpoint import load_checkpoint, save_checkpoint
from promptlearn.data.loader import ImageItems, image_loader
from promptlearn.errors import PromptlearnError
from promptlearn.methods import METHODS
from promptlearn.methods.clip_lora import ClipLoraConfig
from promptlearn.runner import run_experiment

TRAINING = [name for name in METHODS if METHODS.get(name).capabilities.trains]
DEEP = ("ivlp", "maple", "promptsrc", "vpt_deep")
# every section's epochs and batches small, so that each method trains 3 epochs of a few steps; augmentation
# on, so that crops and flips are drawn too (Tip-Adapter-F's fresh crops: a new pass every epoch); CLIP-LoRA
# keeps its default dropout and trains the 3 epochs whole, in batches of 4
CHEAP = ["data.shots=2", "train.epochs=3", "train.batch_size=8", "train.augment=true",
         "cocoop.epochs=3", "cocoop.batch_size=4", "kgcoop.epochs=3", "kgcoop.batch_size=8",
         "tcp.epochs=3", "tcp.batch_size=8", "tcp.layer=1",
         "clap.epochs=3", "clap.batch_size=8", "clap.feature_passes=2",
         "tip_adapter_f.epochs=3", "tip_adapter_f.batch_size=8", "tip_adapter_f.alpha_steps=2",
         "tip_adapter_f.beta_steps=2", "tip_adapter_f.fresh_crops=true",
         "clip_lora.batch_size=4", "promptsrc.gpa_mean=2",
         *[f"{m}.{key}" for m in DEEP for key in ("epochs=3", "batch_size=4", "depth_vision=2")],
         *[f"{m}.depth_text=2" for m in DEEP if m != "vpt_deep"],
         "mmrl.epochs=3", "mmrl.batch_size=4", "mmrl.rep_layers=[1,2]",
         "mma.epochs=3", "mma.batch_size=4", "mma.adapter_start=1", "mma.adapter_end=2"]
# cached passes for the methods that train on cached features (a method streaming images refuses the key)
FEATURE_PASSES = {name: ["train.feature_passes=2"] if "feature_passes" in METHODS.get(name).training_keys else []
                  for name in TRAINING}
STOP_AT = 2  # epochs done before the interruption


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


def same(a, b, where: str = "checkpoint") -> list[str]:
    """Where two checkpoint payloads differ: tensors compared bit for bit (dtype, shape, values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        equal = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                 and torch.equal(a, b))
        return [] if equal else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [w for k in a for w in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} entries"]
        return [w for i, (x, y) in enumerate(zip(a, b)) for w in same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def test_the_methods_tested_are_the_registry_s_trainers_with_clip_lora_s_dropout_on(tmp_path):
    """The parametrisation below comes from the registry, so a method added later is tested too; CLIP-LoRA
    keeps its default dropout, the random draw a resume used to replay."""
    assert {"clip_lora", "coop", "promptsrc"} <= set(TRAINING) and "zeroshot" not in TRAINING
    assert quick_config(tmp_path, *CHEAP).clip_lora.dropout == ClipLoraConfig().dropout > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING)
def test_a_resumed_run_ends_bit_for_bit_as_an_uninterrupted_one(name, tmp_path, cache, one_thread):
    def config(folder):
        return quick_config(tmp_path, *CHEAP, *FEATURE_PASSES[name], f"methods=[{name}]",
                            f"output_dir={tmp_path / folder}", f"cache_dir={cache}")

    run_experiment(config("whole"))
    with interrupted_at_epoch(STOP_AT), pytest.raises(PromptlearnError, match=f"state after epoch {STOP_AT}"):
        run_experiment(config("resumed"))
    run_experiment(config("resumed"), resume=True)

    whole, resumed = (load_checkpoint(tmp_path / f / name / "checkpoint.pt") for f in ("whole", "resumed"))
    assert whole["epoch"] == whole["epochs"] > STOP_AT  # the interruption fell inside training
    for payload in (whole, resumed):
        del payload["train_seconds"]
    assert same(whole, resumed) == []
    predictions = [(tmp_path / f / name / "predictions.csv").read_bytes() for f in ("whole", "resumed")]
    assert predictions[0] == predictions[1]


def test_a_checkpoint_without_random_states_resumes_with_a_warning(tmp_path, cache, caplog):
    """Checkpoints written before the random-number states were saved still resume: nothing is restored, and
    the warning says that a method drawing at random will not end bit for bit."""
    cfg = quick_config(tmp_path, *CHEAP, *FEATURE_PASSES["coop"], "methods=[coop]", f"cache_dir={cache}")
    with interrupted_at_epoch(STOP_AT), pytest.raises(PromptlearnError, match=f"state after epoch {STOP_AT}"):
        run_experiment(cfg)
    checkpoint = tmp_path / "run" / "coop" / "checkpoint.pt"
    old = load_checkpoint(checkpoint)
    del old["random_states"], old["format"]
    save_checkpoint(checkpoint, old)
    with caplog.at_level(logging.INFO, logger="promptlearn"):
        run_experiment(cfg, resume=True)
    assert f"coop: checkpoint {checkpoint} holds no random-number states" in caplog.text
    assert "resumed from" in caplog.text and load_checkpoint(checkpoint)["epoch"] == 3


def test_the_fp16_loss_scale_resumes_where_it_was(tmp_path, cache, monkeypatch):
    """fp16 on a GPU scales the loss, its scale growing or backing off step by step: a resumed run carries on
    from the saved scale instead of starting again at 2**16. (An enabled CPU scaler stands in for the GPU's.)"""
    monkeypatch.setattr("promptlearn.trainer.grad_scaler",
                        lambda device, precision: torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1))

    def config(folder):
        return quick_config(tmp_path, *CHEAP, *FEATURE_PASSES["coop"], "methods=[coop]", f"output_dir={tmp_path / folder}", f"cache_dir={cache}")

    run_experiment(config("whole"))
    with interrupted_at_epoch(STOP_AT), pytest.raises(PromptlearnError, match=f"state after epoch {STOP_AT}"):
        run_experiment(config("resumed"))
    run_experiment(config("resumed"), resume=True)
    whole, resumed = (load_checkpoint(tmp_path / f / "coop" / "checkpoint.pt")["scaler"] for f in ("whole", "resumed"))
    assert whole["scale"] > 8.0 and resumed == whole


def test_loading_images_draws_nothing_from_the_global_generator():
    """A DataLoader draws its workers' seed from torch's generator unless given its own: loading features
    (computed on a cache miss, not on a hit) would shift what training draws next."""
    before = torch.get_rng_state()
    list(image_loader(ImageItems([], transform=None), batch_size=4, num_workers=0, device=torch.device("cpu")))
    assert torch.equal(torch.get_rng_state(), before)
