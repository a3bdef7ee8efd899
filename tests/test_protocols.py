"""The protocols: CoCoOp's base/novel split rule, HM arithmetic, n/a marking, no novel-class leak into
training or the feature cache, class-row selection for subset targets, validation-free mode, the run's
environment record and a protocol sweep's report in the papers' layout."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, SAMPLE, quick_config, tiny_backbone

from promptlearn.config import DataConfig, dump_yaml, load_config
from promptlearn.data import build_dataset
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.fewshot import FewShotSplit
from promptlearn.errors import ConfigError
from promptlearn.methods import build_method
from promptlearn.protocols import (
    PROTOCOLS,
    NotApplicable,
    Target,
    base_novel_labels,
    harmonic_mean,
    keep_classes,
    scorer_for,
)
from promptlearn.report import protocol_summary
from promptlearn.runner import run_experiment

QUICK = ["train.epochs=1", "train.feature_passes=1", "train.augment=false"]


def test_base_novel_split_follows_cocoop_rule():
    # labels sorted, the first ceil(n/2) are base: 10 -> 5 + 5, 37 (OxfordPets) -> 19 + 18, 1 -> 1 + 0
    assert base_novel_labels(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    base, novel = base_novel_labels(37)
    assert (len(base), len(novel), novel[0]) == (19, 18, 19)
    assert base_novel_labels(1) == ([0], [])
    items = [Item(f"/x/{c}-{i}.png", c, f"class {c}") for c in range(5) for i in range(2)]
    ds = DatasetSplits("d", [f"class {c}" for c in range(5)], train=items, test=items)
    novel_ds = keep_classes(ds, base_novel_labels(5)[1], "d-novel")
    assert novel_ds.classnames == ["class 3", "class 4"]  # relabelled 0.. within the half
    assert {(it.classname, it.label) for it in novel_ds.test} == {("class 3", 0), ("class 4", 1)}
    assert not {it.path for it in novel_ds.train} & {it.path for it in ds.train if it.label < 3}


def test_harmonic_mean_and_published_figures():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    # the papers' HM is the harmonic mean of the averaged base and novel accuracies
    for label, f in PROTOCOLS.get("base2novel").published.items():
        assert harmonic_mean(f["base"], f["novel"]) == pytest.approx(f["HM"], abs=0.011), label


def test_subset_target_is_scored_on_its_class_rows():
    backbone = tiny_backbone()
    cfg = load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none"])
    names = ["cat", "dog", "bird", "fish"]
    method = build_method("linear_probe", cfg, backbone, names)  # no unseen classes, yet scores subsets
    torch.manual_seed(0)
    method.weight.copy_(torch.randn_like(method.weight))
    target = Target("variant", DatasetSplits("variant", ["bird", "cat"]), cfg.data)
    x = torch.nn.functional.normalize(torch.randn(6, backbone.embed_dim), dim=-1)
    assert torch.equal(scorer_for(method, target, cfg)(x), method.predict(x)[:, [2, 0]])
    unseen = Target("other", DatasetSplits("other", ["cat", "horse"]), cfg.data)
    assert "unseen_classes" in scorer_for(method, unseen, cfg).reason


def test_subset_rows_are_found_by_wnid_where_a_display_name_repeats(tmp_path):
    """open_clip's ImageNet names hold "missile" twice: ImageNet-R's first missile is scored on that row."""
    from fixtures_data import make_imagenet, make_imagenet_r, write_wnid_classnames

    classes = {"n01440764": "missile", "n01443537": "goldfish", "n01484850": "missile"}
    write_wnid_classnames(make_imagenet(tmp_path) / "classnames.txt", classes)
    write_wnid_classnames(make_imagenet_r(tmp_path, present=["n01440764", "n01443537"]) / "classnames.txt", classes)
    cfg = load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none"])
    source = build_dataset(DataConfig(name="imagenet", root=str(tmp_path)))
    subset = build_dataset(DataConfig(name="imagenet_r", root=str(tmp_path)))
    assert source.class_ids == list(classes) and subset.class_ids == ["n01440764", "n01443537"]
    assert subset.classnames == ["missile", "goldfish"]
    backbone = tiny_backbone()
    method = build_method("linear_probe", cfg, backbone, source.classnames)
    torch.manual_seed(0)
    method.weight.copy_(torch.randn_like(method.weight))
    x = torch.nn.functional.normalize(torch.randn(6, backbone.embed_dim), dim=-1)
    target = Target("imagenet_r", subset, cfg.data)
    assert torch.equal(scorer_for(method, target, cfg, source.class_ids)(x), method.predict(x)[:, [0, 1]])
    # without ids, a name two trained classes share selects no row: a class-specific method is n/a, never wrong
    nameless = Target("r", DatasetSplits("r", subset.classnames), cfg.data)
    assert isinstance(scorer_for(method, nameless, cfg), NotApplicable)


def test_a_novel_classifier_is_built_from_display_names_not_class_ids(tmp_path, monkeypatch):
    """Ids find rows; prompts are written with the names (classnames.txt's 'T-shirt/top', not the folder
    't-shirt_top'; on ImageNet the name, never 'a photo of a n01440764.')."""
    from promptlearn import protocols

    built, real = [], protocols.build_method
    monkeypatch.setattr(protocols, "build_method",
                        lambda name, cfg, backbone, names: built.append(list(names)) or real(name, cfg, backbone, names))
    cfg = quick_config(tmp_path, "protocol=base2novel", "methods=[coop]", "coop.class_specific=false", *QUICK)
    metrics = run_experiment(cfg)
    assert built == [build_dataset(cfg.data).classnames[5:]] and "T-shirt/top" in built[0]
    assert metrics["coop"]["novel_accuracy"] is not None


def test_base2novel_run_reports_base_novel_hm_and_never_leaks_novel(tmp_path):
    cfg = quick_config(tmp_path, "protocol=base2novel", "methods=[zeroshot,coop,linear_probe]",
                       "coop.class_specific=false", *QUICK)
    metrics = run_experiment(cfg)
    dataset = build_dataset(cfg.data)
    novel_names = set(dataset.classnames[5:])
    novel_paths = {it.path for it in [*dataset.train, *dataset.val, *dataset.test] if it.classname in novel_names}
    novel_test = {it.path for it in dataset.test if it.classname in novel_names}
    for name in ("zeroshot", "coop"):
        m = metrics[name]
        assert m["hm"] == pytest.approx(harmonic_mean(m["base_accuracy"], m["novel_accuracy"]))
        assert m["novel_accuracy"] is not None and m["evaluations"]["novel"]["num_test_images"] == len(novel_test)
    probe = metrics["linear_probe"]
    assert probe["base_accuracy"] is not None and probe["novel_accuracy"] is None and probe["hm"] is None
    assert "unseen_classes" in probe["na"]["novel"]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| base (%) | novel (%) | HM (%) |" in summary and "linear_probe, novel: n/a" in summary
    # training and selection: the protocol's split of the draw holds base classes only
    draw = json.loads((tmp_path / "run" / "fewshot" / "shot_16-seed_1.json").read_text())
    full = FewShotSplit(dataset.name, 16, 1, *[[Item(p, lab, c) for p, lab, c in draw[k]] for k in ("train", "val")])
    _, training = PROTOCOLS.get("base2novel").training_split(cfg, dataset, full)
    assert training.train and not {it.path for it in [*training.train, *training.val]} & novel_paths
    # the feature cache: novel images only ever in the novel test features
    cached = [torch.load(f, weights_only=True)["paths"] for f in (tmp_path / "cache").glob("*.pt")]
    assert len(cached) >= 4 and any(set(paths) == novel_test for paths in cached)
    for paths in cached:
        assert not set(paths) & novel_paths or set(paths) == novel_test
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["protocol"] == "base2novel" and info["environment"]["torch"] == torch.__version__
    assert set(info["phase_seconds"]) == {"feature_extraction", "training", "evaluation"}
    assert info["peak_rss_mib"] > 0 and metrics["coop"]["phases"]["training_seconds"] >= 0


def variant_folder(tmp_path: Path, folders: list[str]) -> Path:
    """A test-only set holding some of the sample's classes (their test images), named as the sample names them."""
    root = tmp_path / "variant"
    lines = dict(line.split("\t") for line in (SAMPLE / "classnames.txt").read_text().splitlines())
    for folder in folders:
        shutil.copytree(SAMPLE / "test" / folder, root / folder)
    (root / "classnames.txt").write_text("".join(f"{f}\t{lines[f]}\n" for f in folders))
    target = tmp_path / "variant.yaml"
    target.write_text(f"data:\n  name: image_folder\n  path: {root}\n  split_seed: 3\n")
    return target


