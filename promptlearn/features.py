"""Frozen image features: extracted once per (backbone, weights, dataset split, transform, pass),
cached on disk, and shared by every method that trains or fits on top of a frozen image encoder."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from filelock import FileLock
from torch.utils.data import DataLoader

from promptlearn import distributed
from promptlearn.backbone import FrozenCLIP
from promptlearn.checkpoint import content_digest
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.fewshot import FewShotSplit
from promptlearn.data.loader import ImageItems, collate_images, image_loader, own_generator
from promptlearn.data.transforms import DEFAULT_CROP_SCALE, eval_transform, train_transform
from promptlearn.errors import DataError, NonFinite
from promptlearn.io import TEMP_SUFFIX, atomic_write_bytes, file_creation_mode
from promptlearn.progress import progress

log = logging.getLogger("promptlearn")


class Batch(NamedTuple):
    """This process's share of one training step's global batch (all of it in one process)."""

    inputs: torch.Tensor  # features or images
    labels: torch.Tensor
    size: int  # the images of the global batch: every rank's shares together


@dataclass
class SplitFeatures:
    features: torch.Tensor  # [N, D] L2-normalised, fp32, CPU
    labels: torch.Tensor  # [N]
    paths: list[str]
    norms: torch.Tensor | None = None  # [N] L2 norms of the features before normalisation

    def __len__(self) -> int:
        return len(self.paths)


def non_finite_rows(values: torch.Tensor) -> tuple[int, int | None]:
    """(how many rows of `values` hold a NaN or an infinity, the first such row or None)."""
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    count = int(bad.sum())
    return count, int(bad.nonzero()[0]) if count else None


def extract_features(backbone: FrozenCLIP, items: list[Item], transform, *, batch_size: int,
                     num_workers: int, skip_bad: bool, aug_seed: tuple[int, int] | None = None,
                     desc: str = "features", encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     shared: bool = False) -> SplitFeatures:
    """Features of `items`, in their order (unreadable ones skipped with `skip_bad`), by the frozen backbone
    or by `encode` (a method's own image encoder). `shared`: under torchrun every rank calls this, encodes
    every N-th image and receives the others' (the same features on every rank, in 1/N of the time)."""
    share = shared and distributed.world_size() > 1
    rows = range(distributed.rank(), len(items), distributed.world_size()) if share else None
    loader = image_loader(ImageItems(items, transform, aug_seed, rows), batch_size, num_workers, backbone.device)
    features, norms, indices, skipped = [], [], [], []
    shown = progress(loader, desc=desc, unit="batch", disable=not distributed.is_writer())  # one display a split
    for images, _, batch_indices, bad in shown:
        if bad and not skip_bad:
            raise DataError(bad[0].message)
        skipped.extend(bad)
        if images is not None:
            # features stay on the device: a copy to the host per batch would wait for each batch's encoding
            if encode is None:  # the frozen backbone: keep each feature's norm (Tip-Adapter's raw-feature keys)
                raw = backbone.encode_images(images, normalize=False)
                features.append(torch.nn.functional.normalize(raw, dim=-1))
                norms.append(raw.norm(dim=-1))
            else:
                features.append(encode(images))
                norms.append(features[-1].norm(dim=-1))
            indices.append(batch_indices)
    if skipped:
        log.warning("%s: skipped %d unreadable images (data.skip_bad_images=true), e.g. %s",
                    desc, len(skipped), skipped[0].message)
    part = (torch.cat(features).cpu(), torch.cat(norms).cpu(), torch.cat(indices)) if features else None
    parts = [p for p in (distributed.gathered(part) if share else [part]) if p is not None]
    if not parts:
        raise DataError(f"{desc}: none of the {len(items)} images could be read")
    features, norms, indices = (torch.cat([p[j] for p in parts]) for j in range(3))  # every rank's part
    kept, order = indices.sort()  # in the items' order
    result = SplitFeatures(features[order], torch.tensor([items[i].label for i in kept.tolist()]),
                           [items[i].path for i in kept.tolist()], norms[order])
    bad, first = non_finite_rows(result.features)
    if bad:  # before any method, cache file or result is made of them
        encoder = (f"the backbone {backbone.name} (weights {backbone.pretrained})" if encode is None
                   else "the method's own image encoder")
        raise NonFinite(f"{desc}: {encoder} gave image features that are not finite (NaN or inf) for {bad} of "
                        f"{len(result)} images, e.g. {result.paths[first]}; check the weights (a damaged or "
                        "diverged checkpoint holds NaN) or try backbone.precision=fp32 (fp16 overflows)")
    return result


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
        # nothing is created here (the first write makes the folder), so a run that stops before extracting
        # leaves no empty cache folder, and processes starting together (torchrun) never remove one another's
        existing = next(p for p in [self.folder, *self.folder.parents] if p.exists())
        try:
            if existing == self.folder:
                probe = self.folder / f".write-test-{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
            elif not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            elif not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
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
                "aug_seed": aug_seed, "skip_bad": skip_bad, "precision": backbone.precision,
                "with_norms": True}  # files from before norms were kept are not read
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
            payload = {"features": result.features, "labels": result.labels, "paths": result.paths,
                       "norms": result.norms}
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
            intact = payload.pop("checksum") == content_digest(payload)
            cached = SplitFeatures(payload["features"], payload["labels"], list(payload["paths"]), payload["norms"])
        except Exception:  # any unreadable cache file is recomputed, never trusted
            intact = False
        if not intact:
            log.warning("feature cache %s is damaged; extracting again", path)
            return None
        bad, _ = non_finite_rows(cached.features)
        if bad:  # intact, so written so: by a version that did not check its backbone's output
            raise NonFinite(f"feature cache file {path} holds features that are not finite (NaN or inf) for {bad} "
                            f"of {len(cached)} images; delete it (the features are extracted again), or run "
                            "with cache_dir=none")
        return cached


