"""The dataset record every reader returns."""
from __future__ import annotations

from dataclasses import dataclass, field

from promptlearn.errors import DataError


@dataclass(frozen=True)
class Item:
    path: str  # absolute image path
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """Class names and train / val / test items of one dataset. `val` may be empty."""

    name: str
    classnames: list[str]
    train: list[Item] = field(default_factory=list)
    val: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.classnames)
        for split in ("train", "val", "test"):
            for item in getattr(self, split):
                if not 0 <= item.label < n:
                    raise DataError(
                        f"dataset {self.name!r}: {split} item {item.path} has label {item.label}, "
                        f"outside 0..{n - 1} for {n} classes; fix the split file or class list"
                    )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
