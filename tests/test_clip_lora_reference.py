"""clip_lora.protocol=reference follows CLIP-LoRA's published training loop (Zanella & Ben Ayed). The numbers
below are the published code's: AdamW (betas 0.9, 0.999, weight decay 0.01, lr 2e-4), CosineAnnealingLR with
T_max = 500 x shots and eta_min = 1e-6 stepped after every optimizer step, no warm-up, batches of 32 with
the last short one kept, training stopped after exactly 500 x shots steps even mid-epoch, and the
template "a photo of a {}." for every dataset (main.py, lora.py, run_utils.py, datasets/*.py of
github.com/MaxZanella/CLIP-LoRA)."""
import pytest
import torch
from test_baselines import NoTestBank, setup, shared_cache  # noqa: F401 (a fixture)
from test_trainer_schedule import cosine, record_steps

from promptlearn.checkpoint import load_checkpoint
from promptlearn.data import build_dataset
from promptlearn.methods import build_method
from promptlearn.methods.clip_lora import ClipLoraConfig

ETA_MIN = 1e-6


def record_batch_sizes(monkeypatch, method) -> list[int]:
    sizes, original = [], method.training_step
    monkeypatch.setattr(method, "training_step", lambda x, y: sizes.append(len(y)) or original(x, y))
    return sizes


def lora_setup(tmp_path, shared_cache, *overrides):  # noqa: F811
    """clip_lora on 1 shot of the sample's 10 classes, in batches of 4, for 7 iterations: with the last short
    batch kept, 2 epochs of 3 batches (4, 4, 2) and 1 batch of a third; with it dropped, 2 batches an epoch."""
    cfg, backbone, bank, trainer = setup(tmp_path, shared_cache, "data.shots=1", "clip_lora.batch_size=4",
                                         "clip_lora.iterations_per_shot=7", *overrides)
    assert len(bank.fewshot.train) == 10
    return cfg, backbone, bank, trainer, build_dataset(cfg.data).classnames


def test_the_published_recipe_is_the_default():
    own = ClipLoraConfig()
    assert (own.rank, own.alpha, own.dropout, own.projections, own.layers, own.encoder) == (2, 1, 0.25, "qkv", "all",
                                                                                            "both")
    assert (own.lr, own.weight_decay, own.batch_size, own.iterations_per_shot) == (2e-4, 0.01, 32, 500)
    assert own.protocol == "promptlearn"


def test_reference_steps_a_cosine_to_1e6_every_iteration_and_stops_after_exactly_500_k(tmp_path, shared_cache,  # noqa: F811
                                                                                      monkeypatch):
    cfg, backbone, bank, trainer, classnames = lora_setup(tmp_path, shared_cache, "clip_lora.protocol=reference")
    method = build_method("clip_lora", cfg, backbone, classnames)
    (lrs, optimizers), sizes = record_steps(monkeypatch), record_batch_sizes(monkeypatch, method)
    info = method.fit(NoTestBank(bank), trainer, tmp_path / "lora.pt", resume=False)
    total = 7  # iterations_per_shot x shots
    assert sizes == [4, 4, 2, 4, 4, 2, 4]  # the last short batch kept; stopped mid-epoch at the 7th step
    assert lrs == pytest.approx([cosine(2e-4, ETA_MIN, i, total) for i in range(total)], rel=1e-12, abs=0)
    assert info["history"][-1]["lr"] == pytest.approx(ETA_MIN, rel=1e-9)  # the cosine ends at eta_min
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3] and info["epochs"] == 3
    optimizer = optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        "lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    assert load_checkpoint(tmp_path / "lora.pt")["epoch"] == 3


def test_the_promptlearn_protocol_steps_the_cosine_per_epoch_to_zero_over_whole_epochs(tmp_path, shared_cache,  # noqa: F811
                                                                                      monkeypatch):
    cfg, backbone, bank, trainer, classnames = lora_setup(tmp_path, shared_cache)
    method = build_method("clip_lora", cfg, backbone, classnames)
    (lrs, _), sizes = record_steps(monkeypatch), record_batch_sizes(monkeypatch, method)
    info = method.fit(NoTestBank(bank), trainer, tmp_path / "lora.pt", resume=False)
    epochs = 4  # ceil(7 / 2 full batches)
    assert sizes == [4] * 8
    assert lrs == pytest.approx([cosine(2e-4, 0.0, e, epochs) for e in range(epochs) for _ in range(2)],
                                rel=1e-12, abs=0)
    assert info["epochs"] == epochs
    assert load_checkpoint(tmp_path / "lora.pt")["scheduler"]["_last_lr"] == pytest.approx([0.0], abs=1e-20)


@pytest.mark.parametrize("protocol, own_template, expected", [
    ("reference", None, "a photo of a {}."),  # the published code's, whatever the dataset
    ("reference", "{} pattern.", "{} pattern."),  # data.template still chooses
    ("promptlearn", None, "{} texture."),  # the dataset's own (CoOp's for DTD)
])
def test_reference_template_is_a_photo_of_a_for_every_dataset(tmp_path, shared_cache, protocol,  # noqa: F811
                                                              own_template, expected):
    cfg, backbone, _, _ = setup(tmp_path, shared_cache, f"clip_lora.protocol={protocol}")
    cfg.data.name, cfg.data.template = "dtd", own_template
    classnames = ["banded", "woven"]
    method = build_method("clip_lora", cfg, backbone, classnames)
    assert method.template() == expected
    assert torch.equal(method.token_ids, backbone.tokenizer([expected.format(c) for c in classnames]))
