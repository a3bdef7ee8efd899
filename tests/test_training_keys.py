"""One owner of a method's training settings: the same training keys in every section, layered code default <
recipe < files < command line, a given train.<key> reaching every method that reads it or refused, and where each
value came from (--print-config's `effective`)."""
from __future__ import annotations

import json

import pytest
import yaml
from helpers import QUICKSTART, SAMPLE

from promptlearn.commands import main as promptlearn_main
from promptlearn.config import (
    TRAINING_KEYS,
    RunConfig,
    TrainingKeys,
    load_config,
    origins,
    training_settings,
)
from promptlearn.errors import ConfigError
from promptlearn.methods import METHODS
from promptlearn.recipes import matching
from promptlearn.settings import effective, method_recipe

# a valid value for each training key that no method's code default or recipe uses
OTHER_VALUE = {"epochs": 7, "batch_size": 3, "lr": 0.0123, "momentum": 0.5, "weight_decay": 0.0007,
               "warmup_epochs": 2, "warmup_lr": 3e-6, "optimizer": "adamw", "eps": 3e-7, "augment": False,
               "crop_scale": [0.3, 0.9], "lr_per_step": True, "min_lr": 1e-7, "drop_last": False, "feature_passes": 3}
# how a refusal says a method does not read a key: it has no such key, or its optimizer has no use for it
UNREAD = r"(reads no|trains with \w+, which reads no)"


def reads(method: str, key: str) -> bool:
    """Whether the method reads the key under its own optimizer (SGD has no eps; Adam and AdamW no momentum)."""
    from promptlearn.config import OPTIMIZER_KEYS

    optimizer = training_settings(load_config([], [f"methods=[{method}]"]), METHODS[method].section).optimizer
    return key in METHODS[method].training_keys and optimizer in OPTIMIZER_KEYS.get(key, (optimizer,))


TRAINING_METHODS = [name for name in METHODS if isinstance(RunConfig().sections.get(METHODS[name].section),
                                                               TrainingKeys)]


def test_every_method_that_trains_has_every_training_key_in_its_own_section():
    assert set(OTHER_VALUE) == set(TRAINING_KEYS)
    for name in METHODS:
        cls = METHODS[name]
        if cls.trains() or cls.training_keys:
            assert name in TRAINING_METHODS, f"{name} reads training keys but its section lacks them"
        assert cls.training_keys <= set(TRAINING_KEYS)


@pytest.mark.parametrize("key", TRAINING_KEYS)
@pytest.mark.parametrize("method", TRAINING_METHODS)
def test_a_method_key_takes_effect_or_is_refused(method, key):
    """`<method>.<key>` set on the command line is what the method's trainer runs with, or a ConfigError naming
    the key when the method does not read it; never silently ignored."""
    cls, value = METHODS[method], OTHER_VALUE[key]
    override = f"{cls.section}.{key}={json.dumps(value)}"
    if reads(method, key):
        cfg = load_config([], [f"methods=[{method}]", override])
        assert getattr(training_settings(cfg, cls.section), key) == value
        assert effective(cfg)[method][key] == {"value": value, "from": "command line"}
    else:
        with pytest.raises(ConfigError, match=rf"{cls.section}\.{key} is read by no method: {method} {UNREAD} {key}"):
            load_config([], [f"methods=[{method}]", override])


@pytest.mark.parametrize("key", TRAINING_KEYS)
@pytest.mark.parametrize("method", TRAINING_METHODS)
def test_a_train_key_reaches_the_method_or_is_refused(method, key):
    cls, value = METHODS[method], OTHER_VALUE[key]
    override = f"train.{key}={json.dumps(value)}"
    if reads(method, key):
        cfg = load_config([], [f"methods=[{method}]", override])
        assert getattr(training_settings(cfg, cls.section), key) == value
        assert effective(cfg)[method][key]["from"] == f"train.{key} (command line)"
    elif cls.trains():
        with pytest.raises(ConfigError, match=rf"train\.{key} would not reach {method} \({method} {UNREAD} {key}"):
            load_config([], [f"methods=[{method}]", override])
    else:  # a method that trains nothing is not concerned: the value waits for methods that train
        cfg = load_config([], [f"methods=[{method}]", override])
        assert getattr(cfg.train, key) == value and key not in effective(cfg)[method]
        assert f"{cls.section}.{key}" not in method_recipe(cfg, method)["changed"]


