"""Shared test helpers: tiny random backbones and quick run configs on the embedded sample."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.tokenizer import HFTokenizer

from promptlearn.backbone import MODEL_CONFIG_DIR, FrozenCLIP, load_backbone
from promptlearn.config import BackboneConfig, RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "datasets" / "fashion_mnist_sample"
QUICKSTART = REPO / "configs" / "quickstart.yaml"
FAMILIES = ["tiny-clip", "tiny-custom-clip", "tiny-bidir-clip", "tiny-rn-clip"]
SIGLIP_TOKENIZER = "timm/ViT-B-16-SigLIP"  # the tokenizer of open_clip's SigLIP (v1) models
# how long a test waits on a subprocess (or a condition) before calling it hung: a guard against hangs only,
# never a measure of speed, so that a busy machine makes tests slower, not failed
HANG_GUARD_S = 1800


def tiny_backbone(model: str = "tiny-clip") -> FrozenCLIP:
    return load_backbone(BackboneConfig(model=model, pretrained="none", device="cpu"))


class NoStartTokenizer:
    """A SigLIP-like test double: open_clip's BPE vocabulary with no start token, EOS then padding."""

    def __init__(self, context_length: int):
        self.inner = open_clip.SimpleTokenizer(context_length=context_length)
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def __call__(self, texts, context_length=None) -> torch.Tensor:
        length = context_length or self.context_length
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = (self.encode(t) + [self.inner.eot_token_id])[:length]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def no_start_backbone() -> FrozenCLIP:
    torch.manual_seed(0)  # open_clip's random init, as load_backbone seeds it
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-bidir-clip", pretrained=None)
    cfg = BackboneConfig(model="tiny-bidir-clip", pretrained="none", device="cpu")
    return FrozenCLIP(model, NoStartTokenizer(32), preprocess, cfg, torch.device("cpu"))


def hf_tokenizer_cached(repo: str = SIGLIP_TOKENIZER, filename: str = "tokenizer_config.json") -> bool:
    """Whether a file of a Hugging Face repository is in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo, filename), str)


def tiny_siglip_tokenizer() -> HFTokenizer:
    """open_clip's HFTokenizer over the tiny SentencePiece-style tokenizer shipped with the tiny configs:
    SigLIP's rules (test_families checks them on both) with a 69-token vocabulary."""
    return HFTokenizer(str(MODEL_CONFIG_DIR / "hf-tiny-sentencepiece"), context_length=64, clean="canonicalize")


def sample_bank(cfg: RunConfig, folder: Path, model: str = "tiny-clip"):
    """(dataset, backbone, feature bank) of cfg's few-shot draw (saved under folder/fewshot), on a tiny backbone."""
    from promptlearn.data import build_dataset
    from promptlearn.data.fewshot import load_or_draw
    from promptlearn.features import FeatureBank, FeatureCache

    dataset = build_dataset(cfg.data)
    fewshot = load_or_draw(dataset, cfg.data, folder / "fewshot")
    backbone = tiny_backbone(model)
    return dataset, backbone, FeatureBank(backbone, dataset, fewshot, cache=FeatureCache(cfg.cache_dir),
                                          batch_size=128, num_workers=0, skip_bad=False, seed=cfg.data.seed)


def quick_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """The quickstart config, writing into tmp_path, with few epochs unless overridden."""
    return load_config([QUICKSTART], [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                                      f"data.path={SAMPLE}", "train.epochs=5", *overrides])


@contextmanager
def interrupted_at_epoch(epoch: int):
    """Within it, Ctrl-C as the trainer starts epoch `epoch` (0-based): a run saves its state after `epoch`
    epochs and stops."""
    from promptlearn.trainer import Trainer

    real = Trainer._epoch

    def stop(self, method, data, optimizer, scheduler, scaler, at, *rest):
        if at == epoch:
            raise KeyboardInterrupt
        return real(self, method, data, optimizer, scheduler, scaler, at, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_epoch", stop)
        yield
