"""Speed and memory of promptlearn's CoOp beside a training loop faithful to the reference recipe.

The reference loop does what CoOp's original implementation does at every step: it loads and augments
a batch of training images, runs them through the frozen image encoder, and pushes every class prompt
through the text tower at the full context length (fp32 on the CPU, fp16 autocast on a GPU).
promptlearn's path trains on image features cached from a few augmented passes, runs prompts at the
longest real length, computes the shared prompt start once, and can chunk the classes (bf16 autocast
on a GPU). Both run on the same randomly initialised backbone and the same synthetic images, each in a
process of its own so that its peak memory is its own. A full protocol run is extrapolated from a few
measured steps (protocol epochs x N // batch size steps); the test-set evaluation, the same for both,
is left out.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from promptlearn.backbone import FrozenCLIP, load_backbone
from promptlearn.config import RunConfig, protocol_epochs, validate
from promptlearn.data import DATASETS
from promptlearn.data.base import Item
from promptlearn.data.loader import ImageItems, collate_images
from promptlearn.data.transforms import eval_transform, train_transform
from promptlearn.errors import ConfigError
from promptlearn.features import EpochFeatures, SplitFeatures, batch_order, extract_features, steps_per_epoch
from promptlearn.methods.coop import CoOp
from promptlearn.progress import set_quiet
from promptlearn.trainer import Trainer, build_optimizer, grad_scaler, lr_factor, optimizer_step

SEED = 1
SYNTHETIC_IMAGE_SIZE = 320  # about the size of a decoded ImageNet photo
# dense bf16 / fp16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0), ("V100", 125.0), ("T4", 65.0))
ADJECTIVES = ("red", "small", "spotted", "striped", "golden", "wild", "common", "giant", "little", "northern",
              "great", "black", "white", "mountain", "sea", "desert", "river", "garden", "royal", "grey")
NOUNS = ("fox", "heron", "beetle", "orchid", "tractor", "violin", "lantern", "teapot", "kayak", "cathedral",
         "sparrow", "tulip", "lobster", "cabinet", "espresso", "jellyfish", "harmonica", "wombat", "pretzel",
         "canoe", "lizard", "umbrella", "pelican", "bagel", "trombone", "cactus", "submarine", "otter", "kettle",
         "mushroom", "falcon", "scooter", "daisy", "walrus", "sandal", "lighthouse", "iguana", "waffle", "tiger",
         "parachute", "snail", "cello", "bison", "anchor", "robin", "zucchini", "hammer", "gecko", "carousel", "moth")


@dataclass
class BenchmarkSpec:
    model: str = "RN50"
    pretrained: str = "none"
    classes: int = 10
    shots: int = 16
    protocol: str = "default"  # the dataset whose protocol epochs apply ("imagenet": 50 at every K)
    epochs: int | None = None  # None: the protocol's epochs for `shots`
    n_ctx: int = 16
    batch_size: int = 32
    feature_passes: int = 10  # promptlearn's cached augmented passes
    class_chunk: int = 0  # promptlearn's classes per text-tower pass (0: all)
    device: str = "auto"
    precision: str | None = None  # promptlearn's; None: bf16 on a GPU (the reference runs fp16 there)
    num_workers: int | None = None  # image-loading workers of both paths; None: 0 on the CPU, up to 8 on a GPU
    reference_steps: int = 3  # measured steps, after `warmup_steps`
    promptlearn_steps: int = 20
    warmup_steps: int = 1
    feature_sample: int = 64  # images encoded to time promptlearn's feature extraction
    logit_images: int = 8
    reference: bool = True  # False: measure promptlearn alone (a class count the reference cannot afford)
    class_names: str = "synthetic"  # synthetic (two-word names) | imagenet (CLIP's ImageNet names, first N)
    cuda_graphs: bool = True  # promptlearn's step replayed as a CUDA graph on a GPU (train.cuda_graphs)
    quick: bool = False

    def quick_mode(self) -> "BenchmarkSpec":
        """Fewer measured steps and images: under a minute for RN50 on 2 CPU cores."""
        return BenchmarkSpec(**{**asdict(self), "reference_steps": 1, "promptlearn_steps": 5,
                                "feature_sample": 32, "logit_images": 4, "quick": True})

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())

    @property
    def workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return min(8, (os.cpu_count() or 1) - 1) if self.cuda else 0  # the CPU is busy computing otherwise

    @property
    def train_images(self) -> int:
        return self.classes * self.shots

    @property
    def run_epochs(self) -> int:
        fixed = DATASETS[self.protocol].epochs if self.protocol in DATASETS else None
        return protocol_epochs(self.shots, fixed) if self.epochs is None else self.epochs

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.train_images, self.batch_size)


# ----------------------------------------------------------------------------- data and models

def benchmark_class_names(kind: str, n: int) -> list[str]:
    """The classes of a measurement: CLIP's real ImageNet names (as open_clip ships them; their prompt
    lengths decide the text tower's work) or synthetic two-word names."""
    if kind == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if n > len(IMAGENET_CLASSNAMES):
            raise ConfigError(f"--classes {n}: ImageNet has {len(IMAGENET_CLASSNAMES)} class names")
        return list(IMAGENET_CLASSNAMES[:n])
    if kind != "synthetic":
        raise ConfigError(f"--class-names must be synthetic or imagenet, got {kind!r}")
    return class_names(n)


