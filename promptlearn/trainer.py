"""One trainer for every method that learns: SGD (or Adam, AdamW) with a constant warm-up and a cosine schedule,
mixed precision on GPU, deterministic batches, atomic checkpoints, resume (bit for bit: the checkpoint keeps
the random-number states), Ctrl-C safe."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from promptlearn import distributed
from promptlearn.checkpoint import (
    DamagedCheckpoint,
    check_meta,
    random_states,
    restore_random_states,
    save_checkpoint,
    set_aside,
)
from promptlearn.config import TrainConfig
from promptlearn.errors import NonFinite, PromptlearnError
from promptlearn.features import batch_order
from promptlearn.progress import TrainingProgress

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
    lr_key: str  # the config key that set its learning rate, for the advice when training diverges
    backbone: object  # for autocast()
    capabilities: object  # its static_step: the trainer may capture the step as a CUDA graph

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
    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str | Path) -> None: ...

log = logging.getLogger("promptlearn")


NOT_IN_RECIPE = ("checkpoint_every", "sync_every", "cuda_graphs")  # how a run goes, not what it computes


class NonFiniteLoss(NonFinite):
    pass


def lr_factor(epoch: float, cfg: TrainConfig, epochs: float) -> float:
    """CoOp's schedule: constant warm-up lr for the first epochs, then cosine over all epochs, from train.lr
    down to train.min_lr. With train.lr_per_step, `epoch` is fractional (step / steps per epoch): with no
    warm-up that is CosineAnnealingLR(T_max = epochs x steps, eta_min = min_lr) stepped every iteration, as
    Tip-Adapter-F's and CLIP-LoRA's code do. `epochs` is fractional where train.max_steps ends training
    mid-epoch, so that the cosine reaches min_lr at the last step."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr / cfg.lr
    floor = cfg.min_lr / cfg.lr
    share = (epoch - cfg.warmup_epochs) / epochs if epochs else 0.0  # of the cosine run so far
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * share))


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":  # betas (0.9, 0.999), the decay as an L2 term of the gradient: Dassl's build_optimizer
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on GPU; a pass-through otherwise."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def optimizer_step(method: Trainable, losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    method.backward(losses, scaler.scale)  # a method may reshape its gradients (ProGrad projects them)
    apply_gradients(method, optimizer, scaler)


