"""One registry from a dataset name to its facts: reader, zero-shot template(s), protocol epochs."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from promptlearn.data.base import DatasetSplits
from promptlearn.errors import DataError
from promptlearn.registry import Registry

if TYPE_CHECKING:
    from promptlearn.config import DataConfig

Reader = Callable[["DataConfig"], DatasetSplits]
DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATE_FILE = Path(__file__).with_name("templates.yaml")  # the authors' prompt ensembles, with their sources


@functools.cache
def ensemble(name: str) -> list[str]:
    """A prompt ensemble of templates.yaml (imagenet_7: Tip-Adapter's, LP++'s and CLAP's; imagenet_60: PromptSRC's)."""
    with open(TEMPLATE_FILE, encoding="utf-8") as f:
        return list(yaml.safe_load(f)[name]["templates"])



@dataclass(frozen=True)
class DatasetInfo:
    name: str
    reader: Reader
    template: str = DEFAULT_TEMPLATE  # CoOp's zero-shot template for the dataset
    epochs: int | None = None  # protocol epochs fixed whatever the shots (ImageNet: 50)
    evaluation_only: bool = False  # a test set only (ImageNet-V2, -Sketch, -A, -R)
    layout: str = ""  # where its files go under data.root, for listings and docs


DATASETS: Registry[DatasetInfo] = Registry("dataset", DataError, filled_by="promptlearn.data")


def register_dataset(name: str, template: str = DEFAULT_TEMPLATE, epochs: int | None = None,
                     evaluation_only: bool = False, layout: str = "") -> Callable[[Reader], Reader]:
    def add(reader: Reader) -> Reader:
        DATASETS.add(name, DatasetInfo(name, reader, template, epochs, evaluation_only, layout))
        return reader

    return add


def build_dataset(cfg: "DataConfig") -> DatasetSplits:
    return DATASETS.get(cfg.name).reader(cfg)


def chosen_templates(cfg: "DataConfig") -> list[str]:
    """The template(s) the run sets (data.templates, else data.template), which win over any method's; [] if none."""
    if cfg.templates:
        return list(cfg.templates)
    return [cfg.template] if cfg.template is not None else []


def dataset_templates(cfg: "DataConfig") -> list[str]:
    """The zero-shot template(s): those the run sets, else the dataset's own."""
    if chosen_templates(cfg):
        return chosen_templates(cfg)
    return [DATASETS.get(cfg.name).template]
