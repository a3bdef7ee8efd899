"""Dataset readers: every layout on tiny fixture folders, and the messages of bad inputs."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fixtures_data import (
    AIRCRAFT_VARIANTS,
    IMAGENET_CLASSES,
    make_csv,
    make_eurosat,
    make_fgvc_aircraft,
    make_image_folder,
    make_imagenet,
    make_imagenet_r,
    make_imagenet_v2,
    make_oxford_pets,
    make_split_dataset,
    make_split_image_folder,
    png_bytes,
    split_entries,
    write_lines,
)

from promptlearn.config import DataConfig, load_config
from promptlearn.data import DATASETS, build_dataset
from promptlearn.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# The layout of each split-file dataset as the protocol table gives it: (folder, image folder, split file).
PROTOCOL_LAYOUTS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
GENERIC_READERS = {"image_folder", "csv"}


def read(name: str, root: Path | None = None, path: Path | None = None, **kwargs):
    cfg = DataConfig(name=name, root=str(root) if root else "data", path=str(path) if path else None, **kwargs)
    return build_dataset(cfg)


def assert_absolute_existing(splits) -> None:
    for item in splits.train + splits.val + splits.test:
        assert os.path.isabs(item.path) and os.path.isfile(item.path), item.path


# ----------------------------------------------------------------------------- CoOp split files

def test_oxford_pets_reads_split_file(tmp_path):
    base = make_oxford_pets(tmp_path)
    splits = read("oxford_pets", tmp_path)
    assert splits.name == "oxford_pets"
    assert splits.classnames == ["Abyssinian", "american bulldog", "basset hound"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    first = splits.train[0]
    assert first.path == str(base / "images" / "Abyssinian_train0.png")
    assert (first.label, first.classname) == (0, "Abyssinian")
    assert Counter(item.label for item in splits.train) == {0: 2, 1: 2, 2: 2}
    assert all(item.classname == splits.classnames[item.label] for item in splits.test)
    assert_absolute_existing(splits)


def test_eurosat_raw_classnames_become_readable(tmp_path):
    make_eurosat(tmp_path)
    splits = read("eurosat", tmp_path)
    assert splits.classnames == ["Annual Crop Land", "Forest", "Sea or Lake", "Herbaceous Vegetation Land"]
    assert splits.test[2].classname == "Sea or Lake"
    assert splits.test[2].path.endswith(os.path.join("eurosat", "2750", "SeaLake", "test0.png"))


@pytest.mark.parametrize("name", sorted(PROTOCOL_LAYOUTS))
def test_every_split_file_dataset_reads_its_protocol_layout(tmp_path, name):
    folder, image_dir, split_file = PROTOCOL_LAYOUTS[name]
    make_split_dataset(tmp_path, folder, image_dir, split_file, split_entries(["a_b", "c"], {"train": 1, "test": 1}))
    splits = read(name, tmp_path)
    assert splits.classnames == ["a b", "c"]
    assert splits.val == [] and len(splits.train) == len(splits.test) == 2
    assert splits.train[1].path == str(tmp_path / folder / image_dir / "c_train0.png")


# ----------------------------------------------------------------------------- ImageNet, its variants, FGVCAircraft

def test_imagenet_reads_train_and_val_folders(tmp_path):
    base = make_imagenet(tmp_path)
    (base / "images" / "train" / "n01443537" / "README.txt").write_text("not an image")
    splits = read("imagenet", tmp_path)
    assert splits.classnames == list(IMAGENET_CLASSES.values())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 0, 3)
    assert [item.label for item in splits.test] == [0, 1, 2]
    assert splits.test[2].path == str(base / "images" / "val" / "n01484850" / "img0.JPEG")
    assert_absolute_existing(splits)


def test_imagenet_r_keeps_only_present_classes_in_sorted_wnid_order(tmp_path):
    make_imagenet_r(tmp_path, present=["n01484850", "n01440764"])
    splits = read("imagenet_r", tmp_path)
    assert splits.classnames == ["tench", "great white shark"]
    assert splits.train == [] and splits.val == []
    assert [item.label for item in splits.test] == [0, 0, 1, 1]
    assert "n01484850" in splits.test[3].path


def test_imagenet_v2_reads_label_folders(tmp_path):
    make_imagenet_v2(tmp_path)
    splits = read("imagenet_v2", tmp_path)
    assert splits.classnames == list(IMAGENET_CLASSES.values())
    assert [(item.label, item.classname) for item in splits.test] == list(enumerate(IMAGENET_CLASSES.values()))
    assert splits.test[1].path.endswith(os.path.join("imagenetv2-matched-frequency-format-val", "1", "img0.jpeg"))


def test_fgvc_aircraft_reads_variant_files(tmp_path):
    base = make_fgvc_aircraft(tmp_path)
    splits = read("fgvc_aircraft", tmp_path)
    assert splits.classnames == AIRCRAFT_VARIANTS
    assert [item.label for item in splits.train] == [0, 1, 2, 2]
    assert (len(splits.val), len(splits.test)) == (1, 2)
    assert splits.test[1].path == str(base / "images" / "0000007.jpg")
    assert splits.test[1].classname == "Cessna 172"


# ----------------------------------------------------------------------------- image_folder and csv

def test_image_folder_without_splits_is_split_50_20_30_per_class(tmp_path):
    root = make_image_folder(tmp_path, {"rose": 10, "sun_flower": 10, "daisy": 3})
    splits = read("image_folder", path=root)
    assert splits.name == "flowers"
    assert splits.classnames == ["daisy", "rose", "sun flower"]
    count = {name: Counter(item.label for item in getattr(splits, name)) for name in ("train", "val", "test")}
    assert [count["train"][1], count["val"][1], count["test"][1]] == [5, 2, 3]
    assert [count["train"][0], count["val"][0], count["test"][0]] == [2, 0, 1]  # a small class keeps a test image
    all_paths = [item.path for item in splits.train + splits.val + splits.test]
    assert len(set(all_paths)) == 23 and not any(p.endswith(".txt") for p in all_paths)
    assert_absolute_existing(splits)


def test_seeded_split_depends_on_the_seed_not_on_listing_order(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path, {"a": 10, "b": 10})
    first = read("image_folder", path=root, split_seed=1)
    assert read("image_folder", path=root, split_seed=2).train != first.train

    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: contextlib.nullcontext(list(real_scandir(p))[::-1]))
    assert read("image_folder", path=root, split_seed=1) == first


@pytest.mark.subprocess
def test_seeded_split_is_independent_of_pythonhashseed(tmp_path):
    root = make_image_folder(tmp_path, {"a": 7, "b": 6, "c": 5})
    script = (
        "import json, sys; from promptlearn.config import DataConfig; from promptlearn.data import build_dataset; "
        "s = build_dataset(DataConfig(name='image_folder', path=sys.argv[1], split_seed=3)); "
        "print(json.dumps([[i.path for i in getattr(s, k)] for k in ('train', 'val', 'test')]))"
    )

    def run(hash_seed: str) -> list:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", script, str(root)], env=env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)

    assert run("1") == run("4242")


def test_image_folder_with_split_folders_and_classnames_file(tmp_path):
    root = make_split_image_folder(tmp_path)
    write_lines(root / "classnames.txt", ["blue_jay\tBlue Jay"])
    splits = read("image_folder", path=root)
    assert splits.name == "birds"
    assert splits.classnames == ["Blue Jay", "crow"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 1, 3)
    assert [(item.label, item.classname) for item in splits.val] == [(1, "crow")]
    assert splits.test[0].path == str(root / "test" / "blue_jay" / "img0.png")


def test_csv_with_labels_and_split_column(tmp_path):
    csv_path = make_csv(
        tmp_path, "path,label,split",
        ["img/a.png,0,train", "img/b.png,1,train", "img/c.png,1,val", f"{tmp_path}/img/d.png,0,TEST"],
        images=["img/a.png", "img/b.png", "img/c.png", "img/d.png"],
    )
    splits = read("csv", path=csv_path)
    assert splits.name == "data"
    assert splits.classnames == ["class 0", "class 1"]
    assert [item.label for item in splits.train] == [0, 1]
    assert splits.val[0].path == str(tmp_path / "img" / "c.png")
    assert splits.test[0].path == str(tmp_path / "img" / "d.png")


def test_csv_with_classnames_only_is_seeded_split(tmp_path):
    images = [f"{cls}{i}.png" for cls in ("zebra", "cat") for i in range(4)]
    csv_path = make_csv(tmp_path, "path,classname", [f"{p},{p[:-5]}" for p in images], images=images)
    splits = read("csv", path=csv_path)
    assert splits.classnames == ["cat", "zebra"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 2)
    assert all(item.classname == ("cat" if "cat" in item.path else "zebra") for item in splits.train)


def test_csv_with_labels_and_classnames(tmp_path):
    csv_path = make_csv(tmp_path, "classname,path,label,split",
                        ["dog,a.png,1,train", "cat,b.png,0,test"], images=["a.png", "b.png"])
    splits = read("csv", path=csv_path)
    assert splits.classnames == ["cat", "dog"]
    assert splits.train[0].classname == "dog" and splits.test[0].label == 0


# ----------------------------------------------------------------------------- registry and configs

def test_every_benchmark_dataset_has_a_config(tmp_path):
    benchmark = set(DATASETS) - GENERIC_READERS
    assert set(PROTOCOL_LAYOUTS) | {"imagenet", "fgvc_aircraft", "imagenet_v2", "imagenet_sketch",
                                    "imagenet_a", "imagenet_r"} == benchmark
    configs = {p.stem: p for p in (REPO / "configs" / "datasets").glob("*.yaml")}
    assert set(configs) == benchmark
    for name, path in configs.items():
        cfg = load_config([path])
        assert cfg.data.name == name and "{}" in cfg.data.template
    assert load_config([configs["dtd"]]).data.template == "{} texture."


# ----------------------------------------------------------------------------- error messages

def test_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist.*oxford_pets/images.*split_zhou_OxfordPets"):
        read("oxford_pets", tmp_path / "nowhere")


def test_missing_dataset_folder_or_split_file_names_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"oxford_pets does not exist; expected CoOp's layout: .*split_zhou_OxfordPets.json"):
        read("oxford_pets", tmp_path)
    base = make_oxford_pets(tmp_path)
    (base / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DataError, match=r"split_zhou_OxfordPets.json does not exist"):
        read("oxford_pets", tmp_path)
    (tmp_path / "imagenet" / "images" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"imagenet/images/train does not exist; .*images/val, .*imagenet/classnames.txt"):
        read("imagenet", tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    base = make_oxford_pets(tmp_path)
    (base / "split_zhou_OxfordPets.json").write_text('{"train": [')
    with pytest.raises(DataError, match=r"split_zhou_OxfordPets.json is not valid JSON"):
        read("oxford_pets", tmp_path)


@pytest.mark.parametrize("split, message", [
    ({"train": []}, r"has no 'test' key"),
    ({"train": [["a.png", "0", "x"]], "test": []}, r"train\[0\] is \['a.png', '0', 'x'\]; expected"),
    ([1, 2], r"must hold a JSON object"),
])
def test_malformed_split_file(tmp_path, split, message):
    make_split_dataset(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json", {})
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=message):
        read("dtd", tmp_path)


def test_split_pointing_to_missing_images(tmp_path):
    base = make_oxford_pets(tmp_path)
    (base / "images" / "Abyssinian_train0.png").unlink()
    (base / "images" / "basset_hound_test0.png").unlink()
    with pytest.raises(DataError, match=r"split_zhou_OxfordPets.json: 2 of 12 images do not exist, e.g. .*Abyssinian_train0.png"):
        read("oxford_pets", tmp_path)


@pytest.mark.parametrize("rows, message", [
    ([["a.png", 0, "cat"], ["b.png", 0, "dog"]], r"label 0 is named both 'cat' and 'dog' \(test\[1\]\)"),
    ([["a.png", 0, "cat"], ["b.png", 1, "cat"]], r"class 'cat' has the labels 0 and 1"),
    ([["a.png", 0, "cat"], ["b.png", 2, "dog"]], r"without gaps, but no item has label 1"),
    ([["a.png", -1, "cat"]], r"test\[0\] has label -1"),
])
def test_bad_labels_in_split_file(tmp_path, rows, message):
    make_oxford_pets(tmp_path, {"train": [], "val": [], "test": rows})
    with pytest.raises(DataError, match=message):
        read("oxford_pets", tmp_path)


def test_imagenet_folder_missing_from_classnames(tmp_path):
    base = make_imagenet(tmp_path)
    (base / "images" / "val" / "n99999999").mkdir()
    with pytest.raises(DataError, match=r"images/val has folders that are no class of .*classnames.txt: n99999999"):
        read("imagenet", tmp_path)


def test_fgvc_unknown_variant_names_file_and_line(tmp_path):
    base = make_fgvc_aircraft(tmp_path)
    write_lines(base / "images_variant_val.txt", ["0000005 707-320", "0000001 Boeing 999"])
    with pytest.raises(DataError, match=r"images_variant_val.txt, line 2: variant 'Boeing 999' is not in"):
        read("fgvc_aircraft", tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path, {"rose": 2})
    (root / "tulip").mkdir()
    with pytest.raises(DataError, match=r"class folder .*flowers/tulip holds no images"):
        read("image_folder", path=root)


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match=r"data.path is not set"):
        read("image_folder")
    with pytest.raises(DataError, match=r"missing .*does not exist or is no folder"):
        read("image_folder", path=tmp_path / "missing")
    root = make_split_image_folder(tmp_path)
    (root / "test" / "owl").mkdir()
    with pytest.raises(DataError, match=r"test has folders that are no class of .*train: owl"):
        read("image_folder", path=root)
    write_lines(root / "classnames.txt", ["crow Crow"])
    with pytest.raises(DataError, match=r"classnames.txt, line 1: expected '<folder><TAB><class name>'"):
        read("image_folder", path=root)


def test_class_folder_names_without_a_usable_class_name_are_refused(tmp_path):
    """A folder of spaces alone was class ''; a non-UTF-8 byte stopped the run in a UnicodeEncodeError later."""
    root = make_image_folder(tmp_path, {"crow": 3, "   ": 3})
    with pytest.raises(DataError, match=r"class folder '   ' of .*flowers gives no class name \(its name holds "
                                        r"only spaces or underscores\); rename it"):
        read("image_folder", path=root)
    other = make_image_folder(tmp_path, {"crow": 3}, name="birds")
    os.mkdir(os.fsencode(other) + b"/caf\xe9")
    with open(os.fsencode(other) + b"/caf\xe9/img0.png", "wb") as f:
        f.write(png_bytes())
    with pytest.raises(DataError, match=r"folder .*birds/caf\\xe9 has a name that is not UTF-8 \(the \\x.. bytes\); "
                                        r"rename it in UTF-8 characters"):
        read("image_folder", path=other)


@pytest.mark.parametrize("header, rows, message", [
    ("file,label", ["a.png,0"], r"data.csv, line 1: the header has unknown column\(s\) file"),
    ("path,split", ["a.png,train"], r"line 1: the header needs a label or classname column"),
    ("path,label", ["a.png,0", "a.png,one"], r"data.csv, line 3: label 'one' is not an integer"),
    ("path,label,split", ["a.png,0,train", "a.png,0,holdout"], r"line 3: split 'holdout' is not one of train, val, test"),
    ("path,label", ["a.png,0,extra"], r"line 2: 3 fields, but the header has 2"),
    ("path,label", ["gone.png,0"], r"data.csv: 1 of 1 images do not exist, e.g. .*gone.png"),
    ("path,label", [], r"has a header but no rows"),
])
def test_bad_csv(tmp_path, header, rows, message):
    csv_path = make_csv(tmp_path, header, rows, images=["a.png"])
    with pytest.raises(DataError, match=message):
        read("csv", path=csv_path)


def test_unknown_dataset_name_suggests_the_nearest():
    with pytest.raises(DataError, match=r"unknown dataset 'oxford_pet'; did you mean 'oxford_pets'"):
        read("oxford_pet")
