"""MMA: Multi-Modal Adapter (Yang et al., CVPR 2024).

On layers adapter_start .. adapter_end of both towers (counted from 1 as the authors count them; layer 0 is the
embeddings) a bottleneck adapter reads the block's input x through the block's own first norm and adds

    scale * up_t(shared_l(down_t(norm_1(x))))

to the block's output (x + attention + MLP): down_t is Linear(width_t, dim) + ReLU of tower t, shared_l is
Linear(dim, dim) + ReLU of layer l, the same module in both towers (the projection that joins them), up_t is
Linear(dim, width_t). At layer 0 the same sum is added to the text tower's token embeddings (before the
positions, no norm) and to the image tower's pre-transformer norm output (read from it).

Gradients as the authors' code gives them (clip/gsl.py): in the blocks the gradient entering the adapter's output
is divided by the scale and the one it passes back to the block's input multiplied by it, so the adapter weights
learn as if the scale were 1 while the tokens below get the true gradient (layer 0 has no such scaling).
Weights start Kaiming-normal (fan_out, relu), biases zero. The text prompt is "<ctx_init> <class name>." with no
learned tokens; cross-entropy on the backbone's scaled cosines is the only loss. Defaults are the authors'
ViT-B/16 recipe (configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptlearn.config import TrainingKeys
from promptlearn.deep_prompts import check_text_tower, checkpointed, image_tower
from promptlearn.errors import ConfigError
from promptlearn.methods.base import ImageMethod, register_method
from promptlearn.prompts import END_OF_PROMPT, spoken_name

TOWERS = ("text", "image")


@dataclass
class MMAConfig(TrainingKeys):
    adapter_start: int = 5  # first adapted layer, counted from 1 (0: the embeddings)
    adapter_end: int = 12  # last adapted layer, included
    adapter_dim: int = 32  # the bottleneck width, shared by both towers
    adapter_scale: float = 0.001  # the adapters' output factor, in both towers
    ctx_init: str = "a photo of a"  # the text prompt's words before the class name
    lr: Optional[float] = 0.0015
    batch_size: Optional[int] = 16
    epochs: Optional[int] = 5
    warmup_epochs: Optional[int] = 0
    grad_checkpointing: bool = False  # recompute each tower's activations in backward: less memory

    def problems(self) -> list[str]:
        found = []
        if self.adapter_start < 0 or self.adapter_end < self.adapter_start:
            found.append(f"mma.adapter_start and mma.adapter_end must satisfy 0 <= start <= end, got "
                         f"{self.adapter_start} and {self.adapter_end}")
        if self.adapter_dim < 1:
            found.append(f"mma.adapter_dim must be at least 1, got {self.adapter_dim}")
        if not self.adapter_scale > 0:  # the backward divides by it
            found.append(f"mma.adapter_scale must be positive, got {self.adapter_scale}")
        return found


class GradientScale(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer in x's dtype (the fp32 adapter on an fp16 tower)."""
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


class TowerAdapter(nn.Module):
    """One tower's projections at one layer: down (width -> dim, then ReLU) and up (dim -> width)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)


def _block_norm(block: nn.Module, tower: str) -> nn.Module:
    """The norm a block applies before its attention (open_clip's ln_1, timm's norm1)."""
    norm = getattr(block, "ln_1", None) or getattr(block, "norm1", None)
    if norm is None:
        raise ConfigError(f"mma reads each adapted block's input through its first norm; a block of the {tower} "
                          f"tower ({type(block).__name__}) has no ln_1 or norm1")
    return norm


def _image_blocks(model: nn.Module, method: str) -> tuple[list[nn.Module], int]:
    """The image tower's transformer blocks and width: deep prompts' towers (open_clip's ViT, timm's ViT), and a
    timm trunk of pre-norm blocks (EVA, PE-Core), which adapters reach though prompts do not; else image_tower's
    refusal, naming the tower."""
    try:
        tower = image_tower(model, method)
        return list(tower.blocks), tower.width
    except ConfigError:
        trunk = getattr(model.visual, "trunk", None)
        blocks = getattr(trunk, "blocks", None)
        if blocks is None or not hasattr(trunk, "norm_pre") or not all(hasattr(b, "norm1") for b in blocks):
            raise
        return list(blocks), trunk.embed_dim


def _image_input_norm(visual: nn.Module) -> nn.Module:
    """The norm before the image tower's first block (open_clip's ln_pre, timm's norm_pre)."""
    return getattr(visual, "ln_pre", None) or visual.trunk.norm_pre


