"""A small view of a tokenizer: plain token ids, its special tokens, and readable token text."""
from __future__ import annotations

import torch

from promptlearn.errors import PromptlearnError


class PromptTokenizer:
    """Wraps an open_clip tokenizer. Special tokens are read off the tokenizer's own output, so
    tokenizers with no start token (SigLIP-style) lay out prompts without one."""

    def __init__(self, tokenizer, context_length: int):
        if not hasattr(tokenizer, "encode"):
            raise PromptlearnError(
                f"tokenizer {type(tokenizer).__name__} gives no plain token ids; promptlearn supports "
                "open_clip's BPE tokenizer and tokenizers with an encode(text) method")
        self.tokenizer = tokenizer
        self.context_length = context_length
        probe = "a photo"
        plain = self.encode(probe)
        full = tokenizer([probe], context_length=context_length)[0].tolist()
        start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
        self.start_ids: list[int] = full[:start]  # [] or [SOS]
        self.end_ids: list[int] = [full[start + len(plain)]]  # [EOS]
        self.pad_id: int = full[-1]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens."""
        return list(self.tokenizer.encode(text))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for text in texts:  # the tokenizer would cut a long text short without a word
            length = len(self.start_ids) + len(self.encode(text)) + len(self.end_ids)
            if length > self.context_length:
                raise PromptlearnError(
                    f"the prompt {text!r} is {length} tokens, more than the text tower's context length "
                    f"{self.context_length}; shorten the class name in it or the template")
        return self.tokenizer(texts, context_length=self.context_length)

    @property
    def vocab_size(self) -> int:
        return len(getattr(self.tokenizer, "encoder", {})) or self.tokenizer.vocab_size

    def token_text(self, token_id: int) -> str:
        """Readable text of one token: BPE end-of-word markers become a trailing space."""
        decoder = getattr(self.tokenizer, "decoder", None)
        if isinstance(decoder, dict) and hasattr(self.tokenizer, "byte_decoder"):
            raw = decoder[token_id]
            data = bytearray(self.tokenizer.byte_decoder.get(c, ord("?")) for c in raw.replace("</w>", ""))
            text = data.decode("utf-8", errors="replace")
            return text + " " if raw.endswith("</w>") else text
        return self.tokenizer.decode([token_id])
