"""What every method is: a classifier over frozen, L2-normalised image features."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from promptlearn.checkpoint import check_meta, load_checkpoint
from promptlearn.errors import CheckpointError
from promptlearn.features import TrainingFeatures

if TYPE_CHECKING:
    from promptlearn.backbone import FrozenCLIP
    from promptlearn.config import RunConfig
    from promptlearn.features import FeatureBank
    from promptlearn.trainer import Trainer


class Method(nn.Module):
    name = "method"
    trains = False  # whether fit() runs the trainer and writes a checkpoint

    def __init__(self, cfg: "RunConfig", backbone: "FrozenCLIP", classnames: list[str]):
        super().__init__()
        self.cfg, self.backbone, self.classnames = cfg, backbone, list(classnames)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def fit(self, bank: "FeatureBank", trainer: "Trainer", checkpoint: Path, resume: bool) -> dict:
        """Learn from the few-shot features; returns facts worth reporting (chosen C, history...)."""
        return {}

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_features(self, bank: "FeatureBank") -> TrainingFeatures:
        """The features a learning method trains on: cached augmented passes (see train.feature_passes)."""
        return TrainingFeatures(bank, self.cfg.train.feature_passes, self.cfg.train.augment)

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
