"""Command-line plumbing shared by the tools: flags and `key=value` onto the typed config."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable

import yaml

from promptlearn.config import BackboneConfig, DataConfig, RunConfig, dump_yaml, load_config
from promptlearn.errors import PromptlearnError, error_line
from promptlearn.progress import set_quiet

# flag -> config key
FLAG_KEYS = {"data_root": "data.root", "shots": "data.shots", "seed": "data.seed", "epochs": "train.epochs",
             "model": "backbone.model", "pretrained": "backbone.pretrained", "device": "backbone.device",
             "output_dir": "output_dir", "log_to": "log_to"}


def dataset_config(name: str) -> tuple[list[str], list[str]]:
    """`--dataset` as a YAML file or as a registered dataset name (its template comes with it)."""
    if name.endswith((".yaml", ".yml")):
        return [name], []
    return [], [f"data.name={name}"]


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless the help names it already; a flag (False) or an unset
    option (None: the config decides, and its help says what the config's default is) has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    backbone, data = BackboneConfig(), DataConfig()
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML defaults (repeatable; later files win)")
    parser.add_argument("--dataset", metavar="NAME|FILE.yaml",
                        help=f"dataset name or dataset YAML (default: data.name, {data.name})")
    parser.add_argument("--data-root", metavar="DIR",
                        help=f"folder holding the CoOp dataset folders (default: data.root, {data.root})")
    parser.add_argument("--shots", type=int, metavar="K", help=f"images per class (default: data.shots, {data.shots})")
    parser.add_argument("--seed", type=int, metavar="S", help=f"the few-shot draw's seed (default: data.seed, "
                                                             f"{data.seed})")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help="training epochs (default: train.epochs, unset: the protocol's for the shot count)")
    parser.add_argument("--model", metavar="NAME",
                        help=f"open_clip model name (default: backbone.model, {backbone.model})")
    parser.add_argument("--pretrained", metavar="TAG|PATH|none",
                        help=f"open_clip weights tag, a checkpoint path, or none for random weights (default: "
                             f"backbone.pretrained, {backbone.pretrained}: downloaded from the Hugging Face hub once)")
    parser.add_argument("--device", metavar="D",
                        help=f"auto, cpu, cuda or cuda:N (default: backbone.device, {backbone.device})")
    parser.add_argument("--output-dir", metavar="DIR", help=f"the run folder (default: output_dir, "
                                                            f"{RunConfig.output_dir})")
    parser.add_argument("--log-to", metavar="tensorboard|wandb",
                        help="also log to TensorBoard and/or Weights & Biases (comma-separated; key log_to; "
                             "pip install 'promptlearn[tensorboard]' or '[wandb]'; default: none)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    add_console_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show the INFO log (every epoch, open_clip's messages) on the console; -vv: debug too")
    parser.add_argument("-q", "--quiet", action="count", default=0,
                        help="errors only on the console, no progress bars (log.txt keeps everything)")


def setup_logging(verbose: int = 0, quiet: int = 0) -> None:
    """The console shows WARNING and above plus the progress displays; -v adds INFO (-vv DEBUG), -q keeps
    errors only and hides the displays. A run's log.txt records INFO whatever the console shows (runner.log_to_file)."""
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "promptlearn_console", False)]:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.promptlearn_console = True
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(console)
    root.setLevel(min(level, logging.WARNING))
    set_quiet(bool(quiet))


def prepare_run(args: argparse.Namespace) -> RunConfig | None:
    """Console logging from -v/-q, then the config; None when --print-config printed it (nothing to run)."""
    setup_logging(args.verbose, args.quiet)
    cfg = config_from_args(args)
    if args.print_config:
        # the config as files and the command line set it, then what each listed method runs with and why (each
        # source on one line, unwrapped)
        from promptlearn.settings import effective  # beside the methods: read once the config is built

        print(dump_yaml(cfg) + yaml.safe_dump({"effective": effective(cfg)}, sort_keys=False, width=1000), end="")
        return None
    return cfg


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
    """Run a tool's main: a PromptlearnError prints one clear line and exits with its status (2; 3 for a
    sweep that left busy runs), not a traceback."""
    setup_logging()
    try:
        code = main(None)
    except PromptlearnError as e:
        print(error_line(e), file=sys.stderr)
        code = e.exit_status
    except KeyboardInterrupt as e:
        print(error_line(e), file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader went away (`promptlearn list models | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush raises nothing
        code = 128 + signal.SIGPIPE
    sys.exit(code)
