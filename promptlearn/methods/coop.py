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
from promptlearn.config import CLASS_POSITIONS, TRAINING_KEYS, TrainingKeys
from promptlearn.decoder import save_decoded_prompt
from promptlearn.errors import ConfigError, PromptlearnError
from promptlearn.methods.base import AfterTraining, Capabilities, Method, register_method
from promptlearn.prompts import CLASS_AT_END, layout_prompt, padded_ids, spoken_name
from promptlearn.text_tower import Packing

DEFAULT_N_CTX = 16
RANDOM_CTX_STD = 0.02


@dataclass
class CoOpConfig(TrainingKeys):
    section: ClassVar[str] = "coop"  # the section's name in messages (methods built on CoOp have their own)
    n_ctx: Optional[int] = None  # context length M (16 when unset); with ctx_init, the phrase's token count
    ctx_init: str = ""  # e.g. "a photo of a"; empty: random normal init, std 0.02
    # M = the phrase's words ("_" read as a space), as the original code counts: its first M tokens learned
    ctx_init_words: bool = False
    class_specific: bool = False  # one context per class (CSC)
    class_position: str = "end"  # end | middle | front
    truncate_prompts: bool = True  # run each prompt at its own real length (packed rows) where exact
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
        return found


@dataclass(frozen=True)
class ContextStart:
    """Where the context sits in every prompt and what it starts from."""

    n_ctx: int
    ids: list[int]  # the tokens between the start token and the class name: the context's n_ctx, then any fixed
    # ones (laid out with the class at the end only)
    vectors: Optional[torch.Tensor] = None  # [n_ctx, width] starting values; None: random normal, std 0.02


def placeholder_ids(backbone: FrozenCLIP, n: int) -> list[int]:
    return backbone.tokenizer.encode("X") * n  # any ordinary token: the context replaces it


def token_vectors(backbone: FrozenCLIP, ids: list[int]) -> torch.Tensor:
    """[len(ids), width] fp32 token embeddings."""
    with torch.no_grad():
        return backbone.text.embed(torch.tensor(ids, device=backbone.device)).float()


def word_count(phrase: str) -> int:
    """The original code's context length for a phrase: its space-separated words, not its tokens."""
    return len(phrase.split(" "))


def word_context(backbone: FrozenCLIP, phrase: str, n_ctx: int) -> ContextStart:
    """The original code's start from a phrase of W words (n_ctx >= W): n_ctx vectors, zeros then the embeddings
    of the phrase's first W tokens; its tokens past W stay fixed words before the class name (CoOp: n_ctx = W;
    ProGrad pads its templates' words to 16 with zeros)."""
    words = word_count(phrase)
    ids = placeholder_ids(backbone, n_ctx - words) + backbone.tokenizer.encode(phrase)
    vectors = token_vectors(backbone, ids[:n_ctx])
    vectors[:n_ctx - words] = 0
    return ContextStart(n_ctx, ids, vectors)


