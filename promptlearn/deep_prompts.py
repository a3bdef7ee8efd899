"""Learned tokens at given depths of open_clip's vision and text transformers, without copying its code.

Deep prompting (VPT-deep, IVLP, MaPLe, PromptSRC) changes a transformer in two places only: learned
tokens join the token sequence before the first block, and at the input of each later block up to
the prompt depth they are replaced by that block's own learned tokens. Both are done here with
forward hooks on open_clip's own modules, registered for the duration of one forward pass (the
backbone is shared by every method of a run, so nothing stays attached):

- vision: after the positional embedding (the output of `patch_dropout`, before `ln_pre`, as the
  authors' code appends them), the prompts are appended after the patch tokens; block i's input has
  its last n tokens replaced; the prompts are dropped again at the transformer's output, so the
  pooling (class token, average or attention pool) sees the usual tokens;
- text: the first-layer prompts are part of the prompt embeddings (as CoOp's context); block i's
  input has the context positions replaced.

The image side reaches open_clip's own VisionTransformer and timm's VisionTransformer trunks (the
appended tokens are dropped before timm's final norm there); the text side open_clip's Transformer.
Other towers are refused by `image_tower` / `check_text_tower` with a message naming the tower.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import Transformer, VisionTransformer
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptlearn.errors import ConfigError


@dataclass(frozen=True)
class ImageTower:
    """Where the hooks reach into an image tower: `entry` outputs the token sequence [N, L, D] after the
    positional embedding (prompts are appended to it), `blocks` are the transformer blocks (the
    prompts are replaced at their input, sequence on `seq_dim`), `exit` takes the tokens after the last
    block (the prompts are dropped from its input) and `width` is the token width."""

    entry: nn.Module
    blocks: Sequence[nn.Module]
    exit: nn.Module
    width: int
    seq_dim: int


def image_tower(model: nn.Module, method: str) -> ImageTower:
    """open_clip's own ViT image tower or a timm ViT trunk, or a ConfigError naming the tower."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer) and isinstance(visual.transformer, Transformer):
        t = visual.transformer
        return ImageTower(visual.patch_dropout, t.resblocks, t, t.width, 1 if t.batch_first else 0)
    trunk = getattr(visual, "trunk", None)
    if isinstance(visual, TimmModel) and isinstance(trunk, TimmViT):
        return ImageTower(trunk.patch_drop, trunk.blocks, trunk.norm, trunk.embed_dim, 1)
    inner = f" ({type(trunk).__name__})" if trunk is not None else ""
    raise ConfigError(
        f"{method} learns inside the image encoder, which must be open_clip's own VisionTransformer or a timm "
        f"VisionTransformer; this model's image tower is a {type(visual).__name__}{inner} (a ResNet, ConvNeXt or "
        "Hugging Face tower cannot be prompted here). Choose a ViT model such as ViT-B-16, or a method on "
        "cached features (coop)")


def check_text_tower(text, method: str) -> Transformer:
    """The transformer of a backbone's text tower (promptlearn's TextTower), if prompts can reach it."""
    if isinstance(text.transformer, Transformer):
        return text.transformer
    kind = type(text.source).__name__ if text.hf else type(text.transformer).__name__
    raise ConfigError(f"{method} learns inside the text encoder, which must be open_clip's own Transformer; "
                      f"this model's text tower is a {kind} (a Hugging Face text tower cannot be prompted here). "
                      "Choose a model with open_clip's text transformer (CLIP, EVA02, SigLIP), or a method on "
                      "cached features (coop)")


def _seq_dim(transformer: Transformer) -> int:
    """Which dimension of a block's input is the token sequence (open_clip may run L, N, D)."""
    return 1 if transformer.batch_first else 0