@register_method("mma", config=MMAConfig)
class MMA(ImageMethod):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        own = self.own = cfg.mma
        image_blocks, image_width = _image_blocks(backbone.model, self.name)
        blocks = {"image": image_blocks,
                  "text": list(check_text_tower(backbone.text, self.name).resblocks)}
        for tower in TOWERS:
            if own.adapter_end > len(blocks[tower]):
                raise ConfigError(f"mma.adapter_end={own.adapter_end} exceeds the {tower} tower's "
                                  f"{len(blocks[tower])} layers of {backbone.name}; set mma.adapter_end (and "
                                  f"adapter_start) within them")
        widths = {"text": backbone.text.width, "image": image_width}
        self.layers = list(range(own.adapter_start, own.adapter_end + 1))
        self.blocks = {t: {layer: blocks[t][layer - 1] for layer in self.layers if layer > 0} for t in TOWERS}
        # each block's pre-attention norm, found here: a tower without one is refused before anything attaches
        self.norms = {t: {layer: _block_norm(block, t) for layer, block in self.blocks[t].items()} for t in TOWERS}
        # built (and initialised) in the authors' order: the text tower's, the image tower's, the shared layers
        self.text = nn.ModuleDict({str(layer): TowerAdapter(widths["text"], own.adapter_dim) for layer in self.layers})
        self.image = nn.ModuleDict({str(layer): TowerAdapter(widths["image"], own.adapter_dim)
                                    for layer in self.layers})
        self.shared = nn.ModuleDict({str(layer): nn.Linear(own.adapter_dim, own.adapter_dim)
                                     for layer in self.layers})
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        prompts = [" ".join(filter(None, [own.ctx_init.strip(), spoken_name(name) + END_OF_PROMPT]))
                   for name in classnames]
        token_ids = backbone.tokenizer(prompts).to(backbone.device)
        tower = backbone.text
        if tower.can_truncate:  # nothing reads the padding after the longest prompt: run without it
            token_ids = token_ids[:, :int((token_ids != backbone.tokenizer.pad_id).sum(1).max())]
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeds", tower.embed(token_ids).float(), persistent=False)

    def adapt(self, tower: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """scale * up(shared(down(x))) of `tower` at `layer`, x already normalised."""
        adapter = getattr(self, tower)[str(layer)]
        y = F.relu(_linear(adapter.down, x))
        y = F.relu(_linear(self.shared[str(layer)], y))
        return _linear(adapter.up, y) * self.own.adapter_scale

    def _block_hook(self, tower: str, layer: int, norm: nn.Module):
        scale = self.own.adapter_scale

        def hook(module, args, kwargs, out):
            y = self.adapt(tower, layer, norm(GradientScale.apply(args[0], scale)))
            return out + GradientScale.apply(y, 1.0 / scale)

        return hook

    @contextlib.contextmanager
    def attached(self, tower: str) -> Iterator[None]:
        """The tower's adapters on its blocks (and, at layer 0, on the image tower's input norm) for the duration
        of the `with`: the backbone is shared by a run's other methods, so nothing stays attached."""
        handles = []
        try:  # every hook registered inside: a failure part-way still removes those already attached
            for layer, block in self.blocks[tower].items():
                handles.append(block.register_forward_hook(self._block_hook(tower, layer, self.norms[tower][layer]),
                                                           with_kwargs=True))
            if tower == "image" and 0 in self.layers:
                handles.append(_image_input_norm(self.backbone.model.visual).register_forward_hook(
                    lambda module, args, out: out + self.adapt("image", 0, out)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:  # the hooks inside, so that a recomputation sees them
            with self.attached("image"):
                out = self.backbone.model.visual(x)
            return out[0] if isinstance(out, tuple) else out  # CoCa's tower also returns its tokens
        return F.normalize(checkpointed(run, images, enabled=self.own.grad_checkpointing).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        def run() -> torch.Tensor:
            embeds = self.token_embeds
            if 0 in self.layers:
                embeds = embeds + self.adapt("text", 0, embeds)
            with self.attached("text"):
                return self.backbone.text.encode(embeds, self.token_ids)
        return F.normalize(checkpointed(run, enabled=self.own.grad_checkpointing).float(), dim=-1)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        return trainer.fit(self, self.training_images(bank), checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        meta.pop("classnames")  # the adapters fit any class list (base-to-novel, cross-dataset)
        return {**meta, **{k: getattr(self.own, k)
                           for k in ("adapter_start", "adapter_end", "adapter_dim", "adapter_scale", "ctx_init")}}
