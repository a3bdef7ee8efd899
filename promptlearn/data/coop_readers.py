"""Readers of the CoOp benchmark datasets (and ImageNet's shifted test sets) in CoOp's layout under data.root."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Mapping, Sequence

from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.generic_readers import (
    CLASSNAMES_FILE,
    SPLITS,
    ClassFolder,
    absolute,
    check_images_exist,
    classnames_from_labels,
    present_classes,
    read_class_folders,
    read_text_lines,
    readable_classname,
)
from promptlearn.data.registry import DEFAULT_TEMPLATE, register_dataset
from promptlearn.errors import DataError

if TYPE_CHECKING:
    from promptlearn.config import DataConfig

# (path relative to the image folder, label, class name)
SplitEntry = tuple[str, int, str]


def require_layout(data_root: str, folder: str, parts: Sequence[str], dataset: str) -> str:
    """The absolute dataset folder `data_root/folder`, after checking that it and each of its `parts` exist."""
    root = absolute(data_root)
    base = os.path.join(root, folder)
    expected = ", ".join(os.path.join(base, part) for part in parts)
    if not os.path.isdir(root):
        raise DataError(
            f"{dataset}: data root {root} does not exist; set data.root to the folder that holds the "
            f"dataset folders (expected {expected})"
        )
    for path in [base, *(os.path.join(base, part) for part in parts)]:
        if not os.path.exists(path):
            raise DataError(f"{dataset}: {path} does not exist; expected CoOp's layout: {expected}")
    return base


def read_wnid_classnames(path: str) -> dict[str, str]:
    """{wnid: class name} in file order from lines "<wnid> <class name>"."""
    names: dict[str, str] = {}
    for number, line in read_text_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            raise DataError(f"{path}, line {number}: expected '<wnid> <class name>', got {line!r}")
        wnid, name = parts
        if wnid in names:
            raise DataError(f"{path}, line {number}: {wnid} is listed twice; list each class once")
        names[wnid] = name
    if not names:
        raise DataError(f"{path} lists no classes; copy ImageNet's classnames.txt ('<wnid> <class name>' lines) there")
    return names


# ----------------------------------------------------------------------------- split_zhou_*.json datasets

EUROSAT_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class SplitFileDataset:
    """A dataset whose train/val/test items CoOp lists in a split_zhou_*.json file."""

    name: str  # registry name
    folder: str  # dataset folder under data.root
    image_dir: str  # folder the split's paths are relative to, inside `folder` ("": `folder` itself)
    split_file: str  # inside `folder`
    template: str = DEFAULT_TEMPLATE  # CoOp's zero-shot template
    rename: Mapping[str, str] = field(default_factory=dict)  # raw class name -> readable one


SPLIT_FILE_DATASETS = (
    SplitFileDataset("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    SplitFileDataset("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                     "a photo of a {}, a type of pet."),
    SplitFileDataset("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    SplitFileDataset("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                     "a photo of a {}, a type of flower."),
    SplitFileDataset("food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    SplitFileDataset("sun397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    SplitFileDataset("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    SplitFileDataset("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
                     EUROSAT_CLASSNAMES),
    SplitFileDataset("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                     "a photo of a person doing {}."),
)


def read_split_file_dataset(spec: SplitFileDataset, cfg: "DataConfig") -> DatasetSplits:
    """One of CoOp's datasets from its image folder and split_zhou_*.json file."""
    base = require_layout(cfg.root, spec.folder, [p for p in (spec.image_dir, spec.split_file) if p], spec.name)
    split_path = os.path.join(base, spec.split_file)
    image_dir = os.path.join(base, spec.image_dir)
    entries = {
        split: [(path, label, readable_classname(spec.rename.get(name, name))) for path, label, name in rows]
        for split, rows in read_split_file(split_path).items()
    }
    classnames = classnames_from_labels(
        ((label, name, f"{split}[{index}]") for split, rows in entries.items()
         for index, (_, label, name) in enumerate(rows)),
        split_path,
    )
    splits = {
        split: [Item(os.path.normpath(os.path.join(image_dir, path)), label, name) for path, label, name in rows]
        for split, rows in entries.items()
    }
    check_images_exist(
        [item.path for items in splits.values() for item in items], split_path,
        f"its paths are relative to {image_dir}; check that the dataset's images were extracted there",
    )
    return DatasetSplits(spec.name, classnames, **splits)


