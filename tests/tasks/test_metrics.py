"""Metrics equal the reference implementations' own numbers (rouge-score, sacrebleu) and hand computations."""

import json
import math
import re

import numpy as np
import pytest

from gpt2lite.tasks import metrics


@pytest.fixture(scope="module")
def lead3_pairs(shared_data):
    """(lead-3 predictions, highlights references) of the first 60 CNN/DailyMail test articles."""
    rows = [json.loads(line) for line in (shared_data / "cnn_dailymail" / "test.jsonl").open()][:60]
    sentence_end = re.compile(r"(?<=[.!?])\s+")
    predictions = [" ".join(sentence_end.split(r["article"].strip())[:3]) for r in rows]
    return predictions, [r["highlights"] for r in rows]


def test_rouge_equals_rouge_score(lead3_pairs):
    from rouge_score import rouge_scorer

    predictions, references = lead3_pairs
    ours = metrics.rouge(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        theirs = np.mean([scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references)])
        assert ours[kind] == pytest.approx(100 * theirs, abs=1e-9)
    # Lsum: one sentence per line, which the references already are and the predictions become
    split = ["\n".join(re.split(r"(?<=[.!?])\s+", p)) for p in predictions]
    theirs = np.mean([scorer.score(r, p)["rougeLsum"].fmeasure for p, r in zip(split, references)])
    assert ours["rougeLsum"] == pytest.approx(100 * theirs, abs=1e-9)
    # lead-3 on CNN/DM is a strong baseline (published: R1 40.3, R2 17.7): a sanity check of the scale
    assert 25 < ours["rouge1"] < 50 and 8 < ours["rouge2"] < 25
    assert ours["rougeLsum"] != ours["rougeL"]  # the summary-level variant really differs


def test_bleu_family_equals_sacrebleu(lead3_pairs):
    import sacrebleu

    predictions, references = (pairs[:8] for pairs in lead3_pairs)  # TER is slow on long texts
    ours = metrics.bleu_scores(predictions, references)
    assert ours["sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-9)
    sentence = np.mean([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)])
    assert ours["bleu"] == pytest.approx(sentence, abs=1e-9)
    assert ours["ter"] == pytest.approx(sacrebleu.corpus_ter(predictions, [references]).score, abs=1e-9)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, abs=1e-9)
    assert ours["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert ours["bleu"] != pytest.approx(ours["sacrebleu"])  # the two definitions are distinct numbers


def test_exact_match_scores_are_perfect():
    texts = ["the cat sat on the mat .", "a dog ran in the park today ."]
    scores = metrics.generation_metrics(texts, texts)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "sacrebleu", "bleu", "chrf"):
        assert scores[key] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert scores["n_examples"] == 2


def test_meteor_is_none_without_wordnet_never_zero(monkeypatch):
    import nltk

    def missing(_):
        raise LookupError("Resource wordnet not found")

    monkeypatch.setattr(nltk.data, "find", missing)
    scores = metrics.generation_metrics(["a cat"], ["a dog"])
    assert scores["meteor"] is None
    assert "wordnet" in scores["meteor_unavailable"].lower()


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.bleu_scores([], [])


def test_classification_metrics_by_hand():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    y_pred = [0, 1, 0, 1, 1, 2, 0, 2, 1, 0]
    scores = metrics.classification_metrics(y_true, y_pred, num_labels=4)
    # confusion matrix, rows true / columns predicted
    assert scores["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [1, 0, 0, 0]]
    assert scores["accuracy"] == pytest.approx(6 / 10)
    # per class (precision, recall): 0 (2/4, 2/3), 1 (2/4, 2/2), 2 (2/2, 2/4), 3 (0 [never predicted], 0/1)
    precision = [2 / 4, 2 / 4, 1.0, 0.0]
    recall = [2 / 3, 1.0, 2 / 4, 0.0]
    support = [3, 2, 4, 1]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    weighted = lambda values: sum(v * s for v, s in zip(values, support)) / 10  # noqa: E731
    assert scores["precision"] == pytest.approx(weighted(precision))
    assert scores["recall"] == pytest.approx(weighted(recall))
    assert scores["f1"] == pytest.approx(weighted(f1))
    assert scores["precision"] == pytest.approx(0.65) and scores["f1"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        metrics.classification_metrics([0, 4], [0, 1], num_labels=4)


def test_perplexity_is_exp_of_mean_loss():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(50257)) == pytest.approx(50257)
    assert metrics.perplexity(1e6) == math.inf
