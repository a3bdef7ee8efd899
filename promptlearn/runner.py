"""The whole pipeline on one screen: data -> frozen backbone -> method -> trainer -> evaluation -> report."""
from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from promptlearn import distributed
from promptlearn.backbone import backbone_problems, load_backbone
from promptlearn.config import NEUTRAL_KEYS, RunConfig, dump_yaml, saved_changes, to_dict
from promptlearn.data import DATASETS, build_dataset
from promptlearn.data.fewshot import FewShotSplit, load_or_draw
from promptlearn.data.loader import check_images
from promptlearn.errors import ConfigError, PromptlearnError, error_line
from promptlearn.features import FeatureBank, FeatureCache
from promptlearn.io import RunLock, atomic_write_json, atomic_write_text, check_writable
from promptlearn.methods import METHODS, build_method, method_class
from promptlearn.protocols import evaluate_on, protocol_for
from promptlearn.report import run_table
from promptlearn.runinfo import PhaseClock, environment, peak_memory
from promptlearn.settings import method_recipe, run_epochs
from promptlearn.tracking import check_trackers, open_tracking
from promptlearn.trainer import Trainer

log = logging.getLogger("promptlearn")
COMPLETE_MARKER = "run_complete.json"


def run_experiment(cfg: RunConfig, resume: bool = False, eval_only: str | None = None,
                   overwrite: bool = False) -> dict:
    """One run; under torchrun, one rank of a data-parallel run (rank 0 writes, the others train)."""
    if resume and not eval_only and finished_with(cfg):  # before the checks: nothing will be loaded
        return finished_metrics(cfg)
    check_run(cfg, eval_only, resume, overwrite)
    protocol = protocol_for(cfg)
    cfg.backbone.device = distributed.join_from_environment(cfg.backbone.device)
    writer = distributed.is_writer()
    out = Path(cfg.output_dir)
    with RunLock(out) if writer else contextlib.nullcontext(), \
            log_to_file(out / "log.txt") if writer else contextlib.nullcontext(), \
            open_tracking(cfg.log_to if writer else [], out, str(out), to_dict(cfg)) as tracking:
        if writer:
            (out / COMPLETE_MARKER).unlink(missing_ok=True)
            atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        everything = build_dataset(cfg.data)                                            # data
        check_shots(cfg, everything)
        targets = protocol.targets(cfg, everything)  # test sets: e.g. base and novel classes, target datasets
        if writer:
            drawn = few_shot_draw(cfg, everything, out, eval_only)
        distributed.barrier()  # the other ranks read the draw rank 0 saved
        if not writer:
            drawn = few_shot_draw(cfg, everything, out, eval_only)
        dataset, fewshot = protocol.training_split(cfg, everything, drawn)
        if not cfg.data.skip_bad_images:  # else each split's extraction skips and counts them
            check_images([*fewshot.train, *fewshot.val, *(item for t in targets for item in t.dataset.test)])
        backbone = load_backbone(cfg.backbone)                                          # frozen backbone
        cache = FeatureCache.from_setting(cfg.cache_dir, cfg.cache_hash_content)
        bank = FeatureBank(backbone, dataset, fewshot, cache=cache, batch_size=cfg.data.eval_batch_size,
                           num_workers=cfg.data.num_workers, skip_bad=cfg.data.skip_bad_images, seed=cfg.data.seed)
        clock, info_file = PhaseClock(bank), out / "run_info.json"
        log.info("%s (protocol %s, recipe %s): %d classes, %d-shot draw (seed %d): %d train, %d val images; "
                 "test sets %s", dataset.name, protocol.name, cfg.recipe, dataset.num_classes, cfg.data.shots,
                 cfg.data.seed, len(fewshot.train), len(fewshot.val), ", ".join(t.name for t in targets))
        metrics, reports = {}, []
        for name in cfg.methods:
            unable = protocol.unable(cfg, method_class(name).capabilities_for(cfg))
            if unable:  # marked n/a with the reason, never dropped
                metrics[name] = protocol.not_run(unable)
                continue
            torch.manual_seed(cfg.data.seed)  # a method's random init depends only on the seed
            method = build_method(name, cfg, backbone, dataset.classnames)             # method
            if not writer and not (method.caps.trains and not eval_only):
                continue  # only training is shared between the ranks
            folder, phases = out / name, {}
            with clock.phase("training", phases):
                if eval_only and method.caps.eval_from_checkpoint:
                    method.restore(eval_only)
                    info = {"checkpoint": str(eval_only)}
                else:
                    settings = method.train_config
                    trainer = Trainer(settings, run_epochs(cfg, settings), cfg.data.seed, backbone.precision,
                                      tracking.epoch)                                  # trainer
                    info = method.fit(bank, trainer, folder / "checkpoint.pt", resume)
            if not writer:
                continue  # evaluating and reporting are rank 0's
            history = info.pop("history", None)
            if history is not None:
                atomic_write_json(folder / "history.json", history)
                tracking.history(name, history)
            with clock.phase("evaluation", phases):                                     # evaluation
                result = protocol.combine({t.name: evaluate_on(method, t, bank, folder / t.folder, cfg)
                                           for t in targets})
            result.update(info, train_seconds=info.get("train_seconds", phases["training_seconds"]),
                          phases=phases, recipe=method_recipe(cfg, name))
            extra = method.after_training(folder)  # e.g. CoOp's prompt read as words
            if extra is not None:
                result.update(extra.metrics)
                reports.append(extra.report)
            metrics[name] = result
            tracking.result(name, result)
            atomic_write_json(out / "metrics.json", metrics)
            atomic_write_json(info_file, run_info(cfg, backbone, clock, bank))
        if not writer:
            return {}
        table = run_table(protocol, metrics, f"{everything.name}, {cfg.data.shots} shots, seed {cfg.data.seed}, "
                                             f"{backbone.name} ({backbone.pretrained})", cfg.selection)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(info_file, run_info(cfg, backbone, clock, bank))
        atomic_write_text(out / "summary.md", table + "\n")                             # report
        tracking.text("results", table)
        atomic_write_json(out / COMPLETE_MARKER, {"methods": list(metrics)})
        print("\n\n".join([table, *filter(None, reports)]))
        return metrics


