"""The published recipes (promptlearn/recipes/*.yaml): every file loads and validates, each entry names its
source, and a few of the authors' numbers read back as the configs state them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from promptlearn.commands import main
from promptlearn.config import all_keys
from promptlearn.errors import ConfigError
from promptlearn.methods import METHODS
from promptlearn.recipes import RECIPE_DIR, Recipe, all_recipes, load_recipe_file, matching


def entry(method: str, protocol: str, dataset: str, shots: int) -> Recipe:
    """What the published recipe sets for (protocol, dataset, shots): the matching entries' settings, the more
    specific over the less, as a run applies them."""
    matches = matching(method, protocol, dataset, shots)
    assert matches, f"no {method} recipe for {protocol}, {dataset}, {shots} shots"
    settings = {k: v for r in matches for k, v in r.settings.items()}
    return dataclasses.replace(matches[-1], settings=settings)


def test_every_method_has_a_file_and_every_entry_is_valid():
    recipes = all_recipes()
    built_in = {name for name, cls in METHODS.items() if cls.__module__.startswith("promptlearn.")}
    assert set(recipes) == built_in  # one file per built-in method (not plug-ins'), each loaded through the validation
    keys = all_keys()
    for method, entries in recipes.items():
        for r in entries:
            assert r.method == method and r.repository.count("/") == 1 and r.source
            assert set(r.settings) <= set(keys)
            assert r.settings or r.unmapped


def test_published_facts_read_from_the_files():
    dtd = entry("promptsrc", "fewshot", "dtd", 16).settings  # the commented 45/5 of the few-shot config
    assert (dtd["promptsrc.epochs"], dtd["promptsrc.gpa_mean"], dtd["promptsrc.gpa_std"]) == (50, 45.0, 5.0)
    pets = entry("promptsrc", "fewshot", "oxford_pets", 4).settings
    assert (pets["promptsrc.epochs"], pets["promptsrc.gpa_mean"], pets["promptsrc.gpa_std"]) == (50, 30.0, 30.0)
    xd = entry("promptsrc", "cross_dataset", "imagenet", 16).settings
    assert (xd["promptsrc.depth_text"], xd["promptsrc.depth_vision"], xd["promptsrc.gpa_mean"],
            xd["promptsrc.gpa_std"]) == (3, 3, 6.0, 10.0)
    maple = entry("maple", "cross_dataset", "imagenet", 16).settings
    assert (maple["maple.depth_text"], maple["maple.lr"], maple["maple.epochs"]) == (3, 0.0026, 2)
    assert entry("maple", "base2novel", "dtd", 16).settings["maple.depth_text"] == 9
    for dataset, shots, projection in (("dtd", 16, 0.8), ("caltech101", 16, 1.0), ("dtd", 4, 1.0)):
        applied = {k: v for r in matching("prograd", "fewshot", dataset, shots) for k, v in r.settings.items()}
        assert applied["prograd.projection"] == projection  # besides the per-dataset prompt's entry
    assert entry("kgcoop", "base2novel", "dtd", 16).settings["kgcoop.epochs"] == 100
    assert entry("kgcoop", "cross_dataset", "imagenet", 4).settings["kgcoop.weight"] == 8.0
    assert entry("tip_adapter_f", "fewshot", "eurosat", 16).settings["tip_adapter_f.epochs"] == 100
    assert entry("tip_adapter_f", "fewshot", "dtd", 16).settings["tip_adapter_f.init_alpha"] == 2.0
    assert entry("coop", "fewshot", "caltech101", 2).settings["coop.epochs"] == 100
    lpclip = entry("linear_probe", "fewshot", "dtd", 16).settings
    assert lpclip["linear_probe.c_grid"] == [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    assert (lpclip["linear_probe.bisection_steps"], lpclip["linear_probe.features"]) == (8, "raw")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD_ENTRY = "  - protocol: fewshot\n    settings: {promptsrc.epochs: 50}\n    source: configs/x.yaml\n"


@pytest.mark.parametrize("text, message", [
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY.replace("promptsrc.epochs", "promptsrc.epoch"),
     "recipe 1: settings: unknown config key 'promptsrc.epoch'; did you mean 'promptsrc.epochs'?"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY.replace("    source: configs/x.yaml\n", ""),
     "recipe 1: 'source' is missing"),
    ("method: promptsrc\nrecipes:\n" + GOOD_ENTRY, "'source' is missing"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY.replace("fewshot", "few_shot"),
     "recipe 1: unknown protocol 'few_shot'; did you mean 'fewshot'"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY + "    datasets: [flowers102]\n",
     "recipe 1: unknown dataset 'flowers102'"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY.replace("50", "fifty"),
     "promptsrc.epochs must be an integer, got 'fifty'"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY + "    backbone: [RN50]\n",
     "recipe 1: backbone must be text"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY + "    epochs: 5\n",
     "recipe 1: unknown key 'epochs'"),
    ("method: promptsrc\nsource: a/b\nrecipes:\n" + GOOD_ENTRY.replace("promptsrc.epochs", "train.epochs"),
     "recipe 1: train.epochs is not a key of promptsrc's own section (promptsrc.*): a recipe sets only its "
     "method's keys"),
])
def test_a_broken_recipe_file_is_one_error_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_recipe_file(path)
    assert str(caught.value).startswith(f"recipe file {path}") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_shipped_files_are_the_package_data():
    assert {p.stem for p in RECIPE_DIR.glob("*.yaml")} == set(METHODS)


@pytest.mark.parametrize("columns", [80, 140])  # narrow: the settings go under each row
def test_list_recipes_of_one_method(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    main(["list", "recipes", "promptsrc"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= columns for line in lines)
    assert lines[0].split()[:4] == ["method", "protocol", "datasets", "shots"]
    assert [line.split()[1] for line in lines if line.startswith("promptsrc ")] == [
        "base2novel", "fewshot", "fewshot", "cross_dataset,", "fewshot,"]
    assert "gpa_mean=45;" in out and "gpa_mean=6;" in out and "depth_text=3;" in out
    assert "source: muzairkhattak/PromptSRC" in out and "vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml" in out
    assert "maple" not in out


def test_list_takes_a_method_only_for_recipes():
    with pytest.raises(ConfigError, match="takes no method name"):
        main(["list", "methods", "coop"])
    with pytest.raises(ConfigError, match="unknown method 'promptsrcc'"):
        main(["list", "recipes", "promptsrcc"])


@pytest.mark.parametrize("given, n_ctx, ctx_init", [
    (["coop.ctx_init='a photo of a'"], None, "a photo of a"),  # the phrase decides the length
    (["coop.n_ctx=8"], 8, ""),
    ([], None, ""),  # nothing given: CoOp's random 16 (N_CTX 16, promptlearn's length when no phrase is given)
])
def test_the_recipe_leaves_the_context_length_to_the_phrase(given, n_ctx, ctx_init):
    """CoOp's entries set ctx_init (none: random) and leave n_ctx unset, so a given phrase never meets a recipe's
    16 tokens, and a given n_ctx takes random vectors."""
    from promptlearn.config import load_config

    cfg = load_config([], ["data.name=dtd", "data.shots=16", *given])
    assert (cfg.coop.n_ctx, cfg.coop.ctx_init) == (n_ctx, ctx_init)
    assert cfg.coop.epochs == 200  # the rest of the recipe still applies


def test_the_more_specific_entry_says_the_context_start():
    """Domain generalisation on 16-shot ImageNet matches two CoOp entries: every protocol's "a photo of a" and the
    more specific robustness entry's random 16 tokens, which wins."""
    from promptlearn.config import load_config

    dg = load_config([], ["protocol=domain_generalization", "data.name=imagenet", "data.shots=16"])
    assert (dg.coop.n_ctx, dg.coop.ctx_init, dg.coop.epochs) == (None, "", 50)
    b2n = load_config([], ["protocol=base2novel", "data.name=imagenet", "data.shots=16"])
    assert (b2n.coop.n_ctx, b2n.coop.ctx_init) == (None, "a photo of a")


def test_every_recipe_that_gives_imagenet_an_ensemble_gives_the_authors_seven():
    """Tip-Adapter's, LP++'s, CLAP's and TaskRes's recipes write ImageNet's templates out; they must be the 7 of
    promptlearn/data/templates.yaml (CLAP's and TaskRes's code add ImageNet's own "a photo of a {}." after them)."""
    from promptlearn.data.registry import ensemble

    seven = ensemble("imagenet_7")
    found = {}
    for method, entries in all_recipes().items():
        for r in entries:
            for key, value in r.settings.items():
                if key.endswith(".templates") and "imagenet" in r.datasets and len(value) > 1:  # an ensemble
                    found[method] = value
    assert set(found) == {"tip_adapter", "tip_adapter_f", "lp_pp", "clap", "taskres"}
    assert all(value[:7] == seven for value in found.values())
    eight = ("clap", "taskres")
    assert all(found[m][7:] == ["a photo of a {}."] for m in eight)
    assert all(len(v) == 7 for m, v in found.items() if m not in eight)
