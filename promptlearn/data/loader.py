"""Image loading in DataLoader workers, with every odd image mode converted and bad files named."""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from promptlearn.data.base import Item
from promptlearn.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@contextlib.contextmanager
def named_image_errors(path: str):
    """Any failure to read the image at `path` inside it becomes a DataError naming the file and the way out."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its pixel limit; treat every oversized image as a bomb
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to decode safely ({e}); resize it or remove it") from None
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e}); it may be corrupt, "
                        "truncated or not an image. Remove it or set data.skip_bad_images=true") from None


def load_image(path: str) -> Image.Image:
    """Open any image as RGB. Raises DataError naming the file when it cannot be read."""
    with named_image_errors(path), Image.open(path) as img:
        img.load()
        return to_rgb(img)


def header_problem(path: str) -> str | None:
    """Why the image at `path` cannot be read, as far as its header and Pillow's verify() (no decode) tell,
    or None."""
    try:
        with named_image_errors(path), Image.open(path) as img:
            img.verify()
    except DataError as e:
        return str(e)
    return None


HEADER_READERS = 8  # threads reading headers: the time goes on waiting for the files, not on the CPU


def check_images(items: list[Item]) -> None:
    """Every image's header, before any of them is decoded: the first unreadable one (in the items' order)
    stops the run as a DataError, with how many more there are."""
    paths = list(dict.fromkeys(item.path for item in items))
    with ThreadPoolExecutor(HEADER_READERS) as pool:
        problems = [p for p in pool.map(header_problem, paths) if p]
    if problems:
        more = f" ({len(problems) - 1} more images cannot be read)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in SIXTEEN_BIT_MODES:  # scale high-bit-depth gray to 8 bits instead of clipping
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def item_seed(seed: int, pass_index: int, index: int) -> int:
    """A per-image seed so augmentation is the same whatever the worker count or batch order."""
    digest = hashlib.sha256(f"{seed}/{pass_index}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class BadImage:
    index: int
    message: str


class ImageItems(Dataset):
    """(image tensor, label, index) per item; a BadImage record instead of raising inside a worker."""

    def __init__(self, items: list[Item], transform, aug_seed: tuple[int, int] | None = None,
                 rows: Sequence[int] | None = None):
        self.items = items
        self.transform = transform
        self.aug_seed = aug_seed  # (seed, pass) for reproducible random augmentation
        # the items to load, as indices into `items` (all by default); an item's augmentation and the
        # index reported with it are those of its place in `items`, whichever part of them is loaded
        self.rows = range(len(items)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        index = self.rows[position]
        try:
            img = load_image(self.items[index].path)
        except DataError as e:
            return BadImage(index, str(e))
        if self.aug_seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(*self.aug_seed, index))
                x = self.transform(img)
        return x, self.items[index].label, index


def collate_images(batch):
    good = [b for b in batch if not isinstance(b, BadImage)]
    bad = [b for b in batch if isinstance(b, BadImage)]
    if not good:
        return None, None, torch.empty(0, dtype=torch.long), bad
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, labels, indices, bad


def own_generator() -> torch.Generator:
    """A DataLoader's generator for its workers' base seed, which it otherwise draws from torch's global
    generator: whether features came from the cache or were computed would then change what training
    draws next (dropout), and a resumed run would not end as an uninterrupted one. The workers' seeds
    matter to nothing else: each image's augmentation is seeded by its own (seed, pass, index)."""
    return torch.Generator().manual_seed(0)


def image_loader(dataset: ImageItems, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches in the items' order; on a GPU in pinned memory, so copies to the device run asynchronously.
    Each worker keeps torch's default two batches ready: decoding, not the queue, limits a GPU's intake,
    and a deeper queue only holds more pinned memory (a batch of 128 images at 224 px is 77 MB)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_images,
                      persistent_workers=False, generator=own_generator())