def apply_gradients(method: Trainable, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    distributed.average_gradients(method.parameters())  # under torchrun: the global batch's gradients
    scaler.step(optimizer)
    scaler.update()


def forward_backward(method: Trainable, x: torch.Tensor, y: torch.Tensor, weight: float, world: int,
                     scale: Callable, cache: bool = True) -> tuple[list[str], torch.Tensor]:
    """A step's losses and gradients (into .grad, which must be unset): the loss names and, on the
    device, the global batch's mean of each loss and its hits (summed over the ranks under torchrun)."""
    with method.backbone.autocast(cache):
        logits, losses = method.training_step(x, y)
        losses = {name: value * weight for name, value in losses.items()} if weight != 1 else losses
    values = torch.stack([*(v.detach().float() / world for v in losses.values()),
                          (logits.argmax(-1) == y).sum().float()])
    method.backward(losses, scale)  # a method may reshape its gradients (ProGrad projects them)
    return list(losses), distributed.summed(values)


class EpochTotals:
    """What an epoch adds up, kept on the device so that no step waits for the host: each loss summed over
    the images, the hits, and the first step whose loss was not finite (with that loss). `read` brings
    them to the host: every train.sync_every steps and at the epoch's end."""

    def __init__(self, device: torch.device):
        self.sums: torch.Tensor | None = None
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 1-based step; 0: none yet
        self.bad_loss = torch.zeros((), device=device)
        self.seen = 0

    def add(self, values: torch.Tensor, n: int, step: int) -> None:
        loss = values[:-1].sum()
        first = (self.first_bad == 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, step + 1, self.first_bad)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        weighted = torch.cat([values[:-1] * n, values[-1:]])
        self.sums = weighted if self.sums is None else self.sums + weighted
        self.seen += n

    def read(self) -> tuple[list[float], float, int, float]:
        """(each loss's mean over the images so far, accuracy %, first bad step or 0, its loss)."""
        if self.sums is None:  # no batch yet
            return [], 0.0, 0, 0.0
        values = torch.cat([self.sums, self.first_bad[None].float(), self.bad_loss[None]]).tolist()
        *losses, hits, bad_step, bad_loss = values
        seen = max(self.seen, 1)
        return [v / seen for v in losses], 100.0 * hits / seen, int(bad_step), bad_loss


class StepGraph:
    """A training step's forward and backward captured once as a CUDA graph and replayed for every batch
    of the captured shape: one launch for hundreds of kernels, with no Python between them (train.cuda_graphs).
    Only for methods that declare a fixed-shape step with no host reads (`Capabilities.static_step`), in
    one process. The first WARMUP steps run eagerly on a side stream, as capture requires; a step the
    capture cannot take (a host read, a CPU tensor) turns the graph off for the run, with a warning."""

    WARMUP = 2

    def __init__(self, method: Trainable, world: int):
        self.method, self.world = method, world
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple | None = None
        self.warmed, self.off = 0, False

    def step(self, x: torch.Tensor, y: torch.Tensor, weight: float, scale: Callable
             ) -> tuple[list[str], torch.Tensor] | None:
        """`forward_backward` of the batch, the gradients in .grad, or None where this batch runs eagerly
        (another shape than the captured one, or graphs off)."""
        if self.off or weight != 1 or (self.shape is not None and self.shape != (x.shape, y.shape)):
            return None
        self.shape = (x.shape, y.shape)
        if self.graph is None and self.warmed < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for p in self.params:
                    p.grad = None
                self.names, values = forward_backward(self.method, x, y, 1.0, self.world, scale, cache=False)
            torch.cuda.current_stream().wait_stream(side)
            self.warmed += 1
            return self.names, values
        if self.graph is None:
            self.capture(x, y, scale)
            if self.off:
                return None
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        for p, grad in zip(self.params, self.grads):  # an eager step in between may have replaced them
            p.grad = grad
        return self.names, self.values

    def capture(self, x: torch.Tensor, y: torch.Tensor, scale: Callable) -> None:
        self.x, self.y = x.clone(), y.clone()
        for p in self.params:
            p.grad = None  # the graph allocates the gradients it writes, and rewrites them at every replay
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                _, self.values = forward_backward(self.method, self.x, self.y, 1.0, self.world, scale, cache=False)
        except Exception as e:  # noqa: BLE001 - any failure to capture leaves the step eager, correct as before
            log.warning("%s: train.cuda_graphs is off for this run: its step could not be captured (%s)",
                        self.method.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.off = True
            for p in self.params:
                p.grad = None
            return
        self.graph, self.grads = graph, [p.grad for p in self.params]


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


def resume_random_states(saved: dict, checkpoint: Path, name: str) -> None:
    """This process's generators as they were after the checkpoint's epoch: each rank its own; a rank the
    checkpoint has none for (resumed on more processes than wrote it) takes rank 0's, as every rank starts
    from the same seed. A checkpoint written before they were saved restores none, with a warning."""
    states = saved.get("random_states")
    if states is None:
        log.warning("%s: checkpoint %s holds no random-number states (an older promptlearn wrote it): training "
                    "goes on from freshly seeded generators, so a method that draws at random while it trains "
                    "(CLIP-LoRA's dropout) will not end bit for bit as an uninterrupted run would", name, checkpoint)
        return
    rank = distributed.rank()
    restore_random_states(states[rank] if rank < len(states) else states[0])


class Trainer:
    def __init__(self, cfg: TrainConfig, epochs: int, seed: int, precision: str = "fp32",
                 on_epoch: Callable[[str, dict], None] | None = None):
        self.cfg, self.epochs, self.seed, self.precision = cfg, epochs, seed, precision
        self.on_epoch = on_epoch  # told each epoch's record as it ends (method name, record): experiment tracking

    def with_recipe(self, cfg: TrainConfig, epochs: int) -> "Trainer":
        """This trainer (seed, precision, listener) under a method's own recipe: optimiser, lr, batch size, epochs."""
        return Trainer(cfg, epochs, self.seed, self.precision, self.on_epoch)

    def recipe(self, data: "TrainingFeatures | TrainingImages") -> dict:
        """Everything that changes the result of training: resuming under another recipe is refused."""
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in NOT_IN_RECIPE}
        return {**settings, "epochs": self.epochs, "seed": self.seed, **data.draw}

    def fit(self, method: Trainable, data: "TrainingFeatures | TrainingImages", checkpoint: Path,
            resume: bool = False) -> dict:
        cfg, device = self.cfg, method.device
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        world, sizes = distributed.world_size(), [len(b) for b in batch_order(data.images, cfg.batch_size, 0, 0,
                                                                              cfg.drop_last)]
        if cfg.min_lr > cfg.lr:  # a method's own lr may lie below train.min_lr, which would make the cosine climb
            raise PromptlearnError(f"train.min_lr ({cfg.min_lr}) is above {method.name}'s learning rate ({cfg.lr}); "
                                   f"set train.min_lr to {cfg.lr} or less")
        if min(sizes, default=world) < world:  # a rank with no images would leave the others waiting
            raise PromptlearnError(
                f"{method.name}: a global batch of {min(sizes)} images cannot be shared by {world} processes; "
                f"under torchrun use a batch size of at least {world} (train.batch_size, or the method's own, "
                f"such as cocoop.batch_size) and drop the last short batch (train.drop_last=true) where the "
                f"method's recipe allows, or run on fewer processes")
        steps = len(sizes)  # per epoch: counted by the scheduler with train.lr_per_step, spent by train.max_steps
        length = self.epochs if cfg.max_steps is None else min(self.epochs, cfg.max_steps / max(steps, 1))
        epochs = math.ceil(length)  # the last one cut short where train.max_steps ends training mid-epoch
        per_step = max(steps, 1) if cfg.lr_per_step else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t / per_step, cfg, length))
        scaler = grad_scaler(device, self.precision)
        graph = (StepGraph(method, world) if cfg.cuda_graphs and device.type == "cuda" and world == 1
                 and method.capabilities.static_step else None)
        meta, recipe = method.checkpoint_meta(), self.recipe(data)
        start, history, seconds_before = 0, [], 0.0
        saved = restore_unless_damaged(method, checkpoint) if resume and checkpoint.is_file() else None
        if saved is not None:
            check_meta(checkpoint, saved.get("recipe", {}), recipe, absent=dataclasses.asdict(TrainConfig()))
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):  # fp16's loss scale where it grew or backed off (empty where scaling is off)
                scaler.load_state_dict(saved["scaler"])
            start, history = int(saved["epoch"]), list(saved.get("history", []))
            seconds_before = float(saved.get("train_seconds", 0.0))
            resume_random_states(saved, checkpoint, method.name)
            log.info("%s: resumed from %s at epoch %d", method.name, checkpoint, start)
        began = time.perf_counter()

        def snapshot(epoch: int) -> dict:
            """Everything the next epoch starts from; taken at the epoch's end, so that a Ctrl-C later in the
            next epoch saves this, random-number states included (every rank's, in rank order)."""
            return {"method": method.name, "meta": meta, "recipe": recipe, "epoch": epoch, "epochs": epochs,
                    "state": method.trainable_state(), "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": list(history),
                    "random_states": distributed.gathered(random_states()),
                    "train_seconds": seconds_before + time.perf_counter() - began}

        def save(state: dict) -> None:
            if distributed.is_writer():  # every rank holds the same state; one file, written once
                save_checkpoint(checkpoint, state)

        last_done = snapshot(start)
        shown = TrainingProgress(method.name, epochs, steps, start, disable=not distributed.is_writer())
        try:
            for epoch in range(start, epochs):
                steps_left = None if cfg.max_steps is None else cfg.max_steps - epoch * steps
                history.append(self._epoch(method, data, optimizer, scheduler, scaler, epoch, epochs, steps_left,
                                           last_done["epoch"], graph, shown))
                shown.epoch_done(epoch + 1, history[-1]["loss"], history[-1]["accuracy"])
                method.end_of_epoch(epoch + 1, epochs)
                if self.on_epoch is not None:
                    self.on_epoch(method.name, history[-1])
                if not cfg.lr_per_step:
                    scheduler.step()
                last_done = snapshot(epoch + 1)
                log.info("%s epoch %d/%d: loss %.4f, train accuracy %.2f%%, lr %.2e", method.name, epoch + 1,
                         epochs, history[-1]["loss"], history[-1]["accuracy"], history[-1]["lr"])
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == epochs:
                    save(last_done)
        except KeyboardInterrupt:
            save(last_done)
            raise PromptlearnError(f"interrupted; saved the state after epoch {last_done['epoch']} to "
                                   f"{checkpoint}. Rerun with --resume to continue.") from None
        except NonFiniteLoss:
            method.load_trainable_state(last_done["state"], checkpoint)  # no step after the bad one is kept
            save(last_done)  # the last good state, whatever checkpoint_every is
            raise
        finally:
            shown.stop()
        shown.close()
        if epochs == 0 or start == epochs:
            save(last_done)
        return {"epochs": epochs, "train_seconds": last_done["train_seconds"], "history": history}

    def _epoch(self, method, data, optimizer, scheduler, scaler, epoch: int, epochs: int, steps_left: int | None,
               checkpoint_epoch: int, graph: StepGraph | None, shown: TrainingProgress) -> dict:
        """One epoch, ended after `steps_left` steps if that comes first (train.max_steps). Under torchrun each
        rank takes its share of every global batch and the gradients are averaged over the ranks
        (apply_gradients), so the ranks stay equal to one process with that batch. Losses and hits stay on the
        device (EpochTotals) until a read, so a GPU never waits for the host."""
        method.train()
        world, sync_every = distributed.world_size(), self.cfg.sync_every
        totals, names = EpochTotals(method.device), []
        batches = islice(data.batches(epoch, self.cfg.batch_size, self.seed, method.device, self.cfg.drop_last),
                         steps_left)

        def read(steps_done: int) -> tuple[list[float], float]:
            losses, accuracy, bad_step, bad_loss = totals.read()
            if bad_step:  # the same on every rank (the values are summed over the ranks): all stop together
                advice = (f"Try a lower {method.lr_key} or backbone.precision=fp32." if epoch or bad_step > 1 else
                          "It was so before any update, so not the learning rate: the training inputs (features "
                          "or images), the backbone's weights or the method's initial parameters are not finite.")
                raise NonFiniteLoss(
                    f"{method.name}: the loss became {bad_loss} at epoch {epoch + 1}, step {bad_step}; training "
                    f"stopped and the parameters went back to the state after epoch {checkpoint_epoch}, which the "
                    f"checkpoint keeps. {advice}")
            shown.show(epoch + 1, steps_done, sum(losses), accuracy)
            return losses, accuracy

        step = -1
        for step, (x, y, n) in enumerate(batches):  # this rank's share of a global batch of n images
            # weighted so that the gradients averaged over the ranks are those of the global batch's mean loss
            # (the weight is exactly 1 in one process)
            weight = len(y) * world / n
            done = graph.step(x, y, weight, scaler.scale) if graph is not None else None
            if done is None:
                optimizer.zero_grad(set_to_none=True)
                done = forward_backward(method, x, y, weight, world, scaler.scale)
            names, values = done
            apply_gradients(method, optimizer, scaler)
            if self.cfg.lr_per_step:
                scheduler.step()
            totals.add(values, n, step)
            if (step + 1) % sync_every == 0:
                read(step + 1)
            shown.step()
        losses, accuracy = read(step + 1)
        method.eval()
        parts = dict(zip(names, losses)) if len(losses) > 1 else {}
        return {"epoch": epoch + 1, "loss": sum(losses), "accuracy": accuracy,
                "lr": optimizer.param_groups[0]["lr"], **parts}