def finished_with(cfg: RunConfig) -> bool:
    """The output folder holds a complete run of this config, its methods included (keys that change no result,
    such as the device each torchrun rank is given, aside): --resume has nothing left to do. Every rank decides
    alike, from the same files, before any is written."""
    saved = Path(cfg.output_dir) / "config.yaml"
    return (is_complete(cfg.output_dir) and saved.is_file()
            and not saved_changes(saved, cfg, NEUTRAL_KEYS - {"methods"}))


def finished_metrics(cfg: RunConfig) -> dict:
    """A complete run's results as it left them, its table printed again; nothing is loaded or computed."""
    out = Path(cfg.output_dir)
    log.info("%s holds this complete run: nothing to resume (--overwrite runs it again)", out)
    if not distributed.is_writer():
        return {}
    print((out / "summary.md").read_text(encoding="utf-8"), end="")
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def run_info(cfg: RunConfig, backbone, clock: PhaseClock, bank: FeatureBank) -> dict:
    """The protocol, the environment, wall-clock per phase, feature extraction (images encoded and read from
    the cache, images per second) and peak memory (run_info.json)."""
    return {"protocol": cfg.protocol, "selection": cfg.selection,
            "recipes": {name: method_recipe(cfg, name) for name in cfg.methods},
            "environment": environment(backbone.device, backbone.precision),
            "phase_seconds": clock.record(), "feature_extraction": bank.extraction_record(),
            **peak_memory(backbone.device)}


def check_run(cfg: RunConfig, eval_only: str | None = None, resume: bool = False, overwrite: bool = False) -> None:
    """Before anything loads: every method exists and can do what this run asks of it, the backbone's
    name and weights exist, the output and cache folders can be written, and no finished run is replaced
    unasked. Every problem is listed at once, in one ConfigError."""
    out = Path(cfg.output_dir)
    created = [p for p in [out, *out.parents] if not p.exists()]  # check_writable makes them
    problems = backbone_problems(cfg.backbone)
    checks = (lambda: check_methods(cfg, eval_only), lambda: check_writable(cfg.output_dir),
              lambda: FeatureCache.from_setting(cfg.cache_dir).check(),
              lambda: check_not_finished(cfg.output_dir, eval_only, resume, overwrite),
              lambda: check_trackers(cfg.log_to))
    for check in checks:  # each raises its own message; all of them are reported together
        try:
            check()
        except PromptlearnError as e:
            problems.append(str(e))
    if problems:
        for folder in created:  # a refused run leaves nothing behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise ConfigError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))


