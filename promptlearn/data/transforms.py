"""Image transforms: the backbone's own preprocessing for evaluation, CoOp's augmentation for training."""
from __future__ import annotations

from torchvision import transforms as T

from promptlearn.backbone import FrozenCLIP


def train_transform(backbone: FrozenCLIP, augment: bool = True):
    """Random resized crop + horizontal flip (bicubic, the backbone's mean and std), as CoOp trains."""
    if not augment:
        return backbone.preprocess
    return T.Compose([
        T.RandomResizedCrop(backbone.image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(backbone.image_mean, backbone.image_std),
    ])


def eval_transform(backbone: FrozenCLIP):
    return backbone.preprocess
