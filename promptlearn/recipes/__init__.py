"""The authors' published recipes as data: one YAML file per method in this folder.

Each file names the method and the authors' repository; each entry holds what the authors' configs and scripts
set for a protocol (and, where they differ, per dataset and shot count): `settings` in promptlearn's own config
keys, `unmapped` for published facts that have no promptlearn key, and the `source` file it was read from. Settings are
keys of the method's own config section. Under `recipe: published` (the default) a run applies, for each listed
method, every entry that matches its protocol, dataset and shots, the more specific over the less (config.
build_config: below config files and the command line). `promptlearn list recipes [METHOD]` shows them.

File shape:
    method: promptsrc
    source: muzairkhattak/PromptSRC              # the authors' repository
    recipes:
      - protocol: fewshot                        # or a list; omitted: every protocol
        datasets: [dtd, eurosat]                 # promptlearn dataset names; omitted: every dataset
        shots: [1, 2, 4, 8, 16]                  # omitted: every shot count
        backbone: ViT-B-16                       # optional: the backbone the authors ran it with
        settings: {promptsrc.epochs: 50}         # dotted promptlearn config keys
        unmapped: {...}                          # facts without a key yet
        source: configs/trainers/...yaml         # the file in the repository (and script that sets it)
        note: ...                                # optional
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptlearn.config import RECIPE_BOOKS, UniqueKeyLoader, build_config
from promptlearn.errors import ConfigError, unknown_name_message
from promptlearn.settings import same_model

RECIPE_DIR = Path(__file__).parent
FILE_KEYS = ("method", "source", "recipes")
ENTRY_KEYS = ("protocol", "datasets", "shots", "backbone", "settings", "unmapped", "source", "note")


@dataclass(frozen=True)
class Recipe:
    """One published entry: where it applies, what it sets, and where the authors set it."""
    method: str
    repository: str
    source: str  # file (and script) in the repository
    protocols: tuple[str, ...]  # empty: every protocol
    datasets: tuple[str, ...] = ()  # empty: every dataset
    shots: tuple[int, ...] = ()  # empty: every shot count
    settings: dict[str, Any] = field(default_factory=dict)
    unmapped: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    note: str | None = None


def matching(method: str, protocol: str, dataset: str, shots: int, model: str | None = None) -> list[Recipe]:
    """The entries of `method` that apply to a run, least specific first (an entry restricting more of protocol,
    dataset and shots comes later and so wins; equals keep file order). Where some entry was published for the
    run's backbone (`model`), entries published for another backbone are left out: the authors ran that one."""
    found = [r for r in all_recipes().get(method, [])
             if (not r.protocols or protocol in r.protocols) and (not r.datasets or dataset in r.datasets)
             and (not r.shots or shots in r.shots)]
    if model is not None and any(r.backbone is not None and same_model(r.backbone, model) for r in found):
        found = [r for r in found if same_model(r.backbone, model)]
    return sorted(found, key=lambda r: bool(r.protocols) + bool(r.datasets) + bool(r.shots))


def apply_recipes(cfg) -> None:
    """Each listed method's matching entries, for every key that no config file, override or given train.<key>
    set; a recipe's templates yield to the run's own data.template(s), and a recipe's context phrase to a given
    context length (the recipe's phrase would fix another; ProGrad's padded words take any length). Records the
    sources applied, with the backbone each was published for."""
    from promptlearn.config import applied_recipes, origins
    from promptlearn.registry import METHODS

    set_by_user = origins(cfg).keys() - {k for k, v in origins(cfg).items() if v.startswith("recipe ")}
    own_templates = cfg.data.template is not None or bool(cfg.data.templates)  # the run's prompt: never replaced
    for method in cfg.methods:
        if method not in METHODS:
            continue  # validate names it
        applied = applied_recipes(cfg).setdefault(method, [])
        for recipe in matching(method, cfg.protocol, cfg.data.name, cfg.data.shots, cfg.backbone.model):
            applied.append(recipe)
            for key, value in recipe.settings.items():
                section, _, leaf = key.partition(".")
                own = cfg.sections[section]
                if key in set_by_user or (own_templates and leaf == "templates"):
                    continue
                if leaf == "ctx_init" and value and f"{section}.n_ctx" in set_by_user and not (
                        recipe.settings.get(f"{section}.ctx_init_words", getattr(own, "ctx_init_words", False))):
                    continue
                setattr(own, leaf, copy.deepcopy(value))
                origins(cfg)[key] = f"recipe {recipe.repository} {recipe.source}"


RECIPE_BOOKS.add("published", apply_recipes)


def recipes_for(method: str) -> list[Recipe]:
    """The published entries for `method` (a registered method name), in file order; [] when none is known."""
    from promptlearn.registry import METHODS

    if method not in METHODS:
        raise ConfigError(unknown_name_message("method", method, METHODS))
    return all_recipes().get(method, [])


