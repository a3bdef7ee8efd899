"""Few-shot draws: K images per class for training and min(K, 4) for validation (`data.val_shots` sets
another validation size), saved as JSON.

Two draws (`data.draw`):
- "reference" (default): the original code's draw (Dassl's generate_fewshot_dataset after
  set_random_seed), so seed S gives the images the published CoOp / CoCoOp / Tip-Adapter runs used:
  Python's `random` seeded with the integer seed; classes in the order their label first appears in
  the train list; within a class the listing order; `sample(items, K)` for a class with at least K
  items, all of them (without touching the generator) otherwise; then the validation draw, min(K, 4)
  per class (or `data.val_shots`), continues on the same generator. It depends on the listing order:
  split files and CSVs in file order, folders in sorted order.
- "sorted": independent of the listing order: items sorted by path, the generator seeded from a
  string of (dataset, K, seed) (hashed with SHA-512 by `random`, not by Python's salted hash).

Without a val split (ImageNet, whose original val is its test set) validation comes from the training
images not drawn, so nothing is ever selected on the test set.
"""
from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from promptlearn.config import DRAWS, DataConfig
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.import_split import import_original_draw
from promptlearn.errors import DataError
from promptlearn.io import atomic_write_json

log = logging.getLogger("promptlearn")

IMPORTED = "imported"  # the draw of a split file imported from the original code (data.fewshot_import)


@dataclass
class FewShotSplit:
    dataset: str
    shots: int
    seed: int
    train: list[Item]
    val: list[Item]
    draw: str = "reference"  # one of DRAWS, or IMPORTED


def val_per_class(shots: int, val_shots: str | None = None) -> int:
    """Validation images per class under data.val_shots: unset, CoOp's min(K, 4); "shots", K (LP++'s
    authors draw K per class from the val split); otherwise the number it gives."""
    if val_shots is None:
        return min(shots, 4)
    return shots if val_shots == "shots" else int(val_shots)


def by_class_in_listing_order(items: Iterable[Item]) -> dict[int, list[Item]]:
    """Items by label: labels in the order they first appear, items in listing order (as Dassl's split by label)."""
    groups: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return groups


def by_class_sorted(items: Iterable[Item]) -> dict[int, list[Item]]:
    """Items by label; labels ascending, items sorted by path."""
    return by_class_in_listing_order(sorted(items, key=lambda it: (it.label, it.path)))


def sample_per_class(groups: dict[int, list[Item]], shots: int, rng: random.Random) -> list[Item]:
    """`shots` items of each class in `groups` order; a smaller class gives all it has and draws nothing."""
    drawn: list[Item] = []
    for pool in groups.values():
        drawn.extend(rng.sample(pool, shots) if len(pool) >= shots else pool)
    return drawn


def check_classes(ds: DatasetSplits, groups: dict[int, list[Item]], shots: int) -> None:
    """An error for classes without training images, a warning for those with fewer than `shots`."""
    empty = [ds.classnames[c] for c in range(ds.num_classes) if not groups.get(c)]
    if empty:
        raise DataError(f"dataset {ds.name!r}: no training images for classes {empty[:10]}; "
                        "add images or remove these classes")
    warn_short(ds, groups, shots, "training")


def warn_short(ds: DatasetSplits, groups: dict[int, list[Item]], wanted: int, kind: str) -> None:
    """Name the classes with fewer than `wanted` images to draw from: they keep all they have."""
    short = [f"{ds.classnames[c]} ({len(groups.get(c, []))})" for c in range(ds.num_classes)
             if len(groups.get(c, [])) < wanted]
    if short:
        log.warning("dataset %s: %d classes have fewer than %d %s images and keep all they "
                    "have: %s", ds.name, len(short), wanted, kind, ", ".join(short))


def draw_few_shot(ds: DatasetSplits, shots: int, seed: int, draw: str = "reference",
                  val_shots: str | None = None) -> FewShotSplit:
    """The training draw, then the validation draw on the same generator (so its size never changes the
    training images); `val_shots` as data.val_shots."""
    if draw not in DRAWS:
        raise DataError(f"data.draw={draw!r} is no few-shot draw; use one of {', '.join(DRAWS)}")
    group = by_class_in_listing_order if draw == "reference" else by_class_sorted
    rng = random.Random(seed if draw == "reference" else f"{ds.name}|shots={shots}|seed={seed}")
    train_pool = group(ds.train)
    check_classes(ds, train_pool, shots)
    train = sample_per_class(train_pool, shots, rng)
    val = draw_validation(ds, group(ds.val or not_drawn(ds.train, train)), shots, val_shots, rng)
    return FewShotSplit(ds.name, shots, seed, train, val, draw)


