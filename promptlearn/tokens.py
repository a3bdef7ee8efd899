"""A small view of a tokenizer: plain token ids, its special tokens, and readable token text, for
open_clip's BPE tokenizer and for Hugging Face tokenizers (BPE, WordPiece, SentencePiece) wrapped by
open_clip's HFTokenizer."""
from __future__ import annotations

import torch

from promptlearn.errors import PromptlearnError

WORD_MARKERS = ("\u2581", "\u0120")  # SentencePiece and byte-level BPE word-start markers


def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside open_clip's HFTokenizer, or None."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if hasattr(inner, "convert_ids_to_tokens") else None


class PromptTokenizer:
    """Wraps an open_clip tokenizer. Special tokens are read off the tokenizer's own output, so
    tokenizers with no start token (SigLIP-style) lay out prompts without one. A tokenizer that gives
    no plain ids still tokenises whole sentences (zero-shot); laying out prompts is refused by name."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.hf = hf_tokenizer(tokenizer)
        self.readable = self.hf is not None or hasattr(tokenizer, "encode")
        self.context_length = context_length
        self.start_ids: list[int] = []  # [] or [SOS]
        self.end_ids: list[int] = []  # [EOS]
        self.pad_id: int = 0
        if self.readable:
            probe = "a photo"
            plain = self.encode(probe)
            full = tokenizer([probe], context_length=context_length)[0].tolist()
            start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
            self.start_ids, self.end_ids, self.pad_id = full[:start], [full[start + len(plain)]], full[-1]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens, after the tokenizer's own text cleaning."""
        if self.hf is not None:
            clean = getattr(self.tokenizer, "clean_fn", lambda t: t)
            return list(self.hf(clean(text), add_special_tokens=False)["input_ids"])
        if not self.readable:
            raise PromptlearnError(
                f"the tokenizer {type(self.tokenizer).__name__} gives no plain token ids, so coop and the prompt "
                "decoder cannot lay out prompts with it (zeroshot and the feature-based methods can); promptlearn "
                "reads open_clip's BPE tokenizer, its HFTokenizer, and tokenizers with an encode(text) method")
        return list(self.tokenizer.encode(text))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for text in texts if self.readable else []:  # the tokenizer would cut a long text short without a word
            length = len(self.start_ids) + len(self.encode(text)) + len(self.end_ids)
            if length > self.context_length:
                raise PromptlearnError(
                    f"the prompt {text!r} is {length} tokens, more than the text tower's context length "
                    f"{self.context_length}; shorten the class name in it or the template")
        return self.tokenizer(texts, context_length=self.context_length)

    @property
    def vocab_size(self) -> int:
        if self.hf is not None:
            return len(self.hf)
        return len(getattr(self.tokenizer, "encoder", {})) or self.tokenizer.vocab_size

    @property
    def special_ids(self) -> set[int]:
        """Ids that are no word: start, end, padding and the tokenizer's declared special tokens."""
        declared = getattr(self.hf if self.hf is not None else self.tokenizer, "all_special_ids", [])
        return set(self.start_ids) | set(self.end_ids) | set(declared)

    def decode(self, ids: list[int]) -> str:
        return (self.hf if self.hf is not None else self.tokenizer).decode(list(ids))

    def token_text(self, token_id: int) -> str:
        """Readable text of one token: BPE end-of-word markers become a trailing space, SentencePiece
        and byte-level word-start markers a leading one."""
        if self.hf is not None:
            token = self.hf.convert_ids_to_tokens(int(token_id))
            return " " + token[1:] if token.startswith(WORD_MARKERS) else token
        decoder = getattr(self.tokenizer, "decoder", None)
        if isinstance(decoder, dict) and hasattr(self.tokenizer, "byte_decoder"):
            raw = decoder[token_id]
            data = bytearray(self.tokenizer.byte_decoder.get(c, ord("?")) for c in raw.replace("</w>", ""))
            text = data.decode("utf-8", errors="replace")
            return text + " " if raw.endswith("</w>") else text
        return self.tokenizer.decode([token_id])