def read_split_file(path: str) -> dict[str, list[SplitEntry]]:
    """The entries of a split_zhou_*.json file by split; "val" may be absent."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"split file {path} is not valid JSON ({e.msg} at line {e.lineno}); download it again"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"split file {path} must hold a JSON object with train, val and test lists")
    for split in ("train", "test"):
        if split not in data:
            raise DataError(f"split file {path} has no {split!r} key; expected keys train, val, test")
    return {split: split_entries(data.get(split, []), split, path) for split in SPLITS}


def split_entries(rows: object, split: str, path: str) -> list[SplitEntry]:
    """The checked [relative_path, label, classname] entries of one split."""
    if not isinstance(rows, list):
        raise DataError(f"split file {path}: {split!r} must be a list of [relative_path, label, classname]")
    for index, row in enumerate(rows):
        valid = (
            isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
            and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str)
        )
        if not valid:
            raise DataError(
                f"split file {path}: {split}[{index}] is {row!r}; expected [relative_path, integer label, classname]"
            )
        if os.path.isabs(row[0]) or ".." in row[0].replace("\\", "/").split("/"):
            # split files come from others: an entry must not reach images outside the dataset's folder
            raise DataError(f"split file {path}: {split}[{index}] has the path {row[0]!r}, which leaves the "
                            "dataset's folder; a split file lists paths relative to its image folder, without "
                            "'..' or a leading '/'")
    return [tuple(row) for row in rows]


for _spec in SPLIT_FILE_DATASETS:
    _layout = f"{_spec.folder}/{_spec.image_dir + '/' if _spec.image_dir else ''}, {_spec.folder}/{_spec.split_file}"
    register_dataset(_spec.name, _spec.template, layout=_layout)(partial(read_split_file_dataset, _spec))


# ----------------------------------------------------------------------------- ImageNet

def imagenet_classes(wnid_names: dict[str, str]) -> list[ClassFolder]:
    """(wnid, label, name) labelled by sorted wnid, as the original labels ImageNet's sorted class folders
    (whatever the order of classnames.txt, which only gives the names)."""
    return [(wnid, label, wnid_names[wnid]) for label, wnid in enumerate(sorted(wnid_names))]


@register_dataset("imagenet", epochs=50,
                  layout="imagenet/images/train/<wnid>/, imagenet/images/val/<wnid>/ (the test set), "
                         "imagenet/classnames.txt")
def read_imagenet(cfg: "DataConfig") -> DatasetSplits:
    """ImageNet: images/train/<wnid>/ and images/val/<wnid>/ (the test set); labels by sorted wnid.

    Images within a class folder are in sorted order: the original lists them in the file system's order,
    so its few-shot draw can only be had from its cached file (data.fewshot_import)."""
    base = require_layout(cfg.root, "imagenet", ["images/train", "images/val", CLASSNAMES_FILE], "imagenet")
    listing = os.path.join(base, CLASSNAMES_FILE)
    classes = imagenet_classes(read_wnid_classnames(listing))
    return DatasetSplits(
        "imagenet",
        [name for _, _, name in classes],
        train=read_class_folders(os.path.join(base, "images", "train"), classes, listing),
        test=read_class_folders(os.path.join(base, "images", "val"), classes, listing),
        class_ids=[wnid for wnid, _, _ in classes],
    )


@dataclass(frozen=True)
class ImageNetVariant:
    """A test-only shifted ImageNet set with a copy of ImageNet's classnames.txt in its folder."""

    name: str  # registry name
    folder: str  # dataset folder under data.root
    image_dir: str  # the folder of class folders, inside `folder`
    folders_by_label: bool = False  # class folders named 0..999 instead of by wnid
    present_classes_only: bool = False  # 200-class subsets: only the wnids that have a folder


IMAGENET_VARIANTS = (
    ImageNetVariant("imagenet_v2", "imagenetv2", "imagenetv2-matched-frequency-format-val", folders_by_label=True),
    ImageNetVariant("imagenet_sketch", "imagenet-sketch", "images"),
    ImageNetVariant("imagenet_a", "imagenet-adversarial", "imagenet-a", present_classes_only=True),
    ImageNetVariant("imagenet_r", "imagenet-rendition", "imagenet-r", present_classes_only=True),
)


