"""Typed run configuration. A YAML file mirrors these dataclasses; `key=value` overrides it.

Core sections: backbone, data, train, eval, plus top-level `methods`, `output_dir` and `cache_dir`.
Each method module registers its own section (coop, clip_adapter, tip_adapter, ...) with
`register_section`; `cfg.coop` reads it like any other section. Unknown keys and wrongly typed
values are errors that name the key and the nearest valid one; every problem is listed at once.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from promptlearn.errors import ConfigError, nearest
from promptlearn.registry import METHODS, Registry

# method config sections: name -> dataclass (defaults); a section may define problems() -> list[str]
SECTIONS: Registry[type] = Registry("config section", filled_by="promptlearn.methods")
# recipe name -> what applies it to a built config (promptlearn.recipes registers "published"; the files are read
# at the first build, never at import)
RECIPE_BOOKS: Registry = Registry("recipe book", filled_by="promptlearn.recipes")


def register_section(name: str, cls: type) -> type:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r} must be a dataclass, got {cls!r}")
    return SECTIONS.add(name, cls)


def default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in SECTIONS.items()}


@dataclass
class BackboneConfig:
    model: str = "RN50"  # any open_clip model name
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none" (random init)
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights
    # auto (bf16 autocast on a GPU that has it, else fp16; fp32 on the CPU) | fp32 | bf16 | fp16 (autocast on
    # GPU; the CPU always runs fp32) | fp16_reference (the original CoOp's pure fp16: fp16 weights and context,
    # plain SGD on fp16, no loss scaling; only to reproduce its runs)
    precision: str = "auto"
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    logit_scale: Optional[float] = None  # overrides the checkpoint's exp(logit_scale)
    quick_gelu: Optional[bool] = None  # None: the activation the weights were trained with (tag, name, file)


@dataclass
class DataConfig:
    name: str = "image_folder"  # a registered reader (see promptlearn.data.DATASETS)
    root: str = "data"  # data root holding the CoOp dataset folders
    path: Optional[str] = None  # the folder or CSV file of the generic readers (image_folder, csv)
    template: Optional[str] = None  # zero-shot template (None: the dataset's own); `templates`: an ensemble
    templates: list[str] = field(default_factory=list)
    shots: int = 16
    seed: int = 1
    split_seed: int = 1  # seeded train/val/test split for folders or CSVs without one
    fewshot_dir: Optional[str] = None  # where few-shot draws are cached (default: the run folder)
    draw: str = "reference"  # reference (the original code's draw for a seed) | sorted (listing-independent)
    fewshot_import: Optional[str] = None  # CoOp's split_fewshot/ folder or a shot_K-seed_S.pkl: use its draw
    # validation images per class: unset, CoOp's min(K, 4); `shots`, K (LP++'s authors); or a number
    val_shots: Optional[str] = None
    num_workers: int = 2
    eval_batch_size: int = 128
    skip_bad_images: bool = False  # skip unreadable images (counted) instead of stopping


@dataclass
class TrainConfig:
    epochs: Optional[int] = None  # None: the protocol's epochs for the shot count
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    optimizer: str = "sgd"  # sgd | adamw (Tip-Adapter-F's recipe) | adam (L2 in the gradient: Dassl's, TaskRes and TCP)
    eps: float = 1e-8  # AdamW's and Adam's epsilon
    augment: bool = True  # random resized crop + flip on training images
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop's area range
    lr_per_step: bool = False  # step the schedule every iteration, not every epoch (Tip-Adapter-F's code)
    min_lr: float = 0.0  # where the cosine ends (CLIP-LoRA's code: 1e-6)
    max_steps: Optional[int] = None  # stop after this many optimizer steps, mid-epoch if need be; None: epochs decide
    drop_last: bool = True  # drop an epoch's last short batch (CoOp/Dassl do; Tip-Adapter-F's code does not)
    feature_passes: int = 10  # augmented passes cached for training (0: encode images every step)
    checkpoint_every: int = 1  # epochs between checkpoints
    sync_every: int = 50  # steps between reads of the loss and accuracy from the device (and at each epoch's end)
    cuda_graphs: bool = False  # on one GPU, capture a method's fixed-shape training step once and replay it


# The training keys: `train.<key>` is the run's value, and every method that trains has the same keys in its own
# section (`coop.lr`, `clap.epochs`, ...), one meaning everywhere. A method's value comes from, lowest first: its
# code default (None: train.<key>'s), its published recipe (`recipe: published`), config files, the command line;
# a `train.<key>` given in a file or on the command line reaches every method that reads it (see build_config).
@dataclass
class TrainingKeys:
    epochs: Optional[int] = None  # None: the protocol's epochs for the shot count
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_epochs: Optional[int] = None
    warmup_lr: Optional[float] = None
    optimizer: Optional[str] = None
    eps: Optional[float] = None
    augment: Optional[bool] = None
    crop_scale: Optional[list[float]] = None
    lr_per_step: Optional[bool] = None
    min_lr: Optional[float] = None
    drop_last: Optional[bool] = None
    feature_passes: Optional[int] = None


TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingKeys))


@dataclass
class EvalConfig:
    ece_bins: int = 15
    decode_topk: int = 3


@dataclass
class RunConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: ["zeroshot", "linear_probe", "coop"])
    # published: each method runs its authors' settings for the run's protocol, dataset and shots
    # (promptlearn/recipes/); promptlearn: promptlearn's common recipe (the code defaults)
    recipe: str = "published"
    output_dir: str = "output/run"
    cache_dir: str = "~/.cache/promptlearn/features"  # frozen-feature cache shared by runs; "none" disables
    cache_hash_content: bool = False  # key cached features on a hash of each image (default: size and time)
    protocol: str = "fewshot"  # fewshot | base2novel | cross_dataset | domain_generalization (promptlearn.protocols)
    targets: list[str] = field(default_factory=list)  # test-only datasets (names or YAML); empty: the protocol's own
    selection: str = "validation"  # model selection: validation (few-shot val split) | none (fixed hyper-parameters)
    log_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb (promptlearn.tracking)
    # the methods' own sections, read as attributes: cfg.coop, cfg.tip_adapter, ...
    sections: dict[str, Any] = field(default_factory=default_sections, repr=False)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no section or key {name!r}")


PROTOCOL_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
CLASS_POSITIONS = ("end", "middle", "front")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp16_reference")
OPTIMIZERS = ("sgd", "adamw", "adam")
DRAWS = ("reference", "sorted")  # few-shot draws, see promptlearn.data.fewshot
SELECTIONS = ("validation", "none")
RECIPES = ("published", "promptlearn")


def protocol_epochs(shots: int, fixed: int | None = None) -> int:
    """CoOp's epochs: 50 / 100 / 100 / 200 / 200 for 1 / 2 / 4 / 8 / 16 shots, unless the dataset fixes
    them (ImageNet: 50 at every K; see its registration)."""
    if fixed is not None:
        return fixed
    if shots in PROTOCOL_EPOCHS:
        return PROTOCOL_EPOCHS[shots]
    return PROTOCOL_EPOCHS[max(k for k in PROTOCOL_EPOCHS if k <= shots)] if shots > 1 else 50


# ----------------------------------------------------------------------------- keys and values

def all_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config tree with its annotation, the methods' sections included."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if cls is RunConfig and f.name == "sections":
            for name, section in SECTIONS.items():
                keys.update(all_keys(section, f"{prefix}{name}."))
        elif dataclasses.is_dataclass(hint):
            keys.update(all_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def _unknown_key(key: str, source: str, keys: dict[str, Any]) -> ConfigError:
    close = nearest(key, keys, n=1)
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
    """Nested mappings as dotted keys ({"train": {"lr": 1}} -> {"train.lr": 1}); no config value is a mapping."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(tree).__name__}")
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        inner = flatten_tree(value, source, f"{dotted}.") if isinstance(value, dict) else {dotted: value}
        for twice in flat.keys() & inner.keys():  # `train: {lr: ..}` and `train.lr: ..` in one file
            raise ConfigError(f"{source}: key {twice!r} is given twice; keep one")
        flat.update(inner)
    return flat


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently) and
    any alias of a mapping: nested mapping aliases double the dotted keys at every level (a few hundred bytes
    would flatten to billions of keys), so they are refused while the file is composed, before any expansion."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if isinstance(self.anchors.get(event.anchor), yaml.MappingNode):
                raise ConfigError(f"{event.start_mark.name}, line {event.start_mark.line + 1}: *{event.anchor} "
                                  f"repeats a mapping; config files take no aliases of mappings (nor `<<` merges "
                                  f"of them): write the keys out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}, line {line}: key {key!r} is given twice (first on "
                                  f"line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


# keys that change no result: where outputs go, how fast it runs, what else is logged; a sweep may change them
# between runs, and a finished run with other values for them is still finished (methods: a sweep tracks them
# per method itself)
NEUTRAL_KEYS = {"methods", "output_dir", "cache_dir", "log_to", "data.num_workers", "data.eval_batch_size",
                "data.fewshot_dir", "backbone.device", "backbone.cache_dir", "train.checkpoint_every",
                *(f"{m}.{k}" for m in ("coop", "coop_csc", "cocoop", "kgcoop", "prograd")
                  for k in ("class_chunk", "truncate_prompts", "share_prefix")),
                "cocoop.prompts_per_pass"}


def saved_changes(saved_file: Path, cfg: "RunConfig", neutral: set[str]) -> list[str]:
    """The settings in which a saved config.yaml differs from cfg, neutral keys and keys it lacks aside."""
    saved = read_yaml(saved_file)  # as a config file is read: no aliases of mappings to expand
    now = flatten_tree(to_dict(cfg), "config")
    changes = [f"{key}: {saved[key]!r} there, {value!r} now" for key, value in now.items()
               if key in saved and key not in neutral and saved[key] != value]
    # a listed method whose whole section the saved config lacks ran under keys of another section (before
    # coop_csc and tip_adapter_f had their own): not the same setup
    sections = {key.partition(".")[0] for key in saved}
    return changes + [f"{name}: no section there" for name in cfg.methods
                      if name in SECTIONS and name not in sections and "methods" not in neutral]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.load(f, Loader=UniqueKeyLoader) or {}
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


def read_sources(files: list[str | Path] = (), overrides: list[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(source, dotted keys) layers in the order they apply: each YAML file, then each `key=value`."""
    layers = [(str(f), read_yaml(f)) for f in files]
    return layers + [("command line", dict([parse_override(text)])) for text in overrides]


# keys that no longer exist, with what replaced them (a config file written for an older promptlearn), and the
# sections that had them
RETIRED_FROM = ("clap", "clip_lora", "lp_pp", "prograd", "tip_adapter", "tip_adapter_f")
RETIRED = {"protocol": "the published code's settings are now the default for every method: `recipe: published` "
                       "applies its authors' recipe for the run's protocol, dataset and shots "
                       "(promptlearn list recipes {method}); `recipe: promptlearn` runs promptlearn's common one"}


def retired_key(key: str, source: str) -> ConfigError | None:
    section, _, leaf = key.partition(".")
    if leaf in RETIRED and section in RETIRED_FROM:
        return ConfigError(f"{source}: {key} was removed: " + RETIRED[leaf].format(method=section))
    return None


def apply(cfg: RunConfig, flat: dict[str, Any], source: str, extra: dict[str, Any] | None = None) -> RunConfig:
    """Set dotted keys on `cfg` (in place), checking names and types. `extra` maps further section names to
    dataclass instances set from the same sources (a sweep file's `sweep:` section)."""
    extra = extra or {}
    keys = {**all_keys(), **{k: v for name, obj in extra.items() for k, v in all_keys(type(obj), f"{name}.").items()}}
    given = given_keys(cfg)
    order = 1 + max((at for at, _ in given.values()), default=0)
    for key, value in flat.items():
        if key not in keys:
            raise retired_key(key, source) or _unknown_key(key, source, keys)
        value = coerce_value(key, value, keys[key], source)
        *path, leaf = key.split(".")
        target: Any = extra[path[0]] if path and path[0] in extra else cfg
        for part in path[1:] if target is not cfg else path:
            target = getattr(target, part)
        setattr(target, leaf, value)
        if not (path and path[0] in extra):
            given[key] = (order, source)
            origins(cfg)[key] = source
    return cfg


def load_config(files: list[str | Path] = (), overrides: list[str] = (), base: RunConfig | None = None,
                extra: dict[str, Any] | None = None) -> RunConfig:
    """Defaults (or `base`), then each YAML file in order, then `key=value` overrides; validated."""
    return build_config(read_sources(files, overrides), base, extra)


def build_config(layers: list[tuple[str, dict[str, Any]]], base: RunConfig | None = None,
                 extra: dict[str, Any] | None = None) -> RunConfig:
    """The config of `layers` over `base`'s, settled in one place, lowest first: code defaults; each listed
    method's published recipe for the run's protocol, dataset and shots (recipe=published); the layers (files,
    then the command line) in order, a `train.<key>` reaching every method section that no later layer (nor
    its own) sets itself. Validated."""
    earlier = base.__dict__.get("_layers") if base is not None else None
    if earlier is not None:  # rebuilt from all its layers: a recipe chosen for other shots leaves nothing behind
        layers, cfg = [*earlier, *layers], RunConfig()
    else:
        cfg = base or RunConfig()
    for source, flat in layers:
        apply(cfg, flat, source, extra)
    cfg.__dict__["_layers"] = [(source, {k: v for k, v in flat.items() if k.partition(".")[0] not in (extra or {})})
                               for source, flat in layers]
    spread_training_keys(cfg)
    if cfg.recipe in RECIPE_BOOKS:  # "promptlearn" has none: the code defaults
        RECIPE_BOOKS[cfg.recipe](cfg)
    validate(cfg)
    return cfg


def spread_training_keys(cfg: RunConfig) -> None:
    """A given `train.<key>` sets that key in every method section that has the training keys, except where a
    later layer sets the section's own key (within one layer the section's key wins: it is more specific)."""
    given = given_keys(cfg)
    for key in TRAINING_KEYS:
        if f"train.{key}" not in given:
            continue
        at, source = given[f"train.{key}"]
        for name, section in cfg.sections.items():
            own = given.get(f"{name}.{key}")
            if isinstance(section, TrainingKeys) and (own is None or own[0] < at):
                setattr(section, key, copy.deepcopy(getattr(cfg.train, key)))
                origins(cfg)[f"{name}.{key}"] = f"train.{key} ({source})"


def given_keys(cfg: RunConfig) -> dict[str, tuple[int, str]]:
    """The dotted keys set by files or overrides: key -> (layer order, source); kept beside the fields, not dumped."""
    return cfg.__dict__.setdefault("_given", {})


def origins(cfg: RunConfig) -> dict[str, str]:
    """Where each key's value came from, for every key not at its code default: a file, the command line, the
    `train.<key>` it followed, or a recipe with its source."""
    return cfg.__dict__.setdefault("_origins", {})


def applied_recipes(cfg: RunConfig) -> dict[str, list]:
    """Listed method -> the published entries (recipes.Recipe) applied to it (recipe=published)."""
    return cfg.__dict__.setdefault("_recipes", {})


def training_settings(cfg: RunConfig, section: str | None) -> TrainConfig:
    """What a method's trainer runs with: train.* with the method section's own training values in place (set
    by its code default, its recipe, a file, the command line or a given train.<key>)."""
    own = cfg.sections.get(section) if section else None
    if not isinstance(own, TrainingKeys):
        return copy.deepcopy(cfg.train)
    return dataclasses.replace(copy.deepcopy(cfg.train), **{k: copy.deepcopy(getattr(own, k)) for k in TRAINING_KEYS
                                                            if getattr(own, k) is not None})


def validate(cfg: RunConfig) -> None:
    """Every problem that can be seen without data or a backbone, listed at once in one ConfigError."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1
                          else f"{len(problems)} problems: " + "; ".join(problems))


def config_problems(cfg: RunConfig) -> list[str]:
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    # a value that followed a given train.<key> into the method sections is checked once, as train.<key>
    followers = {key for key, source in origins(cfg).items() if source.startswith("train.")}
    values = {key: value for key, value in flat_values(cfg).items() if key not in followers}
    for key, value in values.items():  # inf and nan pass every range check below: refuse them first
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key} must be a finite number, got {value}")
    problems += integer_problems(values)
    if problems:
        return problems
    need(cfg.backbone.precision in PRECISIONS,
         f"backbone.precision must be one of {', '.join(PRECISIONS)}, got {cfg.backbone.precision!r}")
    need(cfg.data.draw in DRAWS, f"data.draw must be one of {', '.join(DRAWS)}, got {cfg.data.draw!r}")
    val_shots = cfg.data.val_shots
    need(val_shots in (None, "shots") or (val_shots.isdecimal() and int(val_shots) >= 1),
         f"data.val_shots must be a whole number of at least 1, or 'shots' for K (unset: min(K, 4)), got {val_shots!r}")
    need(cfg.backbone.logit_scale is None or cfg.backbone.logit_scale > 0,
         f"backbone.logit_scale must be a positive number (or unset), got {cfg.backbone.logit_scale}")
    need(bool(cfg.methods), "methods must name at least one method")
    need(len(set(cfg.methods)) == len(cfg.methods), f"methods lists a method twice: {cfg.methods}")
    need(cfg.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    problems += training_problems(cfg.train, "train")
    for name, section in cfg.sections.items():  # each method's own training values, where it sets them
        if isinstance(section, TrainingKeys):
            problems += training_problems(training_settings(cfg, name), name, section, followers)
    problems += reach_problems(cfg)
    need(cfg.selection in SELECTIONS,
         f"selection must be one of {', '.join(SELECTIONS)}, got {cfg.selection!r}")
    problems += template_problems("data.template", [cfg.data.template] if cfg.data.template is not None else [])
    problems += template_problems("data.templates", cfg.data.templates)
    for name, section in cfg.sections.items():  # a method's own templates (kgcoop.templates, ...)
        problems += template_problems(f"{name}.templates", getattr(section, "templates", []))
    for name, section in cfg.sections.items():  # each method section checks its own values
        problems.extend(getattr(section, "problems", lambda: [])())
        if name in cfg.methods:  # and, for a method that runs, the keys given together (a section is its method's)
            problems.extend(getattr(section, "given_problems", lambda given: [])(given_keys(cfg).keys()))
    return problems


def template_problems(key: str, templates: list[str]) -> list[str]:
    problems = []
    for t in templates:
        try:
            t.format("class name")
            if "{}" not in t:
                problems.append(f"{key} {t!r} must contain {{}} where the class name goes")
        except (IndexError, KeyError, ValueError):
            problems.append(f"{key} {t!r} must hold exactly one {{}} and no other braces")
    return problems


def training_problems(train: TrainConfig, prefix: str, own: TrainingKeys | None = None,
                      followers: set[str] = frozenset()) -> list[str]:
    """Out-of-range training values, each named by the key that set it (the section's own, else train's); train's
    values (and those that followed a given train.<key>) are checked once, as train's."""
    problems: list[str] = []

    def mine(name: str) -> bool:
        return own is not None and getattr(own, name) is not None and f"{prefix}.{name}" not in followers

    def key(name: str) -> str:
        return f"{prefix}.{name}" if own is None or mine(name) else f"train.{name}"

    def need(ok: bool, name: str, message: str) -> None:
        if not ok and (own is None or mine(name)):
            problems.append(f"{key(name)} {message}")

    need(train.lr > 0, "lr", f"must be positive, got {train.lr}")
    for name in ("momentum", "weight_decay", "warmup_lr"):
        need(getattr(train, name) >= 0, name, f"must be 0 or more, got {getattr(train, name)}")
    need(train.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}")
    need(train.eps > 0, "eps", f"must be positive, got {train.eps}")
    if train.lr > 0:
        need(0 <= train.min_lr <= train.lr, "min_lr",
             f"must be 0 or more and at most {key('lr')} ({train.lr}), got {train.min_lr}")
    scale = train.crop_scale
    need(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "crop_scale",
         f"must be [low, high] with 0 < low <= high <= 1, got {scale}")
    return problems


# training keys only some optimizers read: SGD has no epsilon, Adam and AdamW no momentum (their betas are torch's)
OPTIMIZER_KEYS = {"momentum": ("sgd",), "eps": ("adam", "adamw")}


def reads(cfg: RunConfig, method: Any, key: str) -> bool:
    """Whether a method reads a training key in this run: it declares it, and its optimizer uses it."""
    optimizers = OPTIMIZER_KEYS.get(key)
    return key in method.training_keys and (
        optimizers is None or training_settings(cfg, method.section).optimizer in optimizers)


def reach_problems(cfg: RunConfig) -> list[str]:
    """A given training key that some method it names would not read: `train.<key>` with a listed method that
    trains without reading it (or whose optimizer has no use for it), or `<section>.<key>` that no method of the
    section reads. Never ignored silently."""
    problems, given = [], given_keys(cfg)
    listed = [METHODS[name] for name in cfg.methods if name in METHODS]

    def reason(m: Any, key: str) -> str:
        if key in m.training_keys:
            return f"{m.name} trains with {training_settings(cfg, m.section).optimizer}, which reads no {key}"
        return m.unread_reason(key)

    for key in TRAINING_KEYS:
        if f"train.{key}" in given:
            missed = [m for m in listed if m.trains() and not reads(cfg, m, key)]
            if missed:
                reached = [f"{m.section}.{key}" for m in listed if reads(cfg, m, key)]
                problems.append(f"train.{key} would not reach {', '.join(m.name for m in missed)} ("
                                + "; ".join(reason(m, key) for m in missed) + "): "
                                + (f"set {', '.join(reached)} instead, " if reached else "")
                                + "or leave those methods out of this run")
    for key in given:
        section, _, leaf = key.partition(".")
        if leaf in TRAINING_KEYS and section in SECTIONS:
            users = [m for _, m in METHODS.items() if m.section == section]
            if users and not any(reads(cfg, m, leaf) for m in users):
                problems.append(f"{key} is read by no method: " + "; ".join(reason(m, leaf) for m in users))
    return problems


# the smallest value of each count, size and step setting, by the key's last part, in every section (core and
# methods'); a key not here (coop.n_ctx, ivlp.depth_text, ...) has its lower bound checked by its section
LEAST = {"shots": 1, "batch_size": 1, "eval_batch_size": 1, "epochs": 0, "max_steps": 1, "warmup_epochs": 0,
         "feature_passes": 0, "checkpoint_every": 1, "sync_every": 1, "num_workers": 0, "ece_bins": 1,
         "decode_topk": 1, "class_chunk": 0, "prompts_per_pass": 1, "iterations_per_shot": 1, "rank": 1,
         "reduction": 1, "alpha_every": 1, "alpha_steps": 1, "beta_steps": 1}
# every whole-number setting (seeds included) stays within what indexing, ranges and generators accept
MAX_COUNT = 2**31 - 1


def integer_problems(values: dict[str, Any]) -> list[str]:
    """Every whole-number setting at most MAX_COUNT, and each count, size or step at least its LEAST."""
    problems = []
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        least = LEAST.get(key.rpartition(".")[2])
        if least is not None and value < least:
            problems.append(f"{key} must be {'at least 1' if least else '0 or more'}, got {value}")
        elif value > MAX_COUNT:
            problems.append(f"{key} must be at most {MAX_COUNT}, got {value}")
    return problems


def flat_values(cfg: RunConfig) -> dict[str, Any]:
    """Dotted key -> value for every leaf, list items included as key[i]."""
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value

    walk(to_dict(cfg), "")
    return flat


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as the YAML mirrors it: method sections at the top level beside the core ones."""
    tree = dataclasses.asdict(cfg)
    tree.update(tree.pop("sections"))
    return tree


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
