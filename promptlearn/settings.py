"""What each listed method runs with, and why: its epochs, the recipe it ran (recorded in metrics.json and
run_info.json) and its effective settings with their sources (--print-config's `effective`). Above the config
and the data registry; the methods and the recipes read it."""
from __future__ import annotations

import dataclasses
from typing import Any

from promptlearn.config import (
    TRAINING_KEYS,
    RunConfig,
    TrainConfig,
    TrainingKeys,
    applied_recipes,
    origins,
    protocol_epochs,
    training_settings,
)
from promptlearn.data.registry import DATASETS
from promptlearn.registry import METHODS


def same_model(published: str | None, model: str) -> bool:
    """Whether a recipe entry's backbone is the run's (open_clip's -quickgelu twin is the same model); an entry
    that names none fits every backbone."""
    return published is None or published.lower().removesuffix("-quickgelu") == model.lower().removesuffix(
        "-quickgelu")


def run_epochs(cfg: RunConfig, train: TrainConfig) -> int:
    """The epochs a trainer runs: the method's (or train.epochs), else the protocol's for the run's shots."""
    if train.epochs is not None:
        return train.epochs
    fixed = DATASETS[cfg.data.name].epochs if cfg.data.name in DATASETS else None
    return protocol_epochs(cfg.data.shots, fixed)


def unread(method: str, key: str) -> bool:
    """Whether a section key is a training key its method does not read (a given train.<key> lands there too)."""
    leaf = key.partition(".")[2]
    return method in METHODS and leaf in TRAINING_KEYS and leaf not in METHODS[method].training_keys


def method_recipe(cfg: RunConfig, method: str) -> dict[str, Any]:
    """Which recipe a method ran (metrics.json, run_info.json): published or promptlearn's, the published
    entries applied, whether their settings were published for the run's backbone (`for_backbone`: every entry
    that sets values names this backbone or none), and the keys it reads that a file or the
    command line changed in its section (the run then is not the published recipe as it stands)."""
    section = METHODS[method].section if method in METHODS else None
    changed = sorted(k for k, v in origins(cfg).items() if section and k.startswith(f"{section}.")
                     and not v.startswith("recipe ") and not unread(method, k))
    entries = applied_recipes(cfg).get(method, [])
    setting = [r for r in entries if r.settings]
    return {"recipe": cfg.recipe, "entries": [f"{r.repository} {r.source}" for r in entries],
            "for_backbone": all(same_model(r.backbone, cfg.backbone.model) for r in setting),
            "changed": changed}


def effective(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Per listed method, every setting of its section as it runs (training keys resolved through train.* and
    the protocol's epochs; a training key the method does not read is left out) with where the value came from:
    default, recipe (its source), a file, the command line, or the train.<key> it followed."""
    out: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        section = METHODS[method].section if method in METHODS else None
        own = cfg.sections.get(section) if section else None
        settings: dict[str, Any] = {"recipe": {"value": cfg.recipe,
                                               "from": "; ".join(method_recipe(cfg, method)["entries"]) or "-"}}
        train = training_settings(cfg, section)
        for f in dataclasses.fields(own) if own is not None else ():
            key, value = f"{section}.{f.name}", getattr(own, f.name)
            if unread(method, key):
                continue
            source = origins(cfg).get(key, "default")
            if isinstance(own, TrainingKeys) and f.name in TRAINING_KEYS and value is None:
                value = getattr(train, f.name)
                source = f"train.{f.name} ({origins(cfg).get(f'train.{f.name}', 'default')})"
                if f.name == "epochs" and value is None and METHODS[method].unset_epochs:
                    source = METHODS[method].unset_epochs
                elif f.name == "epochs" and value is None:
                    value = run_epochs(cfg, train)
                    source = f"protocol {cfg.protocol}'s epochs for {cfg.data.shots} shots"
            settings[f.name] = {"value": value, "from": source}
        out[method] = settings
    return out
