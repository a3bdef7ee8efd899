"""IVLP: independent deep vision-language prompts (the baseline of the MaPLe paper), and the pieces
the other deep-prompt methods (vpt_deep, maple, promptsrc) share.

Text: the prompt is "<ctx_init> <class name>." with its first n_ctx_text tokens learned (initialised
from the phrase's own embeddings; random normal std 0.02 without a phrase, or when n_ctx_text is
longer than it), and at the input of text blocks 1 .. depth_text-1 those positions are replaced by
each block's own learned tokens. Image: n_ctx_vision learned tokens appended after the positional
embedding, replaced at the input of image blocks 1 .. depth_vision-1 (see promptlearn.deep_prompts).
Defaults are the authors' base-to-novel recipe for ViT-B/16.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.backbone import FrozenCLIP
from promptlearn.config import TrainingKeys
from promptlearn.deep_prompts import check_text_tower, checkpointed, image_tower, text_prompts, vision_prompts
from promptlearn.errors import ConfigError
from promptlearn.methods.base import ImageMethod, register_method
from promptlearn.prompts import layout_prompt, padded_ids

PROMPT_STD = 0.02  # random init of every learned token


@dataclass
class DeepPromptConfig(TrainingKeys):
    n_ctx_text: int = 2  # learned tokens in the text prompt (0: text side frozen)
    n_ctx_vision: int = 2  # learned tokens in the image sequence
    depth_text: int = 12  # text blocks whose input carries learned tokens (1: the first layer only)
    depth_vision: int = 12
    ctx_init: str = "a photo of a"  # the text prompt's phrase; its first n_ctx_text tokens are learned
    lr: Optional[float] = 0.0035
    batch_size: Optional[int] = 4
    epochs: Optional[int] = 5
    grad_checkpointing: bool = False  # recompute each tower's activations in backward: less memory

    def problems(self) -> list[str]:
        name = type(self).section
        found = [f"{name}.{key} must be at least {low}, got {getattr(self, key)}"
                 for key, low in (("n_ctx_text", 0), ("n_ctx_vision", 0), ("depth_text", 1), ("depth_vision", 1))
                 if getattr(self, key) < low]
        return found


@dataclass
class IVLPConfig(DeepPromptConfig):
    section = "ivlp"


class TextPrompts(nn.Module):
    """The text side: "<phrase> <name>." token embeddings with n learned tokens after the start token,
    and (depth - 1) deeper sets of n tokens."""

    def __init__(self, backbone: FrozenCLIP, classnames: list[str], n_ctx: int, ctx_init: str, depth: int):
        super().__init__()
        tok, tower = backbone.tokenizer, backbone.text
        phrase = tok.encode(ctx_init) if ctx_init.strip() else []
        from_phrase = 0 < n_ctx <= len(phrase)
        placeholder = phrase if from_phrase or (phrase and n_ctx == 0) else tok.encode("X") * n_ctx
        rows, positions = [], []
        for name in classnames:
            ids, pos = layout_prompt(tok, placeholder, name, "end")
            if len(ids) > tower.context_length:
                raise ConfigError(f"the prompt for class {name!r} is {len(ids)} tokens, more than the text tower's "
                                  f"context length {tower.context_length}; shorten the class name or ctx_init")
            rows.append(ids)
            positions.append(pos[:n_ctx])
        length = max(map(len, rows)) if tower.can_truncate else tower.context_length
        token_ids = padded_ids(rows, length, tok.pad_id).to(backbone.device)
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeds", tower.embed(token_ids).float(), persistent=False)
            if from_phrase:
                ctx = tower.embed(torch.tensor(phrase[:n_ctx], device=backbone.device)).float()
            else:
                ctx = torch.empty(n_ctx, tower.width, device=backbone.device).normal_(std=PROMPT_STD)
        self.start = len(tok.start_ids)
        self.ctx = nn.Parameter(ctx, requires_grad=n_ctx > 0)  # none: the text side stays frozen
        deep = torch.empty(max(depth - 1, 0) if n_ctx else 0, n_ctx, tower.width, device=backbone.device)
        self.deep = nn.Parameter(deep.normal_(std=PROMPT_STD), requires_grad=deep.numel() > 0)
        self.tower = tower
        # every prompt starts [SOS] [context]: that start runs once per step, the rest packed (as CoOp's)
        self.prefix = self.start + n_ctx
        self.packing = tower.packing(token_ids, self.prefix) if tower.can_share_prefix(token_ids, self.prefix) else None

    def embeddings(self) -> torch.Tensor:
        """[C, L, D]: the frozen embeddings with the first-layer context in place."""
        n = self.ctx.shape[0]
        ctx = self.ctx.to(self.token_embeds.dtype)[None].expand(len(self.token_embeds), -1, -1)
        return torch.cat([self.token_embeds[:, :self.start], ctx, self.token_embeds[:, self.start + n:]], dim=1)

    def encode(self, deep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[C, D] L2-normalised class features, with `deep` (default: the own deep tokens) at blocks 1.."""
        deep = list(self.deep) if deep is None else deep
        if self.packing is not None:
            prefix = torch.cat([self.token_embeds[0, :self.start], self.ctx.to(self.token_embeds.dtype)])
            states = self.tower.prefix_states(prefix, deep, self.start)
            features = self.tower.encode_packed(self.token_embeds[:, self.prefix:], self.packing, states)
        else:
            with text_prompts(self.tower.transformer, self.start, deep):
                features = self.tower.encode(self.embeddings(), self.token_ids)
        return F.normalize(features.float(), dim=-1)