def test_train_lr_reaches_every_method_named_in_the_issue():
    names = ["coop", "coop_csc", "prograd", "clip_adapter", "kgcoop", "cocoop", "clap", "tip_adapter_f", "ivlp",
             "maple", "vpt_deep", "promptsrc", "clip_lora"]
    cfg = load_config([], [f"methods=[{','.join(names)}]", "train.lr=0.01"])
    assert {name: training_settings(cfg, name).lr for name in names} == {name: 0.01 for name in names}
    with pytest.raises(ConfigError, match=r"train\.lr would not reach lp_pp .*set coop\.lr instead"):
        load_config([], ["methods=[coop,lp_pp]", "train.lr=0.01"])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_layers_lowest_first_default_recipe_file_command_line(tmp_path):
    run = ["methods=[promptsrc]", "data.name=dtd", "data.shots=16"]
    assert load_config([], ["recipe=promptlearn", *run]).promptsrc.gpa_mean == 15.0  # code default
    assert load_config([], run).promptsrc.gpa_mean == 45.0  # DTD's published few-shot recipe
    file = write(tmp_path / "a.yaml", "promptsrc: {gpa_mean: 10.0, epochs: 12}\n")
    cfg = load_config([file], [*run, "promptsrc.gpa_mean=12"])
    assert (cfg.promptsrc.gpa_mean, cfg.promptsrc.epochs) == (12.0, 12)
    assert origins(cfg)["promptsrc.gpa_mean"] == "command line" and origins(cfg)["promptsrc.epochs"] == str(file)
    assert origins(cfg)["promptsrc.gpa_std"].startswith("recipe muzairkhattak/PromptSRC configs/trainers/PromptSRC/")


def test_a_train_key_and_a_method_key_the_later_layer_wins_and_within_one_layer_the_method_key(tmp_path):
    general = write(tmp_path / "general.yaml", "train: {lr: 0.5}\n")
    specific = write(tmp_path / "specific.yaml", "coop: {lr: 0.25}\n")
    both = write(tmp_path / "both.yaml", "train: {lr: 0.5}\ncoop: {lr: 0.25}\n")
    lr = lambda files, overrides=(): load_config(files, ["methods=[coop,kgcoop]", *overrides])  # noqa: E731
    assert (lr([general], ["coop.lr=0.125"]).coop.lr, lr([general], ["coop.lr=0.125"]).kgcoop.lr) == (0.125, 0.5)
    assert (lr([specific], ["train.lr=0.125"]).coop.lr, lr([specific], ["train.lr=0.125"]).kgcoop.lr) == (0.125, 0.125)
    assert (lr([both]).coop.lr, lr([both]).kgcoop.lr) == (0.25, 0.5)


def test_a_config_rebuilt_for_other_shots_takes_that_recipe_whole():
    """A sweep builds each run over the dataset's config: the 16-shot entry must not survive into 4 shots."""
    base = load_config([], ["methods=[prograd]", "data.name=dtd", "data.shots=16"])
    assert base.prograd.projection == 0.8
    four = load_config([], ["data.shots=4"], base=base)
    assert four.prograd.projection == 1.0 and four.prograd.epochs == 100
    assert not any("lambda as 0.8" in e for e in method_recipe(four, "prograd")["entries"])


def test_every_matching_entry_is_applied_the_most_specific_last():
    cfg = load_config([], ["methods=[prograd]", "data.name=oxford_flowers", "data.shots=8"])
    entries = matching("prograd", "fewshot", "oxford_flowers", 8)
    assert method_recipe(cfg, "prograd")["entries"] == [f"{e.repository} {e.source}" for e in entries]
    assert entries[-1].datasets and entries[-1].shots  # dataset- and shot-specific: applied last, so it wins
    assert cfg.prograd.projection == entries[-1].settings["prograd.projection"] == 0.8


def test_published_recipes_of_the_issue_are_what_runs():
    xd = load_config([], ["methods=[maple,promptsrc]", "protocol=cross_dataset", "data.name=imagenet"])
    assert (xd.maple.depth_text, xd.maple.lr, xd.maple.epochs) == (3, 0.0026, 2)
    assert (xd.promptsrc.depth_text, xd.promptsrc.depth_vision, xd.promptsrc.gpa_mean, xd.promptsrc.gpa_std) == \
        (3, 3, 6.0, 10.0)
    few = load_config([], ["methods=[promptsrc]", "data.name=oxford_pets", "data.shots=4"])
    assert (few.promptsrc.epochs, few.promptsrc.gpa_mean, few.promptsrc.gpa_std) == (50, 30.0, 30.0)
    b2n = load_config([], ["methods=[promptsrc,coop]", "protocol=base2novel", "data.name=dtd"])
    assert (b2n.promptsrc.epochs, b2n.promptsrc.gpa_mean, b2n.coop.ctx_init) == (20, 15.0, "a photo of a")