def test_domain_generalization_scores_every_method_on_a_class_subset(tmp_path):
    target = variant_folder(tmp_path, ["bag", "coat", "trouser"])
    cfg = quick_config(tmp_path, "protocol=domain_generalization", f"targets=[{target}]",
                       "methods=[zeroshot,coop_csc,linear_probe]", *QUICK)
    metrics = run_experiment(cfg)
    for name, m in metrics.items():
        assert not m["na"], name
        assert m["targets_average"] == m["target_accuracy"]["variant"] is not None
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| source (%) | variant (%) | targets average (%) |" in summary


def test_validation_free_mode_uses_fixed_values_and_no_validation_images(tmp_path):
    cfg = quick_config(tmp_path, "selection=none", "methods=[zeroshot,linear_probe,tip_adapter]",
                       "tip_adapter.init_alpha=2.0", "tip_adapter.init_beta=3.0", *QUICK)
    metrics = run_experiment(cfg)
    # a linear probe without a fixed C would need validation images: n/a with the reason
    assert metrics["linear_probe"]["accuracy"] is None and "linear_probe.c" in metrics["linear_probe"]["na"]["run"]
    tip = metrics["tip_adapter"]
    assert (tip["alpha"], tip["beta"]) == (2.0, 3.0) and "val_accuracy" not in tip and tip["accuracy"] is not None
    assert "validation-free" in (tmp_path / "run" / "summary.md").read_text()
    cached = [torch.load(f, weights_only=True)["paths"] for f in (tmp_path / "cache").glob("*.pt")]
    val_paths = {it.path for it in build_dataset(cfg.data).val}
    assert cached and not any(set(paths) & val_paths for paths in cached)  # no validation image was encoded
    fixed = run_experiment(quick_config(tmp_path, "selection=none", "methods=[linear_probe]", "linear_probe.c=0.5",
                                        "output_dir=" + str(tmp_path / "fixed"), *QUICK))
    assert fixed["linear_probe"]["C"] == 0.5 and fixed["linear_probe"]["accuracy"] is not None


