"""Low-rank adapters on the attention projections of open_clip's transformer blocks (CLIP-LoRA).

Why not `peft`: open_clip's blocks use torch's nn.MultiheadAttention, whose q, k and v projections are
one fused `in_proj_weight` read inside a functional call, so a LoRA on q, k or v separately cannot be
attached to an nn.Linear there (peft's MultiheadAttention support merges weights, which cannot apply
dropout to the adapter's input as CLIP-LoRA does). `LoRAAttention` is a small stand-in for one such
module: the same arithmetic on the block's own frozen weights, plus scaling * B A dropout(x) on the
chosen projections. It is swapped into the blocks only for the duration of a forward pass
(`attached`), so the backbone shared by a run's other methods is never changed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import Transformer
from torch import nn

from promptlearn.errors import ConfigError

PROJECTIONS = ("q", "k", "v", "o")


class LowRank(nn.Module):
    """scaling * B A dropout(x); A as nn.Linear's default init, B zero (the adapter starts as a no-op)."""

    def __init__(self, width_in: int, width_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, width_in))
        self.B = nn.Parameter(torch.zeros(width_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(rank)  # CLIP-LoRA's scaling (loralib's is alpha / rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scaling


class LoRAAttention(nn.Module):
    """nn.MultiheadAttention's self-attention on `base`'s frozen weights, with low-rank updates on the
    projections named in `projections` (q, k, v: the input projections; o: the output projection)."""

    def __init__(self, base: nn.MultiheadAttention, projections: Sequence[str], rank: int, alpha: float,
                 dropout: float):
        super().__init__()
        self._base = (base,)  # a reference, not a submodule: its weights stay the backbone's
        width = base.embed_dim
        self.lora = nn.ModuleDict({p: LowRank(width, width, rank, alpha, dropout) for p in projections})

    def forward(self, query, key, value, need_weights: bool = False, attn_mask: torch.Tensor | None = None):
        base = self._base[0]
        if not base.batch_first:
            query = query.transpose(0, 1)
        n, length, width = query.shape
        weights = base.in_proj_weight.chunk(3)
        biases = base.in_proj_bias.chunk(3) if base.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(query, w, b) + (self.lora[p](query) if p in self.lora else 0)
                   for p, w, b in zip("qkv", weights, biases))

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, H, L, D/H]
            return t.unflatten(-1, (base.num_heads, -1)).transpose(1, 2)

        if attn_mask is not None and attn_mask.dim() == 3:  # nn.MultiheadAttention's [N*H, L, S]
            attn_mask = attn_mask.view(n, base.num_heads, length, -1)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(2)
        out = base.out_proj(out) + (self.lora["o"](out) if "o" in self.lora else 0)
        return (out if base.batch_first else out.transpose(0, 1)), None


def adaptable_blocks(transformer: nn.Module, tower: str, method: str) -> list[nn.Module]:
    """The blocks of an open_clip Transformer whose attention is a plain self-attention
    nn.MultiheadAttention; any other tower or attention is refused, naming it."""
    if not isinstance(transformer, Transformer):
        raise ConfigError(f"{method} adapts the {tower} tower, which must be open_clip's own Transformer; this "
                          f"model's is a {type(transformer).__name__}. Choose a CLIP ViT model (e.g. ViT-B-16) "
                          f"or set {method}.encoder to the other tower")
    for i, block in enumerate(transformer.resblocks):
        attn = getattr(block, "attn", None)
        if not (type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim and attn.bias_k is None
                and not attn.add_zero_attn and attn.dropout == 0):
            raise ConfigError(f"{method}: block {i} of the {tower} tower uses {type(attn).__name__} attention, "
                              "not a plain nn.MultiheadAttention; this model family cannot take LoRA here")
    return list(transformer.resblocks)


@contextlib.contextmanager
def attached(blocks: Sequence[nn.Module], adapters: Sequence[LoRAAttention]) -> Iterator[None]:
    """Each adapter in place of its block's attention for the duration of the `with`."""
    originals = [block.attn for block in blocks]
    try:
        for block, adapter in zip(blocks, adapters):
            block.attn = adapter
        yield
    finally:
        for block, original in zip(blocks, originals):
            block.attn = original
