"""Datasets: readers for CoOp's layouts and generic folders, few-shot draws, transforms, loaders."""
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.registry import DATASETS, build_dataset, register_dataset

__all__ = ["DatasetSplits", "Item", "DATASETS", "build_dataset", "register_dataset"]