def test_a_method_key_set_by_the_user_is_recorded_as_a_change_of_the_recipe():
    cfg = load_config([], ["methods=[coop,kgcoop]", "coop.lr=0.01"])
    assert method_recipe(cfg, "coop")["changed"] == ["coop.lr"]
    kgcoop = method_recipe(cfg, "kgcoop")
    assert (kgcoop["recipe"], kgcoop["changed"], kgcoop["for_backbone"]) == ("published", [], True)
    # KgCoOp's base-to-novel script names the RN50 config: run on ViT-B/16, the record says so
    vit = load_config([], ["methods=[kgcoop]", "protocol=base2novel", "backbone.model=ViT-B-16"])
    assert method_recipe(vit, "kgcoop")["for_backbone"] is False and vit.kgcoop.epochs == 100


def test_recipe_must_be_published_or_promptlearn():
    with pytest.raises(ConfigError, match="recipe must be one of published, promptlearn, got 'paper'"):
        load_config([], ["recipe=paper"])


def test_print_config_shows_each_methods_effective_settings_and_their_sources(tmp_path, capsys):
    assert promptlearn_main(["train", "--config", str(QUICKSTART), "--output-dir", str(tmp_path / "never"),
                             f"data.path={SAMPLE}", "methods=[coop,clap]", "clap.lr=0.05", "recipe=published",
                             "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    coop, clap = printed["effective"]["coop"], printed["effective"]["clap"]
    assert coop["epochs"] == {"value": 50, "from": f"train.epochs ({QUICKSTART})"}
    assert coop["ctx_init"] == {"value": "a photo of a", "from": str(QUICKSTART)}
    assert clap["lr"] == {"value": 0.05, "from": "command line"}
    assert clap["batch_size"]["value"] == 256 and clap["batch_size"]["from"].startswith("recipe jusiro/CLAP")
    assert coop["momentum"] == {"value": 0.9, "from": "train.momentum (default)"}
    assert coop["recipe"]["value"] == "published"
    assert coop["crop_scale"] == {"value": [0.08, 1.0], "from": "train.crop_scale (default)"}  # no YAML alias
    cfg = load_config([])
    assert training_settings(cfg, "coop").crop_scale is not cfg.train.crop_scale  # a method's copy, never train's
    assert not (tmp_path / "never").exists()


def test_clip_lora_epochs_beside_a_given_stop_or_iteration_count_is_refused():
    assert load_config([], ["methods=[clip_lora]", "train.epochs=3"]).clip_lora.epochs == 3  # epochs decide
    with pytest.raises(ConfigError, match=r"clip_lora.epochs=3 trains whole epochs, so the given "
                                          r"clip_lora.iterations_per_shot would do nothing"):
        load_config([], ["methods=[clip_lora]", "train.epochs=3", "clip_lora.iterations_per_shot=10"])


def test_a_run_saved_before_a_method_had_its_own_section_is_not_the_same_setup(tmp_path):
    from promptlearn.config import NEUTRAL_KEYS, dump_yaml, saved_changes

    cfg = load_config([], ["methods=[coop,coop_csc]"])
    saved = tmp_path / "config.yaml"
    tree = yaml.safe_load(dump_yaml(cfg))
    saved.write_text(yaml.safe_dump(tree), encoding="utf-8")
    assert saved_changes(saved, cfg, NEUTRAL_KEYS - {"methods"}) == []
    del tree["coop_csc"]  # as promptlearn wrote it when coop_csc read coop.*
    saved.write_text(yaml.safe_dump(tree), encoding="utf-8")
    assert saved_changes(saved, cfg, NEUTRAL_KEYS - {"methods"}) == ["coop_csc: no section there"]


def test_a_section_of_a_method_not_listed_keeps_its_given_keys_unjudged():
    """A config file covering many methods may give clip_lora.iterations_per_shot beside a train.epochs for the
    others: refused only where clip_lora runs."""
    assert load_config([], ["methods=[coop]", "train.epochs=3", "clip_lora.iterations_per_shot=10"]).coop.epochs == 3