def context_from_config(backbone: FrozenCLIP, cfg: CoOpConfig) -> ContextStart:
    """The phrase's tokens, each starting from its embedding (with ctx_init_words, the first W of them, W its
    words, the rest fixed words before the class); without a phrase, M random vectors."""
    if not cfg.ctx_init.strip():
        n_ctx = cfg.n_ctx or DEFAULT_N_CTX
        return ContextStart(n_ctx, placeholder_ids(backbone, n_ctx))
    phrase = spoken_name(cfg.ctx_init) if cfg.ctx_init_words else cfg.ctx_init
    ids = backbone.tokenizer.encode(phrase)
    if not ids:
        raise ConfigError(f"{cfg.section}.ctx_init {cfg.ctx_init!r} has no tokens; give a phrase or leave it empty")
    n_ctx, counted = (word_count(phrase), "words") if cfg.ctx_init_words else (len(ids), "tokens")
    if cfg.n_ctx is not None and cfg.n_ctx != n_ctx:
        raise ConfigError(f"{cfg.section}.n_ctx={cfg.n_ctx} conflicts with {cfg.section}.ctx_init {cfg.ctx_init!r}, "
                          f"which is {n_ctx} {counted}; drop n_ctx or set it to {n_ctx}, or set "
                          f"{cfg.section}.ctx_init='' for {cfg.n_ctx} random vectors")
    if n_ctx > len(ids):
        raise ConfigError(f"{cfg.section}.ctx_init {cfg.ctx_init!r} has more words ({n_ctx}) than tokens "
                          f"({len(ids)}); separate its words by single spaces")
    if n_ctx < len(ids) and cfg.class_position != "end":
        raise ConfigError(f"{cfg.section}.ctx_init_words leaves {len(ids) - n_ctx} of the tokens of "
                          f"{cfg.ctx_init!r} fixed before the class, which needs {cfg.section}.class_position=end")
    if cfg.ctx_init_words:
        return word_context(backbone, phrase, n_ctx)
    return ContextStart(n_ctx, ids, token_vectors(backbone, ids))