def read_imagenet_variant(spec: ImageNetVariant, cfg: "DataConfig") -> DatasetSplits:
    base = require_layout(cfg.root, spec.folder, [spec.image_dir, CLASSNAMES_FILE], spec.name)
    listing = os.path.join(base, CLASSNAMES_FILE)
    image_dir = os.path.join(base, spec.image_dir)
    wnid_names = read_wnid_classnames(listing)
    classes = variant_classes(spec, wnid_names, image_dir)
    test = read_class_folders(image_dir, classes, listing)
    wnids = sorted(wnid_names)  # ImageNet-V2's folder i holds the i-th sorted wnid; the others are named by wnid
    ids = [wnids[int(folder)] if spec.folders_by_label else folder for folder, _, _ in classes]
    return DatasetSplits(spec.name, [name for _, _, name in classes], test=test, class_ids=ids)


def variant_classes(spec: ImageNetVariant, wnid_names: dict[str, str], image_dir: str) -> list[ClassFolder]:
    """The variant's classes, labelled like ImageNet's by sorted wnid (restricted to the present ones for -A and -R).

    ImageNet-V2's folder i is the class of the i-th sorted wnid (the original takes the i-th line of
    classnames.txt, the same for ImageNet's own file, which is in wnid order)."""
    classes = imagenet_classes(wnid_names)
    if spec.folders_by_label:
        return [(str(label), label, name) for _, label, name in classes]
    if spec.present_classes_only:  # relabel the present classes 0..n-1 in sorted-wnid order, as the original
        classes = [(wnid, label, name) for label, (wnid, _, name) in enumerate(present_classes(image_dir, classes))]
    return classes


for _variant in IMAGENET_VARIANTS:
    register_dataset(_variant.name, evaluation_only=True,
                     layout=f"{_variant.folder}/{_variant.image_dir}/, {_variant.folder}/{CLASSNAMES_FILE}",
                     )(partial(read_imagenet_variant, _variant))


# ----------------------------------------------------------------------------- FGVCAircraft

@register_dataset("fgvc_aircraft", "a photo of a {}, a type of aircraft.",
                  layout="fgvc_aircraft/images/, fgvc_aircraft/variants.txt, "
                         "fgvc_aircraft/images_variant_{train,val,test}.txt")
def read_fgvc_aircraft(cfg: "DataConfig") -> DatasetSplits:
    """FGVCAircraft: images/<id>.jpg, variants.txt (labels in line order), images_variant_<split>.txt."""
    split_files = {split: f"images_variant_{split}.txt" for split in SPLITS}
    base = require_layout(cfg.root, "fgvc_aircraft", ["images", "variants.txt", *split_files.values()], "fgvc_aircraft")
    classnames = read_variants(os.path.join(base, "variants.txt"))
    image_dir = os.path.join(base, "images")
    splits = {
        split: read_fgvc_split(os.path.join(base, file), image_dir, classnames)
        for split, file in split_files.items()
    }
    return DatasetSplits("fgvc_aircraft", classnames, **splits)


def read_variants(path: str) -> list[str]:
    """The class names of variants.txt, one a line."""
    classnames: list[str] = []
    for number, name in read_text_lines(path):
        if name in classnames:
            raise DataError(f"{path}, line {number}: variant {name!r} is listed twice; list each variant once")
        classnames.append(name)
    if not classnames:
        raise DataError(f"{path} lists no variants; expected one class name a line")
    return classnames


def read_fgvc_split(path: str, image_dir: str, classnames: list[str]) -> list[Item]:
    """Items of an images_variant_<split>.txt file, lines "<image id> <variant name>"."""
    label_of = {name: label for label, name in enumerate(classnames)}
    variants_file = os.path.join(os.path.dirname(path), "variants.txt")
    items: list[Item] = []
    for number, line in read_text_lines(path):
        image_id, _, variant = line.partition(" ")
        variant = variant.strip()
        if variant not in label_of:
            raise DataError(
                f"{path}, line {number}: variant {variant!r} is not in {variants_file}; "
                f"expected '<image id> <variant name>' with a listed variant"
            )
        items.append(Item(os.path.join(image_dir, f"{image_id}.jpg"), label_of[variant], variant))
    check_images_exist(
        [item.path for item in items], path, f"expected the images as {image_dir}/<image id>.jpg"
    )
    return items
