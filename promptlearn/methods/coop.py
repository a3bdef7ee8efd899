"""CoOp: learnable context vectors in the text prompt of a frozen CLIP.

A prompt is [SOS] [ctx_1 .. ctx_M] [class name] [.] [EOS] (class at the end; also middle and front),
laid out with the backbone's own tokenizer and run through its own text tower.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptlearn.backbone import FrozenCLIP
from promptlearn.config import CLASS_POSITIONS
from promptlearn.decoder import save_decoded_prompt
from promptlearn.errors import ConfigError, PromptlearnError
from promptlearn.methods.base import AfterTraining, Capabilities, Method, register_method
from promptlearn.prompts import layout_prompt, padded_ids

DEFAULT_N_CTX = 16
RANDOM_CTX_STD = 0.02


@dataclass
class CoOpConfig:
    section: ClassVar[str] = "coop"  # the section's name in messages (methods built on CoOp have their own)
    n_ctx: Optional[int] = None  # context length M (16 when unset); with ctx_init, the phrase's token count
    ctx_init: str = ""  # e.g. "a photo of a"; empty: random normal init, std 0.02
    class_specific: bool = False  # one context per class (CSC)
    class_position: str = "end"  # end | middle | front
    truncate_prompts: bool = True  # run each prompt at its own real length (grouped by length) where exact
    share_prefix: bool = True  # unified context, class at the end: run the shared prompt start once
    class_chunk: int = 0  # classes per text-tower pass (0: all at once); bounds memory

    def problems(self) -> list[str]:
        found = []
        if self.n_ctx is not None and self.n_ctx < 1:
            found.append(f"{self.section}.n_ctx must be at least 1, got {self.n_ctx} "
                         f"(or set {self.section}.ctx_init to a phrase)")
        if self.class_position not in CLASS_POSITIONS:
            found.append(f"{self.section}.class_position must be one of {', '.join(CLASS_POSITIONS)}, "
                         f"got {self.class_position!r}")
        if self.class_chunk < 0:
            found.append(f"{self.section}.class_chunk must be 0 or more, got {self.class_chunk}")
        return found


def context_length_and_init(backbone: FrozenCLIP, cfg: CoOpConfig) -> tuple[int, list[int] | None]:
    """M and the phrase's token ids (None for random init)."""
    if not cfg.ctx_init.strip():
        return cfg.n_ctx or DEFAULT_N_CTX, None
    ids = backbone.tokenizer.encode(cfg.ctx_init)
    if not ids:
        raise ConfigError(f"{cfg.section}.ctx_init {cfg.ctx_init!r} has no tokens; give a phrase or leave it empty")
    if cfg.n_ctx is not None and cfg.n_ctx != len(ids):
        raise ConfigError(f"{cfg.section}.n_ctx={cfg.n_ctx} conflicts with {cfg.section}.ctx_init {cfg.ctx_init!r}, "
                          f"which is {len(ids)} tokens; drop n_ctx or set it to {len(ids)}")
    return len(ids), ids


