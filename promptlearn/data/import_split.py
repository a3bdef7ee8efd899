"""Import the original code's cached few-shot draws, CoOp's split_fewshot/shot_{K}-seed_{S}.pkl, safely.

Those files pickle {"train": [Datum, ...], "val": [Datum, ...]} ("train" only for ImageNet), where Dassl's
Datum holds an absolute image path, a label, a domain and a class name. A restricted unpickler admits that
class alone, with exactly those four typed fields, and refuses everything else (any other class or function
is a code payload) naming the file. The stored paths point into the original user's disk: they are
re-rooted on the part after the dataset's folder (e.g. .../oxford_pets/images/x.jpg -> <data.root>/
oxford_pets/images/x.jpg) and must be items of promptlearn's own dataset with the same label; class names
come from promptlearn's dataset.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.coop_readers import SPLIT_FILE_DATASETS
from promptlearn.data.generic_readers import absolute
from promptlearn.errors import ConfigError, DataError

if TYPE_CHECKING:
    from promptlearn.config import DataConfig

DATUM_CLASS = ("dassl.data.datasets.base_dataset", "Datum")
DATUM_FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}
CACHED_NAME = re.compile(r"shot_(\d+)-seed_(\d+)\.pkl")

# the folder under data.root of each dataset whose original draws can be imported
ORIGINAL_FOLDERS = {
    **{spec.name: spec.folder for spec in SPLIT_FILE_DATASETS},
    "imagenet": "imagenet",
    "fgvc_aircraft": "fgvc_aircraft",
}


class StoredDatum:
    """What one pickled Datum holds; the unpickler builds this instead of Dassl's class."""

    __slots__ = ("impath", "label")

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or set(state) != set(DATUM_FIELDS):
            raise pickle.UnpicklingError(f"a Datum must hold exactly the fields {', '.join(DATUM_FIELDS)}")
        for key, kind in DATUM_FIELDS.items():
            if type(state[key]) is not kind:  # exact types: no bool for int, no str subclass
                raise pickle.UnpicklingError(f"Datum field {key} must be {kind.__name__}, got {state[key]!r}")
        self.impath, self.label = state["_impath"], state["_label"]


class DatumUnpickler(pickle.Unpickler):
    """Admits Dassl's Datum (as StoredDatum) and the plain containers pickle builds itself; nothing else."""

    def find_class(self, module: str, name: str) -> type:
        if (module, name) == DATUM_CLASS:
            return StoredDatum
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only {'.'.join(DATUM_CLASS)} is allowed")

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("it holds a persistent id, which a few-shot draw never has")


def read_datum_pickle(path: Path) -> dict[str, list[StoredDatum]]:
    """{"train": [...], optional "val": [...]} of a cached draw, read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            data = DatumUnpickler(f).load()
    except OSError as e:
        raise DataError(f"cannot read the original few-shot file {path}: {e.strerror}") from None
    except Exception as e:  # any malformed or hostile stream: one line naming the file
        raise DataError(f"refusing the original few-shot file {path}: {e}; only CoOp's split_fewshot "
                        "pickles of Dassl Datum items can be imported") from None
    valid = (
        isinstance(data, dict) and "train" in data and set(data) <= {"train", "val"}
        and all(isinstance(v, list) and all(isinstance(d, StoredDatum) and hasattr(d, "impath") for d in v)
                for v in data.values())
    )
    if not valid:
        raise DataError(f"refusing the original few-shot file {path}: expected a dict with a 'train' (and 'val') "
                        "list of Datum items, as CoOp's split_fewshot/shot_K-seed_S.pkl files hold")
    return data


def rerooted_item(stored: str, folder: str, dataset_dir: str, known: dict[str, Item]) -> Item | None:
    """Our item for a stored absolute path: the part after a `folder` component, under `dataset_dir`.

    Occurrences of `folder` are tried from the last, so a user folder of the same name earlier in the
    stored path does not matter."""
    parts = stored.replace("\\", "/").split("/")
    for index in reversed([i for i, part in enumerate(parts) if part == folder]):
        item = known.get(os.path.normpath(os.path.join(dataset_dir, *parts[index + 1:])))
        if item is not None:
            return item
    return None


def original_draw_file(data: "DataConfig") -> Path:
    """data.fewshot_import: the .pkl file itself, or a folder (CoOp's split_fewshot/) holding shot_K-seed_S.pkl."""
    path = Path(absolute(str(data.fewshot_import)))
    if path.is_dir():
        path = path / f"shot_{data.shots}-seed_{data.seed}.pkl"
    if not path.is_file():
        raise DataError(f"data.fewshot_import: {path} does not exist; point it at CoOp's split_fewshot folder "
                        "or one of its shot_K-seed_S.pkl files")
    named = CACHED_NAME.fullmatch(path.name)
    if named and (int(named[1]), int(named[2])) != (data.shots, data.seed):
        raise DataError(f"data.fewshot_import: {path} is the draw for {named[1]} shots and seed {named[2]}, "
                        f"but data.shots={data.shots} and data.seed={data.seed}; import the matching file")
    return path


def import_original_draw(data: "DataConfig", ds: DatasetSplits) -> tuple[list[Item], list[Item] | None]:
    """The train and val items (val None when the file has none: ImageNet) of the original's cached draw."""
    if data.name not in ORIGINAL_FOLDERS:
        raise ConfigError(f"data.fewshot_import works for the original code's datasets "
                          f"({', '.join(sorted(ORIGINAL_FOLDERS))}), not data.name={data.name!r}")
    path = original_draw_file(data)
    folder = ORIGINAL_FOLDERS[data.name]
    dataset_dir = os.path.join(absolute(data.root), folder)
    stored = read_datum_pickle(path)
    imported: dict[str, list[Item]] = {}
    for split, datums in stored.items():
        known = {item.path: item for item in getattr(ds, split)}
        items = []
        for datum in datums:
            item = rerooted_item(datum.impath, folder, dataset_dir, known)
            if item is None:
                raise DataError(f"{path}: {datum.impath} is not in the {split} split of {ds.name!r} under "
                                f"{dataset_dir}; check data.root and that the file is this dataset's")
            if item.label != datum.label:
                raise DataError(f"{path}: {datum.impath} has label {datum.label} there but {item.label} in "
                                f"promptlearn's {ds.name!r}; the class lists differ")
            items.append(item)
        imported[split] = items
    too_many = [ds.classnames[c] for c in range(ds.num_classes)
                if sum(it.label == c for it in imported["train"]) > data.shots]
    if too_many:
        raise DataError(f"{path} holds more than data.shots={data.shots} images of {too_many[:5]}; "
                        "import the file of the same shots and seed")
    return imported["train"], imported.get("val")