def class_names(n: int) -> list[str]:
    """n distinct two- or three-token names ("spotted otter"), like typical dataset class names."""
    names = [f"{ADJECTIVES[i // len(NOUNS) % len(ADJECTIVES)]} {NOUNS[i % len(NOUNS)]}" for i in range(n)]
    return [name if i < len(ADJECTIVES) * len(NOUNS) else f"{name} {i}" for i, name in enumerate(names)]


def synthetic_images(folder: Path, classes: int, shots: int, unique: int) -> list[Item]:
    """classes x shots training items over `unique` smooth random JPEGs, reused in turn: only the
    images a measurement touches need to exist."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = class_names(classes)
    files = []
    for i in range(min(unique, classes * shots)):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        path = folder / f"img{i:05d}.jpg"
        low.resize((SYNTHETIC_IMAGE_SIZE, SYNTHETIC_IMAGE_SIZE), Image.BICUBIC).save(path, quality=90)
        files.append(str(path))
    return [Item(files[i % len(files)], i // shots, names[i // shots]) for i in range(classes * shots)]


def run_config(spec: BenchmarkSpec, reference: bool) -> RunConfig:
    cfg = RunConfig()
    cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.device = spec.model, spec.pretrained, spec.device
    cfg.backbone.precision = ("fp16" if reference else spec.precision or "bf16") if spec.cuda else "fp32"
    cfg.coop.n_ctx = spec.n_ctx
    cfg.train.batch_size, cfg.train.feature_passes = spec.batch_size, spec.feature_passes
    cfg.data.num_workers, cfg.data.seed, cfg.cache_dir = spec.workers, SEED, "none"
    if reference:  # the plain computation: every prompt at full length, all classes at once
        cfg.coop.truncate_prompts = cfg.coop.share_prefix = False
        cfg.coop.class_chunk = 0
    else:
        cfg.coop.class_chunk, cfg.train.cuda_graphs = spec.class_chunk, spec.cuda_graphs
    validate(cfg)
    return cfg


def build_coop(cfg: RunConfig, backbone: FrozenCLIP, classnames: list[str]) -> CoOp:
    torch.manual_seed(cfg.data.seed)  # the same initial context in every process, as the runner seeds it
    return CoOp(cfg, backbone, classnames).to(backbone.device)


# ----------------------------------------------------------------------------- the reference loop

def reference_training(method: CoOp, items: list[Item], cfg: RunConfig, epochs: int, *, augment: bool = True,
                       max_steps: int | None = None, on_step: Callable[[], None] | None = None) -> CoOp:
    """CoOp trained as the original implementation does: each step loads its batch of images with
    the training transform and encodes it with the frozen image encoder. Batches, augmentation seeds,
    optimiser and schedule are promptlearn's, so with augmentation off it must reach the same context
    as training on cached features (the test of the feature cache)."""
    backbone, seed = method.backbone, cfg.data.seed
    optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg.train, epochs))
    scaler = grad_scaler(backbone.device, backbone.precision)
    transform, steps = train_transform(backbone, augment), 0
    method.train()
    for epoch in range(epochs):
        images = ImageItems(items, transform, (seed, epoch) if augment else None)
        batches = [b.tolist() for b in batch_order(len(items), cfg.train.batch_size, seed, epoch)]
        loader = DataLoader(images, batch_sampler=batches, num_workers=cfg.data.num_workers,
                            collate_fn=collate_images, pin_memory=backbone.device.type == "cuda")
        for x, y, _, _ in loader:
            features = backbone.encode_images(x)
            with backbone.autocast():
                losses = method.training_step(features, y.to(backbone.device)).losses
            optimizer_step(method, losses, optimizer, scaler)
            steps += 1
            if on_step is not None:
                on_step()
            if steps == max_steps:
                return method
        scheduler.step()
    return method


# ----------------------------------------------------------------------------- measurements

def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated memory on a GPU, the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def memory_facts(device: torch.device, after_load: float) -> dict:
    return {"peak_memory_mb": round(peak_memory_mb(device), 1), "memory_after_load_mb": round(after_load, 1),
            "memory_kind": "CUDA peak allocated" if device.type == "cuda" else "peak RSS"}


def measure_reference(spec: BenchmarkSpec, classnames: list[str], items: list[Item]) -> dict:
    cfg = run_config(spec, reference=True)
    backbone = load_backbone(cfg.backbone)
    after_load = peak_memory_mb(backbone.device)
    method = build_coop(cfg, backbone, classnames)
    stamps = [clock(backbone.device)]
    reference_training(method, items, cfg, spec.run_epochs, max_steps=spec.warmup_steps + spec.reference_steps,
                       on_step=lambda: stamps.append(clock(backbone.device)))
    step_s = statistics.median(np.diff(stamps)[spec.warmup_steps:])
    total = spec.run_epochs * spec.steps_per_epoch
    memory = memory_facts(backbone.device, after_load)
    flops, text_s = text_tower_work(method, reps=1)
    return {"precision": backbone.precision, "prompt_length": method.prompts.token_ids.shape[1],
            "text_rows_per_step": method.text_rows(),
            "time_per_step_s": step_s, "measured_steps": spec.reference_steps,
            "full_run_s": total * step_s, "text_tower_flops_per_step": flops, "text_tower_s_per_step": text_s,
            **memory}


class _FixedFeatures(EpochFeatures):
    """Trainer data that gives the same features every epoch."""

    draw = {"dataset": "benchmark", "shots": 0}

    def __init__(self, split: SplitFeatures):
        self.split = split

    def epoch(self, epoch: int) -> SplitFeatures:
        return self.split


def measure_promptlearn(spec: BenchmarkSpec, classnames: list[str], items: list[Item]) -> dict:
    cfg = run_config(spec, reference=False)
    backbone = load_backbone(cfg.backbone)
    device = backbone.device
    after_load = peak_memory_mb(device)

    sample = items[:spec.feature_sample]
    batch = min(cfg.data.eval_batch_size, len(sample))

    def encode(images: list[Item]) -> SplitFeatures:  # one augmented pass, as FeatureBank.train_pass runs it
        return extract_features(backbone, images, train_transform(backbone), batch_size=batch,
                                num_workers=cfg.data.num_workers, skip_bad=False, aug_seed=(SEED, 0), desc="benchmark")
    encode(sample[:batch])  # warm-up at the measured batch shape
    began = clock(device)
    features = encode(sample)
    per_image_s = (clock(device) - began) / len(sample)

    method = build_coop(cfg, backbone, classnames)

    def steps(n: int) -> _FixedFeatures:  # one epoch of n batches drawn from the encoded sample
        rows = (torch.arange(n * spec.batch_size) % len(features)).tolist()
        return _FixedFeatures(SplitFeatures(features.features[rows], features.labels[rows],
                                            [features.paths[i] for i in rows]))
    trainer = Trainer(cfg.train, 1, SEED, backbone.precision)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(spec.warmup_steps):
            trainer.fit(method, steps(1), Path(tmp) / "warmup.pt")
        timed = trainer.fit(method, steps(spec.promptlearn_steps), Path(tmp) / "timed.pt")
    step_s = timed["train_seconds"] / spec.promptlearn_steps
    memory = memory_facts(device, after_load)  # before counting FLOPs: the counter holds on to activations
    flops, text_s = text_tower_work(method)
    passes = min(spec.feature_passes, spec.run_epochs) if spec.feature_passes else spec.run_epochs
    features_s = passes * spec.train_images * per_image_s
    training_s = spec.run_epochs * spec.steps_per_epoch * step_s
    peak = next((tflops for name, tflops in PEAK_TFLOPS if name in device_name(device)), None)
    achieved = flops / text_s / 1e12
    return {"precision": backbone.precision, "prompt_length": method.prompts.token_ids.shape[1],
            "shared_prefix_length": method.shared_start,
            "text_rows_per_step": method.text_rows(),
            "class_chunk": spec.class_chunk, "feature_passes": spec.feature_passes,
            "cuda_graphs": spec.cuda_graphs and device.type == "cuda",
            "time_per_step_s": step_s, "measured_steps": spec.promptlearn_steps,
            "feature_batch_size": batch, "feature_extraction_s_per_image": per_image_s,
            "feature_extraction_s": features_s,
            "training_s": training_s, "full_run_s": features_s + training_s,
            "text_tower_flops_per_step": flops, "text_tower_s_per_step": text_s, "text_tower_tflops": achieved,
            "device_peak_tflops": peak if device.type == "cuda" else None,
            "text_tower_utilisation": achieved / peak if peak and device.type == "cuda" else None, **memory}


def text_tower_work(method: CoOp, reps: int = 3) -> tuple[int, float]:
    """FLOPs (counted by PyTorch) and median seconds of the text tower's forward and backward in one step."""
    def step() -> None:
        method.zero_grad(set_to_none=True)
        with method.backbone.autocast():
            features = method.text_features()
        features.float().sum().backward()
    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(reps):
        began = clock(method.device)
        step()
        times.append(clock(method.device) - began)
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops(), statistics.median(times)