@functools.cache
def all_recipes() -> dict[str, list[Recipe]]:
    """Every recipe file of the package, loaded and validated: method name -> its entries."""
    recipes: dict[str, list[Recipe]] = {}
    files: dict[str, Path] = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        entries = load_recipe_file(path)  # never empty: a file without entries is refused
        method = entries[0].method
        if method in files:
            raise ConfigError(f"recipe file {path}: method {method!r} already has {files[method].name}; keep one file")
        files[method] = path
        recipes[method] = entries
    return recipes


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.load(f, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe file {path} must be a mapping with keys {', '.join(FILE_KEYS)}")
    return tree


def load_recipe_file(path: str | Path) -> list[Recipe]:
    """One file's entries, each checked: known method, protocols and datasets; settings that build a valid
    config; a named source. The first problem is an error naming the file and the entry."""
    from promptlearn.registry import METHODS

    path = Path(path)
    tree = read_recipe_yaml(path)
    where = f"recipe file {path}"
    for key in tree:
        if key not in FILE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; a recipe file holds {', '.join(FILE_KEYS)}")
    for key in FILE_KEYS:
        if not tree.get(key):
            raise ConfigError(f"{where}: {key!r} is missing" + (" (the authors' repository, owner/name)"
                                                                 if key == "source" else ""))
    method, repository = tree["method"], tree["source"]
    if method not in METHODS:
        raise ConfigError(f"{where}: {unknown_name_message('method', str(method), METHODS)}")
    if not isinstance(repository, str) or repository.count("/") != 1:
        raise ConfigError(f"{where}: source must be the authors' repository as owner/name, got {repository!r}")
    if not isinstance(tree["recipes"], list):
        raise ConfigError(f"{where}: recipes must be a list of entries")
    return [parse_entry(entry, method, repository, f"{where}, recipe {i + 1}")
            for i, entry in enumerate(tree["recipes"])]


def parse_entry(entry: Any, method: str, repository: str, where: str) -> Recipe:
    from promptlearn.data import DATASETS
    from promptlearn.protocols import PROTOCOLS
    from promptlearn.registry import METHODS

    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an entry must be a mapping with keys {', '.join(ENTRY_KEYS)}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; an entry holds {', '.join(ENTRY_KEYS)}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: 'source' is missing: name the file in {repository} the values come from")
    protocols = names(entry.get("protocol", []), "protocol", where)
    for name in protocols:
        if name not in PROTOCOLS:
            raise ConfigError(f"{where}: {unknown_name_message('protocol', name, PROTOCOLS)}")
    datasets = names(entry.get("datasets", []), "datasets", where)
    for name in datasets:
        if name not in DATASETS:
            raise ConfigError(f"{where}: {unknown_name_message('dataset', name, DATASETS)}")
    shots = entry.get("shots", [])
    if not isinstance(shots, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in shots):
        raise ConfigError(f"{where}: shots must be a list of whole numbers of at least 1, got {shots!r}")
    settings, unmapped = entry.get("settings") or {}, entry.get("unmapped") or {}
    for key, value in (("settings", settings), ("unmapped", unmapped)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
    for key in ("backbone", "note"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{where}: {key} must be text, got {entry[key]!r}")
    if not settings and not unmapped:
        raise ConfigError(f"{where}: the entry states nothing: give settings or unmapped facts")
    section = METHODS[method].section
    for key in settings:
        if not (section and key.startswith(f"{section}.")):
            raise ConfigError(f"{where}: {key} is not a key of {method}'s own section"
                              + (f" ({section}.*)" if section else " (it has none)")
                              + ": a recipe sets only its method's keys")
    settings = checked_settings(settings, where)
    return Recipe(method, repository, source.strip(), protocols, datasets, tuple(shots), settings, unmapped,
                  entry.get("backbone"), entry.get("note"))


def names(value: Any, key: str, where: str) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a name or a list of names, got {value!r}")
    return tuple(value)


def checked_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings with each value as promptlearn reads it, checked by building a config from them: unknown
    keys, wrong types and out-of-range values are refused as in a config file."""
    try:
        cfg = build_config([("recipe", {"recipe": "promptlearn"}), ("settings", settings)])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    checked = {}
    for key in settings:
        *path, leaf = key.split(".")
        target: Any = cfg
        for part in path:
            target = getattr(target, part)
        checked[key] = getattr(target, leaf)
    return checked


# ----------------------------------------------------------------------------- the listing

def recipe_table(recipes: list[Recipe], width: int) -> str:
    """Entries as a table that fits `width` columns: protocol, datasets, shots and settings wrap inside their
    column; the source follows each entry on its own line."""
    import textwrap

    from promptlearn.registry import METHODS

    if not recipes:
        return "(no published recipe recorded)"
    heads = ("method", "protocol", "datasets", "shots", "settings")
    rows = []
    for r in recipes:
        section = f"{METHODS[r.method].section}." if METHODS[r.method].section else None
        shown = [f"{k[len(section):] if section and k.startswith(section) else k}={format_value(v)}"
                 for k, v in r.settings.items()]
        if r.unmapped:
            shown.append("unmapped: " + ", ".join(r.unmapped))
        if r.backbone:
            shown.append(f"backbone: {r.backbone}")
        rows.append((r.method, ", ".join(r.protocols) or "all", ", ".join(r.datasets) or "all",
                     ", ".join(map(str, r.shots)) or "all", "; ".join(shown) or "-",
                     f"source: {r.repository} {r.source}"))
    fixed = [max(len(heads[0]), *(len(row[0]) for row in rows)), len("domain_generalization"), 20, 8]
    room = width - sum(fixed) - 2 * len(fixed)
    beside = room >= 30  # a narrow terminal gets the settings on their own lines under the row, like the source
    widths = [*fixed, room] if beside else fixed
    indent = " " * (widths[0] + 2 if beside else 2)
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for row in rows:
        cells = [textwrap.wrap(cell, w, break_on_hyphens=False, break_long_words=False) or [""]
                 for cell, w in zip(row, widths)]
        for i in range(max(map(len, cells))):
            lines.append("  ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip())
        for text in row[len(widths):]:
            lines += textwrap.wrap(text, max(40, width), initial_indent=indent, subsequent_indent=indent + "  ",
                                   break_on_hyphens=False, break_long_words=False)  # a path stays whole
    return "\n".join(lines)


def format_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(format_value, value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return f'"{value}"' if isinstance(value, str) and " " in value else str(value)
