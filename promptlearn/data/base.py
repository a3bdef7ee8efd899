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
    """Class names and train / val / test items of one dataset. `val` may be empty. `class_ids` identify the
    classes where the reader knows more than a display name (ImageNet's wnids, a class folder's name): two
    classes may share a display name (ImageNet's "missile" and "sunglasses"), never an identifier."""

    name: str
    classnames: list[str]
    train: list[Item] = field(default_factory=list)
    val: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)
    class_ids: list[str] = field(default_factory=list)  # per label; empty: the class names identify the classes

    def __post_init__(self) -> None:
        n = len(self.classnames)
        if self.class_ids and len(self.class_ids) != n:
            raise ValueError(f"dataset {self.name!r}: {len(self.class_ids)} class ids for {n} classes")
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