@torch.no_grad()
def max_logit_difference(spec: BenchmarkSpec, classnames: list[str], items: list[Item]) -> float:
    """Largest |logit| difference between the two paths' CoOp at the same context, both in fp32."""
    cfg = run_config(spec, reference=False)
    cfg.backbone.precision = "fp32"
    backbone = load_backbone(cfg.backbone)
    reference_cfg = run_config(spec, reference=True)
    reference_cfg.backbone.precision = "fp32"
    ours, theirs = build_coop(cfg, backbone, classnames), build_coop(reference_cfg, backbone, classnames)
    theirs.prompts.ctx.copy_(ours.prompts.ctx)
    images = extract_features(backbone, items[:spec.logit_images], eval_transform(backbone), batch_size=spec.batch_size,
                              num_workers=0, skip_bad=False, desc="benchmark").features.to(backbone.device)
    ours.eval(), theirs.eval()
    return float((ours(images) - theirs(images)).abs().max())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "unknown")
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_seconds() -> tuple[float, float, float] | None:
    """(busy seconds of the whole machine, its total seconds, this process's and its children's
    seconds) on Linux, to tell how much of the CPU other processes took during a measurement."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None
    import resource
    ticks = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, own  # idle and iowait are not busy


def other_processes_share(before, after) -> float | None:
    if before is None or after is None:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / total) if total > 0 else None


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def measuring_child(parent: int) -> None:
    """Set up a measuring process: it ends with the benchmark (SIGKILL when the parent dies, on Linux; a
    parent already gone ends it now) and shows no progress, which would interleave with the benchmark's."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    set_quiet(True)


