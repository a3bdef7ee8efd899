"""Typed run configuration. A YAML file mirrors these dataclasses; `key=value` overrides it.

Sections: backbone, data, coop, train, clip_adapter, tip_adapter, eval, plus top-level `methods` and `output_dir`.
Unknown keys and wrongly typed values are errors that name the key and the nearest valid one.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from promptlearn.errors import ConfigError, nearest


@dataclass
class BackboneConfig:
    model: str = "RN50"  # any open_clip model name
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none" (random init)
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on GPU; the CPU always runs fp32)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    logit_scale: Optional[float] = None  # overrides the checkpoint's exp(logit_scale)


@dataclass
class DataConfig:
    name: str = "image_folder"  # a registered reader (see promptlearn.data.DATASETS)
    root: str = "data"  # data root holding the CoOp dataset folders
    path: Optional[str] = None  # the folder or CSV file of the generic readers (image_folder, csv)
    template: str = "a photo of a {}."  # zero-shot template; `templates` gives an ensemble
    templates: list[str] = field(default_factory=list)
    shots: int = 16
    seed: int = 1
    split_seed: int = 1  # seeded train/val/test split for folders or CSVs without one
    fewshot_dir: Optional[str] = None  # where few-shot draws are cached (default: the run folder)
    num_workers: int = 2
    eval_batch_size: int = 128
    skip_bad_images: bool = False  # skip unreadable images (counted) instead of stopping


@dataclass
class CoOpConfig:
    n_ctx: Optional[int] = None  # context length M (16 when unset); with ctx_init, the phrase's token count
    ctx_init: str = ""  # e.g. "a photo of a"; empty: random normal init, std 0.02
    class_specific: bool = False  # one context per class (CSC)
    class_position: str = "end"  # end | middle | front
    truncate_prompts: bool = True  # run prompts at the longest real length where exact
    share_prefix: bool = True  # unified context, class at the end: run the shared prompt start once
    class_chunk: int = 0  # classes per text-tower pass (0: all at once); bounds memory


@dataclass
class TrainConfig:
    epochs: Optional[int] = None  # None: the protocol's epochs for the shot count
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    optimizer: str = "sgd"  # sgd | adamw (AdamW: Tip-Adapter-F's recipe)
    eps: float = 1e-8  # AdamW's epsilon
    augment: bool = True  # random resized crop + flip on training images
    feature_passes: int = 10  # augmented passes cached for training (0: encode images every step)
    checkpoint_every: int = 1  # epochs between checkpoints


@dataclass
class ClipAdapterConfig:
    alpha: float = 0.2  # residual ratio: alpha * adapter(f) + (1 - alpha) * f
    reduction: int = 4  # bottleneck width: feature width // reduction
    lr: Optional[float] = None  # None: train.lr (the official code runs in CoOp's trainer and recipe)
    epochs: Optional[int] = None  # None: the same epochs as CoOp


@dataclass
class TipAdapterConfig:
    alpha_range: list[float] = field(default_factory=lambda: [0.1, 10.0])  # searched on the validation set
    alpha_steps: int = 20
    beta_range: list[float] = field(default_factory=lambda: [0.1, 12.0])
    beta_steps: int = 200
    init_alpha: float = 1.0  # alpha and beta while Tip-Adapter-F fine-tunes the keys
    init_beta: float = 1.0
    epochs: int = 20  # Tip-Adapter-F's recipe: AdamW, cosine, batch 256
    lr: float = 0.001
    batch_size: int = 256
    eps: float = 1e-4
    weight_decay: float = 0.01


@dataclass
class EvalConfig:
    ece_bins: int = 15
    decode_topk: int = 3


@dataclass
class RunConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    coop: CoOpConfig = field(default_factory=CoOpConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip_adapter: ClipAdapterConfig = field(default_factory=ClipAdapterConfig)
    tip_adapter: TipAdapterConfig = field(default_factory=TipAdapterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: ["zeroshot", "linear_probe", "coop"])
    output_dir: str = "output/run"
    cache_dir: str = "~/.cache/promptlearn/features"  # frozen-feature cache shared by runs; "none" disables


PROTOCOL_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
CLASS_POSITIONS = ("end", "middle", "front")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


def protocol_epochs(shots: int, dataset: str) -> int:
    """CoOp's epochs: 50 / 100 / 100 / 200 / 200 for 1 / 2 / 4 / 8 / 16 shots; ImageNet 50."""
    if dataset == "imagenet":
        return 50
    if shots in PROTOCOL_EPOCHS:
        return PROTOCOL_EPOCHS[shots]
    return PROTOCOL_EPOCHS[max(k for k in PROTOCOL_EPOCHS if k <= shots)] if shots > 1 else 50


# ----------------------------------------------------------------------------- keys and values

def all_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config tree with its annotation."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(all_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    close = nearest(key, all_keys(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def coerce_value(key: str, value: Any, hint: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_value(key, value, inner[0], source)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [coerce_value(key, v, args[0], source) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    raise ConfigError(f"{source}: {key} has an unsupported type {hint}")


