#!/usr/bin/env python3
"""Convert Fashion-MNIST idx files into the image-folder layout read by `image_folder`.

Output under --out:

    train/<class_folder>/<index>.png   from train-{images-idx3,labels-idx1}-ubyte.gz
    val/<class_folder>/<index>.png     only with --val-per-class (taken from the train files)
    test/<class_folder>/<index>.png    from t10k-{images-idx3,labels-idx1}-ubyte.gz
    classnames.txt                     "<class_folder>\\t<readable name>" per line, in label order

<index> is the image's zero-based position in its idx file, zero-padded to five digits.
Images are 8-bit grayscale PNGs. The output depends only on the inputs and the options.

Examples:

    python datasets/fashion_mnist/convert.py --out datasets/fashion_mnist_full
    python datasets/fashion_mnist/convert.py --out /tmp/fm --per-class 32 --val-per-class 8 --test-per-class 20
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass --source DIR"

# (folder name, readable class name) in label order 0..9.
CLASSES = [
    ("t-shirt_top", "T-shirt/top"),
    ("trouser", "trouser"),
    ("pullover", "pullover"),
    ("dress", "dress"),
    ("coat", "coat"),
    ("sandal", "sandal"),
    ("shirt", "shirt"),
    ("sneaker", "sneaker"),
    ("bag", "bag"),
    ("ankle_boot", "ankle boot"),
]

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
ROWS = COLS = 28
SPLIT_FOLDERS = ("train", "val", "test")


class ConvertError(Exception):
    pass


def _find(source: Path, stem: str) -> Path:
    """`<stem>.gz` in source, or the uncompressed `<stem>` when only that exists."""
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    raise ConvertError(f"missing file {source / (stem + '.gz')}: {INSTALL_HINT}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ConvertError(f"cannot read {path}: {e}") from e


def read_idx_images(path: Path) -> np.ndarray:
    data = _read_bytes(path)
    if len(data) < 16:
        raise ConvertError(f"{path}: too short for an idx3 header ({len(data)} bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        raise ConvertError(
            f"{path}: magic number {magic:#010x}, expected {IMAGES_MAGIC:#010x} (idx3 unsigned-byte images); "
            "is this an images file?"
        )
    if (rows, cols) != (ROWS, COLS):
        raise ConvertError(f"{path}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        raise ConvertError(
            f"{path}: header says {n} images ({expected} bytes) but the file has {len(data)} bytes; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    data = _read_bytes(path)
    if len(data) < 8:
        raise ConvertError(f"{path}: too short for an idx1 header ({len(data)} bytes)")
    magic, n = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        raise ConvertError(
            f"{path}: magic number {magic:#010x}, expected {LABELS_MAGIC:#010x} (idx1 unsigned-byte labels); "
            "is this a labels file?"
        )
    if len(data) != 8 + n:
        raise ConvertError(
            f"{path}: header says {n} labels but the file has {len(data) - 8}; the file is truncated or corrupt"
        )
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ConvertError(f"{path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return labels


def load_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find(source, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(source, f"{prefix}-labels-idx1-ubyte")
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise ConvertError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


def select(labels: np.ndarray, per_class: int | None) -> list[np.ndarray]:
    """Per class, the file indices of its first `per_class` images (all when None), in file order."""
    out = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        out.append(idx if per_class is None else idx[:per_class])
    return out


def plan(
    source: Path, per_class: int | None, test_per_class: int | None, val_per_class: int
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, np.ndarray]]:
    """{split: [(file index, label), ...]} and {split: images array} for every split to write."""
    train_images, train_labels = load_split(source, "train")
    test_images, test_labels = load_split(source, "t10k")
    jobs: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for c, idx in enumerate(select(train_labels, per_class)):
        if val_per_class and val_per_class >= len(idx):
            raise ConvertError(
                f"--val-per-class {val_per_class} leaves no train images: only {len(idx)} are selected "
                f"for class {CLASSES[c][0]!r}"
            )
        cut = len(idx) - val_per_class
        jobs["train"] += [(int(i), c) for i in idx[:cut]]
        jobs["val"] += [(int(i), c) for i in idx[cut:]]
    for c, idx in enumerate(select(test_labels, test_per_class)):
        jobs["test"] += [(int(i), c) for i in idx]
    arrays = {"train": train_images, "val": train_images, "test": test_images}
    return {k: v for k, v in jobs.items() if v}, arrays


def write_png(image: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG", optimize=True)  # 2-D uint8 array: mode "L"
    os.replace(tmp, path)


def write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_out(out: Path, force: bool) -> None:
    existing = [out / p for p in (*SPLIT_FOLDERS, "classnames.txt") if (out / p).exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise ConvertError(f"output already present ({names}); pass --force to replace it")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def convert(args: argparse.Namespace) -> dict[str, list[int]]:
    """Write the layout; returns {split: images per class}."""
    source, out = Path(args.source), Path(args.out)
    if not source.is_dir():
        raise ConvertError(f"source directory {source} does not exist: {INSTALL_HINT}")
    test_per_class = args.per_class if args.test_per_class is None else args.test_per_class
    jobs, arrays = plan(source, args.per_class, test_per_class, args.val_per_class)
    prepare_out(out, args.force)

    counts = {}
    for split, items in jobs.items():
        for folder, _ in CLASSES:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
        images = arrays[split]
        for i, c in tqdm(items, desc=split, unit="img", disable=args.quiet):
            write_png(images[i], out / split / CLASSES[c][0] / f"{i:05d}.png")
        counts[split] = [sum(1 for _, c in items if c == k) for k in range(len(CLASSES))]
    write_text("".join(f"{folder}\t{name}\n" for folder, name in CLASSES), out / "classnames.txt")
    return counts


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Convert Fashion-MNIST idx files into train/[val/]test class folders of PNGs.",
    )
    p.add_argument("--source", default=DEFAULT_SOURCE, help=f"folder with the idx .gz files (default {DEFAULT_SOURCE})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--per-class", type=non_negative, default=None, metavar="N",
        help="keep only the first N images per class per split, in file order (default: all)",
    )
    p.add_argument(
        "--test-per-class", type=non_negative, default=None, metavar="N",
        help="first N test images per class (default: --per-class)",
    )
    p.add_argument(
        "--val-per-class", type=non_negative, default=0, metavar="N",
        help="move the last N selected train images per class to a val/ split (default 0: no val/)",
    )
    p.add_argument("--force", action="store_true", help="replace train/ val/ test/ classnames.txt already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = convert(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    parts = []
    for split, per in counts.items():
        spread = f"{per[0]}" if min(per) == max(per) else f"{min(per)}-{max(per)}"
        parts.append(f"{split} {sum(per)} ({spread} per class)")
    summary = ", ".join(parts)
    print(f"wrote {summary} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