@pytest.mark.parametrize("overrides, message", [
    (["protocol=base2novl"], "did you mean 'base2novel'"),
    (["targets=[imagenet_a]"], "protocol=fewshot tests on the dataset itself"),
    (["selection=test"], "selection must be one of validation, none"),
])
def test_bad_protocol_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(quick_config(tmp_path, *overrides))


PUBLISHED_RUN = {"recipe": "published", "entries": ["KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ctxv1.yaml"],
                 "for_backbone": True, "changed": []}


def base2novel_rows(methods: dict[str, dict | None]) -> list[dict]:
    """Two seeds of every published dataset per method, each row with the method's `recipe` record."""
    datasets = PROTOCOLS.get("base2novel").published_datasets
    return [{"method": m, "dataset": d, "seed": s, "base_accuracy": 80.0 + s + i, "novel_accuracy": 60.0 + s,
             "na": "", "recipe": record} for m, record in methods.items() for i, d in enumerate(datasets)
            for s in (1, 2)]


VIT_B16 = ["protocol=base2novel", "backbone.model=ViT-B-16", "backbone.pretrained=openai"]


def test_protocol_summary_averages_per_seed_and_shows_published_figures():
    datasets = list(PROTOCOLS.get("base2novel").published_datasets)
    cfg = load_config([], VIT_B16)
    rows = base2novel_rows({"coop": PUBLISHED_RUN, "zeroshot": {**PUBLISHED_RUN, "entries": []}})
    text = protocol_summary(PROTOCOLS.get("base2novel"), rows, ["zeroshot", "coop"], datasets, [1, 2], cfg)
    average = text.split("## Average over 11 datasets")[1]
    # per seed the mean over datasets: 86 and 87 base, 61 and 62 novel; then mean ± sample std over seeds
    hm = harmonic_mean(86.5, 61.5)
    assert f"| coop | 86.50 ± 0.71 | 61.50 ± 0.71 | {hm:.2f} |" in average
    assert "| coop (published) | 82.69 | 63.22 | 71.66 |" in average
    assert "| zeroshot (published) | 69.34 | 74.22 | 71.70 |" in average
    assert ("- Published figures of methods this sweep did not run are left out: cocoop, prograd, kgcoop, maple, "
            "promptsrc.") in text
    other = load_config([], ["protocol=base2novel", "backbone.model=RN50"])
    text = protocol_summary(PROTOCOLS.get("base2novel"), rows, ["coop"], datasets, [1, 2], other)
    assert "(published)" not in text and "- No published figures are shown: they exist only for ViT-B-16" in text