class PromptLearner(nn.Module):
    """The learnable context and the frozen embeddings of everything else in the prompts."""

    def __init__(self, backbone: FrozenCLIP, classnames: list[str], cfg: CoOpConfig, class_specific: bool,
                 start: ContextStart, after: str = CLASS_AT_END):
        super().__init__()
        tok, tower = backbone.tokenizer, backbone.text
        n_ctx = start.n_ctx
        self.n_ctx, self.class_specific, self.position = n_ctx, class_specific, cfg.class_position
        self.fixed_ids = start.ids[n_ctx:]  # tokens between the context and the class name, kept as words
        n_cls = len(classnames)
        with torch.no_grad():
            if start.vectors is not None:  # every class starts from the same vectors, class-specific or not
                ctx = start.vectors.expand(n_cls, -1, -1).clone() if class_specific else start.vectors.clone()
            else:
                shape = (n_cls, n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
                ctx = torch.empty(shape, device=backbone.device).normal_(std=RANDOM_CTX_STD)
        self.ctx = nn.Parameter(ctx.to(backbone.parameter_dtype))

        rows, positions = [], []
        for name in classnames:
            ids, pos = layout_prompt(tok, start.ids, name, cfg.class_position, after)
            if len(ids) > tower.context_length:
                raise PromptlearnError(
                    f"the prompt for class {name!r} is {len(ids)} tokens ({n_ctx} of them context), more than the "
                    f"text tower's context length {tower.context_length}; shorten the class name, or the context "
                    f"(a shorter {cfg.section}.ctx_init phrase or a smaller {cfg.section}.n_ctx)")
            rows.append(ids)
            positions.append(pos[:n_ctx])  # fixed ids after the context keep their own embeddings
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

    def shared_prefix(self, ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The start every prompt shares, [SOS] then the context: [P, D] for the learned context, [B, P, D]
        for one context per row of `ctx` [B, M, D] (CoCoOp); and each prompt's rest [C, L-P, D]
        (only when `prefix_length` is set)."""
        p, ctx = self.prefix_length, self.ctx if ctx is None else ctx
        start = self.token_embeds[0, :p - self.n_ctx]
        start = start.expand(*ctx.shape[:-2], -1, -1)
        return torch.cat([start, ctx.to(start.dtype)], dim=-2), self.token_embeds[:, p:]


def class_chunks(n: int, chunk: int = 0) -> list[slice]:
    """Consecutive classes in chunks of at most `chunk` (0: one chunk of all n)."""
    step = chunk or max(n, 1)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


@register_method("coop", config=CoOpConfig)
class CoOp(Method):
    capabilities = Capabilities(learns=True, trains=True, unseen_classes=True, decodes_prompt=True,
                                eval_from_checkpoint=True, static_step=True)
    training_keys = frozenset(TRAINING_KEYS)
    force_class_specific: bool | None = None
    packs = True  # prompts may run packed (TextTower.encode_packed), which runs no hooks inside the text tower

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
        self.prompts = PromptLearner(backbone, classnames, own, specific, self.context_start(), self.words_after())
        text, ids, prefix = backbone.text, self.prompts.token_ids, self.prompts.prefix_length
        packs = self.packs and text.can_pack
        self.share_prefix = packs and own.share_prefix and prefix is not None and text.can_share_prefix(ids, prefix)
        self.own_lengths = own.truncate_prompts and text.can_truncate
        # packed rows: each prompt through its own pooled position, after the shared start when there is one
        self.packed = packs and (self.own_lengths or self.share_prefix)
        self.chunks = [(rows, self.packing(rows) if self.packed else None)
                       for rows in class_chunks(len(ids), own.class_chunk)]

    def words_after(self) -> str:
        """Hook: what follows the context when the class is at the end, {} the name (CoOp: "{}.")."""
        return CLASS_AT_END

    def context_start(self) -> ContextStart:
        """Hook: where the context sits and what it starts from (CoOp: <section>.ctx_init or n_ctx)."""
        return context_from_config(self.backbone, self.own)

    @property
    def shared_start(self) -> int:
        """The positions every prompt shares and runs once per step (0 without a shared start)."""
        return self.prompts.prefix_length if self.share_prefix else 0

    def packing(self, classes: slice) -> Packing:
        """The packing of the prompts of `classes`."""
        return self.backbone.text.packing(self.prompts.token_ids[classes], self.shared_start, self.own_lengths)

    def text_rows(self) -> int:
        """The token rows one computation of the class features pushes through the text tower."""
        ids = self.prompts.token_ids
        return self.shared_start + sum(packing.rows if packing is not None else len(ids[rows]) * ids.shape[1]
                           for rows, packing in self.chunks)

    def text_features(self) -> torch.Tensor:
        """[C, D] L2-normalised class features. Prompts run packed, each through its own pooled position,
        with a shared start run once per step (`TextTower.encode_packed`); chunks of classes under
        activation checkpointing bound the memory of a training step by the chunk size instead of the
        class count."""
        text, ids = self.backbone.text, self.prompts.token_ids
        if self.share_prefix:
            prefix, rest = self.prompts.shared_prefix()
            states = text.prefix_states(prefix)  # once for every chunk
        else:
            rest, states = self.prompts(), None
        checkpointed = torch.is_grad_enabled() and self.own.class_chunk > 0
        parts = []
        for rows, packing in self.chunks:
            encode, args = ((text.encode_packed, (rest[rows], packing, states)) if packing is not None
                            else (text.encode, (rest[rows], ids[rows])))
            parts.append(checkpoint(encode, *args, use_reentrant=False) if checkpointed else encode(*args))
        return self.backbone.normalize(torch.cat(parts))

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
        if self.prompts.fixed_ids:  # named only when there are any, so checkpoints from before still load
            meta["fixed_ids"] = list(self.prompts.fixed_ids)
        return {**meta, "n_ctx": self.prompts.n_ctx,
                "class_specific": self.prompts.class_specific, "class_position": self.prompts.position,
                "ctx_init": self.own.ctx_init}


@dataclass
class CoOpClassSpecificConfig(CoOpConfig):
    section: ClassVar[str] = "coop_csc"
    class_specific: bool = True  # always: the method is CoOp with one context per class

    def problems(self) -> list[str]:
        found = super().problems()
        if not self.class_specific:
            found.append("coop_csc.class_specific=false: coop_csc is CoOp with one context per class; list coop "
                         "for a unified context")
        return found


@register_method("coop_csc", config=CoOpClassSpecificConfig)
class CoOpClassSpecific(CoOp):
    """CoOp with one context per class, whatever coop_csc.class_specific says (for sweeps beside coop)."""
    force_class_specific = True
