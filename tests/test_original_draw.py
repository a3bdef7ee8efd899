"""The original code's few-shot draw (Dassl's generate_fewshot_dataset after set_random_seed), the import of
its cached split_fewshot pickles, and ImageNet's labels by sorted wnid.

The oracle below states the five rules of the original draw (issue 19), each one switchable so the tests
show that the fixture breaks the match when any rule changes:
1. Python's `random` seeded with the integer seed (nothing else draws before);
2. labels visited in the order they first appear in the split file's train list;
3. within a label, items keep the split file's order;
4. a class with at least K items gets sample(items, K); a smaller class gets all, without touching the generator;
5. the validation draw, min(K, 4) per class from the val list, continues on the same generator.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
import types
from pathlib import Path

import pytest
from fixtures_data import IMAGENET_CLASSES, make_imagenet, make_oxford_pets, write_wnid_classnames

from promptlearn.config import DataConfig, load_config
from promptlearn.data import DatasetSplits, build_dataset
from promptlearn.data.fewshot import draw_few_shot, fewshot_path, load_or_draw
from promptlearn.errors import ConfigError, DataError
from promptlearn.protocols import keep_draw_classes

RULES = {"integer_seed": True, "first_appearance": True, "file_order": True, "short_untouched": True,
         "same_generator": True}
CASES = [(seed, shots) for seed in (1, 2, 3) for shots in (1, 2, 4, 16)]


def original_draw(split: dict, shots: int, seed: int, **changed: bool) -> tuple[list, list]:
    """(train rows, val rows) the original draws from a split file's rows, under RULES with `changed` ones off."""
    rules = {**RULES, **changed}
    random.seed(seed if rules["integer_seed"] else str(seed))
    drawn = []
    for rows, k in ((split["train"], shots), (split["val"], min(shots, 4))):
        if not rules["same_generator"] and rows is split["val"]:
            random.seed(seed)
        ordered = rows if rules["file_order"] else sorted(rows)
        by_label: dict[int, list] = {}
        for row in ordered:
            by_label.setdefault(row[1], []).append(row)
        labels = list(by_label) if rules["first_appearance"] else sorted(by_label)
        out = []
        for label in labels:
            items = by_label[label]
            if len(items) >= k:
                out += random.sample(items, k)
            else:
                out += items if rules["short_untouched"] else random.sample(items, len(items))
        drawn.append(out)
    return drawn[0], drawn[1]


CLASSES = ["Abyssinian", "beagle", "Bengal", "boxer", "chihuahua"]


def unsorted_split() -> dict:
    """A split file in no sorted order: labels first appear as 3, 1, 4, 0, 2; class 1 (beagle) has only 3
    training images and 1 val image; file names are listed in a shuffled order."""
    shuffle = random.Random(99)
    split = {}
    for name, sizes in (("train", {3: 20, 1: 3, 4: 18, 0: 21, 2: 19}), ("val", {3: 6, 1: 1, 4: 5, 0: 7, 2: 6}),
                        ("test", {3: 1, 1: 1, 4: 1, 0: 1, 2: 1})):
        rows = [[f"{CLASSES[label]}_{name}{i:02d}.png", label, CLASSES[label]]
                for label, count in sizes.items() for i in range(count)]
        head, tail = rows[:1], rows[1:]  # keep label 3 first, shuffle the rest
        shuffle.shuffle(tail)
        split[name] = head + tail
    return split


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    split = unsorted_split()
    make_oxford_pets(root, split)
    return root, split, build_dataset(DataConfig(name="oxford_pets", root=str(root)))


def relative(items, ds_root: Path) -> list[str]:
    image_dir = ds_root / "oxford_pets" / "images"
    return [os.path.relpath(it.path, image_dir) for it in items]


def test_reference_draw_is_the_original_draw(pets):
    root, split, ds = pets
    for seed, shots in CASES:
        train, val = original_draw(split, shots, seed)
        drawn = draw_few_shot(ds, shots, seed)
        assert relative(drawn.train, root) == [row[0] for row in train]
        assert relative(drawn.val, root) == [row[0] for row in val]
        assert sum(it.label == 1 for it in drawn.train) == min(shots, 3)


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_matters_on_the_fixture(pets, rule):
    root, split, ds = pets
    differs = []
    for seed, shots in CASES:
        train, val = original_draw(split, shots, seed, **{rule: False})
        drawn = draw_few_shot(ds, shots, seed)
        differs.append(relative(drawn.train + drawn.val, root) != [row[0] for row in train + val])
    assert any(differs), f"the fixture does not tell rule {rule} apart"


