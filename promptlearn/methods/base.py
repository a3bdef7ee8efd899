"""What every method is: a classifier over frozen, L2-normalised image features, with the capabilities
the runner reads (it never names a method) and optional hooks.

A new method is one module in this package (or a third-party module under the `promptlearn.methods`
entry-point group): a Method subclass decorated with `register_method(name, config=SectionDataclass)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from promptlearn.checkpoint import check_meta, load_checkpoint
from promptlearn.config import TRAINING_KEYS, origins, register_section, training_settings
from promptlearn.errors import CheckpointError
from promptlearn.features import TrainingFeatures, TrainingImages
from promptlearn.registry import METHODS
from promptlearn.trainer import StepLosses, backward_sum, cross_entropy_step

if TYPE_CHECKING:
    from promptlearn.backbone import FrozenCLIP
    from promptlearn.config import RunConfig, TrainConfig
    from promptlearn.data import DatasetSplits
    from promptlearn.features import FeatureBank, SplitFeatures
    from promptlearn.trainer import Trainer


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; the runner and the protocols decide from these alone."""

    learns: bool = False  # learns from the few-shot training images (False: zero-shot)
    trains: bool = False  # fit() runs the trainer: epochs, checkpoints, --resume
    cached_features: bool = True  # trains on cached frozen image features (False: images at every step)
    unseen_classes: bool = False  # scores classes it never trained on (base-to-novel, cross-dataset)
    decodes_prompt: bool = False  # has a learned prompt to read as words after training (after_training)
    eval_from_checkpoint: bool = False  # can be evaluated from a saved checkpoint (--eval-only)
    uses_validation: bool = False  # chooses hyper-parameters on the few-shot validation split
    static_step: bool = False  # its training step has fixed shapes and no host reads (CUDA graphs may replay it)

    def describe(self) -> str:
        return ", ".join(name.replace("_", " ") for name, value in vars(self).items() if value) or "zero-shot only"


@dataclass
class AfterTraining:
    """What a method adds to its results after training: metrics entries and a printed report."""

    metrics: dict
    report: str = ""


