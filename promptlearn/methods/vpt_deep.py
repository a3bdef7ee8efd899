"""VPT-deep (vision only): learned tokens in every layer of the image tower; the classifier is the
frozen text encoder's features of "<ctx_init> <class name>." (the authors' VPT baseline recipe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from promptlearn.methods.base import register_method
from promptlearn.methods.ivlp import IVLP, DeepPromptConfig


@dataclass
class VptDeepConfig(DeepPromptConfig):
    section = "vpt_deep"
    n_ctx_text: int = 0  # the text side stays frozen
    n_ctx_vision: int = 8
    depth_text: int = 1
    depth_vision: int = 12
    lr: Optional[float] = 0.0025

    def problems(self) -> list[str]:
        found = super().problems()
        if self.n_ctx_text or self.depth_text != 1:
            found.append("vpt_deep prompts the image tower only: leave vpt_deep.n_ctx_text at 0 and depth_text "
                         "at 1 (use ivlp for prompts in both towers)")
        if self.n_ctx_vision < 1:
            found.append(f"vpt_deep.n_ctx_vision must be at least 1, got {self.n_ctx_vision}")
        return found


@register_method("vpt_deep", config=VptDeepConfig)
class VptDeep(IVLP):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        with torch.no_grad():
            self.register_buffer("frozen_text", self.text.encode([]), persistent=False)

    def text_features(self) -> torch.Tensor:
        return self.frozen_text