def test_sorted_draw_is_not_the_original(pets):
    root, split, ds = pets
    train, _ = original_draw(split, 4, 1)
    assert relative(draw_few_shot(ds, 4, 1, "sorted").train, root) != [row[0] for row in train]


def test_base_classes_are_kept_from_the_all_class_draw(pets):
    """CoCoOp's base-to-novel: the K shots are drawn over all classes, then the base classes
    (labels below ceil(n / 2)) are kept."""
    root, split, ds = pets
    base = range(math.ceil(ds.num_classes / 2))
    for seed, shots in CASES:
        train, val = original_draw(split, shots, seed)
        kept = keep_draw_classes(draw_few_shot(ds, shots, seed), list(base), "base")  # base labels stay 0..
        assert relative(kept.train, root) == [row[0] for row in train if row[1] in base]
        assert relative(kept.val, root) == [row[0] for row in val if row[1] in base]
    # drawing over the base classes alone gives other images: novel classes come first in the file
    base_only = DatasetSplits(ds.name, ds.classnames[:len(base)], *([it for it in items if it.label in base]
                                                                      for items in (ds.train, ds.val, ds.test)))
    assert draw_few_shot(base_only, 4, 1).train != keep_draw_classes(draw_few_shot(ds, 4, 1), list(base), "b").train


# ----------------------------------------------------------------------------- the original's cached pickles

DATUM_MODULE = "dassl.data.datasets.base_dataset"


@pytest.fixture
def datum_class(monkeypatch):
    """A stand-in for Dassl's Datum under its module path, so pickle writes the same stream as the original."""

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = DATUM_MODULE, "Datum"
    parts = DATUM_MODULE.split(".")
    for depth in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    monkeypatch.setattr(sys.modules[DATUM_MODULE], "Datum", Datum, raising=False)
    return Datum


