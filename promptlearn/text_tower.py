"""The backbone's own text tower, run on token embeddings instead of token ids.

CoOp puts learned vectors where words would be, so it needs the tower from the embedding layer on.
`TextTower` composes open_clip's own modules (positional embedding, attention mask, transformer,
final norm, pooling, projection) for every open_clip text tower kind; the exactness tests compare it with
open_clip's `encode_text` so any drift in open_clip shows up as a failing test.
`encode_shared_prefix` is the same computation for prompts that share their start, doing the
start once per step (`prefix_states`) for every group of prompts; tests compare it with `encode`.
"""
from __future__ import annotations

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

    def can_share_prefix(self, token_ids: torch.Tensor, prefix_length: int) -> bool:
        """Whether `encode_shared_prefix` is exact for these prompts: under a causal mask the first
        `prefix_length` positions never see what follows, so if every prompt has the same ids there,
        their hidden states are the same for all prompts. The pooled position must lie after the
        prefix, and every block must be open_clip's plain residual block, whose arithmetic
        `_tail_block` repeats (a block of any other type falls back to `encode`)."""
        return (self.causal and not self.use_pad_mask and self.cls_emb is None and self.transformer.batch_first
                and 0 < prefix_length < token_ids.shape[1]
                and all(_is_plain_block(b) for b in self.transformer.resblocks)
                and bool((token_ids[:, :prefix_length] == token_ids[:1, :prefix_length]).all())
                and bool((self.pooled_positions(token_ids) >= prefix_length).all()))

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

    def prefix_states(self, prefix: torch.Tensor) -> list[torch.Tensor]:
        """The input of every block at the positions of a prefix [P, D] that prompts share, [1, P, D] each:
        computed once per step and read by every group of prompts (`encode_shared_prefix`)."""
        p = prefix.shape[0]
        cast_dtype = self.transformer.get_cast_dtype()
        head = (prefix.to(cast_dtype) + self.positional_embedding[:p].to(cast_dtype))[None]
        mask, blocks = self.attn_mask[:p, :p], self.transformer.resblocks
        states = [head]
        for block in list(blocks)[:-1]:  # the last block's prefix output is read by nothing
            head = block(head, attn_mask=mask)
            states.append(head)
        return states

    def encode_shared_prefix(self, states: list[torch.Tensor], rest: torch.Tensor,
                             token_ids: torch.Tensor) -> torch.Tensor:
        """`encode` of prompts that all start with the same prefix, given as its `prefix_states`, followed by
        `rest` [N, L-P, D]: only the rest of every prompt runs through the blocks, attending to the prefix's
        keys and values. Only where `can_share_prefix(token_ids, P)` holds."""
        n, p, length = rest.shape[0], states[0].shape[1], token_ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = rest.to(cast_dtype) + self.positional_embedding[p:length].to(cast_dtype)
        mask = self.attn_mask[:length, :length]
        for block, head in zip(self.transformer.resblocks, states):
            x = _tail_block(block, head, x, mask[p:])
        x = self.ln_final(x)
        return self._project(x[torch.arange(n, device=x.device), self.pooled_positions(token_ids) - p])

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


def _tail_block(block: ResidualAttentionBlock, head: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`block` on the positions after a shared prefix: what block(cat(head, x)) gives at x's rows.
    The prefix's keys and values are projected once and shared by all N prompts; the attention is
    nn.MultiheadAttention's arithmetic (in-projection, scaled dot product, out-projection) on the
    block's own weights."""
    attn, (n, _, width) = block.attn, x.shape
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = F.linear(block.ln_1(x), weight, bias).chunk(3, dim=-1)
    head_k, head_v = F.linear(block.ln_1(head), weight[width:],
                              None if bias is None else bias[width:]).chunk(2, dim=-1)
    k = torch.cat([head_k.expand(n, -1, -1), k], dim=1)
    v = torch.cat([head_v.expand(n, -1, -1), v], dim=1)

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, H, L, D/H]
        return t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), attn_mask=mask.to(q.dtype))
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).flatten(2)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
