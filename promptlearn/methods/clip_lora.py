"""CLIP-LoRA: low-rank adapters on the attention projections of both encoders (Zanella & Ben Ayed).

The published recipe, one for every dataset and shot count: rank 2 on q, k and v of every block of
both towers, scaling alpha / sqrt(rank) with alpha 1, dropout 0.25 on the adapters' input, AdamW
(lr 2e-4, weight decay 0.01), batch 32, 500 x shots iterations; the classifier is the adapted text
encoder's features of the dataset's first template. The adapters live in promptlearn.lora.

clip_lora.protocol=reference follows the published training loop otherwise: the cosine stepped every
iteration down to 1e-6, training stopped after exactly 500 x shots iterations (mid-epoch), the last short
batch kept, and "a photo of a {}." for every dataset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TRAINING_KEYS, TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.data.registry import DEFAULT_TEMPLATE, chosen_templates
from promptlearn.deep_prompts import checkpointed
from promptlearn.errors import ConfigError
from promptlearn.features import steps_per_epoch
from promptlearn.lora import PROJECTIONS, LoRAAttention, adaptable_blocks, attached
from promptlearn.methods.base import ImageMethod, protocol_problems, register_method

ENCODERS = ("both", "vision", "text")
REFERENCE_MIN_LR = 1e-6  # the published code's eta_min


@dataclass
class ClipLoraConfig(TrainingKeys):
    protocol: str = "promptlearn"  # promptlearn | reference (the published code's schedule, step count, template)
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
    grad_checkpointing: bool = False
    logit_scale: Optional[float] = None  # a fixed scale of the cosines (the authors' code: 100); None: the backbone's

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.dropout < 1:
            found.append(f"clip_lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.projections or set(self.projections) - set(PROJECTIONS):
            found.append(f"clip_lora.projections must be letters of qkvo, got {self.projections!r}")
        found += protocol_problems("clip_lora", self.protocol)
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
    training_keys = frozenset(TRAINING_KEYS) - {"epochs", "feature_passes"}
    unread_training = ("it trains for clip_lora.iterations_per_shot x shots iterations, on images streamed through "
                       "its adapted encoder at every step")
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
        """The dataset's first template; under the reference "a photo of a {}.", unless data.template(s) is set."""
        data = self.cfg.data
        if self.own.protocol == "reference" and not chosen_templates(data):
            return DEFAULT_TEMPLATE  # the published code's for every dataset
        return dataset_templates(data)[0]

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
        """AdamW with a cosine and no warm-up for iterations_per_shot x shots iterations: as many epochs as
        that takes, the cosine stepped per epoch; the reference steps it every iteration down to 1e-6, keeps
        the last short batch and stops at exactly that many iterations."""
        own = self.own
        iterations = own.iterations_per_shot * bank.fewshot.shots
        recipe = self.train_config
        if own.protocol == "reference":
            recipe = dataclasses.replace(recipe, lr_per_step=True, min_lr=REFERENCE_MIN_LR, max_steps=iterations,
                                         drop_last=False)
        data = self.training_images(bank)
        steps = steps_per_epoch(len(data), recipe.batch_size, recipe.drop_last)
        epochs = math.ceil(iterations / max(steps, 1))
        return trainer.with_recipe(recipe, epochs).fit(self, data, checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        meta.pop("classnames")  # the adapters fit any class list
        return {**meta, **{k: getattr(self.own, k) for k in ("rank", "alpha", "projections", "layers", "encoder")}}
