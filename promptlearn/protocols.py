"""The field's evaluation protocols as named objects, chosen with the config key `protocol`.

- fewshot: train on K shots of every class, test on the dataset's test split (CoOp's protocol).
- base2novel: CoCoOp's base-to-novel generalisation. Classes sorted by label, the first ceil(n/2) are base,
  the rest novel, each half relabelled 0..; train on the base classes' shots, test on base and on novel
  test images, report HM = 2 B N / (B + N).
- cross_dataset: train on the source dataset (ImageNet, all classes), test on it and on each target dataset.
- domain_generalization: the same source model tested on ImageNet-V2, -Sketch, -A and -R.

A protocol decides from a method's Capabilities alone: a target whose classes the method did not train on
needs `unseen_classes` (the trained parameters are loaded into the method rebuilt for the target's
classes), a target holding a subset of the trained classes (ImageNet-A and -R: 200 of 1000) is scored by
selecting those classes' rows, so every method can. What a method cannot do is marked "n/a" with the
reason, never dropped. The runner never names a protocol; it calls these objects.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from promptlearn.config import RunConfig, apply, read_yaml
from promptlearn.data import build_dataset
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.fewshot import FewShotSplit
from promptlearn.errors import ConfigError, NonFinite
from promptlearn.evaluation import evaluate
from promptlearn.features import non_finite_rows
from promptlearn.methods import Capabilities, Method, build_method
from promptlearn.registry import Registry

if TYPE_CHECKING:
    from promptlearn.config import DataConfig
    from promptlearn.features import FeatureBank

CROSS_DATASET_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                         "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SELECTION_TEXT = {"validation": "hyper-parameters chosen on the few-shot validation split",
                  "none": "validation-free: fixed hyper-parameters, no validation split used"}


# ----------------------------------------------------------------------------- class splits

def base_novel_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's rule: labels in sorted order, the first ceil(n/2) are base, the remaining floor(n/2) novel."""
    cut = math.ceil(num_classes / 2)
    return list(range(cut)), list(range(cut, num_classes))


def relabel(items: list[Item], labels: list[int]) -> list[Item]:
    """The items of `labels` only, relabelled 0.. in the order of `labels`."""
    new = {old: i for i, old in enumerate(labels)}
    return [Item(it.path, new[it.label], it.classname) for it in items if it.label in new]


def keep_classes(dataset: DatasetSplits, labels: list[int], name: str) -> DatasetSplits:
    """The dataset restricted to `labels` in every split (other classes' images are gone), relabelled 0.."""
    return DatasetSplits(name, [dataset.classnames[c] for c in labels], relabel(dataset.train, labels),
                         relabel(dataset.val, labels), relabel(dataset.test, labels),
                         [dataset.class_ids[c] for c in labels] if dataset.class_ids else [])