def write_pickle(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def foreign(rows: list, datum_class) -> list:
    """Datum items as the original user's disk had them, with their own spelling of the class names."""
    return [datum_class(f"/home/someone/oxford_pets/data/oxford_pets/images/{path}", label, 0, name.lower())
            for path, label, name in rows]


def test_cached_pickle_imports_as_the_same_draw(pets, datum_class, tmp_path):
    root, split, ds = pets
    train, val = original_draw(split, 4, 2)
    cache = tmp_path / "split_fewshot"
    write_pickle(cache / "shot_4-seed_2.pkl", {"train": foreign(train, datum_class), "val": foreign(val, datum_class)})
    data_cfg = DataConfig(name="oxford_pets", root=str(root), shots=4, seed=2, fewshot_import=str(cache))
    imported = load_or_draw(ds, data_cfg, tmp_path / "run")
    reference = draw_few_shot(ds, 4, 2)
    assert imported.train == reference.train and imported.val == reference.val  # class names are promptlearn's
    assert {it.classname for it in imported.train} <= set(CLASSES)
    saved = json.loads(fewshot_path(tmp_path / "run", 4, 2).read_text())
    assert saved["draw"] == "imported" and len(saved["train"]) == len(train)
    (cache / "shot_4-seed_2.pkl").unlink()  # the saved JSON is reused
    assert load_or_draw(ds, data_cfg, tmp_path / "run").train == reference.train


@pytest.mark.parametrize("val_shots, per_class", [(None, 1), ("2", 2)])
def test_imagenet_pickle_without_val_draws_val_from_other_train_images(tmp_path, datum_class, val_shots, per_class):
    make_imagenet(tmp_path, train_per_class=3)
    ds = build_dataset(DataConfig(name="imagenet", root=str(tmp_path)))
    chosen = [ds.train[0], ds.train[4], ds.train[8]]
    datums = [datum_class(f"/mnt/x/imagenet/{os.path.relpath(it.path, tmp_path / 'imagenet')}", it.label, 0,
                          it.classname) for it in chosen]
    write_pickle(tmp_path / "shot_1-seed_1.pkl", {"train": datums})
    split = load_or_draw(ds, DataConfig(name="imagenet", root=str(tmp_path), shots=1, seed=1, val_shots=val_shots,
                                        fewshot_import=str(tmp_path / "shot_1-seed_1.pkl")), tmp_path / "run")
    assert split.train == chosen
    assert sorted(it.label for it in split.val) == sorted([0, 1, 2] * per_class) and not set(split.val) & set(chosen)
    assert all(it in ds.train for it in split.val)  # never the test set (the original's ImageNet val)
    assert json.loads(fewshot_path(tmp_path / "run", 1, 1, val_shots).read_text())["val_shots"] == per_class


def test_imported_draw_keeps_its_own_validation_size(pets, datum_class, tmp_path):
    """The original's file holds min(K, 4) validation images per class: another data.val_shots is refused."""
    root, split, ds = pets
    train, val = original_draw(split, 4, 2)
    path = write_pickle(tmp_path / "shot_4-seed_2.pkl", {"train": foreign(train, datum_class),
                                                         "val": foreign(val, datum_class)})
    with pytest.raises(DataError, match="data.val_shots=3 asks for 3 validation images per class"):
        load_or_draw(ds, DataConfig(name="oxford_pets", root=str(root), shots=4, seed=2, fewshot_import=str(path),
                                    val_shots="3"), tmp_path / "run")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned > owned.txt",))


@pytest.mark.parametrize("content, message", [
    (lambda datum: {"train": [Payload()]}, r"names (posix|nt|os)\.system, and only dassl"),
    (lambda datum: {"train": [datum("/a/oxford_pets/images/x.png", True, 0, "x")]}, "_label must be int"),
    (lambda datum: {"train": [], "test": []}, "expected a dict with a 'train'"),
    (lambda datum: [1, 2], "expected a dict with a 'train'"),
])
def test_restricted_unpickler_refuses_anything_else(pets, datum_class, tmp_path, monkeypatch, content, message):
    root, _, ds = pets
    monkeypatch.chdir(tmp_path)
    path = write_pickle(tmp_path / "shot_1-seed_1.pkl", content(datum_class))
    with pytest.raises(DataError, match=message) as error:
        load_or_draw(ds, DataConfig(name="oxford_pets", root=str(root), shots=1, seed=1,
                                    fewshot_import=str(path)), tmp_path / "run")
    assert str(path) in str(error.value) and not (tmp_path / "owned.txt").exists()


def test_extra_datum_field_and_foreign_paths_are_refused(pets, datum_class, tmp_path):
    root, _, ds = pets
    odd = datum_class("/a/oxford_pets/images/x.png", 0, 0, "x")
    odd.extra = 1
    cases = [({"train": [odd]}, "exactly the fields"),
             ({"train": [datum_class("/a/other/images/Bengal_train00.png", 2, 0, "x")]}, "is not in the train split"),
             ({"train": [datum_class("/a/oxford_pets/images/Bengal_train00.png", 0, 0, "x")]}, "label 0 there but 2")]
    for data, message in cases:
        path = write_pickle(tmp_path / "shot_1-seed_1.pkl", data)
        with pytest.raises(DataError, match=message):
            load_or_draw(ds, DataConfig(name="oxford_pets", root=str(root), shots=1, seed=1,
                                        fewshot_import=str(path)), tmp_path / "run")
    with pytest.raises(DataError, match="is the draw for 1 shots and seed 1, but data.shots=2"):
        load_or_draw(ds, DataConfig(name="oxford_pets", root=str(root), shots=2, seed=1,
                                    fewshot_import=str(path)), tmp_path / "run")


# ----------------------------------------------------------------------------- ImageNet labels

UNSORTED = {"n01484850": "great white shark", "n01440764": "tench", "n01443537": "goldfish"}


def test_imagenet_labels_follow_sorted_wnids_whatever_the_classnames_order(tmp_path):
    base = make_imagenet(tmp_path)
    write_wnid_classnames(base / "classnames.txt", UNSORTED)
    ds = build_dataset(DataConfig(name="imagenet", root=str(tmp_path)))
    assert ds.classnames == [UNSORTED[wnid] for wnid in sorted(UNSORTED)] == list(IMAGENET_CLASSES.values())
    for item in ds.train + ds.test:
        wnid = Path(item.path).parent.name
        assert item.label == sorted(UNSORTED).index(wnid) and item.classname == UNSORTED[wnid]


def test_draw_keys_are_read_and_checked_by_the_config():
    cfg = load_config([], ["data.draw=sorted", "data.fewshot_import=/data/oxford_pets/split_fewshot"])
    assert (cfg.data.draw, cfg.data.fewshot_import) == ("sorted", "/data/oxford_pets/split_fewshot")
    assert load_config().data.draw == "reference"
    with pytest.raises(ConfigError, match="data.draw must be one of reference, sorted, got 'random'"):
        load_config([], ["data.draw=random"])
