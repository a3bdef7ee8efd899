"""One trainer for every method that learns: SGD (or AdamW) with a constant warm-up and a cosine schedule,
mixed precision on GPU, deterministic batches, atomic checkpoints, resume, Ctrl-C safe."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from promptlearn import distributed
from promptlearn.checkpoint import DamagedCheckpoint, check_meta, save_checkpoint, set_aside
from promptlearn.config import TrainConfig
from promptlearn.errors import PromptlearnError
from promptlearn.features import batch_order

if TYPE_CHECKING:
    from promptlearn.features import TrainingFeatures, TrainingImages


class StepLosses(NamedTuple):
    """One training batch: the logits and the named losses (the reported loss is their sum)."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor]


def cross_entropy_step(method, inputs: torch.Tensor, labels: torch.Tensor) -> StepLosses:
    """The default step: cross-entropy of the method's logits (inputs: image features, or images)."""
    logits = method(inputs)
    return StepLosses(logits, {"cross_entropy": F.cross_entropy(logits.float(), labels)})


def backward_sum(losses: dict[str, torch.Tensor], scale: Callable) -> None:
    """The default backward: gradients of the sum of the losses."""
    scale(sum(losses.values())).backward()


class Trainable(Protocol):
    """What the trainer needs of a method: its parameters, its loss and logits on a batch (image features,
    or images for methods that learn inside the image encoder), and its state."""

    name: str
    device: torch.device
    backbone: object  # for autocast()

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def train(self, mode: bool = True) -> object: ...
    def eval(self) -> object: ...
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor: ...
    def training_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> "StepLosses": ...
    def backward(self, losses: dict[str, torch.Tensor], scale: Callable) -> None: ...
    def end_of_epoch(self, epoch: int, epochs: int) -> None: ...
    def checkpoint_meta(self) -> dict: ...
    def trainable_state(self) -> dict[str, torch.Tensor]: ...
    def restore(self, path: str | Path) -> dict: ...

log = logging.getLogger("promptlearn")


class NonFiniteLoss(PromptlearnError):
    pass


def lr_factor(epoch: float, cfg: TrainConfig, epochs: int) -> float:
    """CoOp's schedule: constant warm-up lr for the first epochs, then cosine over all epochs. With
    train.lr_per_step, `epoch` is fractional (step / steps per epoch): with no warm-up that is
    CosineAnnealingLR over epochs x steps stepped every iteration, as Tip-Adapter-F's code does."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr / cfg.lr
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / max(epochs, 1)))


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on GPU; a pass-through otherwise."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def optimizer_step(method: Trainable, losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    method.backward(losses, scaler.scale)  # a method may reshape its gradients (ProGrad projects them)
    distributed.average_gradients(method.parameters())  # under torchrun: the global batch's gradients
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

    def recipe(self, data: "TrainingFeatures | TrainingImages") -> dict:
        """Everything that changes the result of training: resuming under another recipe is refused."""
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "checkpoint_every"}
        return {**settings, "epochs": self.epochs, "seed": self.seed, **data.draw}

    def fit(self, method: Trainable, data: "TrainingFeatures | TrainingImages", checkpoint: Path,
            resume: bool = False) -> dict:
        cfg, device = self.cfg, method.device
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        # the scheduler counts epochs, or steps with train.lr_per_step
        steps = len(batch_order(data.images, cfg.batch_size, 0, 0, cfg.drop_last)) if cfg.lr_per_step else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t / steps, cfg, self.epochs))
        scaler = grad_scaler(device, self.precision)
        meta, recipe = method.checkpoint_meta(), self.recipe(data)
        start, history, seconds_before = 0, [], 0.0
        saved = restore_unless_damaged(method, checkpoint) if resume and checkpoint.is_file() else None
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
                history.append(self._epoch(method, data, optimizer, scheduler, scaler, epoch, last_done["epoch"]))
                method.end_of_epoch(epoch + 1, self.epochs)
                if not cfg.lr_per_step:
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

    def _epoch(self, method, data, optimizer, scheduler, scaler, epoch: int, checkpoint_epoch: int) -> dict:
        """One epoch. Under torchrun each rank takes its share of every global batch and the gradients are
        averaged over the ranks (optimizer_step), so the ranks stay equal to one process with that batch."""
        method.train()
        world = distributed.world_size()
        total_loss, correct, seen, parts = 0.0, 0, 0, {}
        batches = data.batches(epoch, self.cfg.batch_size, self.seed, method.device, self.cfg.drop_last)
        bar = tqdm(batches, desc=f"{method.name} epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=not distributed.is_writer())
        for step, (x, y) in enumerate(bar):
            n = len(y)
            if world > 1:
                rows = distributed.local_share(torch.arange(n, device=y.device))
                x, y = x[rows], y[rows]
            # weighted so that the gradients averaged over the ranks are those of the global batch's mean loss
            # (the weight is exactly 1 in one process)
            weight = len(y) * world / n
            with method.backbone.autocast():
                logits, losses = method.training_step(x, y)
                losses = {name: value * weight for name, value in losses.items()} if weight != 1 else losses
            # the global batch's losses and hits, the same on every rank (so all stop together on a bad loss)
            totals = distributed.summed(torch.stack([*(v.detach().float() / world for v in losses.values()),
                                                     (logits.argmax(-1) == y).sum().float()]))
            batch_loss, hits = totals[:-1].sum(), totals[-1]
            if not torch.isfinite(batch_loss):
                raise NonFiniteLoss(
                    f"{method.name}: the loss became {batch_loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"training stopped before the parameters were updated; the checkpoint keeps the state "
                    f"after epoch {checkpoint_epoch}. Try a lower train.lr or backbone.precision=fp32.")
            optimizer_step(method, losses, optimizer, scaler)
            if self.cfg.lr_per_step:
                scheduler.step()
            total_loss += batch_loss.item() * n
            for name, value in zip(losses, totals[:-1].tolist()):
                parts[name] = parts.get(name, 0.0) + value * n
            correct += int(hits)
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        method.eval()
        parts = {name: value / max(seen, 1) for name, value in parts.items()} if len(parts) > 1 else {}
        return {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "accuracy": 100.0 * correct / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"], **parts}
