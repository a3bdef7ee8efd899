"""MaPLe: multi-modal prompts, the image tokens of each layer produced from that layer's text tokens
by a linear coupling function (text width -> image width), to depth 9 by default.

The first layer's image tokens are proj(text context); block i's are proj_i(text deep tokens i), the
proj_i starting as copies of one initialisation, as the authors' code makes them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from promptlearn.methods.base import register_method
from promptlearn.methods.ivlp import DeepPromptConfig, DeepPromptMethod


@dataclass
class MapleConfig(DeepPromptConfig):
    section = "maple"
    n_ctx_text: int = 2  # MaPLe has one context length and one depth: text and image values must agree
    n_ctx_vision: int = 2
    depth_text: int = 9
    depth_vision: int = 9

    def problems(self) -> list[str]:
        found = super().problems()
        if self.n_ctx_text != self.n_ctx_vision or self.depth_text != self.depth_vision:
            found.append("maple couples each layer's image tokens to its text tokens: maple.n_ctx_vision must "
                         "equal maple.n_ctx_text and maple.depth_vision maple.depth_text (set both)")
        if self.n_ctx_text < 1:
            found.append(f"maple.n_ctx_text must be at least 1, got {self.n_ctx_text}")
        return found


@register_method("maple", config=MapleConfig)
class MaPLe(DeepPromptMethod):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        text_width, image_width = backbone.text.width, self.tower.width
        self.proj = nn.Linear(text_width, image_width).to(backbone.device)
        layer = nn.Linear(text_width, image_width).to(backbone.device)
        self.deep_proj = nn.ModuleList([copy.deepcopy(layer) for _ in range(self.own.depth_vision - 1)])

    def vision_prompt_list(self) -> list[torch.Tensor]:
        return [self.proj(self.text.ctx)] + [proj(deep) for proj, deep in zip(self.deep_proj, self.text.deep)]
