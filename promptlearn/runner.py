"""The whole pipeline on one screen: data -> frozen backbone -> method -> trainer -> evaluation -> report."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from promptlearn.backbone import load_backbone
from promptlearn.config import RunConfig, dump_yaml, protocol_epochs
from promptlearn.data import build_dataset
from promptlearn.data.fewshot import FewShotSplit, load_or_draw
from promptlearn.errors import ConfigError
from promptlearn.decoder import save_decoded_prompt
from promptlearn.evaluation import evaluate
from promptlearn.features import FeatureBank, FeatureCache
from promptlearn.io import RunLock, atomic_write_json, atomic_write_text, check_writable
from promptlearn.methods import build_method
from promptlearn.methods.coop import CoOp
from promptlearn.report import comparison_table
from promptlearn.trainer import Trainer

log = logging.getLogger("promptlearn")
COMPLETE_MARKER = "run_complete.json"


def run_experiment(cfg: RunConfig, resume: bool = False, eval_only: str | None = None) -> dict:
    out = check_writable(cfg.output_dir)
    with RunLock(out), log_to_file(out / "log.txt"):
        (out / COMPLETE_MARKER).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        dataset = build_dataset(cfg.data)                                               # data
        fewshot = few_shot_draw(cfg, dataset, out, eval_only)
        backbone = load_backbone(cfg.backbone)                                          # frozen backbone
        bank = FeatureBank(backbone, dataset, fewshot, cache=FeatureCache.from_setting(cfg.cache_dir),
                           batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                           skip_bad=cfg.data.skip_bad_images, seed=cfg.data.seed)
        epochs = protocol_epochs(cfg.data.shots, dataset.name) if cfg.train.epochs is None else cfg.train.epochs
        trainer = Trainer(cfg.train, epochs, cfg.data.seed, backbone.precision)         # trainer
        log.info("%s: %d classes, %d-shot draw (seed %d): %d train, %d val, %d test images; %d epochs",
                 dataset.name, dataset.num_classes, cfg.data.shots, cfg.data.seed, len(fewshot.train),
                 len(fewshot.val), len(dataset.test), epochs)
        metrics, decoded_reports = {}, []
        for name in cfg.methods:
            torch.manual_seed(cfg.data.seed)  # a method's random init depends only on the seed
            method = build_method(name, cfg, backbone, dataset.classnames)             # method
            folder = out / name
            began = time.perf_counter()
            if eval_only and isinstance(method, CoOp):
                method.restore(eval_only)
                info = {"checkpoint": str(eval_only)}
            else:
                info = method.fit(bank, trainer, folder / "checkpoint.pt", resume)
            seconds = time.perf_counter() - began
            history = info.pop("history", None)
            if history is not None:
                atomic_write_json(folder / "history.json", history)
            test = bank.test
            result = evaluate(method.predict(test.features), test.labels, test.paths,   # evaluation
                              dataset.classnames, folder, cfg.eval.ece_bins)
            result.update(info, train_seconds=info.get("train_seconds", seconds))
            if isinstance(method, CoOp):  # the learned context read as words, printed after the table
                decoded = save_decoded_prompt(method, folder, cfg.eval.decode_topk)
                result["decoded_prompt"] = decoded.summary()
                decoded_reports.append(decoded.report(detail=False))
            metrics[name] = result
            atomic_write_json(out / "metrics.json", metrics)
        table = comparison_table(metrics, f"{dataset.name}, {cfg.data.shots} shots, seed {cfg.data.seed}, "
                                          f"{backbone.name} ({backbone.pretrained})")
        atomic_write_text(out / "summary.md", table + "\n")                             # report
        atomic_write_json(out / COMPLETE_MARKER, {"methods": list(metrics)})
        print("\n\n".join([table, *decoded_reports]))
        return metrics


def few_shot_draw(cfg: RunConfig, dataset, out: Path, eval_only: str | None) -> FewShotSplit:
    """The saved or new draw; none for evaluation-only sets (ImageNet-V2/-Sketch/-A/-R), where only
    zero-shot and saved CoOp prompts can run."""
    if dataset.train:
        return load_or_draw(dataset, cfg.data.shots, cfg.data.seed, cfg.data.fewshot_dir or out / "fewshot")
    needs_training = [m for m in cfg.methods if m != "zeroshot" and not (eval_only and m in ("coop", "coop_csc"))]
    if needs_training:
        raise ConfigError(f"dataset {dataset.name!r} has no training images (an evaluation-only set), so "
                          f"{', '.join(needs_training)} cannot run; use methods=[zeroshot, coop] with "
                          "--eval-only CKPT to evaluate a prompt trained elsewhere")
    return FewShotSplit(dataset.name, cfg.data.shots, cfg.data.seed, [], [])


def is_complete(folder: str | Path) -> bool:
    """A run folder whose every method finished (the marker is written last, atomically)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


class log_to_file:
    """Send promptlearn's log to the console and a plain file for the duration of a run."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self):
        log.setLevel(logging.INFO)
        log.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        log.removeHandler(self.handler)
        self.handler.close()
