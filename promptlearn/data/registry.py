"""One registry from a dataset name to its reader."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from promptlearn.data.base import DatasetSplits
from promptlearn.errors import DataError, unknown_name_message

if TYPE_CHECKING:
    from promptlearn.config import DataConfig

Reader = Callable[["DataConfig"], DatasetSplits]
DATASETS: dict[str, Reader] = {}


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    def add(reader: Reader) -> Reader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        DATASETS[name] = reader
        return reader

    return add


def build_dataset(cfg: "DataConfig") -> DatasetSplits:
    import promptlearn.data.readers  # noqa: F401  (registers the readers)

    if cfg.name not in DATASETS:
        raise DataError(unknown_name_message("dataset", cfg.name, DATASETS))
    return DATASETS[cfg.name](cfg)
