"""The backbone's own text tower, run on token embeddings instead of token ids.

CoOp puts learned vectors where words would be, so it needs the tower from the embedding layer on.
`TextTower` composes open_clip's own modules (positional embedding, attention mask, transformer,
final norm, pooling, projection) for every open_clip text tower kind; the exactness tests compare it with
open_clip's `encode_text` so any drift in open_clip shows up as a failing test.
`encode_packed` is the same computation for prompts of different lengths packed into rows without
padding, with the start they share done once per step (`prefix_states`); tests compare it with `encode`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, text_global_pool

from promptlearn.errors import PromptlearnError


class TextTower:
    """The text tower of an open_clip model, whatever the family: OpenAI-style CLIP (the text parts on
    the model itself), CustomTextCLIP and SigLIP (open_clip's TextTransformer), CoCa (a TextTransformer
    with a class token appended after the text) and Hugging Face text towers (HFTextEncoder, run with
    `inputs_embeds`). `context_length` is the tokenizer's where it is shorter than the tower's."""

    def __init__(self, model: torch.nn.Module, context_length: int | None = None):
        text = getattr(model, "text", None)
        self.hf = isinstance(text, HFTextEncoder)
        self.cls_emb = None  # CoCa's class token, appended after the text
        if isinstance(model, CLIP):  # OpenAI-style: text parts live on the model itself
            src, self.pool_type, self.eos_id = model, model.text_pool_type, model.text_eos_id
            self.use_pad_mask = False
        elif isinstance(text, TextTransformer):  # CustomTextCLIP, SigLIP, CoCa
            src, self.pool_type, self.eos_id = text, text.pool_type, text.eos_id
            self.use_pad_mask, self.cls_emb = text.use_pad_mask, text.cls_emb
        elif self.hf:
            src, self.pool_type, self.eos_id, self.use_pad_mask = text, "hf", None, True
        else:
            raise PromptlearnError(unsupported_text_tower(model))
        self.source = src
        if self.hf:
            self.token_embedding = text.transformer.get_input_embeddings()
            self.positional_embedding = self.transformer = self.ln_final = self.text_projection = None
            self.attn_mask = None
            limit = text.context_length or context_length
        else:
            self.token_embedding = src.token_embedding
            self.positional_embedding = src.positional_embedding
            self.transformer = src.transformer
            self.ln_final = src.ln_final
            self.text_projection = src.text_projection
            self.attn_mask = src.attn_mask  # None for bidirectional towers
            limit = self.positional_embedding.shape[0] - (self.cls_emb is not None)
        self.context_length = min(limit, context_length or limit)
        self.width = self.token_embedding.weight.shape[1]

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    @property
    def can_truncate(self) -> bool:
        """Running at the longest real prompt length is exact only when no position reads the padding."""
        return self.causal and self.cls_emb is None and self.pool_type in ("argmax", "eos", "first")

    @property
    def can_pack(self) -> bool:
        """Whether `encode_packed` is exact: a causal mask (nothing before a prompt's pooled position reads
        what follows it), no padding mask or appended class token, and only open_clip's plain residual
        blocks, whose arithmetic `_packed_block` repeats (a block of any other type falls back to `encode`)."""
        return (self.can_truncate and not self.use_pad_mask and self.transformer.batch_first
                and all(_is_plain_block(b) for b in self.transformer.resblocks))

    def can_share_prefix(self, token_ids: torch.Tensor, prefix_length: int) -> bool:
        """Whether prompts can share the run of their first `prefix_length` positions (`prefix_states`):
        under a causal mask those positions never see what follows, so if every prompt has the same ids
        there, their hidden states are the same for all prompts. The pooled position must lie after them."""
        return (self.can_pack and 0 < prefix_length < token_ids.shape[1]
                and bool((token_ids[:, :prefix_length] == token_ids[:1, :prefix_length]).all())
                and bool((self.pooled_positions(token_ids) >= prefix_length).all()))

    def packing(self, token_ids: torch.Tensor, prefix: int = 0, own_lengths: bool = True) -> "Packing":
        """The `Packing` of these prompts after their first `prefix` positions, each through its pooled
        position (own_lengths) or at the full length of `token_ids`."""
        pooled = self.pooled_positions(token_ids)
        lengths = pooled + 1 if own_lengths else torch.full_like(pooled, token_ids.shape[1])
        return Packing.of(lengths, pooled, prefix)

    def pooled_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The position each prompt's feature is read at, by open_clip's own pooling rule."""
        positions = torch.arange(token_ids.shape[1], device=token_ids.device).expand_as(token_ids)
        return text_global_pool(positions[..., None], token_ids, self.pool_type, eos_token_id=self.eos_id)[..., 0]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(token_ids)

    def encode(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) of prompts given as embeddings [N, L, D] with ids [N, L]:
        the arithmetic of the family's own encode_text from the embedding layer on."""
        if self.hf:
            return self._encode_hf(embeddings, token_ids)
        length = embeddings.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(cast_dtype).expand(x.shape[0], 1, -1)], dim=1)
            length += 1
        x = x + self.positional_embedding[:length].to(cast_dtype)
        mask = self.attn_mask[:length, :length] if self.causal else None
        if self.use_pad_mask or self.cls_emb is not None:  # padding keys (and CoCa's class token)
            added = self.source._build_additive_mask(token_ids, length, x.dtype)
            mask = added if mask is None else mask[None] + added
        x = self.transformer(x, attn_mask=mask)
        if self.cls_emb is not None:  # CoCa reads its class token, normalised after pooling
            return self._project(self.ln_final(x[:, -1]))
        x = self.ln_final(x)
        return self._project(text_global_pool(x, token_ids, self.pool_type, eos_token_id=self.eos_id))

    def _encode_hf(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """HFTextEncoder.forward with the word embeddings given: the HF model adds its own positions."""
        tower = self.source
        mask = (token_ids != tower.config.pad_token_id).long()
        out = tower.transformer(inputs_embeds=embeddings, attention_mask=mask)
        return tower.proj(tower.pooler(out, mask))

    def prefix_states(self, prefix: torch.Tensor, deep: Sequence[torch.Tensor] = (), start: int = 0
                      ) -> list[torch.Tensor]:
        """The input of every block at the positions of prompt starts that prompts share, [G, P, D] each, from
        the starts' embeddings `prefix` [G, P, D] (or one start, [P, D]): computed once per step and read by
        every packed prompt (`encode_packed`). Deep prompts: deep[j] [n, D] replaces positions start..start+n
        at the input of block j + 1, as `deep_prompts.text_prompts` does in a full pass."""
        head = prefix if prefix.dim() == 3 else prefix[None]
        p = head.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        head = head.to(cast_dtype) + self.positional_embedding[:p].to(cast_dtype)
        mask, blocks = self.attn_mask[:p, :p], self.transformer.resblocks
        states = [head]
        for j, block in enumerate(list(blocks)[:-1]):  # the last block's prefix output is read by nothing
            head = block(head, attn_mask=mask)
            if j < len(deep):
                tokens = deep[j].to(head.dtype)[None].expand(head.shape[0], -1, -1)
                head = torch.cat([head[:, :start], tokens, head[:, start + tokens.shape[1]:]], dim=1)
            states.append(head)
        return states

    def encode_packed(self, rest: torch.Tensor, packing: "Packing",
                      states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`encode` of N prompts laid out by `packing`, each at its own length: `rest` holds the embeddings
        after the shared start [M, L-P, D] (the whole prompts when P is 0), read at `packing.source`;
        `states` are the starts' `prefix_states`, G starts [G, P, D] each for N prompts in G consecutive
        runs of N / G (CoCoOp: one start per image). Only where `can_pack` holds (and `can_share_prefix`
        for a shared start)."""
        p, width = packing.prefix, packing.width
        cast_dtype = self.transformer.get_cast_dtype()
        columns = packing.column
        # index_select, not a gather with repeated indices: its backward adds each row once
        x = rest.flatten(0, 1).index_select(0, packing.source * rest.shape[1] + columns).to(cast_dtype)
        x = x + self.positional_embedding[p + columns].to(cast_dtype)
        mask = self.attn_mask[p:p + width, :p + width]
        for i, block in enumerate(self.transformer.resblocks):
            x = _packed_block(block, x, packing, mask, states[i] if states else None)
        # a row-wise norm: on the pooled rows alone
        return self._project(self.ln_final(x.index_select(0, packing.pooled)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, torch.nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def unsupported_text_tower(model: torch.nn.Module) -> str:
    tower = type(getattr(model, "text", model)).__name__
    return (f"the text tower of {type(model).__name__} is a {tower}, which promptlearn cannot run on learned "
            "prompt embeddings, so coop and the prompt decoder cannot use it (zeroshot, linear_probe, "
            "clip_adapter, tip_adapter and tip_adapter_f can); supported text towers: OpenAI-style CLIP, "
            "open_clip's TextTransformer (CustomTextCLIP, SigLIP, CoCa) and Hugging Face HFTextEncoder")


def _is_plain_block(block: torch.nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and type(attn) is torch.nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn and attn.dropout == 0)


def _packed_block(block: ResidualAttentionBlock, x: torch.Tensor, packing: "Packing", mask: torch.Tensor,
                  head: torch.Tensor | None) -> torch.Tensor:
    """`block` on packed rows [R, D]: what it gives at each prompt's own positions run on the whole prompt.
    Everything but attention is row-wise and runs on the R rows; attention places each prompt's rows in
    padded [N, T] slots (the padding after every real position, hidden by the causal mask) with the
    shared start's keys and values in front, projected once per start. Rows move between the two
    layouts by index_copy / index_select on unique indices, whose backward is as cheap as their forward
    (a gather that repeats one padding row has a backward that adds thousands of rows into one, serially
    on a GPU). The arithmetic is nn.MultiheadAttention's (in-projection, scaled dot product,
    out-projection) on the block's own weights."""
    attn, width, n = block.attn, x.shape[-1], packing.prompts
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    qkv = F.linear(block.ln_1(x), weight, bias)
    qkv = qkv.new_zeros(n * packing.width, qkv.shape[-1]).index_copy(0, packing.real, qkv)
    q, k, v = qkv.view(n, packing.width, -1).chunk(3, dim=-1)  # [N, T, D] each
    if head is not None:
        head_k, head_v = F.linear(block.ln_1(head), weight[width:],
                                  None if bias is None else bias[width:]).chunk(2, dim=-1)
        g = head_k.shape[0]  # one start for all prompts, or one per consecutive run of n / g prompts
        head_k, head_v = ((t.expand(n, -1, -1) if g == 1 else t.repeat_interleave(n // g, dim=0))
                          for t in (head_k, head_v))
        k, v = torch.cat([head_k, k], dim=1), torch.cat([head_v, v], dim=1)

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, H, L, D/H]
        return t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), attn_mask=mask.to(q.dtype))
    out = out.transpose(1, 2).flatten(2).flatten(0, 1).index_select(0, packing.real)  # back to the packed rows
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@dataclass(frozen=True)
class Packing:
    """N prompts of different lengths as R packed rows with no padding, each prompt from its position P on
    (P: a start they share, run once by `prefix_states`; 0 if none). Under a causal mask nothing before a
    prompt's pooled position reads what follows it, so running each prompt through its pooled position is
    exact; the rows a step pushes through the text tower fall from N x the context length to the sum of
    the prompts' own lengths after P."""

    source: torch.Tensor  # [R] the row of the embeddings given to `encode_packed` that each packed row reads
    column: torch.Tensor  # [R] its column there (its position in the prompt minus P)
    real: torch.Tensor  # [R] its slot among the N x T attention slots (prompt x T + column)
    pooled: torch.Tensor  # [N] the packed row each prompt's feature is read at
    prompts: int  # N
    width: int  # T: the longest prompt after P
    prefix: int  # P

    @classmethod
    def of(cls, lengths: torch.Tensor, pooled_positions: torch.Tensor, prefix: int = 0) -> "Packing":
        """Prompts of `lengths` [N] tokens (P included), each read at its `pooled_positions` [N]."""
        tails = lengths - prefix
        n, width, device = len(tails), int(tails.max()), tails.device
        columns = torch.arange(width, device=device).expand(n, width)
        inside = columns < tails[:, None]
        offsets = torch.cumsum(tails, 0) - tails
        return cls(torch.arange(n, device=device)[:, None].expand(n, width)[inside], columns[inside],
                   torch.nonzero(inside.flatten()).flatten(), offsets + pooled_positions - prefix, n, width, prefix)

    @property
    def rows(self) -> int:
        return len(self.source)

    def repeat(self, times: int, sources: int = 0) -> "Packing":
        """The same prompts `times` over (CoCoOp: the class prompts once per image), copy k reading the
        embedding rows `source + k * sources` (0: all copies read the same rows); computed on the device,
        with no copy from the host."""
        copies = torch.arange(times, device=self.source.device)[:, None]
        return Packing((self.source + sources * copies).flatten(), self.column.repeat(times),
                       (self.real + self.prompts * self.width * copies).flatten(),
                       (self.pooled + self.rows * copies).flatten(), self.prompts * times, self.width, self.prefix)
