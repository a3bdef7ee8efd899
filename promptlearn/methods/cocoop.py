"""CoCoOp (Zhou et al., CVPR 2022): CoOp whose context is conditioned on the image. A meta-network
(Linear d -> d/16, ReLU, Linear d/16 -> width, with biases) turns each L2-normalised image feature into
a bias added to every context vector, so each image has its own prompts and its own class features.

The original runs the text tower once per image (batch 1, all classes, 77 tokens). Here the B x C
prompts of a batch run together, truncated like CoOp's, in passes of at most `prompts_per_pass`
prompts (chunks of classes, then of images) under activation checkpointing: the same logits as
the per-image loop (`per_image_logits`, kept as the reference for tests and the benchmark), with
memory bounded by the pass size. Defaults: context "a photo of a", SGD lr 0.002, batch 1, 10 epochs.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from promptlearn.methods.base import Capabilities, register_method
from promptlearn.methods.coop import CoOp, CoOpConfig
from promptlearn.text_tower import Packing

META_REDUCTION = 16  # the meta-network's bottleneck: feature width // 16


@dataclass
class CoCoOpConfig(CoOpConfig):
    section: ClassVar[str] = "cocoop"
    ctx_init: str = "a photo of a"
    prompts_per_pass: int = 4096  # prompts (image x class) per text-tower pass; bounds memory
    lr: Optional[float] = 0.002
    batch_size: Optional[int] = 1  # the original's; larger batches give the same per-image logits
    epochs: Optional[int] = 10

    def problems(self) -> list[str]:
        found = super().problems()
        if self.class_specific:
            found.append("cocoop.class_specific must be false: CoCoOp's context is shared by all classes")
        return found


def meta_network(feature_width: int, ctx_width: int) -> nn.Sequential:
    hidden = max(1, feature_width // META_REDUCTION)
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(feature_width, hidden)), ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(hidden, ctx_width))]))


@register_method("cocoop", config=CoCoOpConfig)
class CoCoOp(CoOp):
    capabilities = Capabilities(learns=True, trains=True, unseen_classes=True, eval_from_checkpoint=True)
    force_class_specific = False

    @classmethod
    def capabilities_for(cls, cfg) -> Capabilities:
        return cls.capabilities

    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        # in the context's dtype: fp16 under backbone.precision=fp16_reference, as the original's PREC fp16
        self.meta_net = meta_network(backbone.embed_dim, backbone.text.width).to(backbone.device,
                                                                                 backbone.parameter_dtype)
        self._packings: dict[tuple, Packing | None] = {}

    def contexts(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, M, width]: the learned context shifted by each image's meta-network bias."""
        return self.prompts.ctx + self.meta_net(image_features.to(self.prompts.ctx.dtype)).unsqueeze(1)

    def _pass(self, image_features: torch.Tensor, ctx: torch.Tensor, classes: slice) -> torch.Tensor:
        """Logits [b, c] of b images against the c classes in `classes`, in one text-tower pass. Packed
        (as CoOp's prompts) where the tower allows: the b x c prompts run each through its own length,
        and with the class at the end each image's prompt start runs once for all its classes."""
        b, text = ctx.shape[0], self.backbone.text
        ids = self.prompts.token_ids[classes]
        c = len(ids)
        packing = self._packing(classes, b)
        if packing is None:
            embeds = self.prompts.with_contexts(ctx, classes).flatten(0, 1)
            features = text.encode(embeds, ids.repeat(b, 1))
        elif self.share_prefix:
            starts, rest = self.prompts.shared_prefix(ctx)
            features = text.encode_packed(rest[classes], packing, text.prefix_states(starts))  # image-major
        else:
            features = text.encode_packed(self.prompts.with_contexts(ctx, classes).flatten(0, 1), packing)
        features = F.normalize(features.float(), dim=-1).view(b, c, -1)
        return self.backbone.logit_scale * torch.einsum("bd,bcd->bc", image_features.float(), features) \
            + self.backbone.logit_bias

    def _packing(self, classes: slice, images: int) -> Packing | None:
        """The packing of `images` x the classes in `classes` (None where the tower runs the plain
        computation), made once per pass shape: every image's prompts read the same class rows when
        their start is shared, their own rows otherwise."""
        key = (classes.start, classes.stop, images)
        if key not in self._packings:
            one = self.packing(classes) if self.packed else None
            sources = 0 if self.share_prefix else len(self.prompts.token_ids[classes])
            self._packings[key] = one.repeat(images, sources) if one is not None else None
        return self._packings[key]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        ctx = self.contexts(image_features)
        n_img, n_cls = image_features.shape[0], len(self.prompts.token_ids)
        per_pass = self.own.prompts_per_pass
        class_chunk = min(n_cls, max(1, per_pass // n_img))
        image_chunk = min(n_img, max(1, per_pass // class_chunk))
        rows = []
        for i in range(0, n_img, image_chunk):
            x, c = image_features[i:i + image_chunk], ctx[i:i + image_chunk]
            parts = []
            for s in range(0, n_cls, class_chunk):
                classes = slice(s, s + class_chunk)
                parts.append(checkpoint(self._pass, x, c, classes, use_reentrant=False)
                             if torch.is_grad_enabled() else self._pass(x, c, classes))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    def per_image_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """The original's computation: one text-tower pass over all classes per image."""
        ctx = self.contexts(image_features)
        return torch.cat([self._pass(image_features[i:i + 1], ctx[i:i + 1], slice(None))
                          for i in range(len(image_features))])

    def scorer(self):
        return self

    def after_training(self, folder):
        return None  # the context alone is not the prompt any image sees

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "meta_reduction": META_REDUCTION}
