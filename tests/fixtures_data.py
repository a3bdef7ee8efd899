"""Builders of tiny dataset folders in every layout the readers accept, for the reader tests.

Each builder writes a few 4x4 PNG images under a given folder and returns what it wrote.
"""
from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

# (relative image path, label, class name), as in CoOp's split_zhou_*.json files
SplitEntry = tuple[str, int, str]


@lru_cache(maxsize=None)
def png_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_class_folders(parent: Path, images_per_class: dict[str, int], ext: str = ".png") -> None:
    """parent/<class>/img<i><ext> for each class."""
    for folder, count in images_per_class.items():
        for i in range(count):
            write_image(parent / folder / f"img{i}{ext}")


# ----------------------------------------------------------------------------- CoOp layouts

def split_entries(classes: Sequence[str], per_split: dict[str, int], folder_per_class: bool = False) -> dict:
    """{split: [[path, label, classname], ...]} with `per_split[split]` images per class."""
    split: dict[str, list[list]] = {}
    for name, count in per_split.items():
        split[name] = [
            [f"{cls}/{name}{i}.png" if folder_per_class else f"{cls}_{name}{i}.png", label, cls]
            for label, cls in enumerate(classes)
            for i in range(count)
        ]
    return split


def make_split_dataset(root: Path, folder: str, image_dir: str, split_file: str, split: dict) -> Path:
    """A CoOp dataset folder: the split file plus an image for every path it lists."""
    base = root / folder
    for rows in split.values():
        for path, _, _ in rows:
            write_image(base / image_dir / path)
    (base / image_dir).mkdir(parents=True, exist_ok=True)
    (base / split_file).write_text(json.dumps(split), encoding="utf-8")
    return base


PETS_CLASSES = ["Abyssinian", "american_bulldog", "basset_hound"]
PETS_PER_SPLIT = {"train": 2, "val": 1, "test": 1}


def make_oxford_pets(root: Path, split: dict | None = None) -> Path:
    split = split or split_entries(PETS_CLASSES, PETS_PER_SPLIT)
    return make_split_dataset(root, "oxford_pets", "images", "split_zhou_OxfordPets.json", split)


EUROSAT_RAW_CLASSES = ["AnnualCrop", "Forest", "SeaLake", "HerbaceousVegetation"]


def make_eurosat(root: Path) -> Path:
    split = split_entries(EUROSAT_RAW_CLASSES, {"train": 1, "val": 1, "test": 1}, folder_per_class=True)
    return make_split_dataset(root, "eurosat", "2750", "split_zhou_EuroSAT.json", split)


IMAGENET_CLASSES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def write_wnid_classnames(path: Path, classes: dict[str, str] = IMAGENET_CLASSES) -> Path:
    return write_lines(path, (f"{wnid} {name}" for wnid, name in classes.items()))


def make_imagenet(root: Path, train_per_class: int = 2, val_per_class: int = 1) -> Path:
    """imagenet/images/{train,val}/<wnid>/*.JPEG (ImageNet's upper-case extension) and classnames.txt."""
    base = root / "imagenet"
    write_class_folders(base / "images" / "train", dict.fromkeys(IMAGENET_CLASSES, train_per_class), ".JPEG")
    write_class_folders(base / "images" / "val", dict.fromkeys(IMAGENET_CLASSES, val_per_class), ".JPEG")
    write_wnid_classnames(base / "classnames.txt")
    return base


def make_imagenet_r(root: Path, present: Sequence[str]) -> Path:
    """imagenet-rendition/imagenet-r/<wnid>/ for the `present` wnids only, with ImageNet's full classnames.txt."""
    base = root / "imagenet-rendition"
    write_class_folders(base / "imagenet-r", dict.fromkeys(present, 2))
    write_wnid_classnames(base / "classnames.txt")
    return base


def make_imagenet_v2(root: Path) -> Path:
    """imagenetv2/imagenetv2-matched-frequency-format-val/<label>/ for every class."""
    base = root / "imagenetv2"
    labels = {str(label): 1 for label in range(len(IMAGENET_CLASSES))}
    write_class_folders(base / "imagenetv2-matched-frequency-format-val", labels, ".jpeg")
    write_wnid_classnames(base / "classnames.txt")
    return base


AIRCRAFT_VARIANTS = ["707-320", "A300B4", "Cessna 172"]
AIRCRAFT_SPLITS = {
    "train": [("0000001", "707-320"), ("0000002", "A300B4"), ("0000003", "Cessna 172"), ("0000004", "Cessna 172")],
    "val": [("0000005", "707-320")],
    "test": [("0000006", "A300B4"), ("0000007", "Cessna 172")],
}


def make_fgvc_aircraft(root: Path) -> Path:
    base = root / "fgvc_aircraft"
    write_lines(base / "variants.txt", AIRCRAFT_VARIANTS)
    for split, rows in AIRCRAFT_SPLITS.items():
        write_lines(base / f"images_variant_{split}.txt", (f"{image_id} {variant}" for image_id, variant in rows))
        for image_id, _ in rows:
            write_image(base / "images" / f"{image_id}.jpg")
    return base


# ----------------------------------------------------------------------------- generic layouts

def make_image_folder(parent: Path, images_per_class: dict[str, int], name: str = "flowers") -> Path:
    """parent/name/<class>/*.png plus a stray non-image file the reader must ignore."""
    root = parent / name
    write_class_folders(root, images_per_class)
    (root / next(iter(images_per_class)) / "notes.txt").write_text("not an image")
    return root


def make_split_image_folder(parent: Path, name: str = "birds") -> Path:
    """parent/name/{train,val,test}/<class>/*.png; val lacks one class."""
    root = parent / name
    write_class_folders(root / "train", {"blue_jay": 3, "crow": 2})
    write_class_folders(root / "val", {"crow": 1})
    write_class_folders(root / "test", {"blue_jay": 1, "crow": 2})
    return root


def make_csv(parent: Path, header: str, rows: Sequence[str], name: str = "data.csv", images: Sequence[str] = ()) -> Path:
    """parent/name with the header and rows, plus the given images (paths relative to parent)."""
    for image in images:
        write_image(parent / image)
    path = parent / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path
