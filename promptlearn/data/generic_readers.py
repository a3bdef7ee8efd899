"""Generic readers (a folder of class folders, a CSV file) and the file helpers every reader shares."""
from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.registry import register_dataset
from promptlearn.errors import DataError

if TYPE_CHECKING:
    from promptlearn.config import DataConfig

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
TRAIN_FRACTION, VAL_FRACTION = 0.5, 0.2  # CoOp's read_and_split_data; the rest (30%) is the test set
MAX_SHOWN = 5  # names listed in one error message
CLASSNAMES_FILE = "classnames.txt"

# (class folder name, label, class name)
ClassFolder = tuple[str, int, str]

FOLDER_LAYOUT = (
    "<path>/<class>/<images>, or <path>/train/<class>/<images> and <path>/test/<class>/<images> "
    "(optional <path>/val/<class>/<images>)"
)
CSV_LAYOUT = "a CSV file with a header row: path and label and/or classname, optional split (train/val/test)"
CSV_COLUMNS = ("path", "label", "classname", "split")


# ----------------------------------------------------------------------------- shared helpers

def shown(names: Sequence[str]) -> str:
    """The first few names, comma-separated, and how many more there are."""
    more = f" and {len(names) - MAX_SHOWN} more" if len(names) > MAX_SHOWN else ""
    return ", ".join(str(n) for n in names[:MAX_SHOWN]) + more


def readable_classname(name: str) -> str:
    """Folder-style class names read as words: underscores become spaces."""
    return " ".join(name.replace("_", " ").split())


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror}; check that it exists and is readable") from None


def utf8_named(entries: Iterable[os.DirEntry], kind: str) -> list[os.DirEntry]:
    """The entries, each name checked to be UTF-8: few-shot files, results and reports hold the names as
    UTF-8 text, which a name with another encoding's bytes (read as surrogate escapes) cannot be written in."""
    entries = list(entries)
    for e in entries:
        try:
            e.name.encode("utf-8")
        except UnicodeEncodeError:
            shown_path = os.fsencode(e.path).decode("utf-8", "backslashreplace")
            raise DataError(f"{kind} {shown_path} has a name that is not UTF-8 (the \\x.. bytes); rename it in "
                            "UTF-8 characters") from None
    return entries


def subfolders(folder: str) -> list[str]:
    """Names of the visible subfolders of `folder`, sorted."""
    return sorted(e.name for e in utf8_named((e for e in _scan(folder) if e.is_dir()), "folder"))


def list_images(folder: str) -> list[str]:
    """Paths of the image files directly in `folder`, sorted; other files are ignored."""
    return sorted(e.path for e in utf8_named((e for e in _scan(folder) if e.is_file() and is_image_file(e.name)),
                                             "image file"))


