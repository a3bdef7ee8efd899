"""Image transforms: the backbone's own preprocessing for evaluation, CoOp's augmentation for training."""
from __future__ import annotations

from torchvision import transforms as T

from promptlearn.backbone import FrozenCLIP

DEFAULT_CROP_SCALE = (0.08, 1.0)  # torchvision's and CoOp's
HALF_AREA_CROP_SCALE = (0.5, 1.0)  # Tip-Adapter's and LP++'s code


def train_transform(backbone: FrozenCLIP, augment: bool = True, crop_scale=DEFAULT_CROP_SCALE):
    """Random resized crop (area fraction in crop_scale) + horizontal flip (bicubic, the backbone's mean
    and std), as CoOp trains."""
    if not augment:
        return backbone.preprocess
    return T.Compose([
        T.RandomResizedCrop(backbone.image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(backbone.image_mean, backbone.image_std),
    ])


def eval_transform(backbone: FrozenCLIP):
    return backbone.preprocess