def draw_validation(ds: DatasetSplits, pool: dict[int, list[Item]], shots: int, val_shots: str | None,
                    rng: random.Random) -> list[Item]:
    """The validation images per class that data.val_shots asks for, from `pool` (the val split, or the
    training images the K-shot draw left). As with data.shots, a size that no class has is refused; a class
    with fewer keeps all it has, with a warning."""
    per_class, largest = val_per_class(shots, val_shots), max(map(len, pool.values()), default=0)
    if val_shots is not None and 0 < largest < per_class:
        source = "its val split" if ds.val else "the training images the K-shot draw leaves"
        raise DataError(f"data.val_shots={val_shots} asks for {per_class} validation images per class, but no class "
                        f"of dataset {ds.name!r} has that many in {source} (the largest has {largest}); set "
                        f"data.val_shots={largest} or fewer")
    warn_short(ds, pool, per_class, "validation")
    return sample_per_class(pool, per_class, rng)


def not_drawn(items: list[Item], drawn: list[Item]) -> list[Item]:
    chosen = {it.path for it in drawn}
    return [it for it in items if it.path not in chosen]


def fewshot_path(folder: str | Path, shots: int, seed: int, val_shots: str | None = None) -> Path:
    """shot_K-seed_S.json for CoOp's validation size, shot_K-seed_S-val_V.json for V per class otherwise:
    a draw is never reused for another validation size."""
    per_class = val_per_class(shots, val_shots)
    other_size = f"-val_{per_class}" if per_class != val_per_class(shots) else ""
    return Path(folder) / f"shot_{shots}-seed_{seed}{other_size}.json"


def save_few_shot(split: FewShotSplit, path: Path, val_shots: int) -> None:
    atomic_write_json(path, {
        "dataset": split.dataset, "shots": split.shots, "seed": split.seed, "draw": split.draw,
        "val_shots": val_shots,
        "train": [[it.path, it.label, it.classname] for it in split.train],
        "val": [[it.path, it.label, it.classname] for it in split.val],
    })


def load_few_shot(path: Path, ds: DatasetSplits, shots: int, seed: int, draw: str = "reference",
                  val_shots: str | None = None) -> FewShotSplit:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        header = (data["dataset"], data["shots"], data["seed"])
        saved_draw = data.get("draw", "sorted")  # files without the key predate the reference draw
        saved_val_shots = data.get("val_shots", val_per_class(shots))  # files without it predate data.val_shots
        splits = {k: [Item(str(p), int(l), str(c)) for p, l, c in data[k]] for k in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"few-shot file {path} is unreadable ({e}); delete it to draw again") from None
    if header != (ds.name, shots, seed):
        raise DataError(f"few-shot file {path} is for {header}, not ({ds.name!r}, {shots}, {seed}); "
                        "delete it or use another folder")
    if saved_draw != draw:
        raise DataError(f"few-shot file {path} holds the {saved_draw!r} draw, not the {draw!r} one asked for; "
                        "delete it or use another data.fewshot_dir")
    if saved_val_shots != val_per_class(shots, val_shots):
        raise DataError(f"few-shot file {path} holds {saved_val_shots} validation images per class, not the "
                        f"{val_per_class(shots, val_shots)} data.val_shots asks for; delete it or use another "
                        "data.fewshot_dir")
    known = {it.path: it.label for it in [*ds.train, *ds.val]}
    for item in [*splits["train"], *splits["val"]]:
        if known.get(item.path) != item.label:
            raise DataError(f"few-shot file {path} lists {item.path} (label {item.label}), which is not in "
                            f"dataset {ds.name!r} with that label; delete the file to draw again")
    return FewShotSplit(ds.name, shots, seed, splits["train"], splits["val"], saved_draw)


def load_or_draw(ds: DatasetSplits, data: DataConfig, folder: str | Path) -> FewShotSplit:
    """Reuse the saved draw in `folder`, else import data.fewshot_import or draw with data.draw, and save it."""
    path = fewshot_path(folder, data.shots, data.seed, data.val_shots)
    draw = IMPORTED if data.fewshot_import else data.draw
    if path.is_file():
        return load_few_shot(path, ds, data.shots, data.seed, draw, data.val_shots)
    per_class = val_per_class(data.shots, data.val_shots)
    if data.fewshot_import:
        train, val = import_original_draw(data, ds)
        if val is None:  # ImageNet's file has no val (its original val is the test set): from undrawn train images
            val = draw_validation(ds, by_class_in_listing_order(not_drawn(ds.train, train)), data.shots,
                                  data.val_shots, random.Random(data.seed))
        elif per_class != val_per_class(data.shots):
            raise DataError(f"data.val_shots={data.val_shots} asks for {per_class} validation images per class, "
                            f"but the original's draw {data.fewshot_import} holds min(K, 4); unset data.val_shots, "
                            "or drop data.fewshot_import: the reference draw gives the same training images")
        split = FewShotSplit(ds.name, data.shots, data.seed, train, val, IMPORTED)
        log.info("few-shot draw imported from %s", data.fewshot_import)
    else:
        split = draw_few_shot(ds, data.shots, data.seed, data.draw, data.val_shots)
    save_few_shot(split, path, per_class)
    return split
