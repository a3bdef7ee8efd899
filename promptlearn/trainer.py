"""One trainer for every method that learns: SGD (or AdamW) with a constant warm-up and a cosine schedule,
mixed precision on GPU, deterministic batches, atomic checkpoints, resume, Ctrl-C safe."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from promptlearn import distributed
from promptlearn.checkpoint import DamagedCheckpoint, check_meta, save_checkpoint, set_aside
from promptlearn.config import TrainConfig
from promptlearn.errors import PromptlearnError

if TYPE_CHECKING:
    from promptlearn.features import TrainingFeatures


class Trainable(Protocol):
    """What the trainer needs of a method: its parameters, logits for image features, and its state."""

    name: str
    device: torch.device
    backbone: object  # for autocast()

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def train(self, mode: bool = True) -> object: ...
    def eval(self) -> object: ...
    def __call__(self, image_features: torch.Tensor) -> torch.Tensor: ...
    def checkpoint_meta(self) -> dict: ...
    def trainable_state(self) -> dict[str, torch.Tensor]: ...
    def restore(self, path: str | Path) -> dict: ...

log = logging.getLogger("promptlearn")


class NonFiniteLoss(PromptlearnError):
    pass


def lr_factor(epoch: int, cfg: TrainConfig, epochs: int) -> float:
    """CoOp's schedule: constant warm-up lr for the first epochs, then cosine over all epochs."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr / cfg.lr
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / max(epochs, 1)))


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled batches that depend only on (seed, epoch); the last short batch is dropped as CoOp does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    full = n - n % batch_size if n >= batch_size else n
    return list(order[:full].split(batch_size))


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on GPU; a pass-through otherwise."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def restore_unless_damaged(method: Trainable, checkpoint: Path) -> dict | None:
    """The checkpoint's payload, loaded into `method`. A damaged file (writes are atomic, so only outside
    damage does that) is never trusted: it is moved aside and training starts afresh (None)."""
    try:
        payload, damage = method.restore(checkpoint), None
    except DamagedCheckpoint as e:
        payload, damage = None, e
    distributed.barrier()  # under torchrun: every rank has read the file before rank 0 moves it
    if damage is not None and distributed.is_writer():
        log.warning("%s; moved it to %s and %s starts again from epoch 0", damage, set_aside(checkpoint), method.name)
    return payload


class Trainer:
    def __init__(self, cfg: TrainConfig, epochs: int, seed: int, precision: str = "fp32"):
        self.cfg, self.epochs, self.seed, self.precision = cfg, epochs, seed, precision

    def with_recipe(self, cfg: TrainConfig, epochs: int) -> "Trainer":
        """This trainer (seed, precision) under a method's own recipe: optimiser, lr, batch size, epochs."""
        return Trainer(cfg, epochs, self.seed, self.precision)

    def recipe(self, data: "TrainingFeatures") -> dict:
        """Everything that changes the result of training: resuming under another recipe is refused."""
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "checkpoint_every"}
        return {**settings, "epochs": self.epochs, "seed": self.seed, **data.draw}

    def fit(self, method: Trainable, data: "TrainingFeatures", checkpoint: Path, resume: bool = False) -> dict:
        cfg, device = self.cfg, method.device
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg, self.epochs))
        scaler = grad_scaler(device, self.precision)
        meta, recipe = method.checkpoint_meta(), self.recipe(data)
        start, history, seconds_before = 0, [], 0.0
        saved = restore_unless_damaged(method, checkpoint) if resume and checkpoint.is_file() else None
        model = distributed.data_parallel(method, device)  # after the restore: every rank starts equal
        if saved is not None:
            check_meta(checkpoint, saved.get("recipe", {}), recipe)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            start, history = int(saved["epoch"]), list(saved.get("history", []))
            seconds_before = float(saved.get("train_seconds", 0.0))
            log.info("%s: resumed from %s at epoch %d", method.name, checkpoint, start)
        began = time.perf_counter()

        def snapshot(epoch: int) -> dict:
            return {"method": method.name, "meta": meta, "recipe": recipe, "epoch": epoch, "epochs": self.epochs,
                    "state": method.trainable_state(), "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "scheduler": scheduler.state_dict(), "history": list(history),
                    "train_seconds": seconds_before + time.perf_counter() - began}

        def save(state: dict) -> None:
            if distributed.is_writer():  # every rank holds the same state; one file, written once
                save_checkpoint(checkpoint, state)

        last_done = snapshot(start)
        try:
            for epoch in range(start, self.epochs):
                history.append(self._epoch(method, model, data, optimizer, scaler, epoch, last_done["epoch"]))
                scheduler.step()
                last_done = snapshot(epoch + 1)
                log.info("%s epoch %d/%d: loss %.4f, train accuracy %.2f%%, lr %.2e", method.name, epoch + 1,
                         self.epochs, history[-1]["loss"], history[-1]["accuracy"], history[-1]["lr"])
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == self.epochs:
                    save(last_done)
        except KeyboardInterrupt:
            save(last_done)
            raise PromptlearnError(f"interrupted; saved the state after epoch {last_done['epoch']} to "
                                   f"{checkpoint}. Rerun with --resume to continue.") from None
        except NonFiniteLoss:
            save(last_done)  # the last good state, whatever checkpoint_every is
            raise
        if self.epochs == 0 or start == self.epochs:
            save(last_done)
        return {"epochs": self.epochs, "train_seconds": last_done["train_seconds"], "history": history}

    def _epoch(self, method, model, data, optimizer, scaler, epoch: int, checkpoint_epoch: int) -> dict:
        """One epoch; `model` is `method`, or its DistributedDataParallel wrapper when several processes
        share each global batch."""
        device = method.device
        split = data.epoch(epoch)
        # one host-to-device copy per epoch, not one per step
        features, labels = split.features.to(device, non_blocking=True), split.labels.to(device, non_blocking=True)
        batches = batch_order(len(labels), self.cfg.batch_size, self.seed, epoch)
        method.train()
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(batches, desc=f"{method.name} epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=not distributed.is_writer())
        for step, batch in enumerate(bar):
            idx = distributed.local_share(batch).to(device)
            x, y = features[idx], labels[idx]
            with method.backbone.autocast():
                logits = model(x)
                # weighted so that the gradients averaged over the ranks are those of the global batch's
                # mean loss (the weight is exactly 1 in one process)
                loss = F.cross_entropy(logits.float(), y) * (len(y) * distributed.world_size() / len(batch))
            # the global batch's loss and hits, the same on every rank (so all stop together on a bad loss)
            batch_loss, hits = distributed.summed(
                torch.stack([loss.detach() / distributed.world_size(), (logits.argmax(-1) == y).sum().float()]))
            if not torch.isfinite(batch_loss):
                raise NonFiniteLoss(
                    f"{method.name}: the loss became {batch_loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"training stopped before the parameters were updated; the checkpoint keeps the state "
                    f"after epoch {checkpoint_epoch}. Try a lower train.lr or backbone.precision=fp32.")
            optimizer_step(loss, optimizer, scaler)
            total_loss += batch_loss.item() * len(batch)
            correct += int(hits)
            seen += len(batch)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        method.eval()
        return {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "accuracy": 100.0 * correct / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"]}
