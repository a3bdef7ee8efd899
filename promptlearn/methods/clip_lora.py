"""CLIP-LoRA: low-rank adapters on the attention projections of both encoders (Zanella & Ben Ayed).

Rank 2 on q, k and v of every block of both towers, scaling alpha / sqrt(rank) with alpha 1, dropout 0.25
on the adapters' input, AdamW (lr 2e-4, weight decay 0.01), batch 32, iterations_per_shot (500) x shots
iterations; the classifier is the adapted text encoder's features of one template per class
(clip_lora.templates, else the dataset's first). The adapters live in promptlearn.lora.

clip_lora.stop: `epochs` (the code default) trains whole epochs, as many as those iterations take;
`iterations` (the authors' code, set by the published recipe with its per-iteration cosine down to 1e-6 and
the last short batch kept) stops after exactly that many iterations, mid-epoch if need be.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.deep_prompts import checkpointed
from promptlearn.errors import ConfigError
from promptlearn.features import steps_per_epoch
from promptlearn.lora import PROJECTIONS, LoRAAttention, adaptable_blocks, attached
from promptlearn.methods.base import ImageMethod, register_method

ENCODERS = ("both", "vision", "text")
STOPS = ("epochs", "iterations")


@dataclass
class ClipLoraConfig(TrainingKeys):
    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    projections: str = "qkv"  # any of q, k, v, o
    layers: str = "all"  # "all" or block indices, e.g. "0,1,2,3" (the same for both towers)
    encoder: str = "both"  # both | vision | text
    lr: Optional[float] = 2e-4
    weight_decay: Optional[float] = 0.01
    batch_size: Optional[int] = 32
    optimizer: Optional[str] = "adamw"
    warmup_epochs: Optional[int] = 0
    iterations_per_shot: int = 500
    # epochs: whole epochs, as many as iterations_per_shot x shots iterations take | iterations: exactly that many
    stop: str = "epochs"
    templates: list[str] = field(default_factory=list)  # the classifier's one template; empty: the dataset's first
    grad_checkpointing: bool = False
    logit_scale: Optional[float] = None  # a fixed scale of the cosines (the authors' code: 100); None: the backbone's

    def given_problems(self, given) -> list[str]:
        """Epochs, where set, decide the length: a stop or iteration count given beside them would do nothing."""
        ignored = [k for k in ("clip_lora.stop", "clip_lora.iterations_per_shot") if k in given]
        if self.epochs is None or not ignored:
            return []
        return [f"clip_lora.epochs={self.epochs} trains whole epochs, so the given {' and '.join(ignored)} would "
                "do nothing: drop one of them (unset epochs: iterations_per_shot x shots iterations)"]

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.dropout < 1:
            found.append(f"clip_lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.projections or set(self.projections) - set(PROJECTIONS):
            found.append(f"clip_lora.projections must be letters of qkvo, got {self.projections!r}")
        if self.stop not in STOPS:
            found.append(f"clip_lora.stop must be one of {', '.join(STOPS)}, got {self.stop!r}")
        if len(self.templates) > 1:
            found.append(f"clip_lora.templates holds one template (the classifier is the adapted text encoder on one "
                         f"prompt per class), got {len(self.templates)}")
        if self.logit_scale is not None and self.logit_scale <= 0:
            found.append(f"clip_lora.logit_scale must be positive (or unset), got {self.logit_scale}")
        if self.encoder not in ENCODERS:
            found.append(f"clip_lora.encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.layers != "all" and not all(p.strip().isdigit() for p in self.layers.split(",")):
            found.append(f"clip_lora.layers must be 'all' or block indices such as '0,1,2', got {self.layers!r}")
        return found


def chosen(blocks: list[nn.Module], layers: str, tower: str) -> list[nn.Module]:
    if layers == "all":
        return blocks
    indices = sorted({int(p) for p in layers.split(",")})
    if indices[-1] >= len(blocks):
        raise ConfigError(f"clip_lora.layers names block {indices[-1]}, but the {tower} tower has "
                          f"{len(blocks)} blocks (0..{len(blocks) - 1})")
    return [blocks[i] for i in indices]


@register_method("clip_lora", config=ClipLoraConfig)
class ClipLora(ImageMethod):
    unset_epochs = "clip_lora.iterations_per_shot x shots iterations"
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        own = self.own = cfg.clip_lora
        towers = {"vision": getattr(backbone.model.visual, "transformer", backbone.model.visual),
                  "text": backbone.text.transformer}
        self.blocks: dict[str, list[nn.Module]] = {}
        self.adapters = nn.ModuleDict()
        for tower in ("vision", "text"):
            if own.encoder in (tower, "both"):
                blocks = chosen(adaptable_blocks(towers[tower], tower, self.name), own.layers, tower)
                self.blocks[tower] = blocks
                self.adapters[tower] = nn.ModuleList([LoRAAttention(b.attn, own.projections, own.rank, own.alpha,
                                                                    own.dropout) for b in blocks])
        self.adapters.to(backbone.device)
        template = self.template()
        self.register_buffer("token_ids", backbone.tokenizer([template.format(c) for c in classnames]),
                             persistent=False)
        if "text" not in self.adapters:
            with torch.no_grad():
                self.register_buffer("frozen_text", self.text_features(), persistent=False)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.own.logit_scale
        if scale is None:
            return self.backbone.logits(image_features, text_features)
        return scale * image_features @ text_features.t() + self.backbone.logit_bias

    def template(self) -> str:
        """clip_lora.templates' one, else the dataset's first (data.template(s) first, where given)."""
        return (self.own.templates or dataset_templates(self.cfg.data))[0]

    def _adapted(self, tower: str):
        return attached(self.blocks.get(tower, []), self.adapters[tower] if tower in self.adapters else [])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            with self._adapted("vision"):
                return self.backbone.model.encode_image(x)
        return F.normalize(checkpointed(run, images, enabled=self.own.grad_checkpointing).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        if "text" not in self.adapters and hasattr(self, "frozen_text"):
            return self.frozen_text

        def run(ids: torch.Tensor) -> torch.Tensor:
            with self._adapted("text"):
                return self.backbone.model.encode_text(ids)
        return F.normalize(checkpointed(run, self.token_ids, enabled=self.own.grad_checkpointing).float(), dim=-1)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        """iterations_per_shot x shots iterations: as many whole epochs as that takes, or (clip_lora.stop=
        iterations) exactly that many, the last epoch cut short (train.max_steps, where it is not smaller);
        clip_lora.epochs (or a given train.epochs), where set, trains that many whole epochs instead."""
        own, train = self.own, self.train_config
        data = self.training_images(bank)
        if train.epochs is not None:
            return trainer.fit(self, data, checkpoint, resume)
        iterations = own.iterations_per_shot * bank.fewshot.shots
        epochs = math.ceil(iterations / max(steps_per_epoch(len(data), train.batch_size, train.drop_last), 1))
        if own.stop == "iterations":
            train = dataclasses.replace(train, max_steps=min(iterations, train.max_steps or iterations))
        return trainer.with_recipe(train, epochs).fit(self, data, checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        meta.pop("classnames")  # the adapters fit any class list
        return {**meta, **{k: getattr(self.own, k) for k in ("rank", "alpha", "projections", "layers", "encoder")}}
