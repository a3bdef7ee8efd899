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
