"""Time per training step and peak memory of CoCoOp, KgCoOp, ProGrad, CLAP and LP++ at several class
counts, beside a path that computes what the original code computes.

The reference paths: CoCoOp runs the text tower once per image over all classes at the full context
length (the original's loop); KgCoOp and ProGrad run every class prompt at the full context length
in one pass (CoOp's original computation). promptlearn's paths: CoCoOp's B x C prompts batched,
truncated and in bounded passes; KgCoOp and ProGrad with truncated prompts and the shared prompt
start. CLAP and LP++ compute on cached features exactly as their authors' code does (a linear layer),
so they are measured alone. Each measurement runs in its own process; memory is compared as the rise
of the peak during the steps above the memory in use before them (`step_memory_mb`: the peak resident
set on Linux CPUs, after freed heap memory is handed back, so allocator reuse blurs differences of a
few MB; CUDA peak allocated on a GPU).
The features are random unit vectors (a step's cost does not depend on their values).
"""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from promptlearn.backbone import load_backbone
from promptlearn.benchmark import (
    class_names,
    clock,
    cpu_seconds,
    device_name,
    in_own_process,
    other_processes_share,
)
from promptlearn.config import RunConfig
from promptlearn.features import SplitFeatures
from promptlearn.methods import build_method
from promptlearn.trainer import build_optimizer, grad_scaler, optimizer_step

SEED = 1
PROMPT_METHODS = ("cocoop", "kgcoop", "prograd")  # measured beside the reference computation
MEMORY_RESOLUTION_MB = 1.0  # smaller rises of the peak resident set are allocator noise: no ratio


@dataclass
class MethodsBenchmarkSpec:
    model: str = "tiny-clip"
    methods: list[str] = field(default_factory=lambda: ["cocoop", "kgcoop", "prograd", "clap", "lp_pp"])
    classes: list[int] = field(default_factory=lambda: [10, 100, 1000])
    batch_size: int = 32  # features per step (CoCoOp: `cocoop_batch_size`)
    cocoop_batch_size: int = 4  # images per CoCoOp step (the original trains with 1)
    steps: int = 3  # measured steps after one warm-up step
    device: str = "cpu"


def run_config(spec: MethodsBenchmarkSpec, method: str, reference: bool) -> RunConfig:
    cfg = RunConfig()
    cfg.backbone.model, cfg.backbone.pretrained, cfg.backbone.device = spec.model, "none", spec.device
    cfg.data.template, cfg.cache_dir = "a photo of a {}.", "none"
    cfg.train.batch_size = spec.batch_size
    section = getattr(cfg, method)
    if reference and method in PROMPT_METHODS:  # every prompt at the full context length, all in one pass
        section.truncate_prompts = section.share_prefix = False
    return cfg