def keep_draw_classes(draw: FewShotSplit, labels: list[int], name: str) -> FewShotSplit:
    """The draw's images of `labels` only, relabelled like keep_classes. CoCoOp draws the K shots over all
    classes and keeps the base classes afterwards: a draw over the base classes alone would give other
    images (other classes consume the generator in between)."""
    return dataclasses.replace(draw, dataset=name, train=relabel(draw.train, labels), val=relabel(draw.val, labels))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 B N / (B + N), the base-to-novel summary (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel else 0.0


# ----------------------------------------------------------------------------- evaluation on a target

@dataclass(frozen=True)
class Target:
    """A test set a protocol evaluates on: its name in the tables, its classes and test images, and the data
    config its zero-shot template comes from."""

    name: str
    dataset: DatasetSplits
    data: "DataConfig"
    folder: str = ""  # where its predictions go, under the method's folder ("": the folder itself)


@dataclass(frozen=True)
class NotApplicable:
    reason: str


def scorer_for(method: Method, target: Target, cfg: "RunConfig", trained_ids: list[str] | None = None):
    """Logits over the target's classes from the trained method, or NotApplicable with the reason.
    `trained_ids`: the class ids of the training set (DatasetSplits.class_ids). Where both sides have ids
    (ImageNet's wnids, class folders), a subset target's rows are found by id, never by display name, which
    two classes may share; a name two trained classes share never selects a row."""
    names = target.dataset.classnames  # what a classifier for the target is built from: ids only find rows
    trained, wanted = method.classnames, names
    ids = target.dataset.class_ids
    if trained_ids and ids and not set(trained_ids).isdisjoint(ids):  # one id scheme on both sides
        trained, wanted = trained_ids, ids
    if wanted == trained:
        return method.predict
    rows = {key: i for i, key in enumerate(trained)}
    if len(rows) == len(trained) and all(key in rows for key in wanted):  # a subset: its rows, in target order
        index = [rows[key] for key in wanted]
        return lambda features: method.predict(features)[:, index]
    if not method.caps.unseen_classes:
        return NotApplicable(f"{method.name} cannot score classes it did not train on (no unseen_classes "
                             f"capability; {target.name} has {len(names)} classes, not all trained)")
    run_cfg = copy.copy(cfg)
    run_cfg.data = target.data
    try:
        moved = build_method(method.name, run_cfg, method.backbone, names)
    except ConfigError as error:  # e.g. a published prompt the target has none of: n/a, not a failed run
        return NotApplicable(f"{method.name} cannot be set up for {target.name}: {error}")
    moved.load_trainable_state(method.trainable_state(), f"{method.name} trained on {len(trained)} classes")
    return moved.predict


def evaluate_on(method: Method, target: Target, bank: "FeatureBank", folder: Path, cfg: "RunConfig") -> dict:
    score = scorer_for(method, target, cfg, bank.dataset.class_ids)
    if isinstance(score, NotApplicable):
        return {"na": score.reason}
    test = method.test_features(bank, target.dataset)  # a method that learns inside the image encoder: its own
    logits = score(test.features)
    bad, first = non_finite_rows(logits)
    if bad:  # the features are finite (extraction checks them): the method made these
        advice = (f"its training diverged: try a lower {method.lr_key} or backbone.precision=fp32" if method.caps.trains
                  else "check the backbone's text tower weights and the method's settings")
        raise NonFinite(f"{method.name}: its logits on the {target.name} test images are not finite (NaN or inf) for "
                        f"{bad} of {len(logits)} images, e.g. {test.paths[first]}, though the image features are; "
                        f"{advice}. No result was written for it")
    return evaluate(logits, test.labels, test.paths, target.dataset.classnames, folder, cfg.eval.ece_bins)


def target_data(cfg: "RunConfig", entry: str) -> "DataConfig":
    """A target given as a registered dataset name (read under the run's data.root) or a YAML file of data keys."""
    data = copy.deepcopy(cfg.data)
    data.template, data.templates = None, []  # the target's own zero-shot template, not the source's
    if not entry.endswith((".yaml", ".yml")):
        data.name, data.path = entry, None
        return data
    keys = read_yaml(entry)
    other = [k for k in keys if not k.startswith("data.")]
    if other:
        raise ConfigError(f"target {entry}: a target YAML holds data keys only (data.name, data.path, ...), "
                          f"not {', '.join(other)}")
    holder = RunConfig()
    holder.data = data
    return apply(holder, keys, entry).data


# ----------------------------------------------------------------------------- protocols

class Protocol:
    """What a paper fixes: which classes train, which test sets are evaluated, how results combine."""

    name = "protocol"
    summary = ""
    default_targets: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = (("accuracy", "accuracy (%)"),)

    def unable(self, cfg: "RunConfig", caps: Capabilities) -> str | None:
        """Why a method cannot take part at all (n/a for the whole run), or None."""
        if cfg.selection == "none" and caps.uses_validation:
            return ("chooses its hyper-parameters on the few-shot validation split, which selection=none leaves "
                    "out (give it fixed values, e.g. linear_probe.c)")
        return None

    def training_split(self, cfg: "RunConfig", dataset: DatasetSplits,
                       draw: FewShotSplit) -> tuple[DatasetSplits, FewShotSplit]:
        """The classes and few-shot images methods train and select on; validation-free (selection=none)
        keeps no validation images at all."""
        if cfg.selection == "none":
            draw = dataclasses.replace(draw, val=[])
        return dataset, draw

    def targets(self, cfg: "RunConfig", dataset: DatasetSplits) -> list[Target]:
        return [Target(dataset.name, dataset, cfg.data)]

    def table_columns(self, metrics: dict[str, dict]) -> list[tuple[str | tuple[str, str], str]]:
        """(metric key, header) of a run's table; a tuple key reads a nested entry."""
        return [*self.columns, ("macro_f1", "macro-F1 (%)"), ("ece", "ECE (%)")]

    # a sweep's report: the values of one result row, derived columns, and published figures to show beside
    @property
    def published(self) -> dict[str, dict[str, float]]:
        """Method -> column -> the papers' value (promptlearn/data/published.yaml), printed as
        "<method> (published)"; none for a protocol without published averages."""
        return published_results().get(self.name, {}).get("figures", {})

    @property
    def published_datasets(self) -> tuple[str, ...]:
        """The datasets the published averages cover."""
        return tuple(published_results().get(self.name, {}).get("datasets", ()))

    def report_values(self, row: dict) -> dict[str, float | None]:
        return {"accuracy": row["accuracy"]}

    def published_applies(self, cfg: "RunConfig", datasets: list[str]) -> bool:
        """Published figures are shown only for the papers' setting: ViT-B/16 with OpenAI's weights, 16 shots,
        the same datasets (and targets)."""
        return (bool(self.published) and cfg.backbone.model in ("ViT-B-16", "ViT-B-16-quickgelu")
                and cfg.backbone.pretrained == "openai" and cfg.data.shots == 16
                and sorted(datasets) == sorted(self.published_datasets)
                and sorted(cfg.targets or self.default_targets) == sorted(self.default_targets))

    def derived(self, means: dict[str, float | None]) -> dict[str, float | None]:
        """Columns computed from the mean columns (base-to-novel: HM of the mean base and novel accuracies)."""
        return {}

    def not_run(self, reason: str) -> dict:
        """The metrics of a method that cannot take part: every column n/a, with the reason."""
        return {**{key: None for key, _ in self.columns}, "accuracy": None, "na": {"run": reason}}

    def combine(self, results: dict[str, dict]) -> dict:
        """One method's metrics from its per-target results (the first target's in the usual keys)."""
        first = next(iter(results.values()))
        combined = dict(first) if "na" not in first else {"accuracy": None}
        if len(results) > 1:
            combined["evaluations"] = results
        combined["na"] = {name: r["na"] for name, r in results.items() if "na" in r}
        return combined


PROTOCOLS: Registry[Protocol] = Registry("protocol")
PUBLISHED_FILE = Path(__file__).parent / "data" / "published.yaml"


@functools.cache
def published_results() -> dict:
    """Protocol -> {setting, datasets, figures}: the papers' averages (promptlearn/data/published.yaml)."""
    with open(PUBLISHED_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    PROTOCOLS.add(cls.name, cls())
    return cls


@register_protocol
class FewShot(Protocol):
    name = "fewshot"
    summary = "few-shot on all classes (CoOp): K shots per class, test on the dataset's test split"

    def targets(self, cfg, dataset):
        if cfg.targets:
            raise ConfigError("targets lists test sets for protocol=cross_dataset or domain_generalization; "
                              "protocol=fewshot tests on the dataset itself: remove targets or set protocol")
        return super().targets(cfg, dataset)


@register_protocol
class BaseToNovel(Protocol):
    name = "base2novel"
    summary = ("base-to-novel (CoCoOp): classes sorted by label, first ceil(n/2) base, rest novel; train on "
               "the base classes' shots, test on base and novel, HM = 2BN/(B+N)")
    columns = (("base_accuracy", "base (%)"), ("novel_accuracy", "novel (%)"), ("hm", "HM (%)"))
    def training_split(self, cfg, dataset, draw):
        base, _ = base_novel_labels(dataset.num_classes)
        return super().training_split(cfg, keep_classes(dataset, base, f"{dataset.name}-base"),
                                      keep_draw_classes(draw, base, f"{dataset.name}-base"))

    def targets(self, cfg, dataset):
        FewShot().targets(cfg, dataset)  # the same refusal of `targets`
        base, novel = base_novel_labels(dataset.num_classes)
        return [Target("base", keep_classes(dataset, base, f"{dataset.name}-base"), cfg.data, "base"),
                Target("novel", keep_classes(dataset, novel, f"{dataset.name}-novel"), cfg.data, "novel")]

    def table_columns(self, metrics):
        return list(self.columns)  # the paper's layout: base / novel / HM

    def report_values(self, row):
        return {"base": row["base_accuracy"], "novel": row["novel_accuracy"]}

    def derived(self, means):
        b, n = means.get("base"), means.get("novel")
        return {"HM": harmonic_mean(b, n) if b is not None and n is not None else None}

    def combine(self, results):
        combined = super().combine(results)
        b, n = (results[k].get("accuracy") for k in ("base", "novel"))
        combined.update(base_accuracy=b, novel_accuracy=n,
                        hm=harmonic_mean(b, n) if b is not None and n is not None else None)
        return combined


@register_protocol
class CrossDataset(Protocol):
    name = "cross_dataset"
    summary = ("cross-dataset transfer: train on the source dataset (all classes), test on the source and on "
               "each target dataset")
    default_targets = CROSS_DATASET_TARGETS
    columns = (("source_accuracy", "source (%)"), ("targets_average", "targets average (%)"))

    def report_values(self, row):
        return {"source": row["accuracy"], **row["target_accuracy"], "average": row["targets_average"]}

    def targets(self, cfg, dataset):
        found = [Target(dataset.name, dataset, cfg.data, dataset.name)]
        for entry in cfg.targets or self.default_targets:
            data = target_data(cfg, entry)
            target = build_dataset(data)
            # a target YAML names the target: a generic reader names a dataset by its folder, which may say
            # only "test"
            name = Path(entry).stem if entry.endswith((".yaml", ".yml")) else target.name
            if target.name == dataset.name or any(t.name == name for t in found):
                raise ConfigError(f"targets: {entry!r} is the dataset {name!r}, already a test set of "
                                  "this run; list each target once and not the source")
            found.append(Target(name, target, data, name))
        return found

    def table_columns(self, metrics):
        names = dict.fromkeys(t for m in metrics.values() for t in m.get("target_accuracy") or {})
        return [self.columns[0], *[(("target_accuracy", t), f"{t} (%)") for t in names], self.columns[1]]

    def combine(self, results):
        combined = super().combine(results)
        source, *targets = results
        accuracies = [results[t].get("accuracy") for t in targets]
        combined.update(source_accuracy=results[source].get("accuracy"),
                        target_accuracy=dict(zip(targets, accuracies)),
                        targets_average=(sum(accuracies) / len(accuracies)
                                         if accuracies and None not in accuracies else None))
        return combined


@register_protocol
class DomainGeneralization(CrossDataset):
    name = "domain_generalization"
    summary = ("domain generalisation: the source model tested on shifted versions of its dataset (by default "
               "ImageNet-V2, -Sketch, -A and -R); a target holding a subset of the trained classes (ImageNet-A "
               "and -R: 200) is scored with those classes' rows")
    default_targets = IMAGENET_VARIANTS


def protocol_for(cfg: "RunConfig") -> Protocol:
    return PROTOCOLS.get(cfg.protocol)