class FeatureBank:
    """Features of one few-shot draw: plain train / val / test, and augmented training passes."""

    def __init__(self, backbone: FrozenCLIP, dataset: DatasetSplits, fewshot: FewShotSplit, *,
                 cache: FeatureCache, batch_size: int, num_workers: int, skip_bad: bool, seed: int):
        self.backbone, self.dataset, self.fewshot, self.cache = backbone, dataset, fewshot, cache
        self.batch_size, self.num_workers, self.skip_bad, self.seed = batch_size, num_workers, skip_bad, seed
        self._passes: dict[tuple[int, tuple], SplitFeatures] = {}  # (pass, crop scale) -> features
        self._tests: dict[tuple[Item, ...], SplitFeatures] = {}  # test items -> frozen features, read once a run
        self.extract_seconds = 0.0  # wall-clock spent encoding images (cache misses), for the run's phase times
        # images per split ("train", "train passes", "val", "test"), for run_info.json's images per second
        self.images_encoded: Counter[str] = Counter()
        self.images_from_cache: Counter[str] = Counter()

    def _features(self, items: list[Item], transform, aug_seed, desc: str, split: str,
                  cached: bool = True) -> SplitFeatures:
        encoded = False

        def compute() -> SplitFeatures:
            nonlocal encoded
            began = time.perf_counter()
            try:
                result = extract_features(self.backbone, items, transform, batch_size=self.batch_size,
                                          num_workers=self.num_workers, skip_bad=self.skip_bad,
                                          aug_seed=aug_seed, desc=desc, shared=not cached)
            finally:
                self.extract_seconds += time.perf_counter() - began
            encoded = True
            self.images_encoded[split] += len(result)
            return result
        if not cached:  # images streamed afresh each epoch (under torchrun, every rank encodes its share)
            return compute()
        result = self.cache.get_or_compute(self.cache.key(self.backbone, items, transform, aug_seed, self.skip_bad),
                                           compute)
        if not encoded:
            self.images_from_cache[split] += len(result)
        return result

    def extraction_record(self) -> dict:
        """Feature extraction in run_info.json: the images the frozen backbone encoded and those read from the
        feature cache (in all and per split), the seconds spent encoding, the rate, and the loader's settings."""
        encoded = sum(self.images_encoded.values())
        return {"images_encoded": encoded, "images_from_cache": sum(self.images_from_cache.values()),
                "seconds": round(self.extract_seconds, 3),
                "images_per_second": round(encoded / self.extract_seconds, 1) if encoded else None,
                "encoded_by_split": dict(self.images_encoded),
                "from_cache_by_split": dict(self.images_from_cache),
                "num_workers": self.num_workers, "batch_size": self.batch_size}

    @cached_property
    def train(self) -> SplitFeatures:
        return self._features(self.fewshot.train, eval_transform(self.backbone), None, "train features", "train")

    @cached_property
    def val(self) -> SplitFeatures:
        return self._features(self.fewshot.val, eval_transform(self.backbone), None, "val features", "val")

    @property
    def test(self) -> SplitFeatures:
        return self.test_of()

    def test_of(self, dataset: DatasetSplits | None = None,
                encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SplitFeatures:
        """The test split of `dataset` (default: the run's own; a protocol's novel classes or a target set) with
        the same backbone and cache. `encode`: a method's own image encoder (prompted or adapted), never cached."""
        dataset = dataset or self.dataset
        if encode is None:  # every method scoring frozen features reads them once, even with no feature cache
            key = tuple(dataset.test)
            if key not in self._tests:
                self._tests[key] = self._features(dataset.test, eval_transform(self.backbone), None,
                                                  f"{dataset.name} test features", "test")
            return self._tests[key]
        return extract_features(self.backbone, dataset.test, eval_transform(self.backbone),
                                batch_size=self.batch_size, num_workers=self.num_workers, skip_bad=self.skip_bad,
                                desc=f"{dataset.name} test features", encode=encode)

    def train_pass(self, index: int, augment: bool, cached: bool = True,
                   crop_scale=DEFAULT_CROP_SCALE) -> SplitFeatures:
        """Training features of augmented pass `index` (a fresh seeded crop and flip per image)."""
        if not augment:
            return self.train
        transform = train_transform(self.backbone, crop_scale=crop_scale)
        if not cached:
            return self._features(self.fewshot.train, transform, (self.seed, index), f"train pass {index}",
                                  "train passes", cached=False)
        key = (index, tuple(crop_scale))
        if key not in self._passes:
            self._passes[key] = self._features(self.fewshot.train, transform, (self.seed, index),
                                               f"train pass {index}", "train passes")
        return self._passes[key]


def batch_order(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[torch.Tensor]:
    """Shuffled batches that depend only on (seed, epoch); the last short batch is dropped as CoOp does
    (kept with drop_last=False)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    full = n - n % batch_size if n >= batch_size and drop_last else n
    return list(order[:full].split(batch_size)) if full else []


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """len(batch_order(n, batch_size, ..., drop_last)), without drawing the order."""
    return n // batch_size if n >= batch_size and drop_last else -(-n // batch_size)


class EpochFeatures:
    """Training data given as one SplitFeatures per epoch (`epoch`), served in shuffled batches."""

    def epoch(self, epoch: int) -> SplitFeatures:
        raise NotImplementedError

    @property
    def images(self) -> int:
        """Training images per epoch."""
        return len(self.epoch(0).labels)

    def batch_indices(self, size: int, epoch: int, batch_size: int, seed: int,
                      drop_last: bool = True) -> list[torch.Tensor]:
        """Each batch of epoch `epoch` as indices into its `size` features: the order `batch_order` gives."""
        return batch_order(size, batch_size, seed, epoch, drop_last)

    def batches(self, epoch: int, batch_size: int, seed: int, device: torch.device,
                drop_last: bool = True) -> Iterator[Batch]:
        """Batches of epoch `epoch` on `device`, in the order `batch_indices` gives; under torchrun this rank's
        share of each."""
        split = self.epoch(epoch)
        order = self.batch_indices(len(split.labels), epoch, batch_size, seed, drop_last)
        if not order:
            return
        used = torch.cat(order)
        # one host-to-device copy per epoch, not one per step, of the rows the epoch uses, in batch order (a
        # pool of passes holds many more than it uses)
        features = split.features[used].to(device, non_blocking=True)
        labels = split.labels[used].to(device, non_blocking=True)
        # the batches' positions made on the device: indices copied per step would make every step wait for the host
        for idx in torch.arange(len(used), device=device).split([len(i) for i in order]):
            own = distributed.local_share(idx)
            yield Batch(features[own], labels[own], len(idx))


class TrainingFeatures(EpochFeatures):
    """What the trainer draws batches from: epoch e uses cached pass e mod P, or (P = 0) encodes
    the training images afresh every epoch as the reference implementation does."""

    # in the recipe that resuming checks (see PooledPasses); None, not False, so that checkpoints written
    # before the key existed agree with this default
    pools_passes: bool | None = None

    def __init__(self, bank: FeatureBank, passes: int, augment: bool, crop_scale=DEFAULT_CROP_SCALE):
        self.bank, self.passes, self.augment, self.crop_scale = bank, passes, augment, tuple(crop_scale)

    @property
    def images(self) -> int:
        return len(self.bank.fewshot.train)

    @property
    def draw(self) -> dict:
        """Which few-shot draw these features come from, and how epochs draw from the passes (checked
        when training resumes)."""
        return {"dataset": self.bank.fewshot.dataset, "shots": self.bank.fewshot.shots,
                "pools_passes": self.pools_passes}

    def epoch(self, epoch: int) -> SplitFeatures:
        if self.passes == 0:
            return self.bank.train_pass(epoch, self.augment, cached=False, crop_scale=self.crop_scale)
        return self.bank.train_pass(epoch % self.passes, self.augment, crop_scale=self.crop_scale)

    def cached_passes(self) -> list[SplitFeatures]:
        """The cached augmented passes (at least one; without augmentation, the plain features once)."""
        passes = max(self.passes, 1) if self.augment else 1
        return [self.bank.train_pass(p, self.augment, crop_scale=self.crop_scale) for p in range(passes)]

    def pooled(self) -> SplitFeatures:
        """The cached passes end to end, pass after pass (CLAP's zero-shot multipliers and pooled epochs)."""
        splits = self.cached_passes()
        return SplitFeatures(torch.cat([s.features for s in splits]), torch.cat([s.labels for s in splits]),
                             [path for s in splits for path in s.paths])

    def mean_over_passes(self, raw: bool = False) -> torch.Tensor:
        """Features averaged over the cached passes, re-normalised (Tip-Adapter's cache keys): the
        normalised features, or with raw=True the features before normalisation (as Tip-Adapter's code)."""
        stack = torch.stack([s.features * s.norms[:, None] if raw else s.features for s in self.cached_passes()])
        return torch.nn.functional.normalize(stack.mean(0), dim=-1)


class PooledPasses(TrainingFeatures):
    """Epochs drawn from one pool of all the cached passes, as CLAP's code trains: every epoch shuffles the
    whole pool afresh and trains on as many batches as one pass of the N training images makes (with
    train.drop_last, the default: N // B, at least 1, the length of the authors' loader over the images),
    each the next B features of that shuffle. So no feature serves twice in an epoch, every batch is full
    (the whole pool when it holds fewer than B), and most of the pool waits for a later shuffle (about one
    pass's worth is used per epoch)."""

    pools_passes = True

    def epoch(self, epoch: int) -> SplitFeatures:
        return self.pool

    def pooled(self) -> SplitFeatures:
        return self.pool

    @cached_property
    def pool(self) -> SplitFeatures:
        return super().pooled()

    def batch_indices(self, size: int, epoch: int, batch_size: int, seed: int,
                      drop_last: bool = True) -> list[torch.Tensor]:
        steps = steps_per_epoch(self.images, batch_size, drop_last)
        return batch_order(size, batch_size, seed, epoch, drop_last)[:steps]


class TrainingImages:
    """For methods that learn inside the image encoder: the few-shot training images themselves,
    augmented afresh every epoch (the crop and flip of image i in epoch e depend only on the seed, e
    and i) and loaded by worker processes into pinned memory, in the trainer's deterministic order."""

    def __init__(self, bank: FeatureBank, augment: bool, crop_scale=DEFAULT_CROP_SCALE):
        self.bank, self.augment, self.crop_scale = bank, augment, tuple(crop_scale)

    @property
    def draw(self) -> dict:
        return {"dataset": self.bank.fewshot.dataset, "shots": self.bank.fewshot.shots, "images": True}

    @property
    def images(self) -> int:
        return len(self.bank.fewshot.train)

    def __len__(self) -> int:
        return self.images

    def batches(self, epoch: int, batch_size: int, seed: int, device: torch.device,
                drop_last: bool = True) -> Iterator[Batch]:
        bank = self.bank
        items = ImageItems(bank.fewshot.train, train_transform(bank.backbone, self.augment, self.crop_scale),
                           (bank.seed, epoch) if self.augment else None)
        order = batch_order(len(items), batch_size, seed, epoch, drop_last)
        # under torchrun each rank decodes only its share of every global batch
        shares = [distributed.local_share(idx).tolist() for idx in order]
        loader = DataLoader(items, batch_sampler=shares, num_workers=bank.num_workers,
                            pin_memory=device.type == "cuda", collate_fn=collate_images, generator=own_generator())
        for (images, labels, _, bad), idx in zip(loader, order):
            unloaded, empty = len(bad), images is None
            if distributed.world_size() > 1:
                # the ranks agree on the images that did not load: all stop together, or all skip a step some
                # rank has no image of (one rank alone stopping would leave the others waiting)
                unloaded, empty = distributed.summed(torch.tensor([len(bad), images is None], device=device)).tolist()
            if unloaded and not bank.skip_bad:
                raise DataError(bad[0].message if bad else f"{unloaded} training image(s) of this step could not be "
                                "read by another process (its log names them); fix or remove them, or set "
                                "data.skip_bad_images=true")
            size = len(idx) - unloaded
            if not empty:
                yield Batch(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), size)
