"""End to end on the embedded sample: what a run writes, CoOp at epoch 0 = zero-shot, learning,
determinism, resume, eval-only, and checkpoint mismatches."""
import csv
import json
import subprocess
import sys

import pytest
import torch
from fixtures_data import IMAGENET_CLASSES, make_imagenet, make_imagenet_r
from helpers import QUICKSTART, REPO, quick_config

from promptlearn.checkpoint import load_checkpoint
from promptlearn.errors import CheckpointError, ConfigError
from promptlearn.runner import is_complete, run_experiment


def predicted(path):
    with open(path, newline="") as f:
        return [int(row["predicted_label"]) for row in csv.DictReader(f)]


def ctx_of(run_dir, method="coop"):
    return load_checkpoint(run_dir / method / "checkpoint.pt")["state"]["prompts.ctx"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_quickstart_tool_writes_everything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "tools/train_coop.py", "--config", str(QUICKSTART), "--epochs", "3",
                           "--output-dir", str(out), f"cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["zeroshot", "linear_probe", "coop"]
    for name, m in metrics.items():
        assert 0 <= m["accuracy"] <= 100 and {"macro_f1", "ece", "predictions", "per_class_accuracy"} <= set(m)
        assert len(predicted(m["predictions"])) == 200
    assert metrics["linear_probe"]["C"] in metrics["linear_probe"]["searched_C"]
    # the recipe each method ran: the quickstart's promptlearn recipe, and --epochs changed CoOp's
    assert metrics["coop"]["recipe"] == {"recipe": "promptlearn", "entries": [], "for_backbone": True,
                                         "changed": ["coop.augment", "coop.class_specific", "coop.ctx_init",
                                                     "coop.epochs"]}
    info = json.loads((out / "run_info.json").read_text())
    assert info["recipes"]["coop"] == metrics["coop"]["recipe"] and info["recipes"]["zeroshot"]["recipe"] == "promptlearn"
    for f in ["config.yaml", "log.txt", "summary.md", "coop/checkpoint.pt", "coop/history.json",
              "fewshot/shot_16-seed_1.json", "zeroshot/confusion_matrix.csv"]:
        assert (out / f).is_file(), f
    assert "coop epoch 3/3" in (out / "log.txt").read_text()
    assert "| coop |" in proc.stdout and is_complete(out)
    payload = load_checkpoint(out / "coop" / "checkpoint.pt")
    assert payload["epoch"] == 3 and payload["meta"]["model"] == "tiny-clip"
    assert payload["meta"]["classnames"][0] == "ankle boot" and payload["meta"]["n_ctx"] == 4


@pytest.mark.parametrize("position, template", [("end", "a photo of a {}."), ("front", "{} a photo of a.")])
def test_epoch_zero_predicts_exactly_like_zero_shot(tmp_path, position, template):
    cfg = quick_config(tmp_path, "train.epochs=0", "methods=[zeroshot, coop]", f"data.template={template}",
                       "coop.class_specific=false", f"coop.class_position={position}")
    metrics = run_experiment(cfg)
    assert predicted(metrics["coop"]["predictions"]) == predicted(metrics["zeroshot"]["predictions"])
    assert metrics["coop"]["accuracy"] == metrics["zeroshot"]["accuracy"]


def test_training_raises_training_accuracy(tmp_path):
    run_experiment(quick_config(tmp_path, "train.epochs=40", "methods=[coop]"))
    history = json.loads((tmp_path / "run" / "coop" / "history.json").read_text())
    assert history[-1]["accuracy"] >= history[0]["accuracy"] + 15
    assert history[-1]["loss"] < history[0]["loss"]


def test_same_seed_gives_bit_identical_context(tmp_path):
    for name in ("a", "b"):
        run_experiment(quick_config(tmp_path, "methods=[coop]", f"output_dir={tmp_path / name}",
                                    "train.augment=true", "train.feature_passes=2", "coop.ctx_init=", "coop.n_ctx=4"))
    assert torch.equal(ctx_of(tmp_path / "a"), ctx_of(tmp_path / "b"))
    run_experiment(quick_config(tmp_path, "methods=[coop]", f"output_dir={tmp_path / 'c'}", "data.seed=2",
                                "train.augment=true", "train.feature_passes=2", "coop.ctx_init=", "coop.n_ctx=4"))
    assert not torch.equal(ctx_of(tmp_path / "a"), ctx_of(tmp_path / "c"))


def test_resume_continues_to_the_same_context(tmp_path):
    full = quick_config(tmp_path, "methods=[coop]", "train.epochs=6", f"output_dir={tmp_path / 'full'}")
    run_experiment(full)
    # the same run interrupted (Ctrl-C) after 3 of its 6 epochs, then resumed
    first_three = quick_config(tmp_path, "methods=[coop]", "train.epochs=6", f"output_dir={tmp_path / 'ref3'}")
    from promptlearn import trainer as trainer_module

    original = trainer_module.Trainer._epoch
    calls = {"n": 0}

    def stop_after_three(self, *args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    trainer_module.Trainer._epoch = stop_after_three
    try:
        with pytest.raises(Exception, match="interrupted; saved the state after epoch 3"):
            run_experiment(first_three)
    finally:
        trainer_module.Trainer._epoch = original
    assert load_checkpoint(tmp_path / "ref3" / "coop" / "checkpoint.pt")["epoch"] == 3
    metrics = run_experiment(first_three, resume=True)
    assert torch.equal(ctx_of(tmp_path / "ref3"), ctx_of(tmp_path / "full"))
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["coop"]["accuracy"] == full_metrics["coop"]["accuracy"]


def test_eval_only_and_mismatched_checkpoints(tmp_path):
    trained = run_experiment(quick_config(tmp_path, "methods=[coop]", f"output_dir={tmp_path / 'train'}"))
    ckpt = str(tmp_path / "train" / "coop" / "checkpoint.pt")
    again = run_experiment(quick_config(tmp_path, "methods=[coop]", f"output_dir={tmp_path / 'eval'}"), eval_only=ckpt)
    assert again["coop"]["accuracy"] == trained["coop"]["accuracy"]
    assert predicted(again["coop"]["predictions"]) == predicted(trained["coop"]["predictions"])
    with pytest.raises(CheckpointError, match="model: 'tiny-clip' in the checkpoint, 'tiny-custom-clip' now"):
        run_experiment(quick_config(tmp_path, "methods=[coop]", "backbone.model=tiny-custom-clip",
                                    f"output_dir={tmp_path / 'x'}"), eval_only=ckpt)
    with pytest.raises(CheckpointError, match="n_ctx: 4 in the checkpoint, 8 now"):
        run_experiment(quick_config(tmp_path, "methods=[coop]", "coop.ctx_init=", "coop.n_ctx=8",
                                    f"output_dir={tmp_path / 'y'}"), eval_only=ckpt)


def test_resume_under_another_recipe_is_refused_and_time_accumulates(tmp_path):
    cfg = quick_config(tmp_path, "methods=[coop]", "train.epochs=4")
    run_experiment(cfg)
    with pytest.raises(CheckpointError, match="epochs: 4 in the checkpoint, 6 now"):
        run_experiment(quick_config(tmp_path, "methods=[coop]", "train.epochs=6"), resume=True)
    with pytest.raises(CheckpointError, match="lr: 0.002 in the checkpoint, 0.1 now"):
        run_experiment(quick_config(tmp_path, "methods=[coop]", "train.epochs=4", "train.lr=0.1"), resume=True)
    again = run_experiment(cfg, resume=True)  # already finished: nothing trains, the time is kept
    assert again["coop"]["train_seconds"] == load_checkpoint(tmp_path / "run" / "coop" / "checkpoint.pt")["train_seconds"] > 0


def test_evaluation_only_sets_run_zero_shot_and_saved_unified_prompts(tmp_path):
    make_imagenet(tmp_path / "data", train_per_class=4, val_per_class=2)
    make_imagenet_r(tmp_path / "data", list(IMAGENET_CLASSES)[:2])
    common = [f"data.root={tmp_path / 'data'}", "data.path=null", "train.epochs=2", "coop.class_specific=false"]
    run_experiment(quick_config(tmp_path, "data.name=imagenet", "methods=[coop]", "data.shots=2",
                                f"output_dir={tmp_path / 'in'}", *common))
    ckpt = str(tmp_path / "in" / "coop" / "checkpoint.pt")
    shifted = run_experiment(quick_config(tmp_path, "data.name=imagenet_r", "methods=[zeroshot, coop]",
                                          f"output_dir={tmp_path / 'r'}", *common), eval_only=ckpt)
    assert shifted["coop"]["num_test_images"] == shifted["zeroshot"]["num_test_images"] == 4
    with pytest.raises(ConfigError, match="no training images .* linear_probe cannot run"):
        run_experiment(quick_config(tmp_path, "data.name=imagenet_r", "methods=[zeroshot, linear_probe]",
                                    f"output_dir={tmp_path / 'r2'}", *common))


def test_runs_asking_a_method_for_a_missing_capability_stop_before_anything_loads(tmp_path):
    """The runner reads capabilities only: --eval-only needs a method restorable from a checkpoint, a
    test-only set needs methods that do not learn; nothing is written before the refusal."""
    with pytest.raises(ConfigError, match=r"--eval-only .* none of methods=\['zeroshot', 'linear_probe'\] .* "
                                          r"list one of (\w+, )*coop, coop_csc\b"):
        run_experiment(quick_config(tmp_path, "methods=[zeroshot,linear_probe]"), eval_only=str(tmp_path / "x.pt"))
    with pytest.raises(ConfigError, match="unknown method 'coopp'; did you mean 'coop'"):
        run_experiment(quick_config(tmp_path, "methods=[zeroshot,coopp]"))
    with pytest.raises(ConfigError, match=r"imagenet_a' has no training images .* clip_adapter, tip_adapter cannot run"):
        run_experiment(quick_config(tmp_path, "data.name=imagenet_a", "methods=[zeroshot,clip_adapter,tip_adapter]"))
    assert not (tmp_path / "run").exists()
