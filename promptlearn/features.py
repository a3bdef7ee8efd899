"""Frozen image features: extracted once per (backbone, weights, dataset split, transform, pass),
cached on disk, and shared by every method that trains or fits on top of a frozen image encoder."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from promptlearn import distributed
from promptlearn.backbone import FrozenCLIP
from promptlearn.checkpoint import content_digest
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.fewshot import FewShotSplit
from promptlearn.data.loader import ImageItems, image_loader
from promptlearn.data.transforms import eval_transform, train_transform
from promptlearn.errors import DataError
from promptlearn.io import TEMP_SUFFIX, atomic_write_bytes, file_creation_mode

log = logging.getLogger("promptlearn")


@dataclass
class SplitFeatures:
    features: torch.Tensor  # [N, D] L2-normalised, fp32, CPU
    labels: torch.Tensor  # [N]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def extract_features(backbone: FrozenCLIP, items: list[Item], transform, *, batch_size: int,
                     num_workers: int, skip_bad: bool, aug_seed: tuple[int, int] | None = None,
                     desc: str = "features", shared: bool = False) -> SplitFeatures:
    """Features of `items`, in their order (unreadable ones skipped with `skip_bad`). `shared`: under
    torchrun every rank calls this, encodes every N-th image and receives the others' (the same
    features on every rank, in 1/N of the time)."""
    share = shared and distributed.world_size() > 1
    rows = range(distributed.rank(), len(items), distributed.world_size()) if share else None
    loader = image_loader(ImageItems(items, transform, aug_seed, rows), batch_size, num_workers, backbone.device)
    features, indices, skipped = [], [], []
    for images, _, batch_indices, bad in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        if bad and not skip_bad:
            raise DataError(bad[0].message)
        skipped.extend(bad)
        if images is not None:
            features.append(backbone.encode_images(images).cpu())
            indices.append(batch_indices)
    if skipped:
        log.warning("%s: skipped %d unreadable images (data.skip_bad_images=true), e.g. %s",
                    desc, len(skipped), skipped[0].message)
    if share:  # every rank's part, put back in the items' order
        parts = [part for part in distributed.gathered(list(zip(features, indices))) if part]
        features, indices = [f for part in parts for f, _ in part], [i for part in parts for _, i in part]
    if not features:
        raise DataError(f"{desc}: none of the {len(items)} images could be read")
    kept, order = torch.cat(indices).sort()
    return SplitFeatures(torch.cat(features)[order], torch.tensor([items[i].label for i in kept.tolist()]),
                         [items[i].path for i in kept.tolist()])


STALE_TEMP_SECONDS = 24 * 3600  # a cache temp file untouched this long belongs to a killed extraction


def file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of a file, None if there is none: an atomic rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def file_state(path: str, content: bool = False) -> str:
    """What identifies a file's current contents: size and modification time, or (content=True) a hash."""
    try:
        if content:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "unreadable"  # the extraction itself names the file


