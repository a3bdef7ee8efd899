import json
import logging
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from helpers import REPO, SAMPLE

from promptlearn.config import DRAWS, DataConfig
from promptlearn.data import DatasetSplits, Item, build_dataset
from promptlearn.data.fewshot import draw_few_shot, fewshot_path, load_few_shot, load_or_draw
from promptlearn.errors import DataError


def sample():
    return build_dataset(DataConfig(name="image_folder", path=str(SAMPLE)))


def test_k_per_class_and_val_min_k_4():
    ds = sample()
    for k in (1, 2, 4, 8, 16):
        split = draw_few_shot(ds, k, seed=1)
        per_class = [sum(it.label == c for it in split.train) for c in range(ds.num_classes)]
        per_class_val = [sum(it.label == c for it in split.val) for c in range(ds.num_classes)]
        assert per_class == [k] * 10 and per_class_val == [min(k, 4)] * 10
        assert {it.path for it in split.val} <= {it.path for it in ds.val}  # val comes from the val split


def test_sorted_draw_ignores_item_order_and_the_reference_draw_follows_it():
    ds = sample()
    shuffled = DatasetSplits(ds.name, ds.classnames, list(reversed(ds.train)), list(reversed(ds.val)), ds.test)
    a, b = draw_few_shot(ds, 4, 1, "sorted"), draw_few_shot(shuffled, 4, 1, "sorted")
    assert [it.path for it in a.train] == [it.path for it in b.train]
    assert [it.path for it in a.train] != [it.path for it in draw_few_shot(ds, 4, 2, "sorted").train]
    # the original's draw depends on the listing order, as the original code's does
    ref, ref_shuffled = draw_few_shot(ds, 4, 1), draw_few_shot(shuffled, 4, 1)
    assert ref.draw == "reference" and {it.path for it in ref.train} != {it.path for it in ref_shuffled.train}


def test_unknown_draw_is_an_error():
    with pytest.raises(DataError, match="data.draw='random' is no few-shot draw"):
        draw_few_shot(sample(), 1, 1, "random")


@pytest.mark.subprocess
def test_draw_is_the_same_across_processes_and_hash_seeds(tmp_path):
    code = ("import json,sys; sys.path.insert(0,'tests'); from test_fewshot import sample; "
            "from promptlearn.data.fewshot import draw_few_shot; "
            "print(json.dumps([it.path for it in draw_few_shot(sample(), 2, 3).train]))")
    outs = []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outs.append(json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                                              capture_output=True, text=True).stdout))
    assert outs[0] == outs[1] == [it.path for it in draw_few_shot(sample(), 2, 3).train]


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("val_shots, per_class", [(None, 4), ("shots", 8)])
def test_val_from_leftover_train_when_no_val_split(draw, val_shots, per_class):
    """ImageNet's case; LP++'s authors draw 2K training images per class there and validate on half of them."""
    ds = sample()
    no_val = DatasetSplits(ds.name, ds.classnames, ds.train, [], ds.test)
    split = draw_few_shot(no_val, 8, 1, draw, val_shots)
    assert Counter(it.label for it in split.val) == dict.fromkeys(range(10), per_class)
    assert not {it.path for it in split.val} & {it.path for it in split.train}


def test_small_class_keeps_all_with_warning(caplog):
    items = [Item(f"/x/a{i}.png", 0, "cat") for i in range(5)] + [Item(f"/x/b{i}.png", 1, "dog") for i in range(2)]
    ds = DatasetSplits("tiny", ["cat", "dog"], items, [], [])
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        split = draw_few_shot(ds, 4, 1)
    assert sum(it.label == 1 for it in split.train) == 2 and "dog (2)" in caplog.text


def test_empty_class_is_an_error():
    ds = DatasetSplits("tiny", ["cat", "dog"], [Item("/x/a.png", 0, "cat")], [], [])
    with pytest.raises(DataError, match=r"no training images for classes \['dog'\]"):
        draw_few_shot(ds, 1, 1)


def test_saved_as_json_and_reused(tmp_path):
    ds = sample()
    data_cfg = DataConfig(shots=2, seed=1)
    first = load_or_draw(ds, data_cfg, tmp_path)
    path = fewshot_path(tmp_path, 2, 1)
    data = json.loads(path.read_text())
    assert data["shots"] == 2 and data["draw"] == "reference" and len(data["train"]) == 20
    data["train"] = data["train"][:10]  # an edited draw is what is used next time
    path.write_text(json.dumps(data))
    assert len(load_or_draw(ds, data_cfg, tmp_path).train) == 10 != len(first.train)
    with pytest.raises(DataError, match="holds the 'reference' draw, not the 'sorted' one"):
        load_or_draw(ds, DataConfig(shots=2, seed=1, draw="sorted"), tmp_path)
    del data["draw"]  # files written before the reference draw existed hold the sorted draw
    path.write_text(json.dumps(data))
    assert load_or_draw(ds, DataConfig(shots=2, seed=1, draw="sorted"), tmp_path).draw == "sorted"
    path.write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_or_draw(ds, data_cfg, tmp_path)


# ----------------------------------------------------------------------------- data.val_shots

@pytest.mark.parametrize("val_shots, per_class", [(None, 4), ("shots", 6), ("2", 2), ("5", 5)])
def test_val_shots_sets_the_validation_size_per_class(val_shots, per_class):
    ds = sample()  # 24 training and 8 val images per class
    split = draw_few_shot(ds, 6, 1, val_shots=val_shots)
    assert Counter(it.label for it in split.val) == dict.fromkeys(range(10), per_class)
    assert {it.path for it in split.val} <= {it.path for it in ds.val}  # from the val split, never training images
    assert Counter(it.label for it in split.train) == dict.fromkeys(range(10), 6)


