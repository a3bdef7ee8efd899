"""One run on several processes (GPUs): `torchrun --nproc_per_node N tools/train_coop.py ...`.

Data-parallel over torch.distributed (gloo on the CPU, NCCL on GPUs), never nn.DataParallel: gradients
are all-reduced as DistributedDataParallel does, after each method's own backward hook. Every rank builds
the same few-shot draw, reads the
same cached features (the cache is locked per key, so they are extracted once) and starts from the
same parameters; each rank takes its share of every global batch, the gradients are averaged, and
rank 0 alone writes the run folder (checkpoints included). Without torchrun's environment nothing
here does anything.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """The process that writes the run folder: rank 0, or the only process."""
    return rank() == 0


def join_from_environment(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, ...):
    NCCL with one GPU per process, or gloo on the CPU. Returns this process's backbone.device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return device


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def average_gradients(parameters) -> None:
    """Every gradient averaged over the ranks with one all-reduce each, as DistributedDataParallel's reducer
    does, but after the method's own backward hook (ProGrad reshapes its gradients there); nothing in one
    process."""
    if world_size() == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def local_share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch of indices (every rank's parts together are the batch)."""
    return batch[rank()::world_size()]


def summed(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the ranks (itself in one process)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def gathered(value: object) -> list:
    """Every rank's `value` (any picklable object, CPU tensors included), in rank order."""
    if world_size() == 1:
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
