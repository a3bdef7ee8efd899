"""Where the learned context goes in a prompt: one layout for training, decoding and every prompt method."""
from __future__ import annotations

import torch

from promptlearn.tokens import PromptTokenizer

END_OF_PROMPT = "."
CLASS_AT_END = "{}" + END_OF_PROMPT  # the words after the context when the class is at the end


def prompt_names(classnames: list[str], underscores: bool) -> list[str]:
    """Class names as a prompt spells them: "_" read as a space (as every promptlearn prompt), or with
    `underscores` every space written as "_" ("american bulldog" -> "american_bulldog": CLAP's and TaskRes's
    code format the split files' names as they are)."""
    spoken = [spoken_name(c) for c in classnames]
    return [c.replace(" ", "_") for c in spoken] if underscores else spoken


def spoken_name(name: str) -> str:
    """A class name as prompts spell it: underscores read as spaces (as the original CoOp and its
    zero-shot baseline do for every class list)."""
    return name.replace("_", " ")


def layout_prompt(tok: PromptTokenizer, ctx_ids: list[int], name: str,
                  position: str, after: str = CLASS_AT_END) -> tuple[list[int], list[int]]:
    """Token ids of [SOS] context name . [EOS] (class at the end; the context split around the name for
    `middle`; the name first for `front`) and the positions of the context tokens in them.

    The ids are those of the whole sentence the layout spells ("X X X X name.", "X X name X X.",
    "name X X X X."), as zero-shot CLIP tokenises it: text after a space never merges with the
    text before it, but a name ending in punctuation merges with the final "." ("kite (bird of
    prey)." ends in the one token ")."), so the name and the "." that follows it are encoded together.
    With the class at the end, `after` spells what follows the context ({} the name; TCP's "{}, a type of pet.")."""
    name = spoken_name(name)
    half = len(ctx_ids) // 2
    if position == "end":
        pieces = [("c", ctx_ids), ("n", tok.encode(after.format(name)))]
    elif position == "middle":
        pieces = [("c", ctx_ids[:half]), ("n", tok.encode(name)), ("c", ctx_ids[half:])]
    else:  # front
        pieces = [("n", tok.encode(name)), ("c", ctx_ids)]
    if position != "end":
        pieces.append(("d", tok.encode(END_OF_PROMPT)))
    ids, positions = list(tok.start_ids), []
    for kind, part in pieces:
        if kind == "c":
            positions.extend(range(len(ids), len(ids) + len(part)))
        ids.extend(part)
    return ids + tok.end_ids, positions


def padded_ids(rows: list[list[int]], length: int, pad_id: int) -> torch.Tensor:
    """[len(rows), length] token ids, each row padded with `pad_id` after its own ids."""
    token_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        token_ids[i, :len(ids)] = torch.tensor(ids)
    return token_ids
