"""Few-shot draws: K images per class for training and min(K, 4) for validation, saved as JSON.

A draw depends only on (dataset, K, seed): items are sorted by path before sampling and the
generator is seeded from a string (hashed with SHA-512 by `random`, not by Python's salted hash).
"""
from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from promptlearn.data.base import DatasetSplits, Item
from promptlearn.errors import DataError
from promptlearn.io import atomic_write_json

log = logging.getLogger("promptlearn")


@dataclass
class FewShotSplit:
    dataset: str
    shots: int
    seed: int
    train: list[Item]
    val: list[Item]


def val_shots(shots: int) -> int:
    return min(shots, 4)


def _by_class(items: list[Item]) -> dict[int, list[Item]]:
    groups: dict[int, list[Item]] = defaultdict(list)
    for item in sorted(items, key=lambda it: (it.label, it.path)):
        groups[item.label].append(item)
    return groups


def draw_few_shot(ds: DatasetSplits, shots: int, seed: int) -> FewShotSplit:
    rng = random.Random(f"{ds.name}|shots={shots}|seed={seed}")
    train_pool = _by_class(ds.train)
    empty = [ds.classnames[c] for c in range(ds.num_classes) if not train_pool.get(c)]
    if empty:
        raise DataError(f"dataset {ds.name!r}: no training images for classes {empty[:10]}; "
                        "add images or remove these classes")
    train, short = [], []
    for label in sorted(train_pool):
        pool = train_pool[label]
        if len(pool) < shots:
            short.append(f"{ds.classnames[label]} ({len(pool)})")
        train.extend(rng.sample(pool, min(shots, len(pool))))
    if short:
        log.warning("dataset %s: %d classes have fewer than %d training images and keep all they "
                    "have: %s", ds.name, len(short), shots, ", ".join(short))
    # validation comes from the val split, or from training images not drawn when there is none
    chosen = {it.path for it in train}
    val_pool = _by_class(ds.val) if ds.val else _by_class([it for it in ds.train if it.path not in chosen])
    val = []
    for label in sorted(val_pool):
        pool = val_pool[label]
        val.extend(rng.sample(pool, min(val_shots(shots), len(pool))))
    return FewShotSplit(ds.name, shots, seed, train, val)


def fewshot_path(folder: str | Path, shots: int, seed: int) -> Path:
    return Path(folder) / f"shot_{shots}-seed_{seed}.json"


def save_few_shot(split: FewShotSplit, path: Path) -> None:
    atomic_write_json(path, {
        "dataset": split.dataset, "shots": split.shots, "seed": split.seed,
        "train": [[it.path, it.label, it.classname] for it in split.train],
        "val": [[it.path, it.label, it.classname] for it in split.val],
    })


def load_few_shot(path: Path, ds: DatasetSplits, shots: int, seed: int) -> FewShotSplit:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        header = (data["dataset"], data["shots"], data["seed"])
        splits = {k: [Item(str(p), int(l), str(c)) for p, l, c in data[k]] for k in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"few-shot file {path} is unreadable ({e}); delete it to draw again") from None
    if header != (ds.name, shots, seed):
        raise DataError(f"few-shot file {path} is for {header}, not ({ds.name!r}, {shots}, {seed}); "
                        "delete it or use another folder")
    known = {it.path: it.label for it in [*ds.train, *ds.val]}
    for item in [*splits["train"], *splits["val"]]:
        if known.get(item.path) != item.label:
            raise DataError(f"few-shot file {path} lists {item.path} (label {item.label}), which is not in "
                            f"dataset {ds.name!r} with that label; delete the file to draw again")
    return FewShotSplit(ds.name, shots, seed, splits["train"], splits["val"])


def load_or_draw(ds: DatasetSplits, shots: int, seed: int, folder: str | Path) -> FewShotSplit:
    """Reuse the saved draw in `folder` or draw and save it."""
    path = fewshot_path(folder, shots, seed)
    if path.is_file():
        return load_few_shot(path, ds, shots, seed)
    split = draw_few_shot(ds, shots, seed)
    save_few_shot(split, path)
    return split