def _as_tokens(prompt: torch.Tensor, like: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """[n, D] prompts broadcast over the batch of `like`, or [N, n, D] one set per row of it, in its layout and
    dtype."""
    tokens = prompt.to(like.dtype)
    if tokens.dim() == 2:
        tokens = tokens[None].expand(like.shape[1 - seq_dim], -1, -1)
    return tokens if seq_dim == 1 else tokens.transpose(0, 1)


def _replace_block_input(block: nn.Module, prompt: torch.Tensor, start: int | None, seq_dim: int):
    """A pre-hook on `block` putting `prompt` [n, D] (or [N, n, D], one set per row) at positions start..start+n
    of its input (start None: the last n positions)."""
    n = prompt.shape[-2]

    def hook(module, args, kwargs):
        x = args[0]
        tokens = _as_tokens(prompt, x, seq_dim)
        at = x.shape[seq_dim] - n if start is None else start
        x = torch.cat([x.narrow(seq_dim, 0, at), tokens,
                       x.narrow(seq_dim, at + n, x.shape[seq_dim] - at - n)], dim=seq_dim)
        return (x, *args[1:]), kwargs

    return block.register_forward_pre_hook(hook, with_kwargs=True)


@contextlib.contextmanager
def _removing(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def vision_prompts(tower: ImageTower, prompts: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run the image tower with learned tokens: prompts[0] [n, D] appended after the positional
    embedding, prompts[i] (i >= 1) replacing them at the input of block i. Every entry has the same n."""
    if not prompts:
        yield
        return
    n = prompts[0].shape[0]
    if len(prompts) > len(tower.blocks):
        raise ConfigError(f"a prompt depth of {len(prompts)} exceeds the image tower's {len(tower.blocks)} layers")

    def append(module, args, out):  # the entry's output is batch-first [N, L, D]
        return torch.cat([out, _as_tokens(prompts[0], out, 1)], dim=1)

    def drop_before(module, args):  # timm's final norm gets [N, L, D]
        return (args[0][:, :-n], *args[1:])

    def drop_after(module, args, out):  # open_clip's transformer returns [N, L, D] whatever its inner layout
        return out[:, :-n]

    exit_hook = (tower.exit.register_forward_hook(drop_after) if isinstance(tower.exit, Transformer)
                 else tower.exit.register_forward_pre_hook(drop_before))
    handles = [tower.entry.register_forward_hook(append), exit_hook]
    handles += [_replace_block_input(tower.blocks[i], p, None, tower.seq_dim) for i, p in enumerate(prompts) if i > 0]
    with _removing(handles):
        yield


@contextlib.contextmanager
def text_prompts(transformer: Transformer, start: int, deep: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run the text transformer with deep[j] [n, D] replacing positions start..start+n at the input of
    block j + 1 (the first layer's prompts are already in the embeddings)."""
    blocks = transformer.resblocks
    if len(deep) + 1 > len(blocks):
        raise ConfigError(f"a prompt depth of {len(deep) + 1} exceeds the text tower's {len(blocks)} layers")
    seq_dim = _seq_dim(transformer)
    with _removing([_replace_block_input(blocks[j + 1], p, start, seq_dim) for j, p in enumerate(deep)]):
        yield


@contextlib.contextmanager
def text_tokens_at(transformer: Transformer, block: int, start: int, tokens: torch.Tensor) -> Iterator[None]:
    """Run the text transformer with tokens [N, n, D], one set per prompt, replacing positions start..start+n at
    the input of block `block` (TCP's class-aware tokens)."""
    if block >= len(transformer.resblocks):
        raise ConfigError(f"tokens at the input of text block {block} need more than the text tower's "
                          f"{len(transformer.resblocks)} layers")
    with _removing([_replace_block_input(transformer.resblocks[block], tokens, start, _seq_dim(transformer))]):
        yield


def checkpointed(fn, *args, enabled: bool):
    """fn(*args), under activation checkpointing when enabled and gradients are on. The whole tower
    forward is one checkpointed call: its hooks (above) are registered inside `fn`, so the
    recomputation during backward sees them again (open_clip's per-block checkpointing would
    recompute the blocks after the hooks are gone)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------- tokens inserted at a deeper layer
# MMRL's representation tokens join the sequence at the input of a deeper block (not before the first), right
# after the leading token(s), are replaced at the input of later listed blocks, ride unchanged through blocks in
# between, and leave the sequence at the tower's exit, where the method reads them.

def _insert_block_input(tokens: torch.Tensor | None, n: int, at: int, seq_dim: int, carried: bool, causal: bool):
    """A pre-hook putting `tokens` [n, D] at positions at..at+n of a block's input: inserted where the input does
    not carry them yet, else replacing them (None: left as they are). With `causal`, the block's attention mask
    is rebuilt causal over the grown sequence."""

    def hook(module, args, kwargs):
        x = args[0]
        if tokens is not None:
            skip = at + n if carried else at
            x = torch.cat([x.narrow(seq_dim, 0, at), _as_tokens(tokens, x, seq_dim),
                           x.narrow(seq_dim, skip, x.shape[seq_dim] - skip)], dim=seq_dim)
        if causal and kwargs.get("attn_mask") is not None:
            mask, length = kwargs["attn_mask"], x.shape[seq_dim]
            kwargs = {**kwargs, "attn_mask": torch.full((length, length), float("-inf"), dtype=mask.dtype,
                                                        device=mask.device).triu_(1)}
        return (x, *args[1:]), kwargs

    return hook


def _layer_hooks(blocks: Sequence[nn.Module], layers: Sequence[int], tokens: Sequence[torch.Tensor], at: int,
                 seq_dim: int, causal: bool) -> list:
    """Pre-hooks from block layers[0]-1 on (1-based layer numbers, the authors' convention): tokens[j] inserted
    at layer layers[0], replacing at layer layers[j]; every later block gets the grown causal mask where
    `causal`."""
    by_layer, n = dict(zip(layers, tokens)), tokens[0].shape[0]
    handles = []
    for index in range(layers[0] - 1, len(blocks)):
        own = by_layer.get(index + 1)
        if own is not None or causal:
            hook = _insert_block_input(own, n, at, seq_dim, index + 1 > layers[0], causal)
            handles.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def check_layers(layers: Sequence[int], tower_depth: int, tower: str, method: str) -> None:
    if max(layers) > tower_depth:
        raise ConfigError(f"{method}.rep_layers={list(layers)} reaches layer {max(layers)}, beyond the {tower} "
                          f"tower's {tower_depth} layers")


@contextlib.contextmanager
def vision_inserted_tokens(tower: ImageTower, layers: Sequence[int], tokens: Sequence[torch.Tensor], at: int,
                           taken: list) -> Iterator[None]:
    """Run the image tower with tokens[j] [n, D] at positions at..at+n of the input of layer layers[j] (1-based):
    inserted at the first, replaced at the later ones; at the exit they leave the sequence and are appended to
    `taken` as [N, n, D], so the tower's own pooling sees its usual tokens."""
    n = tokens[0].shape[0]

    def take(x: torch.Tensor) -> torch.Tensor:  # [N, L, D]
        taken.append(x[:, at:at + n])
        return torch.cat([x[:, :at], x[:, at + n:]], dim=1)

    exit_hook = (tower.exit.register_forward_hook(lambda module, args, out: take(out))
                 if isinstance(tower.exit, Transformer)
                 else tower.exit.register_forward_pre_hook(lambda module, args: (take(args[0]), *args[1:])))
    handles = [exit_hook, *_layer_hooks(tower.blocks, layers, tokens, at, tower.seq_dim, causal=False)]
    with _removing(handles):
        yield


@contextlib.contextmanager
def text_inserted_tokens(transformer: Transformer, layers: Sequence[int], tokens: Sequence[torch.Tensor],
                         at: int, causal: bool) -> Iterator[None]:
    """Run the text transformer with tokens[j] [n, D] at positions at..at+n of the input of layer layers[j]
    (1-based), inserted at the first and replaced later, under a causal mask over the grown sequence where the
    tower is causal; they leave the sequence at the transformer's output, so the final norm and the pooling
    read the prompt's own positions (the authors read the end token at its position + n: the same row)."""
    n = tokens[0].shape[0]

    def drop(module, args, out):  # open_clip's transformer returns [N, L, D]
        return torch.cat([out[:, :at], out[:, at + n:]], dim=1)

    handles = [transformer.register_forward_hook(drop),
               *_layer_hooks(transformer.resblocks, layers, tokens, at, _seq_dim(transformer), causal)]
    with _removing(handles):
        yield