def in_own_process(fn: Callable, *args):
    """fn(*args) in a fresh process (spawned: safe with CUDA), so its peak memory is its own. The process is
    not a daemon, so its data loaders may start workers of their own; it ends with the benchmark."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=measuring_child,
                             initargs=(os.getpid(),)) as pool:
        return pool.submit(fn, *args).result()


def ratio(reference: dict | None, ours: dict, key: str) -> float | None:
    return reference[key] / ours[key] if reference else None


def run_benchmark(spec: BenchmarkSpec, work_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    began, cpu_before = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        touched = spec.batch_size * (spec.warmup_steps + spec.reference_steps)
        items = synthetic_images(Path(tmp), spec.classes, spec.shots,
                                 max(touched, spec.feature_sample, spec.logit_images, 2))
        names = benchmark_class_names(spec.class_names, spec.classes)
        reference = None
        if spec.reference:
            log(f"reference loop: {spec.warmup_steps} + {spec.reference_steps} steps")
            reference = in_own_process(measure_reference, spec, names, items)
        log(f"promptlearn: {spec.feature_sample} images encoded, {spec.warmup_steps} + {spec.promptlearn_steps} steps")
        ours = in_own_process(measure_promptlearn, spec, names, items)
        log("logits of both paths at the same context")
        difference = max_logit_difference(spec, names, items)
    device = torch.device(("cuda" if spec.cuda else "cpu") if spec.device == "auto" else spec.device)
    return {"device": device_name(device), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "backbone": spec.model, "pretrained": spec.pretrained, "classes": spec.classes, "shots": spec.shots,
            "train_images": spec.train_images, "batch_size": spec.batch_size, "epochs": spec.run_epochs,
            "steps_per_epoch": spec.steps_per_epoch, "total_steps": spec.run_epochs * spec.steps_per_epoch,
            "n_ctx": spec.n_ctx, "num_workers": spec.workers, "quick": spec.quick,
            "class_names": spec.class_names, "reference": reference, "promptlearn": ours,
            "speedup": ratio(reference, ours, "full_run_s"),
            # the text tower's forward and backward of one step, the part the prompt shortcuts change
            "text_step_speedup": ratio(reference, ours, "text_tower_s_per_step"),
            "text_flop_ratio": ratio(reference, ours, "text_tower_flops_per_step"),
            "max_logit_difference": difference, "max_logit_diff": difference,
            "benchmark_seconds": time.perf_counter() - began,
            # the share of the machine's CPU time that other processes took: it slows both paths down
            "cpu_share_of_other_processes": other_processes_share(cpu_before, cpu_seconds()),
            "spec": asdict(spec)}
