import json
import logging
import os
import subprocess
import sys

import pytest
from helpers import REPO, SAMPLE

from promptlearn.config import DataConfig
from promptlearn.data import DatasetSplits, Item, build_dataset
from promptlearn.data.fewshot import draw_few_shot, fewshot_path, load_or_draw
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


@pytest.mark.parametrize("draw", ["reference", "sorted"])
def test_val_from_leftover_train_when_no_val_split(draw):
    ds = sample()
    no_val = DatasetSplits(ds.name, ds.classnames, ds.train, [], ds.test)
    split = draw_few_shot(no_val, 8, 1, draw)
    assert len(split.val) == 40 and not {it.path for it in split.val} & {it.path for it in split.train}


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
