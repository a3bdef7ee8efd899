"""The shipped configs (configs/**/*.yaml) under recipes: each loads, each sweep states its recipe, the sweeps on
real weights keep every method's published recipe unchanged, and the quick ones say what they change."""
from __future__ import annotations

import copy

import pytest
import yaml
from helpers import QUICKSTART, REPO

from promptlearn.config import load_config
from promptlearn.settings import effective, method_recipe
from promptlearn.sweep import load_sweep

CONFIGS = REPO / "configs"
SWEEPS = sorted(p for p in CONFIGS.rglob("*.yaml") if "sweep" in (yaml.safe_load(p.read_text()) or {}))
# run configs; configs/datasets/ have their own test (test_config), protocols/targets/ hold data.* keys for targets
RUN_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in SWEEPS and p.parent.name != "datasets")


def test_the_lists_find_the_shipped_files():
    names = {p.relative_to(CONFIGS).as_posix() for p in SWEEPS}
    assert {"sweeps/quick_sample.yaml", "sweeps/vit_b16_deep_prompts.yaml", "protocols/base2novel_vit_b16.yaml",
            "protocols/base2novel_sample.yaml"} <= names and len(names) == 9
    assert {"quickstart.yaml", "coop/ctx16_end.yaml", "coop/rn50.yaml"} <= {
        p.relative_to(CONFIGS).as_posix() for p in RUN_FILES}


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_run_config_loads(path):
    cfg = load_config([path])
    assert cfg.backbone.model and cfg.methods


def test_the_readme_combination_of_backbone_context_and_precision_loads():
    cfg = load_config([CONFIGS / "coop" / "rn50.yaml", CONFIGS / "coop" / "ctx_photo_end.yaml",
                       CONFIGS / "coop" / "original_fp16.yaml"], ["data.name=oxford_pets"])
    # the phrase sets the context: the recipe's 16 random tokens give way, the rest of the recipe stays
    assert (cfg.coop.n_ctx, cfg.coop.ctx_init, cfg.coop.epochs) == (None, "a photo of a", 200)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_sweep_loads_and_states_its_recipe(path):
    load_sweep(path)
    assert "recipe" in yaml.safe_load(path.read_text()), f"{path} must state `recipe:` (published or promptlearn)"


def sweep_runs(path):
    """The config of every (dataset, shots) of a sweep, as plan_runs builds them, without reading any data."""
    sweep, base, _ = load_sweep(path)
    return [load_config([], [f"data.name={dataset}", f"data.shots={shots}"], base=copy.deepcopy(base))
            for dataset in sweep.datasets for shots in sweep.shots]


@pytest.mark.parametrize("path", [p for p in SWEEPS if yaml.safe_load(p.read_text())["backbone"]["pretrained"]
                                  != "none"], ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_sweeps_on_real_weights_keep_every_published_recipe(path):
    """The sweeps that make real numbers set no training value and no method key: every method runs its
    published recipe as it stands, so the summary may print the papers' figures beside it."""
    for cfg in sweep_runs(path):
        assert cfg.recipe == "published"
        for method in cfg.methods:
            record = method_recipe(cfg, method)
            assert record["changed"] == [], (path.name, cfg.data.name, cfg.data.shots, method, record)


def test_the_deep_prompt_sweep_runs_each_methods_own_recipe():
    by_method = {m: effective(cfg)[m] for cfg in sweep_runs(CONFIGS / "sweeps" / "vit_b16_deep_prompts.yaml")
                 if (cfg.data.name, cfg.data.shots) == ("dtd", 16) for m in cfg.methods}
    assert by_method["promptsrc"]["epochs"]["value"] == 50 and by_method["promptsrc"]["epochs"]["from"].startswith(
        "recipe muzairkhattak/PromptSRC")
    assert by_method["clip_lora"]["iterations_per_shot"]["from"].startswith("recipe MaxZanella/CLIP-LoRA")
    assert by_method["coop"]["epochs"]["value"] == 200 and by_method["coop"]["n_ctx"]["value"] is None  # 16 random
    assert by_method["coop"]["ctx_init"]["value"] == "" and by_method["coop"]["ctx_init"]["from"].startswith(
        "recipe KaiyangZhou/CoOp")
    for method in ("vpt_deep", "ivlp", "maple"):  # no few-shot recipe published: their section defaults
        assert (by_method[method]["epochs"], by_method[method]["batch_size"]["value"]) == (
            {"value": 5, "from": "default"}, 4)


def test_the_quick_sample_changes_only_epochs_and_passes():
    """The quick sweep keeps the recipes but for its quick epochs and passes, set per method, so that another
    method list (CLIP-LoRA reads no epochs) still loads."""
    for cfg in sweep_runs(CONFIGS / "sweeps" / "quick_sample.yaml"):
        for method in cfg.methods:
            changed = set(method_recipe(cfg, method)["changed"])
            assert changed <= {f"{method}.epochs", f"{method}.feature_passes", "coop.ctx_init"}, (method, changed)
        trained = effective(cfg)
        assert trained["coop"]["epochs"]["value"] == 20 and trained["tip_adapter_f"]["epochs"]["value"] == 10
    load_sweep(CONFIGS / "sweeps" / "quick_sample.yaml", ["methods=[zeroshot, clip_lora]"])


def test_the_quickstart_runs_promptlearns_recipe_with_its_two_train_values():
    cfg = load_config([QUICKSTART])
    assert cfg.recipe == "promptlearn" and method_recipe(cfg, "coop")["entries"] == []
    coop = effective(cfg)["coop"]
    assert (coop["epochs"]["value"], coop["augment"]["value"]) == (50, False)
    assert coop["epochs"]["from"] == f"train.epochs ({QUICKSTART})"
    assert (coop["lr"]["value"], coop["batch_size"]["value"], coop["n_ctx"]["value"]) == (0.002, 32, None)