def read_text_lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; check that it is a readable UTF-8 text file") from None
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def read_class_folders(parent: str, classes: Sequence[ClassFolder], class_source: str) -> list[Item]:
    """Items of `parent/<folder>` for each class, in class order.

    A missing or empty class folder, or a subfolder that is no class of `class_source`, is an error.
    """
    if not classes:
        raise DataError(f"{parent} holds no class folders of {class_source}; add one folder of images per class")
    unknown = sorted(set(subfolders(parent)) - {folder for folder, _, _ in classes})
    if unknown:
        raise DataError(
            f"{parent} has folders that are no class of {class_source}: {shown(unknown)}; "
            f"add those classes there or remove the folders"
        )
    items: list[Item] = []
    for folder, label, classname in classes:
        path = os.path.join(parent, folder)
        if not os.path.isdir(path):
            raise DataError(f"class folder {path} is missing; add it with the images of class {classname!r}")
        images = list_images(path)
        if not images:
            raise DataError(
                f"class folder {path} holds no images; add the images of class {classname!r} "
                f"(files ending in {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        items.extend(Item(image, label, classname) for image in images)
    return items


def check_images_exist(paths: Sequence[str], source: str, hint: str) -> None:
    """All of `paths` exist (one cheap stat each); else a DataError with the count and the first few."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"{source}: {len(missing)} of {len(paths)} images do not exist, e.g. {shown(missing)}; {hint}")


def classnames_from_labels(entries: Iterable[tuple[int, str, str]], source: str) -> list[str]:
    """The class list from (label, class name, where) triples, sorted by label.

    Each label has one name and each name one label, and the labels run 0..n-1 without gaps.
    `where` says where an entry is (e.g. "line 3") for the error message.
    """
    name_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for label, name, where in entries:
        if label < 0:
            raise DataError(f"{source}: {where} has label {label}; labels must be 0 or more")
        if name_of.setdefault(label, name) != name:
            raise DataError(
                f"{source}: label {label} is named both {name_of[label]!r} and {name!r} ({where}); "
                f"give each label one class name"
            )
        if label_of.setdefault(name, label) != label:
            raise DataError(
                f"{source}: class {name!r} has the labels {label_of[name]} and {label} ({where}); "
                f"give each class one label"
            )
    if not name_of:
        raise DataError(f"{source} lists no items; add at least one labelled image")
    gaps = sorted(set(range(max(name_of) + 1)) - set(name_of))
    if gaps:
        raise DataError(
            f"{source}: labels must run from 0 to {max(name_of)} without gaps, but no item has label "
            f"{shown(gaps)}; renumber the labels 0..{len(name_of) - 1}"
        )
    return [name_of[label] for label in range(len(name_of))]


def split_sizes(n: int) -> tuple[int, int]:
    """Train and val sizes for a class of n images: CoOp's 50/20/30 split with Python's rounding.

    Unlike CoOp (which asserts) small classes still work: one image goes to train first, and
    from two images on one goes to test.
    """
    n_train = max(1, round(n * TRAIN_FRACTION)) if n else 0
    n_val = round(n * VAL_FRACTION)
    if n - n_train - n_val < 1 and n_val > 0:
        n_val -= 1
    return n_train, n_val


def seeded_split(items: Sequence[Item], seed: int) -> tuple[list[Item], list[Item], list[Item]]:
    """A per-class train/val/test split (50/20/30) like CoOp's read_and_split_data.

    Classes go in label order and each class's items are sorted by path before a
    random.Random(seed) shuffle, so neither the file-system listing order nor PYTHONHASHSEED
    changes the result.
    """
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    train: list[Item] = []
    val: list[Item] = []
    test: list[Item] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda item: item.path)
        rng.shuffle(group)
        n_train, n_val = split_sizes(len(group))
        train += group[:n_train]
        val += group[n_train:n_train + n_val]
        test += group[n_train + n_val:]
    return train, val, test


def generic_path(cfg: "DataConfig", reader: str, expected: str) -> str:
    """The absolute data.path of a generic reader."""
    if not cfg.path:
        raise DataError(f"data.path is not set; the {reader} reader needs data.path=<{expected}>")
    return absolute(cfg.path)


# ----------------------------------------------------------------------------- image_folder

@register_dataset("image_folder", layout="data.path: class folders, or train/ val/ test/ folders of class folders")
def read_image_folder(cfg: "DataConfig") -> DatasetSplits:
    """A folder of class folders, directly or under train/, test/ (and optional val/) split folders."""
    root = generic_path(cfg, "image_folder", "folder")
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} (data.path) does not exist or is no folder; expected {FOLDER_LAYOUT}")
    split_dirs = split_folders(root)
    class_root = split_dirs.get("train", root)
    folders = subfolders(class_root)
    if not folders:
        raise DataError(f"{class_root} holds no class folders; expected {FOLDER_LAYOUT}")
    names = folder_classnames(root, folders)
    classes = [(folder, label, names[folder]) for label, folder in enumerate(folders)]
    classnames = [name for _, _, name in classes]
    name = os.path.basename(root)
    if not split_dirs:
        train, val, test = seeded_split(read_class_folders(root, classes, root), cfg.split_seed)
        return DatasetSplits(name, classnames, train, val, test, class_ids=list(folders))
    # val/ and test/ may lack a class; a folder there that train/ lacks is an error
    splits = {
        split: read_class_folders(folder, present_classes(folder, classes), class_root)
        for split, folder in split_dirs.items()
    }
    return DatasetSplits(name, classnames, **splits, class_ids=list(folders))


def present_classes(parent: str, classes: Sequence[ClassFolder]) -> list[ClassFolder]:
    """The classes that have a folder in `parent`."""
    return [c for c in classes if os.path.isdir(os.path.join(parent, c[0]))]


def split_folders(root: str) -> dict[str, str]:
    """{split: folder} of the train/val/test folders of `root`; empty when it holds class folders directly."""
    present = {split: os.path.join(root, split) for split in SPLITS if os.path.isdir(os.path.join(root, split))}
    if present and not {"train", "test"} <= present.keys():
        raise DataError(
            f"{root} has {', '.join(s + '/' for s in present)} but not both train/ and test/; expected {FOLDER_LAYOUT}"
        )
    return present


def refuse_unnamed(names: dict[str, str], root: str) -> None:
    """A class folder named by spaces or underscores alone would silently become the class ''."""
    for folder, name in names.items():
        if not name:
            raise DataError(f"class folder {folder!r} of {root} gives no class name (its name holds only spaces or "
                            "underscores); rename it: a class folder's name is its class name")


def folder_classnames(root: str, folders: Sequence[str]) -> dict[str, str]:
    """{folder: class name}: underscores become spaces, unless root/classnames.txt names the folder."""
    names = {folder: readable_classname(folder) for folder in folders}
    path = os.path.join(root, CLASSNAMES_FILE)
    if not os.path.isfile(path):
        refuse_unnamed(names, root)
        return names
    for number, line in read_text_lines(path):
        folder, tab, name = line.partition("\t")
        if not tab or not name.strip():
            raise DataError(f"{path}, line {number}: expected '<folder><TAB><class name>', got {line!r}")
        if folder not in names:
            raise DataError(
                f"{path}, line {number}: there is no class folder {folder!r}; valid folders: {shown(list(names))}"
            )
        names[folder] = name.strip()
    refuse_unnamed(names, root)
    folder_of: dict[str, str] = {}
    for folder, name in names.items():  # two folders, one name: per-class results would merge two classes
        if folder_of.setdefault(name, folder) != folder:
            raise DataError(f"{path}: the folders {folder_of[name]!r} and {folder!r} are both named {name!r}; "
                            "give each class its own name")
    return names


# ----------------------------------------------------------------------------- csv

@dataclass(frozen=True)
class CsvRow:
    line: int
    path: str  # absolute
    label: Optional[int]
    classname: Optional[str]
    split: Optional[str]


@register_dataset("csv", layout="data.path: a CSV of image path and label or class name (and split)")
def read_csv_dataset(cfg: "DataConfig") -> DatasetSplits:
    """A CSV of image paths (relative to the CSV's folder) with labels and/or class names."""
    csv_path = generic_path(cfg, "csv", "file.csv")
    if not os.path.isfile(csv_path):
        raise DataError(f"CSV file {csv_path} (data.path) does not exist; expected {CSV_LAYOUT}")
    rows, columns = read_csv_rows(csv_path)
    classnames, labels = csv_classes(rows, "label" in columns, csv_path)
    items = [Item(row.path, label, classnames[label]) for row, label in zip(rows, labels)]
    check_images_exist(
        [item.path for item in items], csv_path,
        f"relative paths are read from the CSV's folder {os.path.dirname(csv_path)}",
    )
    if "split" in columns:
        splits = {split: [item for row, item in zip(rows, items) if row.split == split] for split in SPLITS}
    else:
        splits = dict(zip(SPLITS, seeded_split(items, cfg.split_seed)))
    return DatasetSplits(os.path.splitext(os.path.basename(csv_path))[0], classnames, **splits)


def read_csv_rows(path: str) -> tuple[list[CsvRow], dict[str, int]]:
    """The rows of a CSV file and its {column: index}; blank lines are skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            columns = csv_columns(next(reader, None), path)
            rows = [
                parse_csv_row(fields, columns, reader.line_num, path)
                for fields in reader
                if any(field.strip() for field in fields)
            ]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV file {path}: {e}; check that it is a readable UTF-8 file") from None
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise DataError(f"{path} has a header but no rows; add one row per image")
    return rows, columns


def csv_columns(header: Optional[list[str]], path: str) -> dict[str, int]:
    """{column: index} of a valid header row."""
    names = [name.strip().lower() for name in header or []]
    unknown = [name for name in names if name not in CSV_COLUMNS]
    problem = (
        "is empty" if not names
        else f"has unknown column(s) {shown(unknown)}" if unknown
        else "repeats a column" if len(set(names)) != len(names)
        else "lacks the path column" if "path" not in names
        else "needs a label or classname column" if not {"label", "classname"} & set(names)
        else ""
    )
    if problem:
        raise DataError(f"{path}, line 1: the header {problem}; expected {CSV_LAYOUT}")
    return {name: index for index, name in enumerate(names)}


def parse_csv_row(fields: list[str], columns: dict[str, int], line: int, path: str) -> CsvRow:
    if len(fields) != len(columns):
        raise DataError(f"{path}, line {line}: {len(fields)} fields, but the header has {len(columns)}")

    def cell(column: str) -> Optional[str]:
        if column not in columns:
            return None
        value = fields[columns[column]].strip()
        if not value:
            raise DataError(f"{path}, line {line}: the {column} cell is empty")
        return value

    label = cell("label")
    if label is not None and not is_integer(label):
        raise DataError(f"{path}, line {line}: label {label!r} is not an integer")
    split = cell("split")
    if split is not None and split.lower() not in SPLITS:
        raise DataError(f"{path}, line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
    image = os.path.join(os.path.dirname(path), os.path.expanduser(cell("path")))
    return CsvRow(
        line=line,
        path=os.path.normpath(image),
        label=None if label is None else int(label),
        classname=cell("classname"),
        split=None if split is None else split.lower(),
    )


def is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def csv_classes(rows: Sequence[CsvRow], has_labels: bool, path: str) -> tuple[list[str], list[int]]:
    """The class list and each row's label.

    With a label column: names from the classname column or "class <label>"; without one:
    labels follow the sorted class names.
    """
    if not has_labels:
        classnames = sorted({row.classname for row in rows})
        label_of = {name: label for label, name in enumerate(classnames)}
        return classnames, [label_of[row.classname] for row in rows]
    classnames = classnames_from_labels(
        ((row.label, row.classname or f"class {row.label}", f"line {row.line}") for row in rows), path
    )
    return classnames, [row.label for row in rows]
