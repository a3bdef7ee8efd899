"""TCP, Textual-based Class-aware Prompt tuning (Yao et al., CVPR 2024): KgCoOp with class-aware tokens.

A small projection (Linear E -> E/4, QuickGELU, Linear E/4 -> n_ctx x width; PyTorch's default init) maps each
class's hand-crafted text feature (normalised, E its size) to n_ctx class-aware tokens. The prompt is
[SOS] [ctx_1 .. ctx_n] <words with the class name> [EOS]; at the input of text block `layer` (8 of 12) the
context positions are replaced by the class's own tokens, so blocks `layer`.. read class-aware tokens where the
first ones read the shared context. The loss is KgCoOp's: cross-entropy + weight x (1 - mean cosine to the
hand-crafted features). A class never trained on gets its tokens from its own hand-crafted feature.

Defaults are the authors' base-to-novel recipe (trainers/tcp.py, clip_text/model.py, configs/trainers/TCP/
vit_b16_ep100_ctxv1.yaml, scripts/base2new_train.sh): 4 random context vectors (std 0.02), tokens at block 8,
weight 8.0, Adam (eps 1e-3) lr 0.002, batch 32, 50 epochs, CoOp's warm-up and cosine schedule.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from open_clip.transformer import QuickGELU
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptlearn.config import template_problems
from promptlearn.deep_prompts import check_text_tower, text_tokens_at
from promptlearn.errors import ConfigError
from promptlearn.methods.base import Capabilities, register_method
from promptlearn.methods.kgcoop import KgCoOp, KgCoOpConfig
from promptlearn.prompts import CLASS_AT_END


@dataclass
class TCPConfig(KgCoOpConfig):
    section: ClassVar[str] = "tcp"
    n_ctx: Optional[int] = 4
    ctx_init: str = ""  # random normal, std 0.02 (the authors' CTX_INIT False)
    # what follows the context, {} the class name: the authors' CUSTOM_TEMPLATES less their "X X X X"
    prompt_template: str = CLASS_AT_END
    layer: int = 8  # the text block (0-based) at whose input the class-aware tokens replace the context
    share_prefix: bool = False  # the prompts share no start: from `layer` on their context positions differ
    lr: Optional[float] = 0.002
    batch_size: Optional[int] = 32
    epochs: Optional[int] = 50
    optimizer: Optional[str] = "adam"
    eps: Optional[float] = 1e-3  # the authors' edit of Dassl's Adam

    def problems(self) -> list[str]:
        found = super().problems()
        if self.layer < 0:
            found.append(f"tcp.layer must be 0 or more, got {self.layer}")
        if self.class_position != "end":
            found.append(f"tcp.class_position must be end (the class-aware tokens replace the context after the "
                         f"start token), got {self.class_position!r}")
        if self.class_specific:
            found.append("tcp.class_specific must be false: the class-aware tokens are what is per class")
        if self.share_prefix:
            found.append("tcp.share_prefix must be false: from tcp.layer on no two prompts share their start")
        found += template_problems("tcp.prompt_template", [self.prompt_template])
        return found


class ClassTokens(nn.Module):
    """The authors' meta_net: class features [C, E] -> class-aware tokens [C, n, width]."""

    def __init__(self, embed_dim: int, n_tokens: int, width: int):
        super().__init__()
        self.n_tokens, self.width = n_tokens, width
        self.net = nn.Sequential(OrderedDict([("linear1", nn.Linear(embed_dim, embed_dim // 4)),
                                              ("gelu", QuickGELU()),
                                              ("linear2", nn.Linear(embed_dim // 4, n_tokens * width))]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).unflatten(-1, (self.n_tokens, self.width))


@register_method("tcp", config=TCPConfig)
class TCP(KgCoOp):
    capabilities = Capabilities(learns=True, trains=True, unseen_classes=True, eval_from_checkpoint=True,
                                static_step=True)
    packs = False  # the class-aware tokens enter by a hook on a text block, which packed prompts do not run

    @classmethod
    def capabilities_for(cls, cfg) -> Capabilities:
        return cls.capabilities  # tcp.class_specific is refused

    def __init__(self, cfg, backbone, classnames):
        transformer = check_text_tower(backbone.text, "tcp")
        layer = cfg.tcp.layer
        if layer >= len(transformer.resblocks):
            raise ConfigError(f"tcp.layer={layer}: the text tower of {backbone.name} has "
                              f"{len(transformer.resblocks)} blocks (0 .. {len(transformer.resblocks) - 1})")
        super().__init__(cfg, backbone, classnames)
        self.start = len(backbone.tokenizer.start_ids)  # the context's first position
        self.class_tokens = ClassTokens(backbone.embed_dim, self.prompts.n_ctx, backbone.text.width).to(
            device=backbone.device, dtype=backbone.parameter_dtype)

    def words_after(self) -> str:
        return self.own.prompt_template

    def text_features(self) -> torch.Tensor:
        """[C, D] L2-normalised class features: the prompts with each class's tokens at block `layer`, in
        chunks of classes (under activation checkpointing while training, with tcp.class_chunk)."""
        tokens = self.class_tokens(self.hand_crafted.to(self.backbone.parameter_dtype))
        prompts, ids = self.prompts(), self.prompts.token_ids
        checkpointed = torch.is_grad_enabled() and self.own.class_chunk > 0
        parts = []
        for rows, _ in self.chunks:
            args = (prompts[rows], ids[rows], tokens[rows])
            parts.append(checkpoint(self.encode, *args, use_reentrant=False) if checkpointed else self.encode(*args))
        return self.backbone.normalize(torch.cat(parts))

    def encode(self, prompts: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features of prompt embeddings with class-aware `tokens` [C, n, width] at block `layer` (the hook is
        registered inside, so that a checkpointed recomputation runs it again)."""
        text = self.backbone.text
        with text_tokens_at(text.transformer, self.own.layer, self.start, tokens):
            return text.encode(prompts, ids)

    def after_training(self, folder):
        return None  # from block `layer` on, class-aware tokens stand where the context was: no prompt to read

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "layer": self.own.layer, "prompt_template": self.own.prompt_template}

