"""The backbone's own text tower, run on token embeddings instead of token ids.

CoOp puts learned vectors where words would be, so it needs the tower from the embedding layer on.
`TextTower` composes open_clip's own modules (positional embedding, attention mask, transformer,
final norm, pooling, projection) for both model families; the exactness tests compare it with
open_clip's `encode_text` so any drift in open_clip shows up as a failing test.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, text_global_pool

from promptlearn.errors import PromptlearnError


class TextTower:
    def __init__(self, model: torch.nn.Module):
        if isinstance(model, CLIP):  # OpenAI-style: text parts live on the model itself
            src, self.pool_type, self.eos_id = model, model.text_pool_type, model.text_eos_id
            self.use_pad_mask = False
        elif isinstance(getattr(model, "text", None), TextTransformer):  # CustomTextCLIP
            src, self.pool_type, self.eos_id = model.text, model.text.pool_type, model.text.eos_id
            self.use_pad_mask = model.text.use_pad_mask
            if model.text.cls_emb is not None:
                raise PromptlearnError(
                    "text towers with an appended class token (CoCa) are not supported by promptlearn; "
                    "choose a CLIP, EVA, MobileCLIP or SigLIP-style model")
        else:
            tower = type(getattr(model, "text", model)).__name__
            raise PromptlearnError(
                f"the text tower of {type(model).__name__} is a {tower} (e.g. a Hugging Face text "
                "tower), which promptlearn does not support; choose an open_clip model whose text "
                "tower is open_clip's own transformer (CLIP, EVA02, MobileCLIP, SigLIP families)")
        self.source = src
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.attn_mask = src.attn_mask  # None for bidirectional towers
        self.context_length = self.positional_embedding.shape[0]
        self.width = self.token_embedding.weight.shape[1]

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    @property
    def can_truncate(self) -> bool:
        """Running at the longest real prompt length is exact only when no position reads the padding."""
        return self.causal and self.pool_type in ("argmax", "eos", "first")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(token_ids)

    def encode(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) of prompts given as embeddings [N, L, D] with ids [N, L]."""
        length = embeddings.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        mask = self.attn_mask[:length, :length] if self.causal else None
        if self.use_pad_mask:
            mask = self.source._build_additive_mask(token_ids, length, x.dtype)
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = text_global_pool(x, token_ids, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, torch.nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x