@pytest.mark.parametrize("record, overrides, note", [
    ({**PUBLISHED_RUN, "changed": ["coop.lr"]}, [],
     "- coop (published) is left out: its runs changed coop.lr from the published recipe."),
    ({**PUBLISHED_RUN, "recipe": "promptlearn", "entries": []}, [],
     "- coop (published) is left out: its runs used `recipe: promptlearn`."),
    (None, [], "- coop (published) is left out: some of its runs record no recipe"),
    ({**PUBLISHED_RUN, "for_backbone": False}, [],
     "- coop (published) is left out: no published recipe of it was applied for this backbone and setting"),
    (PUBLISHED_RUN, ["recipe=promptlearn"],
     "- No published figures are shown: this sweep ran `recipe: promptlearn`, not the authors' published recipes."),
])
def test_published_figures_stand_only_beside_runs_of_the_published_recipe(record, overrides, note):
    """A paper's figure beside a run of other settings would compare unlike things: the row is left out, with
    the reason."""
    datasets = list(PROTOCOLS.get("base2novel").published_datasets)
    rows = base2novel_rows({"zeroshot": PUBLISHED_RUN, "coop": PUBLISHED_RUN})
    rows[-1]["recipe"] = record  # coop's last run (one seed of one dataset) is enough to leave its figures out
    text = protocol_summary(PROTOCOLS.get("base2novel"), rows, ["zeroshot", "coop"], datasets, [1, 2],
                            load_config([], [*VIT_B16, *overrides]))
    assert any(line.startswith(note) for line in text.splitlines()), text
    assert "| coop (published) |" not in text
    assert ("| zeroshot (published) |" in text) == (not overrides)  # zero-shot's own runs are the published ones


