"""Classification scores (issue 18 item 4): macro F1 and per-class precision/recall/F1/support equal scikit-learn's
classification_report on the same predictions, in report.json and as a per-class table in report.md."""

import json
import logging
import sys

import numpy as np
import pytest

from gpt2lite.tasks import metrics
from gpt2lite.cli import run
from gpt2lite.experiment.report import to_markdown

sklearn_metrics = pytest.importorskip("sklearn.metrics")
pytestmark = pytest.mark.usefixtures("hub_offline")


def imbalanced(n: int = 300, classes: int = 20, seed: int = 0):
    """(true, predicted): class k drawn with weight 1/(k+1); one class never true, one never predicted."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    weights[7] = 0.0  # never the true class (still predicted)
    true = rng.choice(classes, size=n, p=weights / weights.sum())
    predicted = np.where(rng.random(n) < 0.6, true, rng.integers(0, classes, n))
    predicted[predicted == 3] = 4  # never predicted: precision 0 by zero_division=0
    return true, predicted


def assert_like_sklearn(scores, true, predicted):
    reference = sklearn_metrics.classification_report(true, predicted, output_dict=True, zero_division=0)
    labels = sorted(int(k) for k in reference if k.isdigit())
    assert [c["label"] for c in scores["per_class"]] == labels
    for c in scores["per_class"]:
        expected = reference[str(c["label"])]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (expected["precision"], expected["recall"], expected["f1-score"], expected["support"]))
    for ours, theirs in (("macro_precision", "precision"), ("macro_recall", "recall"), ("macro_f1", "f1-score")):
        assert scores[ours] == pytest.approx(reference["macro avg"][theirs])
    for ours, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
        assert scores[ours] == pytest.approx(reference["weighted avg"][theirs])
    assert scores["accuracy"] == pytest.approx(reference["accuracy"])


def test_scores_equal_sklearns_classification_report_on_imbalanced_20_classes():
    true, predicted = imbalanced()
    scores = metrics.classification_metrics(true, predicted, num_labels=20)
    assert_like_sklearn(scores, true, predicted)
    assert scores["macro_f1"] < scores["f1"]  # the rare classes weigh as much as the common ones
    assert json.loads(json.dumps(scores)) == scores  # plain JSON types


def test_evaluate_writes_per_class_scores_to_report_json_and_md(tmp_path, tiny_hf_classifier_dir):
    rng = np.random.default_rng(1)
    words = "shares bonds rates oil tech banks earnings growth".split()
    rows = [{"text": " ".join(rng.choice(words, 6)), "label": int(min(rng.geometric(0.35) - 1, 19))}
            for _ in range(120)]
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "evaluation"
    run(["evaluate", "--model", str(tiny_hf_classifier_dir), "--data.task", "classification", "--data.train",
         str(data), "--data.num_labels", "20", "--output_dir", str(out)])
    predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
    true = [p["reference"] for p in predictions]
    predicted = [p["prediction"] for p in predictions]
    row = json.load(open(out / "report.json"))["rows"][0]
    assert "macro_f1" in json.load(open(out / "report.json"))["columns"]
    assert_like_sklearn(row, true, predicted)
    markdown = open(out / "report.md").read()
    table = markdown.split(f"## Per-class scores: {row['method']}\n\n")[1].strip().splitlines()
    assert table[0] == "| Class | Precision | Recall | F1 | Support |"
    cells = [line.strip("| ").split(" | ") for line in table[2:]]
    assert [c[0] for c in cells] == [str(c["label"]) for c in row["per_class"]] + ["macro avg", "weighted avg"]
    for cell, scores in zip(cells, row["per_class"]):
        assert [float(v) for v in cell[1:4]] == pytest.approx([scores["precision"], scores["recall"], scores["f1"]],
                                                               abs=5e-5)
        assert int(cell[4]) == scores["support"]
    assert float(cells[-2][3]) == pytest.approx(row["macro_f1"], abs=5e-5)
    assert int(cells[-1][4]) == len(predictions)


def test_without_scikit_learn_the_report_says_how_to_install_it(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with caplog.at_level(logging.WARNING, logger="gpt2lite.tasks.metrics"):
        scores = metrics.classification_metrics([0, 1, 1], [0, 1, 0], num_labels=2)
    assert "pip install 'gpt2lite[metrics]'" in caplog.text
    assert scores["macro_f1"] is None and scores["per_class"] is None and scores["accuracy"] == pytest.approx(2 / 3)
    row = {"method": "lora", **scores}
    markdown = to_markdown([row], "classification")
    assert "| unavailable |" in markdown
    assert "## Per-class scores: lora\n\nunavailable: scikit-learn is not installed (pip install 'gpt2lite[metrics]'" \
        in markdown