def test_val_shots_larger_than_every_class_is_refused_and_a_few_short_classes_warned(caplog):
    """As data.shots: a validation size no class has is one line; classes below it keep all with a warning."""
    ds = sample()  # 8 val images per class
    for val_shots in ("shots", "9"):
        with pytest.raises(DataError, match=rf"data.val_shots={val_shots} asks for (16|9) validation images per class, "
                                            r"but no class of dataset 'fashion_mnist_sample' has that many in its val "
                                            r"split \(the largest has 8\); set data.val_shots=8 or fewer"):
            draw_few_shot(ds, 16, 1, val_shots=val_shots)
    ds.val = [it for it in ds.val if it.label != 3] + [it for it in ds.val if it.label == 3][:3]
    with caplog.at_level(logging.WARNING, logger="promptlearn"):
        split = draw_few_shot(ds, 16, 1, val_shots="8")
    assert len(split.val) == 9 * 8 + 3 and "1 classes have fewer than 8 validation images" in caplog.text


@pytest.mark.parametrize("draw", DRAWS)
def test_the_validation_size_never_changes_the_training_draw(draw):
    """Validation is drawn after training on the same generator: every method trains on the same images."""
    ds = sample()
    default = draw_few_shot(ds, 6, 2, draw)
    for val_shots in ("shots", "2"):
        other = draw_few_shot(ds, 6, 2, draw, val_shots)
        assert other.train == default.train and other.val != default.val


def test_the_validation_draw_is_deterministic_per_seed():
    ds = sample()
    first, again = draw_few_shot(ds, 6, 1, val_shots="shots"), draw_few_shot(ds, 6, 1, val_shots="shots")
    assert first.val == again.val
    assert {it.path for it in first.val} != {it.path for it in draw_few_shot(ds, 6, 2, val_shots="shots").val}


def lp_pp_authors_draw(ds: DatasetSplits, shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """The few-shot sets of one LP++ task as the authors' main.py draws them: Python's `random` seeded with
    the task's seed, K per class from the train split, then K per class from the val split on the same
    generator; classes in the order they first appear, items in listing order."""
    rng = random.Random(seed)
    drawn = []
    for items in (ds.train, ds.val):
        by_label: dict[int, list[Item]] = {}
        for item in items:
            by_label.setdefault(item.label, []).append(item)
        assert min(map(len, by_label.values())) >= shots  # smaller classes: their code repeats images
        drawn.append([it for pool in by_label.values() for it in rng.sample(pool, shots)])
    return drawn[0], drawn[1]


@pytest.mark.parametrize("shots", [2, 6])
def test_val_shots_shots_gives_the_lp_pp_authors_draw(shots):
    ds = sample()
    for seed in (1, 2, 3):
        train, val = lp_pp_authors_draw(ds, shots, seed)
        split = draw_few_shot(ds, shots, seed, val_shots="shots")
        assert split.train == train and split.val == val
    assert draw_few_shot(ds, 6, 1).val != lp_pp_authors_draw(ds, 6, 1)[1]  # the default is not their draw


def test_each_validation_size_is_saved_apart(tmp_path):
    ds = sample()
    default = load_or_draw(ds, DataConfig(shots=6, seed=1), tmp_path)
    authors = load_or_draw(ds, DataConfig(shots=6, seed=1, val_shots="shots"), tmp_path)
    assert fewshot_path(tmp_path, 6, 1).name == "shot_6-seed_1.json"  # the default keeps its name
    assert fewshot_path(tmp_path, 6, 1, "shots").name == "shot_6-seed_1-val_6.json"
    assert json.loads(fewshot_path(tmp_path, 6, 1).read_text())["val_shots"] == 4
    assert json.loads(fewshot_path(tmp_path, 6, 1, "shots").read_text())["val_shots"] == 6
    assert (len(default.val), len(authors.val)) == (40, 60)
    assert load_or_draw(ds, DataConfig(shots=6, seed=1), tmp_path).val == default.val
    assert load_or_draw(ds, DataConfig(shots=6, seed=1, val_shots="shots"), tmp_path).val == authors.val
    assert fewshot_path(tmp_path, 2, 1, "shots") == fewshot_path(tmp_path, 2, 1)  # K = min(K, 4): the same draw


def test_a_saved_draw_of_another_validation_size_is_refused(tmp_path):
    ds = sample()
    load_or_draw(ds, DataConfig(shots=6, seed=1, val_shots="shots"), tmp_path)
    copied = fewshot_path(tmp_path, 6, 1, "5")  # a file copied or renamed by hand
    copied.write_text(fewshot_path(tmp_path, 6, 1, "shots").read_text())
    with pytest.raises(DataError, match="holds 6 validation images per class, not the 5 data.val_shots asks for"):
        load_or_draw(ds, DataConfig(shots=6, seed=1, val_shots="5"), tmp_path)


def test_a_saved_draw_without_its_validation_size_holds_min_k_4(tmp_path):
    ds = sample()
    saved = load_or_draw(ds, DataConfig(shots=6, seed=1), tmp_path)
    path = fewshot_path(tmp_path, 6, 1)
    data = json.loads(path.read_text())
    del data["val_shots"]  # as in files written before data.val_shots
    path.write_text(json.dumps(data))
    assert load_few_shot(path, ds, 6, 1).val == saved.val
    with pytest.raises(DataError, match="holds 4 validation images per class, not the 6"):
        load_few_shot(path, ds, 6, 1, val_shots="shots")