def check_methods(cfg: RunConfig, eval_only: str | None) -> None:
    caps = {name: method_class(name).capabilities_for(cfg) for name in cfg.methods}  # unknown names stop here
    protocol_for(cfg)  # an unknown protocol stops here
    if eval_only and not any(c.eval_from_checkpoint for c in caps.values()):
        able = [n for n in METHODS if METHODS[n].capabilities_for(cfg).eval_from_checkpoint]
        raise ConfigError(f"--eval-only evaluates a saved checkpoint, but none of methods={cfg.methods} can be "
                          f"restored from one; list one of {', '.join(able)}")
    if DATASETS.get(cfg.data.name).evaluation_only:
        refuse_learners(cfg, caps, eval_only, f"dataset {cfg.data.name!r} has no training images (a test-only set)")


def check_not_finished(output_dir: str, eval_only: str | None, resume: bool, overwrite: bool) -> None:
    """A finished run is replaced only when asked (--overwrite), or reused (--resume)."""
    if is_complete(output_dir) and not resume and not overwrite:
        raise ConfigError(f"{output_dir} holds a complete run; --resume shows its results (with a changed config: "
                          "evaluates its finished checkpoints again without training), a new --output-dir keeps "
                          "it and starts another, --overwrite replaces it"
                          + (" with this evaluation" if eval_only else " (training again)"))


def check_shots(cfg: RunConfig, dataset) -> None:
    """A K-shot draw from classes that all hold fewer than K images would silently keep every image."""
    if not dataset.train:
        return
    counts = Counter(item.label for item in dataset.train)
    largest = max(counts.values())
    if cfg.data.shots > largest:
        raise ConfigError(f"data.shots={cfg.data.shots}, but no class of dataset {dataset.name!r} has that many "
                          f"training images (the largest has {largest}); use data.shots={largest} or fewer")


def refuse_learners(cfg: RunConfig, caps: dict, eval_only: str | None, why: str) -> None:
    """Methods that would learn from training images (not restored from --eval-only) cannot run here."""
    learning = [n for n, c in caps.items() if c.learns and not (eval_only and c.eval_from_checkpoint)]
    if learning:
        raise ConfigError(f"{why}, so {', '.join(learning)} cannot run (they learn from training images); run "
                          "methods that do not learn (zeroshot) or evaluate a saved checkpoint with --eval-only CKPT")


def few_shot_draw(cfg: RunConfig, dataset, out: Path, eval_only: str | None) -> FewShotSplit:
    """The saved or new draw; none for a set without training images, where only methods that do not
    learn, or that evaluate a saved checkpoint, run."""
    if dataset.train:
        return load_or_draw(dataset, cfg.data, cfg.data.fewshot_dir or out / "fewshot")
    caps = {name: method_class(name).capabilities_for(cfg) for name in cfg.methods}
    refuse_learners(cfg, caps, eval_only, f"dataset {dataset.name!r}: its train split is empty")
    return FewShotSplit(dataset.name, cfg.data.shots, cfg.data.seed, [], [])


def is_complete(folder: str | Path) -> bool:
    """A run folder whose every method finished (the marker is written last, atomically)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


class log_to_file:
    """Write the whole log at INFO (promptlearn's and its libraries', e.g. open_clip's) to a plain file for
    the duration of a run, and why the run stopped if it did; the console shows what cli.setup_logging sets."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.root_level = logging.getLogger().level

    def __enter__(self):
        root = logging.getLogger()
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        log.setLevel(logging.NOTSET)  # promptlearn's records reach the root's handlers at INFO
        root.addHandler(self.handler)
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:  # the run folder says why it stopped, as the console's last line does
            self.handler.stream.write(f"{error_line(error)}\n")
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.root_level)
        self.handler.close()
