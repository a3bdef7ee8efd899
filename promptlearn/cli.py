"""Command-line plumbing shared by the tools: flags and `key=value` onto the typed config."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from promptlearn.config import RunConfig, load_config
from promptlearn.errors import PromptlearnError

# flag -> config key
FLAG_KEYS = {"data_root": "data.root", "shots": "data.shots", "seed": "data.seed", "epochs": "train.epochs",
             "model": "backbone.model", "pretrained": "backbone.pretrained", "device": "backbone.device",
             "output_dir": "output_dir"}


def dataset_config(name: str) -> tuple[list[str], list[str]]:
    """`--dataset` as a YAML file or as a registered dataset name (its template comes with it)."""
    if name.endswith((".yaml", ".yml")):
        return [name], []
    return [], [f"data.name={name}"]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML defaults (repeatable; later files win)")
    parser.add_argument("--dataset", metavar="NAME|FILE.yaml", help="dataset name or dataset YAML")
    parser.add_argument("--data-root", metavar="DIR", help="folder holding the CoOp dataset folders")
    parser.add_argument("--shots", type=int, metavar="K")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--epochs", type=int, metavar="N")
    parser.add_argument("--model", metavar="NAME", help="open_clip model name")
    parser.add_argument("--pretrained", metavar="TAG|PATH|none")
    parser.add_argument("--device", metavar="D", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output-dir", metavar="DIR")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    files, overrides = list(args.config), []
    if args.dataset:
        extra_files, extra = dataset_config(args.dataset)
        files += extra_files
        overrides += extra
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(files, overrides + list(args.overrides))


def run_tool(main: Callable[[list[str] | None], int]) -> None:
    """Run a tool's main: a PromptlearnError prints one clear line and exits 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        code = main(None)
    except PromptlearnError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, e.g. YAML errors
        print(f"error: {message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
