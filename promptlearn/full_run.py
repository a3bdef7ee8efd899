"""A whole ImageNet-sized CoOp run, timed end to end: `promptlearn benchmark-full-run`.

Where `promptlearn benchmark` extrapolates a run from measured steps, this one runs it: a synthetic
dataset in ImageNet's folder layout with CLIP's real ImageNet class names (their prompt lengths decide
the text tower's work) and JPEGs of ImageNet's typical size, then `promptlearn train` on it with CoOp
(the protocol's epochs, the cached augmented passes, evaluation on the test folder), and the run's own
run_info.json (time per phase, images per second, peak memory) read back. The images are smooth random
fields, so decoding them is cheaper than decoding photographs: the feature-extraction figure is an upper
bound for real data. Beside a `promptlearn benchmark` JSON of the same class count (`beside`), the run's
wall-clock is set against the reference loop's extrapolated run.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promptlearn.benchmark import device_name
from promptlearn.config import load_config, training_settings
from promptlearn.errors import ConfigError
from promptlearn.features import steps_per_epoch

IMAGE_SIZE = (500, 375)  # the commonest size of an ImageNet photo


@dataclass
class FullRunSpec:
    model: str = "RN50"
    pretrained: str = "none"
    classes: int = 1000
    shots: int = 16
    train_per_class: int = 20  # drawn from: K for training, min(K, 4) for validation
    test_per_class: int = 2
    unique_images: int = 512  # distinct JPEGs, hard-linked into the class folders in turn
    num_workers: int | None = None  # None: one per CPU core but one
    cuda_graphs: bool = True
    epochs: int | None = None  # None: the protocol's (ImageNet: 50)

    @property
    def workers(self) -> int:
        return self.num_workers if self.num_workers is not None else max(0, (os.cpu_count() or 1) - 1)


def _write_jpeg(args: tuple[int, str]) -> None:
    seed, path = args
    low = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(low).resize(IMAGE_SIZE, Image.BICUBIC).save(path, quality=90)


def write_imagenet_layout(root: Path, spec: FullRunSpec) -> None:
    """root/imagenet with classnames.txt (wnid, real class name), images/train/<wnid>/ and images/val/<wnid>/."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if spec.classes > len(IMAGENET_CLASSNAMES):
        raise ConfigError(f"--classes {spec.classes}: ImageNet has {len(IMAGENET_CLASSNAMES)} class names")
    base = root / "imagenet"
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    needed = spec.classes * (spec.train_per_class + spec.test_per_class)
    files = [str(pool / f"{i:05d}.JPEG") for i in range(min(spec.unique_images, needed))]
    with multiprocessing.get_context("spawn").Pool(max(1, spec.workers)) as workers:
        workers.map(_write_jpeg, list(enumerate(files)), chunksize=8)
    wnids = [f"n{i:08d}" for i in range(spec.classes)]
    lines = [f"{wnid} {name}" for wnid, name in zip(wnids, IMAGENET_CLASSNAMES)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "classnames.txt").write_text("\n".join(lines) + "\n")
    used = 0
    for split, per_class in (("train", spec.train_per_class), ("val", spec.test_per_class)):
        for wnid in wnids:
            folder = base / "images" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                target = folder / f"{wnid}_{k}.JPEG"
                try:
                    os.link(files[used % len(files)], target)
                except OSError:  # a file system without hard links
                    shutil.copyfile(files[used % len(files)], target)
                used += 1


def run_full(spec: FullRunSpec, work_dir: Path, beside: dict | None = None) -> dict:
    from promptlearn.runner import run_experiment

    work_dir = Path(work_dir)
    began = time.perf_counter()
    write_imagenet_layout(work_dir / "data", spec)
    written = time.perf_counter() - began
    overrides = ["data.name=imagenet", f"data.root={work_dir / 'data'}", f"data.shots={spec.shots}",
                 f"data.num_workers={spec.workers}", "data.eval_batch_size=256", "methods=[coop]",
                 f"backbone.model={spec.model}", f"backbone.pretrained={spec.pretrained}",
                 f"output_dir={work_dir / 'run'}", "cache_dir=none", f"train.cuda_graphs={spec.cuda_graphs}"]
    if spec.epochs is not None:
        overrides.append(f"train.epochs={spec.epochs}")
    cfg = load_config([], overrides)
    began = time.perf_counter()
    metrics = run_experiment(cfg)
    wall = time.perf_counter() - began
    info = json.loads((work_dir / "run" / "run_info.json").read_text())
    coop = metrics["coop"]
    history = json.loads((work_dir / "run" / "coop" / "history.json").read_text())
    settings = training_settings(cfg, "coop")  # what CoOp's trainer ran with
    steps = len(history) * steps_per_epoch(spec.classes * spec.shots, settings.batch_size, settings.drop_last)
    device = torch.device(info["environment"]["device"])
    result = {"device": device_name(device), "torch": torch.__version__, "backbone": spec.model,
              "classes": spec.classes, "class_names": "imagenet", "shots": spec.shots, "epochs": len(history),
              "total_steps": steps, "run_wall_s": wall, "dataset_written_s": written,
              "training_s": coop["phases"]["training_seconds"],  # the steps alone: feature extraction is apart
              "time_per_step_s": coop["phases"]["training_seconds"] / max(steps, 1),
              "run_info": info, "spec": asdict(spec)}
    return with_reference(result, beside) if beside is not None else result


def with_reference(result: dict, beside: dict) -> dict:
    """The full run's figures beside a `promptlearn benchmark` JSON of the same class count: the reference
    loop's time per step and extrapolated run, the speed-up of the whole run over it, and the largest
    logit difference of the two paths at the same context."""
    reference = beside.get("reference") or {}
    full = reference.get("full_run_s")
    return {**result, "reference_time_per_step_s": reference.get("time_per_step_s"), "reference_full_run_s": full,
            "speedup": full / result["run_wall_s"] if full else None, "max_logit_diff": beside.get("max_logit_diff")}