class PromptLearner(nn.Module):
    """The learnable context and the frozen embeddings of everything else in the prompts."""

    def __init__(self, backbone: FrozenCLIP, classnames: list[str], cfg: CoOpConfig, class_specific: bool):
        super().__init__()
        tok, tower = backbone.tokenizer, backbone.text
        n_ctx, init_ids = context_length_and_init(backbone, cfg)
        self.n_ctx, self.class_specific, self.position = n_ctx, class_specific, cfg.class_position
        n_cls = len(classnames)
        with torch.no_grad():
            if init_ids is not None:  # every class starts from the phrase, class-specific or not
                ctx = tower.embed(torch.tensor(init_ids, device=backbone.device)).float()
                ctx = ctx.expand(n_cls, -1, -1).clone() if class_specific else ctx.clone()
            else:
                shape = (n_cls, n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
                ctx = torch.empty(shape, device=backbone.device).normal_(std=RANDOM_CTX_STD)
        self.ctx = nn.Parameter(ctx.to(backbone.parameter_dtype))

        placeholder = init_ids or tok.encode("X") * n_ctx  # any ordinary token: it is replaced
        rows, positions = [], []
        for name in classnames:
            ids, pos = layout_prompt(tok, placeholder, name, cfg.class_position)
            if len(ids) > tower.context_length:
                raise PromptlearnError(
                    f"the prompt for class {name!r} is {len(ids)} tokens ({n_ctx} of them context), more than the "
                    f"text tower's context length {tower.context_length}; shorten the class name, or the context "
                    f"(a shorter {cfg.section}.ctx_init phrase or a smaller {cfg.section}.n_ctx)")
            rows.append(ids)
            positions.append(pos)
        length = max(map(len, rows)) if cfg.truncate_prompts and tower.can_truncate else tower.context_length
        token_ids = padded_ids(rows, length, tok.pad_id).to(backbone.device)
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeds", tower.embed(token_ids).float(), persistent=False)
        self.register_buffer("ctx_positions", torch.tensor(positions, device=backbone.device), persistent=False)
        # a unified context with the class at the end: every prompt starts [SOS] [ctx_1 .. ctx_M]
        self.prefix_length = len(tok.start_ids) + n_ctx if not class_specific and self.position == "end" else None

    def forward(self) -> torch.Tensor:
        """Prompt embeddings [C, L, D]: the frozen token embeddings with the context put in place."""
        n_cls = self.token_embeds.shape[0]
        ctx = self.ctx if self.class_specific else self.ctx.expand(n_cls, -1, -1)
        rows = torch.arange(n_cls, device=ctx.device)[:, None].expand_as(self.ctx_positions)
        return self.token_embeds.index_put((rows, self.ctx_positions), ctx.to(self.token_embeds.dtype))

    def with_contexts(self, ctx: torch.Tensor, classes: slice = slice(None)) -> torch.Tensor:
        """Prompt embeddings [B, c, L, D] of the classes in `classes`, one unified context [M, D] per
        row of `ctx` [B, M, D] (CoCoOp: a context per image)."""
        base, positions = self.token_embeds[classes], self.ctx_positions[classes]
        b, c, m = ctx.shape[0], base.shape[0], positions.shape[1]
        batch = torch.arange(b, device=ctx.device)[:, None, None].expand(b, c, m)
        rows = torch.arange(c, device=ctx.device)[None, :, None].expand(b, c, m)
        values = ctx.to(base.dtype)[:, None].expand(b, c, m, ctx.shape[-1])
        return base.expand(b, -1, -1, -1).index_put((batch, rows, positions.expand(b, c, m)), values)

    def shared_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The start every prompt shares, context in place [P, D], and each prompt's rest [C, L-P, D]
        (only when `prefix_length` is set)."""
        p = self.prefix_length
        prefix = self.token_embeds[0, :p].index_put((self.ctx_positions[0],), self.ctx.to(self.token_embeds.dtype))
        return prefix, self.token_embeds[:, p:]


def length_groups(lengths: torch.Tensor, chunk: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Classes grouped by prompt length, each group to run at its own length, split into chunks of at
    most `chunk` classes (0: no limit): (class indices, length) pairs, shortest first. Under a causal
    mask nothing before a prompt's pooled position reads what follows it, so a prompt run at its own
    length gives the features of the full context length; the rows a step pushes through the text
    tower fall from classes x longest prompt to the sum of the prompts' own lengths."""
    groups = []
    for length in torch.unique(lengths).tolist():
        rows = torch.nonzero(lengths == length).flatten()
        for part in rows.split(chunk or len(rows)):
            groups.append((part, int(length)))
    return groups


@register_method("coop", config=CoOpConfig)
class CoOp(Method):
    capabilities = Capabilities(learns=True, trains=True, unseen_classes=True, decodes_prompt=True,
                                eval_from_checkpoint=True)
    force_class_specific: bool | None = None

    @classmethod
    def capabilities_for(cls, cfg) -> Capabilities:
        """A class-specific context has no row for a class it never trained on."""
        own = getattr(cfg, cls.section)
        specific = own.class_specific if cls.force_class_specific is None else cls.force_class_specific
        return dataclasses.replace(cls.capabilities, unseen_classes=not specific)

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        self.own = own = getattr(cfg, self.section)  # coop, or the section of a method built on CoOp
        specific = own.class_specific if self.force_class_specific is None else self.force_class_specific
        self.prompts = PromptLearner(backbone, classnames, own, specific)
        prefix = self.prompts.prefix_length
        self.share_prefix = (own.share_prefix and prefix is not None
                             and backbone.text.can_share_prefix(self.prompts.token_ids, prefix))
        ids = self.prompts.token_ids
        exact = own.truncate_prompts and backbone.text.can_truncate
        lengths = backbone.text.pooled_positions(ids) + 1 if exact else torch.full((len(ids),), ids.shape[1])
        self.groups = length_groups(lengths, own.class_chunk)
        order = torch.cat([rows for rows, _ in self.groups])
        self.register_buffer("group_order", torch.argsort(order), persistent=False)  # back to class order

    def _encode(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.text.encode(embeds, ids)

    def text_features(self) -> torch.Tensor:
        """[C, D] L2-normalised class features. With a shared prefix the prompt start runs through the
        tower once per group; classes run in groups of equal prompt length, each at its own length
        (`length_groups`), and chunks of classes under activation checkpointing bound the memory of a
        training step by the chunk size instead of the class count."""
        ids = self.prompts.token_ids
        if self.share_prefix:
            prefix, embeds = self.prompts.shared_prefix()
            states = self.backbone.text.prefix_states(prefix)  # once for every length group
            encode, shared, skip = self.backbone.text.encode_shared_prefix, (states,), prefix.shape[0]
        else:
            embeds, encode, shared, skip = self.prompts(), self._encode, (), 0
        checkpointed = torch.is_grad_enabled() and self.own.class_chunk > 0
        parts = []
        for rows, length in self.groups:
            args = (*shared, embeds[rows, :length - skip], ids[rows, :length])
            parts.append(checkpoint(encode, *args, use_reentrant=False) if checkpointed else encode(*args))
        return self.backbone.normalize(torch.cat(parts)[self.group_order])

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(image_features, self.text_features())

    def scorer(self):
        text = self.text_features().float()  # once for all test images
        return lambda image_features: self.backbone.logits(image_features, text)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        return trainer.fit(self, self.training_features(bank), checkpoint, resume)

    def after_training(self, folder) -> AfterTraining:
        """The learned context read as words, saved beside the checkpoint and printed after the table."""
        decoded = save_decoded_prompt(self, folder, self.cfg.eval.decode_topk)
        return AfterTraining({"decoded_prompt": decoded.summary()}, decoded.report(detail=False))

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        if not self.prompts.class_specific:  # a unified context fits any class list (e.g. ImageNet-A's 200)
            meta.pop("classnames")
        return {**meta, "n_ctx": self.prompts.n_ctx,
                "class_specific": self.prompts.class_specific, "class_position": self.prompts.position,
                "ctx_init": self.own.ctx_init}


@register_method("coop_csc", section="coop")
class CoOpClassSpecific(CoOp):
    """CoOp with one context per class, whatever coop.class_specific says (for sweeps)."""
    force_class_specific = True