def register_method(name: str, config: type | None = None) -> Callable:
    """Register a Method subclass under `name`; `config` is its config section's dataclass (the section is
    called `name`: each method owns its settings)."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.section = name if config is not None else None
        if config is not None:
            register_section(name, config)
        return METHODS.add(name, cls)

    return add


def method_class(name: str) -> type["Method"]:
    return METHODS.get(name)


def build_method(name: str, cfg: "RunConfig", backbone: "FrozenCLIP", classnames: list[str]) -> "Method":
    return method_class(name)(cfg, backbone, classnames).to(backbone.device)


class Method(nn.Module):
    name = "method"
    section: str | None = None  # its config section, if any
    capabilities = Capabilities()
    # the training keys (config.TRAINING_KEYS) this method reads from its section; a given train.<key> or
    # <section>.<key> that a method would not read is refused (config.reach_problems)
    training_keys: frozenset[str] = frozenset()
    # why it reads no other training key, for those refusals
    unread_training: str = "it trains nothing"
    unset_epochs: str | None = None  # how long it trains when no epochs are set (None: the protocol's epochs)

    @classmethod
    def trains(cls) -> bool:
        """Whether it runs a training loop (a given train.<key> must then reach it)."""
        return cls.capabilities.trains or "epochs" in cls.training_keys

    @classmethod
    def unread_reason(cls, key: str) -> str:
        return f"{cls.name} reads no {key}: {cls.unread_training}"

    @classmethod
    def capabilities_for(cls, cfg: "RunConfig") -> Capabilities:
        """The capabilities under this config (a class-specific prompt cannot score unseen classes)."""
        return cls.capabilities

    def __init__(self, cfg: "RunConfig", backbone: "FrozenCLIP", classnames: list[str]):
        super().__init__()
        self.cfg, self.backbone, self.classnames = cfg, backbone, list(classnames)
        self.caps = self.capabilities_for(cfg)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def lr_key(self) -> str:
        """The config key that sets the learning rate this method trains with: its section's `lr` where that
        is set, else train.lr."""
        own = self.cfg.sections.get(self.section) if self.section else None
        if getattr(own, "lr", None) is None or origins(self.cfg).get(f"{self.section}.lr", "").startswith("train.lr"):
            return "train.lr"
        return f"{self.section}.lr"

    @property
    def train_config(self) -> "TrainConfig":
        """The training settings this method runs with (config.training_settings); not `training`, which is
        nn.Module's train/eval flag."""
        return training_settings(self.cfg, self.section)

    def fit(self, bank: "FeatureBank", trainer: "Trainer", checkpoint: Path, resume: bool) -> dict:
        """Learn from the few-shot features; returns facts worth reporting (chosen C, history...)."""
        return {}

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> StepLosses:
        """Hook: the logits and named losses of one training batch of image features (or of images, for
        methods that learn inside the image encoder); default: cross-entropy alone."""
        return cross_entropy_step(self, inputs, labels)

    def backward(self, losses: dict[str, torch.Tensor], scale: Callable) -> None:
        """Hook: fill the parameters' gradients from the step's losses (default: of their sum);
        `scale` is the loss scaler's (identity outside fp16)."""
        backward_sum(losses, scale)

    def training_features(self, bank: "FeatureBank") -> TrainingFeatures:
        """The features a learning method trains on: cached augmented passes (see feature_passes)."""
        train = self.train_config
        return TrainingFeatures(bank, train.feature_passes, train.augment, train.crop_scale)

    def end_of_epoch(self, epoch: int, epochs: int) -> None:
        """Hook: called by the trainer after epoch `epoch` (1-based) of `epochs`, before the checkpoint."""

    def test_features(self, bank: "FeatureBank", dataset: "DatasetSplits | None" = None) -> "SplitFeatures":
        """The features of `dataset`'s test images (default: the run's) that `predict` scores: the frozen
        backbone's, cached."""
        return bank.test_of(dataset)

    def scorer(self):
        """Logits as a function of image features, with any per-call work done once (for predict)."""
        return self

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Logits for many images, on the CPU."""
        self.eval()
        with self.backbone.autocast():
            score = self.scorer()
            return torch.cat([score(x.to(self.device)).float().cpu() for x in image_features.split(batch_size)])

    def after_training(self, folder: Path) -> AfterTraining | None:
        """Hook: anything to save, report or add to the metrics once the method is trained."""
        return None

    def checkpoint_meta(self) -> dict:
        """What a checkpoint must agree on to be loaded into this method."""
        return {"method": self.name, "model": self.backbone.name, "pretrained": self.backbone.pretrained,
                "classnames": self.classnames}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def restore(self, path: str | Path) -> dict:
        """Load a checkpoint written for this setup (a mismatch is named) and return its payload."""
        payload = load_checkpoint(path)
        check_meta(path, payload.get("meta", {}), self.checkpoint_meta())
        self.load_trainable_state(payload.get("state", {}), path)
        return payload

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str | Path) -> None:
        own = dict(self.named_parameters())
        for name, value in state.items():
            if name not in own:
                raise CheckpointError(f"checkpoint {source} has parameter {name!r}, which {self.name} lacks")
            if own[name].shape != value.shape:
                raise CheckpointError(f"checkpoint {source}: {name} has shape {tuple(value.shape)}, "
                                      f"{self.name} expects {tuple(own[name].shape)}")
            with torch.no_grad():
                own[name].copy_(value.to(own[name].device))


class ImageMethod(Method):
    """A method that learns inside the towers (deep prompts, LoRA): it cannot use cached image features.
    It trains on augmented images streamed through its own image encoder at every step, and is
    evaluated on test features of that encoder. Subclasses give `encode_images` (with gradients)
    and `text_features`."""

    capabilities = Capabilities(learns=True, trains=True, cached_features=False, unseen_classes=True,
                                eval_from_checkpoint=True)
    training_keys = frozenset(TRAINING_KEYS) - {"feature_passes"}
    unread_training = "it streams images through its own encoder at every step, so caches no feature passes"

    @property
    def visual(self) -> nn.Module:
        """The shared frozen image tower, read, never registered: the method's train() leaves it in eval mode and
        its parameters out of the method's."""
        return self.backbone.model.visual

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features through the method's own (prompted or adapted) image encoder."""
        raise NotImplementedError

    def text_features(self) -> torch.Tensor:
        """[C, D] L2-normalised class features."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_images(images), self.text_features())

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Hook: class scores of features (default: the backbone's scaled cosines)."""
        return self.backbone.logits(image_features, text_features)

    def scorer(self):
        text = self.text_features().float()  # once for all test images
        return lambda image_features: self.logits(image_features, text)

    @torch.no_grad()
    def _encode_for_test(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        with self.backbone.autocast():
            return self.encode_images(images.to(self.device, non_blocking=True)).float()

    def test_features(self, bank: "FeatureBank", dataset: "DatasetSplits | None" = None) -> "SplitFeatures":
        return bank.test_of(dataset, encode=self._encode_for_test)

    def training_images(self, bank: "FeatureBank") -> TrainingImages:
        train = self.train_config
        return TrainingImages(bank, train.augment, train.crop_scale)
