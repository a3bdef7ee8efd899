"""MMRL: Multi-Modal Representation Learning (Guo & Gu, CVPR 2025; github.com/yunncheng/MMRL).

A shared space of n_rep_tokens learned representation tokens [n, rep_dim] (normal, std 0.02) is projected, by
one linear map per listed layer and tower (rep_dim -> that tower's width; the maps of a tower start as copies
of one initialisation), into tokens that join both towers at layer rep_layers[0] (1-based: the input of that
block) right after the leading token (class token; start-of-text token), are replaced by the next layer's
projections at each later listed layer, and leave at the towers' exits. The text prompts are the dataset's
hand-crafted template, with a causal mask over the grown sequence from the first listed layer on.

Two image heads read the image tower: the class-token feature through the frozen projection, and the mean of
the representation tokens after the final norm through a learned projection proj_rep [width, embed_dim]
(normal, std width ** -0.5). Loss: alpha CE(class-token logits) + (1 - alpha) CE(representation logits)
+ reg_weight (1 - mean cos(class-token feature, frozen image feature)) + reg_weight (1 - mean cos(text
feature, frozen text feature of the same template)). Inference: on the test images of the classes and
dataset it trained on, alpha x class-token logits + (1 - alpha) x representation logits; on classes or
datasets it never trained on (novel classes, cross-dataset and domain-shift targets), the class-token
logits alone, as the authors' test() does for B2N new, CD targets other than ImageNet. Defaults are the
authors' base-to-novel recipe (configs/trainers/MMRL/vit_b16.yaml); per-dataset values in the recipes.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from promptlearn.config import TrainingKeys
from promptlearn.data import dataset_templates
from promptlearn.deep_prompts import (
    check_layers,
    check_text_tower,
    checkpointed,
    image_tower,
    text_inserted_tokens,
    vision_inserted_tokens,
)
from promptlearn.errors import ConfigError
from promptlearn.methods.base import ImageMethod, register_method
from promptlearn.prompts import spoken_name
from promptlearn.trainer import StepLosses

REP_TOKEN_STD = 0.02


@dataclass
class MMRLConfig(TrainingKeys):
    section = "mmrl"
    n_rep_tokens: int = 5  # representation tokens per layer
    rep_dim: int = 512  # width of the shared representation space
    rep_layers: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11, 12])  # 1-based, both towers
    alpha: float = 0.7  # weight of the class-token head (loss and inference blend)
    reg_weight: float = 1.0  # of each cosine regularisation towards the frozen features
    lr: Optional[float] = 0.001
    batch_size: Optional[int] = 4
    epochs: Optional[int] = 10
    optimizer: Optional[str] = "adamw"
    crop_scale: Optional[list[float]] = field(default_factory=lambda: [0.5, 1.0])
    grad_checkpointing: bool = False  # recompute each tower's activations in backward: less memory

    def problems(self) -> list[str]:
        found = [f"mmrl.{key} must be at least 1, got {getattr(self, key)}"
                 for key in ("n_rep_tokens", "rep_dim") if getattr(self, key) < 1]
        layers = list(self.rep_layers)
        if not layers or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
            found.append(f"mmrl.rep_layers must be increasing layer numbers from 1, got {layers}")
        if not 0 <= self.alpha <= 1:
            found.append(f"mmrl.alpha must lie in [0, 1], got {self.alpha}")
        if self.reg_weight < 0:
            found.append(f"mmrl.reg_weight must be 0 or more, got {self.reg_weight}")
        return found


def _representation_pool(visual: nn.Module, method: str):
    """The representation head's pooling of the taken tokens [N, n, D] -> [N, D] for this image tower: the
    final norm on every token, then their mean (the authors' ln_post, mean); a timm trunk's pooled norm after."""
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.proj is None:
            raise ConfigError(f"{method} reads its representation tokens through the image tower's final norm and "
                              "a projection; this VisionTransformer tower pools by attention or has no projection "
                              "(CoCa-style), so it cannot. Choose a ViT model such as ViT-B-16")
        return lambda tokens: visual.ln_post(tokens).mean(dim=1)
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        return lambda tokens: trunk.fc_norm(trunk.norm(tokens).mean(dim=1))
    raise AssertionError(type(visual))  # image_tower refused every other tower


@register_method("mmrl", config=MMRLConfig)
class MMRL(ImageMethod):
    def __init__(self, cfg, backbone, classnames):
        super().__init__(cfg, backbone, classnames)
        own = self.own = cfg.mmrl
        self.tower = image_tower(backbone.model, self.name)
        text = backbone.text
        check_text_tower(text, self.name)
        if text.use_pad_mask or text.cls_emb is not None:
            raise ConfigError(f"{self.name} inserts tokens inside the text encoder under a causal mask; this model's "
                              f"text tower ({type(text.source).__name__}) also masks padding or appends a class "
                              "token (CoCa), which it cannot grow. Choose a model such as ViT-B-16")
        self.pool_representation = _representation_pool(self.visual, self.name)
        layers = list(own.rep_layers)
        check_layers(layers, len(self.tower.blocks), "image", self.name)
        check_layers(layers, len(text.transformer.resblocks), "text", self.name)
        # after the class token (and a timm trunk's other leading tokens); after the start-of-text token
        self.image_at = getattr(getattr(self.visual, "trunk", None), "num_prefix_tokens", 1)
        self.text_at = len(backbone.tokenizer.start_ids)
        device, width = backbone.device, self.tower.width
        # the authors' creation order: proj_rep with the model, then the tokens and the projections
        self.proj_rep = nn.Parameter(torch.randn(width, backbone.embed_dim, device=device) * width ** -0.5)
        self.rep_tokens = nn.Parameter(torch.empty(own.n_rep_tokens, own.rep_dim, device=device)
                                       .normal_(std=REP_TOKEN_STD))
        to_image = nn.Linear(own.rep_dim, width).to(device)
        to_text = nn.Linear(own.rep_dim, text.width).to(device)
        self.to_image = nn.ModuleList([copy.deepcopy(to_image) for _ in layers])
        self.to_text = nn.ModuleList([copy.deepcopy(to_text) for _ in layers])
        self.text = text
        templates = dataset_templates(cfg.data)
        if len(templates) != 1:
            raise ConfigError(f"{self.name} prompts with one template, the dataset's; data.templates gives "
                              f"{len(templates)}: set data.template instead")
        token_ids = backbone.tokenizer([templates[0].format(spoken_name(c)) for c in classnames]).to(device)
        if text.can_truncate:  # nothing reads the padding after the longest prompt's pooled position
            token_ids = token_ids[:, :int(text.pooled_positions(token_ids).max()) + 1]
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeds", text.embed(token_ids), persistent=False)
            frozen = F.normalize(text.encode(self.token_embeds, token_ids).float(), dim=-1)
        self.register_buffer("frozen_text", frozen, persistent=False)

    # ------------------------------------------------------------------ the two towers

    def layer_tokens(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each listed layer's image and text tokens, projected from the shared representation tokens."""
        return [p(self.rep_tokens) for p in self.to_image], [p(self.rep_tokens) for p in self.to_text]

    def image_heads(self, images: torch.Tensor, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised class-token and representation features [N, D] each."""
        def run(x: torch.Tensor, *layer_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            taken: list[torch.Tensor] = []
            with vision_inserted_tokens(self.tower, self.own.rep_layers, layer_tokens, self.image_at, taken):
                out = self.visual(x)
            out = out[0] if isinstance(out, tuple) else out  # a tower that also returns its tokens
            return out, self.pool_representation(taken[0]) @ self.proj_rep.to(taken[0].dtype)
        cls, rep = checkpointed(run, images, *tokens, enabled=self.own.grad_checkpointing)
        return F.normalize(cls.float(), dim=-1), F.normalize(rep.float(), dim=-1)

    def class_text(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """[C, D] L2-normalised class features of the template prompts with the text tokens inside."""
        def run(*layer_tokens: torch.Tensor) -> torch.Tensor:
            with text_inserted_tokens(self.text.transformer, self.own.rep_layers, layer_tokens, self.text_at,
                                      self.text.causal):
                return self.text.encode(self.token_embeds, self.token_ids)
        return F.normalize(checkpointed(run, *tokens, enabled=self.own.grad_checkpointing).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The class-token head: what classes it never trained on are scored with."""
        return self.image_heads(images, self.layer_tokens()[0])[0]

    def blended_features(self, images: torch.Tensor) -> torch.Tensor:
        """alpha x class-token + (1 - alpha) x representation features: their logits are the authors' blend
        alpha x logits + (1 - alpha) x logits_rep (the logits are linear in the image feature)."""
        cls, rep = self.image_heads(images, self.layer_tokens()[0])
        return self.own.alpha * cls + (1 - self.own.alpha) * rep

    def text_features(self) -> torch.Tensor:
        return self.class_text(self.layer_tokens()[1])

    # ------------------------------------------------------------------ training and evaluation

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepLosses:
        own = self.own
        image_tokens, text_tokens = self.layer_tokens()
        image, rep = self.image_heads(images, image_tokens)
        text = self.class_text(text_tokens)
        logits, logits_rep = self.backbone.logits(image, text).float(), self.backbone.logits(rep, text).float()
        frozen_image = self.backbone.encode_images(images)  # no gradients, no tokens: the frozen model's
        return StepLosses(own.alpha * logits + (1 - own.alpha) * logits_rep, {
            "cross_entropy": own.alpha * F.cross_entropy(logits, labels),
            "cross_entropy_rep": (1 - own.alpha) * F.cross_entropy(logits_rep, labels),
            "image_regularisation": own.reg_weight * (1 - F.cosine_similarity(image, frozen_image, dim=1).mean()),
            "text_regularisation": own.reg_weight * (1 - F.cosine_similarity(text, self.frozen_text, dim=1).mean()),
        })

    @torch.no_grad()
    def _blend_for_test(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        with self.backbone.autocast():
            return self.blended_features(images.to(self.device, non_blocking=True)).float()

    def test_features(self, bank, dataset=None):
        """The blend on the test images of the dataset and classes it trained on, the class-token head on any
        other (novel classes, other datasets, shifted domains)."""
        own_test = dataset is None or (dataset.name == bank.dataset.name
                                       and list(dataset.classnames) == list(bank.dataset.classnames))
        return bank.test_of(dataset, encode=self._blend_for_test if own_test else self._encode_for_test)

    def fit(self, bank, trainer, checkpoint, resume) -> dict:
        return trainer.fit(self, self.training_images(bank), checkpoint, resume)

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        meta.pop("classnames")  # the learned tokens fit any class list (base-to-novel, cross-dataset)
        return {**meta, **{f.name: getattr(self.own, f.name) for f in dataclasses.fields(self.own)
                           if f.name in ("n_rep_tokens", "rep_dim", "rep_layers")}}