def test_protocol_sweeps_run_from_their_configs_and_skip_finished_runs(tmp_path):
    from promptlearn.sweep import CSV_COLUMNS, load_sweep, plan_runs, run_sweep

    config = REPO / "configs" / "protocols" / "base2novel_sample.yaml"
    overrides = [f"sweep.output_dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}", f"data.path={SAMPLE}",
                 "sweep.seeds=[1]", "sweep.plots=false", "methods=[zeroshot,linear_probe]", *QUICK]
    sweep, base, run_overrides = load_sweep(config, overrides)
    rows = run_sweep(sweep, plan_runs(sweep, base, run_overrides))
    assert {(r["method"], r["novel_accuracy"] is None) for r in rows} == {("zeroshot", False), ("linear_probe", True)}
    # each row carries its method's recipe record, which decides whether a paper's figure may stand beside it
    assert {r["method"]: r["recipe"]["recipe"] for r in rows} == {"zeroshot": "published", "linear_probe": "published"}
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "# Protocol base2novel" in summary and "| method | base | novel | HM |" in summary
    assert "linear_probe on fashion_mnist_sample: novel:" in summary
    header = (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == CSV_COLUMNS and "hm" in CSV_COLUMNS
    marker = next((tmp_path / "sweep").rglob("run_complete.json"))
    before = marker.stat().st_mtime_ns
    run_sweep(sweep, plan_runs(sweep, base, run_overrides))  # finished: skipped, report rebuilt
    assert marker.stat().st_mtime_ns == before


def test_shipped_protocol_configs():
    from promptlearn.sweep import load_sweep

    folder = REPO / "configs" / "protocols"
    for name, protocol, datasets in [("base2novel_vit_b16", "base2novel", 11),
                                     ("cross_dataset_vit_b16", "cross_dataset", 1),
                                     ("domain_generalization_vit_b16", "domain_generalization", 1)]:
        sweep, base, _ = load_sweep(folder / f"{name}.yaml")
        assert (base.protocol, len(sweep.datasets), sweep.shots) == (protocol, datasets, [16])
        assert (base.backbone.model, base.backbone.pretrained, base.coop.ctx_init) == ("ViT-B-16", "openai",
                                                                                        "a photo of a")
        shows_published = PROTOCOLS.get(protocol).published_applies(base, list(sweep.datasets))
        assert shows_published == (protocol != "domain_generalization")  # no DG figures quoted


def test_unseen_target_gets_the_trained_parameters():
    backbone = tiny_backbone()
    cfg = load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none", "coop.ctx_init=a photo of a"])
    trained = build_method("coop", cfg, backbone, ["cat", "dog"])
    with torch.no_grad():
        trained.prompts.ctx.add_(0.5 * torch.randn_like(trained.prompts.ctx))
    target = Target("other", DatasetSplits("other", ["horse", "fish", "cat"]), cfg.data)
    x = torch.nn.functional.normalize(torch.randn(4, backbone.embed_dim), dim=-1)
    expected = build_method("coop", cfg, backbone, ["horse", "fish", "cat"])
    untrained = expected.predict(x)
    expected.load_trainable_state(trained.trainable_state(), "test")
    logits = scorer_for(trained, target, cfg)(x)
    assert torch.equal(logits, expected.predict(x)) and not torch.allclose(logits, untrained)


def test_protocol_recipe_is_the_default_and_overridable(tmp_path):
    assert load_config([], []).coop.ctx_init == ""  # CoOp's own paper: random init
    assert load_config([], ["protocol=base2novel"]).coop.ctx_init == "a photo of a"  # as the CoCoOp paper ran CoOp
    assert load_config([], ["protocol=cross_dataset", "coop.ctx_init="]).coop.ctx_init == ""
    explicit = tmp_path / "random_init.yaml"
    explicit.write_text("protocol: base2novel\ncoop:\n  ctx_init: ''\n")
    assert load_config([explicit], []).coop.ctx_init == ""
    assert "_given" not in dump_yaml(load_config([explicit], []))  # which keys were given is not a config key


def test_a_method_that_cannot_be_set_up_for_a_target_is_na_not_a_failed_run():
    """IVLP's prompts for a custom target's class name too long for the text tower: moved to the target after
    training, it is reported n/a with the reason, and the run's other results stand."""
    import dataclasses

    backbone = tiny_backbone()
    cfg = load_config([], ["backbone.model=tiny-clip", "backbone.pretrained=none", "ivlp.depth_text=2",
                           "ivlp.depth_vision=2", "data.name=dtd"])
    trained = build_method("ivlp", cfg, backbone, ["cat", "dog"])
    custom = dataclasses.replace(cfg.data, name="image_folder")
    long_name = " ".join(["extraordinarily"] * 80)
    score = scorer_for(trained, Target("mine", DatasetSplits("mine", ["horse", long_name]), custom), cfg)
    assert isinstance(score, NotApplicable)
    assert "ivlp cannot be set up for mine" in score.reason and "more than the text tower's context length" in \
        score.reason


def test_published_figures_are_data_with_their_setting():
    """The papers' averages live in promptlearn/data/published.yaml (the protocol notes' tables), not in code."""
    from promptlearn.protocols import PROTOCOLS, published_results

    b2n, xd = PROTOCOLS["base2novel"], PROTOCOLS["cross_dataset"]
    assert b2n.published["promptsrc"] == {"base": 84.26, "novel": 76.10, "HM": 79.97}
    assert b2n.published["zeroshot"]["HM"] == 71.70 and len(b2n.published_datasets) == 11
    assert xd.published == {"coop": {"average": 63.88}, "cocoop": {"average": 65.74},
                            "maple": {"average": 66.30}, "promptsrc": {"average": 65.81}}
    assert xd.published_datasets == ("imagenet",) and PROTOCOLS["domain_generalization"].published == {}
    assert all("ViT-B/16" in entry["setting"] for entry in published_results().values())