def random_features(n: int, width: int, classes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    x = F.normalize(torch.randn(n, width, generator=g), dim=-1)
    return x.to(device), (torch.arange(n) % classes).to(device)


def reset_peak(device: torch.device) -> float:
    """Start a fresh peak-memory count; returns the memory in use now (MB): CUDA allocated on a GPU,
    the resident set on Linux (writing 5 to /proc/self/clear_refs resets its high-water mark)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_mb("VmRSS")


def release_freed_heap() -> None:
    """Hand memory freed before the steps (building the method encodes every class's prompts) back to
    the OS, so that the steps' allocations raise the resident set instead of reusing it (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise is then a lower bound
        pass


def proc_status_mb(key: str) -> float:
    line = next(v for v in Path("/proc/self/status").read_text().splitlines() if v.startswith(key + ":"))
    return int(line.split()[1]) / 2**10  # kB


def step_memory(device: torch.device, before: float) -> dict:
    """How far the steps raised memory above what was in use before them (the loaded backbone and method)."""
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else proc_status_mb("VmHWM")
    return {"step_memory_mb": round(peak - before, 2), "peak_memory_mb": round(peak, 1),
            "memory_kind": "CUDA peak allocated" if device.type == "cuda" else "peak RSS (Linux VmHWM)"}


def measure(spec: MethodsBenchmarkSpec, method_name: str, classes: int, reference: bool) -> dict:
    cfg = run_config(spec, method_name, reference)
    backbone = load_backbone(cfg.backbone)
    torch.manual_seed(SEED)
    method = build_method(method_name, cfg, backbone, class_names(classes))
    batch = spec.cocoop_batch_size if method_name == "cocoop" else spec.batch_size
    x, y = random_features(batch, backbone.embed_dim, classes, backbone.device)
    before = reset_peak(backbone.device)
    if method_name == "lp_pp":  # full-batch gradient descent: a step is one epoch over the few-shot set
        return {**measure_lp_pp(cfg, method, x, y, spec.steps), **step_memory(backbone.device, before)}
    if reference and method_name == "cocoop":
        method.forward = method.per_image_logits  # the original's loop: one text pass per image
    optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], method.train_config)
    scaler = grad_scaler(backbone.device, backbone.precision)
    method.train()
    stamps = []
    for _ in range(1 + spec.steps):
        stamps.append(clock(backbone.device))
        with backbone.autocast():
            losses = method.training_step(x, y).losses
        optimizer_step(method, losses, optimizer, scaler)
    stamps.append(clock(backbone.device))
    step_s = statistics.median([b - a for a, b in zip(stamps[1:], stamps[2:])])
    length = method.prompts.token_ids.shape[1] if hasattr(method, "prompts") else None
    return {"time_per_step_s": step_s, "images_per_step": batch, "time_per_image_s": step_s / batch,
            "prompt_length": length, **step_memory(backbone.device, before)}


def measure_lp_pp(cfg: RunConfig, method, x: torch.Tensor, y: torch.Tensor, epochs: int) -> dict:
    class Bank:  # the few-shot features LP++ fits on and selects its epoch with
        train = val = SplitFeatures(x.cpu(), y.cpu(), [""] * len(y))

        def train_pass(self, index: int, augment: bool, crop_scale=None) -> SplitFeatures:
            return self.train

    cfg.lp_pp.epochs = 1
    method.fit(Bank(), None, None, False)  # warm-up
    cfg.lp_pp.epochs = epochs
    began = clock(method.device)
    method.fit(Bank(), None, None, False)
    step_s = (clock(method.device) - began) / epochs
    return {"time_per_step_s": step_s, "images_per_step": len(y), "time_per_image_s": step_s / len(y),
            "prompt_length": None}


def run_methods_benchmark(spec: MethodsBenchmarkSpec, log=print) -> dict:
    began, cpu_before = time.perf_counter(), cpu_seconds()
    results = []
    for name in spec.methods:
        for classes in spec.classes:
            row = {"method": name, "classes": classes}
            if name in PROMPT_METHODS:
                log(f"{name}, {classes} classes: reference")
                row["reference"] = in_own_process(measure, spec, name, classes, True)
            log(f"{name}, {classes} classes: promptlearn")
            row["promptlearn"] = ours = in_own_process(measure, spec, name, classes, False)
            theirs = row.get("reference")
            row["step_time_ratio"] = theirs["time_per_step_s"] / ours["time_per_step_s"] if theirs else None
            resolved = theirs and min(theirs["step_memory_mb"], ours["step_memory_mb"]) >= MEMORY_RESOLUTION_MB
            row["step_memory_ratio"] = theirs["step_memory_mb"] / ours["step_memory_mb"] if resolved else None
            results.append(row)
    return {"device": device_name(torch.device(spec.device)), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "backbone": spec.model, "pretrained": "none",
            "results": results, "benchmark_seconds": time.perf_counter() - began,
            "cpu_share_of_other_processes": other_processes_share(cpu_before, cpu_seconds()),
            "spec": asdict(spec)}