def flatten_tree(tree: Any, source: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(tree).__name__}")
    flat: dict[str, Any] = {}
    sections = {k.split(".")[0] for k in all_keys() if "." in k}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in sections:
            flat.update(flatten_tree(value, source, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return flatten_tree(tree, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.01` -> ("train.lr", 0.01); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply(cfg: RunConfig, flat: dict[str, Any], source: str) -> RunConfig:
    """Set dotted keys on `cfg` (in place), checking names and types."""
    keys = all_keys()
    for key, value in flat.items():
        if key not in keys:
            raise _unknown_key(key, source)
        value = coerce_value(key, value, keys[key], source)
        target: Any = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg


def load_config(
    files: list[str | Path] = (), overrides: list[str] = (), base: RunConfig | None = None
) -> RunConfig:
    """Defaults, then each YAML file in order, then `key=value` overrides; validated."""
    cfg = base or RunConfig()
    for f in files:
        apply(cfg, read_yaml(f), str(f))
    for text in overrides:
        key, value = parse_override(text)
        apply(cfg, {key: value}, "command line")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.data.shots >= 1, f"data.shots must be at least 1, got {cfg.data.shots}")
    need(cfg.coop.n_ctx is None or cfg.coop.n_ctx >= 1,
         f"coop.n_ctx must be at least 1, got {cfg.coop.n_ctx} (or set coop.ctx_init to a phrase)")
    need(cfg.coop.class_position in CLASS_POSITIONS,
         f"coop.class_position must be one of {', '.join(CLASS_POSITIONS)}, got {cfg.coop.class_position!r}")
    need(cfg.backbone.precision in PRECISIONS,
         f"backbone.precision must be one of {', '.join(PRECISIONS)}, got {cfg.backbone.precision!r}")
    need(cfg.train.epochs is None or cfg.train.epochs >= 0,
         f"train.epochs must be 0 or more, got {cfg.train.epochs}")
    need(cfg.train.batch_size >= 1, f"train.batch_size must be at least 1, got {cfg.train.batch_size}")
    need(cfg.train.lr > 0, f"train.lr must be positive, got {cfg.train.lr}")
    need(cfg.train.feature_passes >= 0, f"train.feature_passes must be 0 or more, got {cfg.train.feature_passes}")
    need(cfg.train.warmup_epochs >= 0, f"train.warmup_epochs must be 0 or more, got {cfg.train.warmup_epochs}")
    need(cfg.train.checkpoint_every >= 1, f"train.checkpoint_every must be at least 1, got {cfg.train.checkpoint_every}")
    need(cfg.data.num_workers >= 0, f"data.num_workers must be 0 or more, got {cfg.data.num_workers}")
    need(cfg.data.eval_batch_size >= 1, f"data.eval_batch_size must be at least 1, got {cfg.data.eval_batch_size}")
    for key in ("momentum", "weight_decay", "warmup_lr"):
        need(getattr(cfg.train, key) >= 0, f"train.{key} must be 0 or more, got {getattr(cfg.train, key)}")
    need(cfg.backbone.logit_scale is None or 0 < cfg.backbone.logit_scale < float("inf"),
         f"backbone.logit_scale must be a positive number (or unset), got {cfg.backbone.logit_scale}")
    need(cfg.eval.ece_bins >= 1, f"eval.ece_bins must be at least 1, got {cfg.eval.ece_bins}")
    need(cfg.eval.decode_topk >= 1, f"eval.decode_topk must be at least 1, got {cfg.eval.decode_topk}")
    need(cfg.coop.class_chunk >= 0, f"coop.class_chunk must be 0 or more, got {cfg.coop.class_chunk}")
    need(bool(cfg.methods), "methods must name at least one method")
    need(cfg.train.optimizer in OPTIMIZERS,
         f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.train.optimizer!r}")
    need(cfg.train.eps > 0 and cfg.tip_adapter.eps > 0, "train.eps and tip_adapter.eps must be positive")
    need(0 <= cfg.clip_adapter.alpha <= 1, f"clip_adapter.alpha must be in [0, 1], got {cfg.clip_adapter.alpha}")
    need(cfg.clip_adapter.lr is None or cfg.clip_adapter.lr > 0,
         f"clip_adapter.lr must be positive (or unset for train.lr), got {cfg.clip_adapter.lr}")
    need(cfg.clip_adapter.reduction >= 1,
         f"clip_adapter.reduction must be at least 1, got {cfg.clip_adapter.reduction}")
    tip = cfg.tip_adapter
    for name in ("alpha", "beta"):
        lo_hi, steps = getattr(tip, f"{name}_range"), getattr(tip, f"{name}_steps")
        need(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1],
             f"tip_adapter.{name}_range must be [low, high] with 0 <= low <= high, got {lo_hi}")
        need(steps >= 1, f"tip_adapter.{name}_steps must be at least 1, got {steps}")
    need(tip.epochs >= 0 and tip.batch_size >= 1 and tip.lr > 0,
         "tip_adapter.epochs must be 0 or more, tip_adapter.batch_size at least 1 and tip_adapter.lr positive")
    for t in [cfg.data.template, *cfg.data.templates]:
        need("{}" in t, f"data.template {t!r} must contain {{}} where the class name goes")
        try:
            t.format("class name")
        except (IndexError, KeyError, ValueError):
            need(False, f"data.template {t!r} must hold exactly one {{}} and no other braces")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