class FeatureCache:
    """Feature files keyed by everything that changes them; written atomically with a checksum.

    A key has two parts, `<what>-<state>`: what is extracted (backbone, weights, image paths and labels,
    transform, pass) and the images' current state (each file's size and modification time, or a hash of
    its contents with `hash_content`). An entry whose first part matches but not its second was extracted
    from files that have changed since: it is reported as stale and replaced."""

    def __init__(self, folder: str | Path | None, hash_content: bool = False):
        self.folder = Path(folder).expanduser() if folder else None
        self.hash_content = hash_content

    @classmethod
    def from_setting(cls, setting: str, hash_content: bool = False) -> "FeatureCache":
        return cls(None if setting.strip().lower() in ("", "none") else setting, hash_content)

    def check(self) -> None:
        """Before a run loads anything: the cache folder can be written (with the way to run without it)."""
        if self.folder is None:
            return
        created = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            for folder in created:  # a run that stops before extracting leaves no empty cache folders
                folder.rmdir()
        except OSError as e:
            raise DataError(f"feature cache folder {self.folder} (cache_dir) cannot be written ({e.strerror or e}); "
                            "choose another with cache_dir=DIR, or run without a cache with cache_dir=none") from None

    def key(self, backbone: FrozenCLIP, items: list[Item], transform, aug_seed, skip_bad: bool) -> str:
        weights = backbone.pretrained
        if os.path.isfile(weights):  # a local file: its identity is its path, size and time
            st = os.stat(weights)
            weights = f"{os.path.abspath(weights)}:{st.st_size}:{st.st_mtime_ns}"
        listing = hashlib.sha256("\n".join(f"{it.path}\t{it.label}" for it in items).encode()).hexdigest()
        desc = {"model": backbone.name, "weights": weights, "items": listing, "transform": repr(transform),
                "aug_seed": aug_seed, "skip_bad": skip_bad, "precision": backbone.precision}
        what = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
        state = hashlib.sha256("\n".join(file_state(it.path, self.hash_content) for it in items).encode())
        return f"{what}-{'c' if self.hash_content else 's'}{state.hexdigest()[:16]}"

    def get_or_compute(self, key: str, compute: Callable[[], SplitFeatures]) -> SplitFeatures:
        """The cached features of `key`, or `compute()` written to the cache. Processes (and nodes on a
        shared filesystem) sharing the cache extract a key once: the first takes the key's lock and
        extracts, the others wait on the lock and then read its complete file (written atomically)."""
        if self.folder is None:
            return compute()
        path = self.folder / f"{key}.pt"
        seen = file_identity(path)
        if seen is not None:  # the common case needs no lock
            cached = self._read(path)
            if cached is not None:
                return cached
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder / f"{key}.lock", mode=file_creation_mode()):
            if file_identity(path) not in (None, seen):  # another process wrote it while we waited
                cached = self._read(path)
                if cached is not None:
                    return cached
            what, _, state = key.partition("-")
            stale_entries = [p for p in self.folder.glob(f"{what}-{state[:1]}*.pt") if p != path] if state else []
            for stale in stale_entries:  # the same images, extracted before they changed
                log.warning("feature cache %s is stale: its images changed on disk since (%s); extracting again",
                            stale, "contents" if self.hash_content else "size or modification time")
                stale.unlink(missing_ok=True)
            self.remove_stale_temps()
            result = compute()
            payload = {"features": result.features, "labels": result.labels, "paths": result.paths}
            payload["checksum"] = content_digest(payload)
            atomic_write_bytes(path, lambda f: torch.save(payload, f))
        return result

    def remove_stale_temps(self) -> None:
        """Temp files of extractions that were killed mid-write (another live writer's temp is recent)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.folder.glob(f".*{TEMP_SUFFIX}"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass  # gone already, or another process's to handle

    @staticmethod
    def _read(path: Path) -> SplitFeatures | None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.pop("checksum") == content_digest(payload):
                return SplitFeatures(payload["features"], payload["labels"], list(payload["paths"]))
        except Exception:  # any unreadable cache file is recomputed, never trusted
            pass
        log.warning("feature cache %s is damaged; extracting again", path)
        return None


class FeatureBank:
    """Features of one few-shot draw: plain train / val / test, and augmented training passes."""

    def __init__(self, backbone: FrozenCLIP, dataset: DatasetSplits, fewshot: FewShotSplit, *,
                 cache: FeatureCache, batch_size: int, num_workers: int, skip_bad: bool, seed: int):
        self.backbone, self.dataset, self.fewshot, self.cache = backbone, dataset, fewshot, cache
        self.batch_size, self.num_workers, self.skip_bad, self.seed = batch_size, num_workers, skip_bad, seed
        self._passes: dict[tuple[int, bool], SplitFeatures] = {}
        self.extract_seconds = 0.0  # wall-clock spent encoding images (cache misses), for the run's phase times

    def _features(self, items: list[Item], transform, aug_seed, desc: str, cached: bool = True) -> SplitFeatures:
        def compute() -> SplitFeatures:
            began = time.perf_counter()
            try:
                return extract_features(self.backbone, items, transform, batch_size=self.batch_size,
                                        num_workers=self.num_workers, skip_bad=self.skip_bad,
                                        aug_seed=aug_seed, desc=desc, shared=not cached)
            finally:
                self.extract_seconds += time.perf_counter() - began
        if not cached:  # images streamed afresh each epoch (under torchrun, every rank encodes its share)
            return compute()
        return self.cache.get_or_compute(self.cache.key(self.backbone, items, transform, aug_seed, self.skip_bad),
                                         compute)

    @cached_property
    def train(self) -> SplitFeatures:
        return self._features(self.fewshot.train, eval_transform(self.backbone), None, "train features")

    @cached_property
    def val(self) -> SplitFeatures:
        return self._features(self.fewshot.val, eval_transform(self.backbone), None, "val features")

    @cached_property
    def test(self) -> SplitFeatures:
        return self._features(self.dataset.test, eval_transform(self.backbone), None, "test features")

    def test_of(self, dataset: DatasetSplits) -> SplitFeatures:
        """The test split of another dataset (a protocol's novel classes or target set), same backbone and cache."""
        return self._features(dataset.test, eval_transform(self.backbone), None, f"{dataset.name} test features")

    def train_pass(self, index: int, augment: bool, cached: bool = True) -> SplitFeatures:
        """Training features of augmented pass `index` (a fresh seeded crop and flip per image)."""
        if not augment:
            return self.train
        if not cached:
            return self._features(self.fewshot.train, train_transform(self.backbone), (self.seed, index),
                                  f"train pass {index}", cached=False)
        if (index, augment) not in self._passes:
            self._passes[(index, augment)] = self._features(
                self.fewshot.train, train_transform(self.backbone), (self.seed, index), f"train pass {index}")
        return self._passes[(index, augment)]


class TrainingFeatures:
    """What the trainer draws batches from: epoch e uses cached pass e mod P, or (P = 0) encodes
    the training images afresh every epoch as the reference implementation does."""

    def __init__(self, bank: FeatureBank, passes: int, augment: bool):
        self.bank, self.passes, self.augment = bank, passes, augment

    @property
    def draw(self) -> dict:
        """Which few-shot draw these features come from (checked when training resumes)."""
        return {"dataset": self.bank.fewshot.dataset, "shots": self.bank.fewshot.shots}

    def epoch(self, epoch: int) -> SplitFeatures:
        if self.passes == 0:
            return self.bank.train_pass(epoch, self.augment, cached=False)
        return self.bank.train_pass(epoch % self.passes, self.augment)

    def mean_over_passes(self) -> torch.Tensor:
        """Features averaged over the cached passes, re-normalised (Tip-Adapter's cache keys)."""
        passes = max(self.passes, 1) if self.augment else 1
        stack = torch.stack([self.bank.train_pass(p, self.augment).features for p in range(passes)])
        return torch.nn.functional.normalize(stack.mean(0), dim=-1)
