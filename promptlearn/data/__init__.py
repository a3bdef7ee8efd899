"""Datasets: readers for CoOp's layouts and generic folders, few-shot draws, transforms, loaders.

Importing this package registers every reader, so `DATASETS` is complete."""
from promptlearn.data import coop_readers, generic_readers  # noqa: F401  (registration)
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.registry import DATASETS, DatasetInfo, build_dataset, dataset_templates, register_dataset

__all__ = ["DatasetSplits", "Item", "DATASETS", "DatasetInfo", "build_dataset", "dataset_templates",
           "register_dataset"]
