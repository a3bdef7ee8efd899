import csv

import numpy as np
import pytest
import torch

from promptlearn.evaluation import evaluate, expected_calibration_error


def test_metrics_and_files(tmp_path):
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 2])
    m = evaluate(logits, labels, ["a", "b", "c", "d"], ["x", "y", "z"], tmp_path)
    assert m["accuracy"] == 75.0
    assert m["per_class_accuracy"] == {"x": 100.0, "y": 100.0, "z": 50.0}
    # F1: x 1, y 2/3 (precision 1/2, recall 1), z 2/3 (precision 1, recall 1/2)
    assert m["macro_f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)
    with open(m["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["predicted_label"] for r in rows] == ["0", "1", "1", "2"]
    assert float(rows[1]["probability"]) == pytest.approx(torch.softmax(logits[1], 0)[1].item(), abs=1e-6)
    with open(m["confusion_matrix"], newline="") as f:
        confusion = list(csv.reader(f))
    assert confusion[3] == ["z", "0", "1", "1"]


def test_prediction_follows_logits_even_when_probabilities_tie(tmp_path):
    logits = torch.tensor([[0.0, 1e-9, 0.0]])
    m = evaluate(logits, torch.tensor([1]), ["a"], ["x", "y", "z"], tmp_path)
    assert m["accuracy"] == 100.0


def test_ece_by_hand():
    confidence = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    # two occupied bins: {0.9, 0.9} with accuracy 0.5 (gap 0.4), {0.6, 0.6} with accuracy 1 (gap 0.4)
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(40.0)


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    from promptlearn.checkpoint import load_checkpoint
    from promptlearn.errors import CheckpointError

    f = tmp_path / "metrics.json"
    f.write_text('{"coop": {}}')
    with pytest.raises(CheckpointError, match="metrics.json is not a checkpoint"):
        load_checkpoint(f)


def test_unwritable_target_is_a_clear_error():
    from promptlearn.errors import PromptlearnError
    from promptlearn.io import atomic_write_text

    with pytest.raises(PromptlearnError, match="could not write /proc/nope/x.json"):
        atomic_write_text("/proc/nope/x.json", "{}")


def test_csv_cells_a_spreadsheet_would_evaluate_are_escaped(tmp_path):
    """Class names beginning with =, +, - or @ get a leading single quote (OWASP) in every CSV written."""
    from promptlearn.sweep import results_csv

    names = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "plain"]
    quoted = ["'=HYPERLINK(\"http://x\")", "'+1", "'-2", "'@SUM(A1)", "plain"]
    m = evaluate(torch.eye(5), torch.arange(5), [f"/img/{i}.png" for i in range(5)], names, tmp_path)
    with open(m["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["true_class"] for r in rows] == quoted and [r["predicted_class"] for r in rows] == quoted
    with open(m["confusion_matrix"], newline="") as f:
        confusion = list(csv.reader(f))
    assert confusion[0][1:] == quoted and [row[0] for row in confusion[1:]] == quoted
    assert list(m["per_class_accuracy"]) == names  # only the CSV cells are escaped, not the metrics' keys
    sweep = list(csv.DictReader(results_csv([{"method": "coop", "dataset": "-dataset", "accuracy": -0.5}]).splitlines()))
    assert sweep[0]["dataset"] == "'-dataset" and sweep[0]["accuracy"] == "-0.5000"  # numbers stay numbers