class DeepPromptMethod(ImageMethod):
    """Learned tokens in both towers; subclasses choose where the tokens come from."""

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        own = getattr(cfg, self.section)
        self.own = own
        self.tower = image_tower(backbone.model, self.name)
        check_text_tower(backbone.text, self.name)
        if own.depth_vision > len(self.tower.blocks) or own.depth_text > len(backbone.text.transformer.resblocks):
            raise ConfigError(f"{self.name}.depth_vision={own.depth_vision} / depth_text={own.depth_text} exceed "
                              f"the towers' {len(self.tower.blocks)} image and "
                              f"{len(backbone.text.transformer.resblocks)} text layers of {backbone.name}")
        self.text = TextPrompts(backbone, classnames, own.n_ctx_text, own.ctx_init, own.depth_text)

    def vision_prompt_list(self) -> list[torch.Tensor]:
        """The image tokens per block: [0] appended before block 0, [i] replacing them before block i."""
        raise NotImplementedError

    def text_deep_list(self) -> list[torch.Tensor]:
        return list(self.text.deep)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            with vision_prompts(self.tower, self.vision_prompt_list()):
                out = self.visual(x)
            return out[0] if isinstance(out, tuple) else out  # CoCa's tower also returns its tokens
        return F.normalize(checkpointed(run, images, enabled=self.own.grad_checkpointing).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return checkpointed(lambda: self.text.encode(self.text_deep_list()), enabled=self.own.grad_checkpointing)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        return trainer.fit(self, self.training_images(bank), checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        meta.pop("classnames")  # the learned tokens fit any class list (base-to-novel, cross-dataset)
        return {**meta, **{f.name: getattr(self.own, f.name)
                                                for f in dataclasses.fields(self.own)
                                                if f.name.startswith(("n_ctx", "depth", "ctx_init"))}}


@register_method("ivlp", config=IVLPConfig)
class IVLP(DeepPromptMethod):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        own, width = self.own, self.tower.width
        shape = (own.depth_vision if own.n_ctx_vision else 0, own.n_ctx_vision, width)
        vision = torch.empty(shape, device=backbone.device).normal_(std=PROMPT_STD)
        self.vision = nn.Parameter(vision, requires_grad=vision.numel() > 0)

    def vision_prompt_list(self) -> list[torch.Tensor]:
        return list(self.vision)
