"""Where the learned context goes in a prompt: one layout for training, decoding and every prompt method."""
from __future__ import annotations

from promptlearn.tokens import PromptTokenizer


def layout_prompt(tok: PromptTokenizer, ctx_ids: list[int], name: str, dot: list[int],
                  position: str) -> tuple[list[int], list[int]]:
    """Token ids of [SOS] context name . [EOS] (class at the end; the context split around the name for
    `middle`; the name first for `front`) and the positions of the context tokens in them."""
    name_ids = tok.encode(name)
    half = len(ctx_ids) // 2
    pieces = {"end": [("s", tok.start_ids), ("c", ctx_ids), ("n", name_ids), ("d", dot), ("e", tok.end_ids)],
              "middle": [("s", tok.start_ids), ("c", ctx_ids[:half]), ("n", name_ids),
                         ("c", ctx_ids[half:]), ("d", dot), ("e", tok.end_ids)],
              "front": [("s", tok.start_ids), ("n", name_ids), ("c", ctx_ids), ("d", dot), ("e", tok.end_ids)]}
    ids, positions = [], []
    for kind, part in pieces[position]:
        if kind == "c":
            positions.extend(range(len(ids), len(ids) + len(part)))
        ids.extend(part)
    return ids, positions
