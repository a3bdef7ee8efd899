"""Metrics every method reports: accuracy, macro-F1, per-class accuracy, ECE, confusion matrix,
and a per-image predictions CSV."""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score

from promptlearn.io import atomic_write_text, safe_row


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE in percent: the bin-size-weighted gap between confidence and accuracy over equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(100.0 * ece)


def distinct_names(classnames: list[str]) -> list[str]:
    """Class names as report keys and columns: a name two labels share gets its label, `crane (label 134)`,
    so that no class is lost from per-class accuracy or merged in the confusion matrix."""
    shared = {name for name, n in Counter(classnames).items() if n > 1}
    return [f"{name} (label {label})" if name in shared else name for label, name in enumerate(classnames)]


def evaluate(logits: torch.Tensor, labels: torch.Tensor, paths: list[str], classnames: list[str],
             out_dir: str | Path, ece_bins: int = 15) -> dict:
    """Compute the metrics and write `predictions.csv` and `confusion_matrix.csv` into `out_dir`."""
    out_dir = Path(out_dir)
    # the prediction comes from the logits: tiny logit gaps can round to equal probabilities
    predicted = logits.argmax(dim=-1)
    confidence = torch.softmax(logits.float(), dim=-1).gather(1, predicted[:, None])[:, 0]
    y_true, y_pred = labels.numpy(), predicted.numpy()
    correct = y_true == y_pred
    n_classes = len(classnames)
    classnames = distinct_names(classnames)
    per_class = {}
    for c, name in enumerate(classnames):
        mask = y_true == c
        per_class[name] = float(100.0 * correct[mask].mean()) if mask.any() else None
    confusion = confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))

    predictions_csv = out_dir / "predictions.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_path", "true_label", "true_class", "predicted_label", "predicted_class", "probability"])
    for path, t, p, conf in zip(paths, y_true, y_pred, confidence.numpy()):
        writer.writerow(safe_row([path, int(t), classnames[t], int(p), classnames[p], f"{conf:.6f}"]))
    atomic_write_text(predictions_csv, buf.getvalue())

    confusion_csv = out_dir / "confusion_matrix.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(safe_row(["true \\ predicted", *classnames]))
    for name, row in zip(classnames, confusion):
        writer.writerow(safe_row([name, *row.tolist()]))
    atomic_write_text(confusion_csv, buf.getvalue())

    return {
        "accuracy": float(100.0 * correct.mean()),
        "macro_f1": float(100.0 * f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro",
                                           zero_division=0)),
        "ece": expected_calibration_error(confidence.numpy(), correct, ece_bins),
        "num_test_images": int(len(y_true)),
        "per_class_accuracy": per_class,
        "predictions": str(predictions_csv),
        "confusion_matrix": str(confusion_csv),
    }
