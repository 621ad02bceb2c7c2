"""Evaluation metrics: generation quality (rouge-score, sacrebleu, nltk), classification, perplexity.

All generation scores are on a 0-100 scale (higher is better, except TER, an edit rate, lower is better).

- ROUGE-1/2/L/Lsum: rouge-score's RougeScorer with use_stemmer=True; the mean F-measure over examples.
  ROUGE-Lsum treats "\\n" as the sentence boundary, so texts without newlines are first split into
  sentences at ". ", "! " and "? " (CNN/DailyMail highlights already hold one sentence per line).
- SacreBLEU: sacrebleu.corpus_bleu with its defaults (13a tokenization, case-sensitive, exp smoothing):
  the standard, comparable corpus BLEU; its signature is returned as "sacrebleu_signature".
- BLEU: the mean over examples of sentence-level BLEU (sacrebleu.sentence_bleu, same defaults), the
  per-summary BLEU many fine-tuning studies average. It differs from corpus BLEU, which pools n-gram
  counts over the corpus before taking the geometric mean and the brevity penalty.
- TER and chrF: sacrebleu.corpus_ter and sacrebleu.corpus_chrf with their defaults.
- METEOR: nltk's meteor_score (mean over examples, whitespace tokens) when WordNet data is installed;
  otherwise None, with the reason in "meteor_unavailable" (never 0).
- Classification: accuracy and support-weighted precision/recall/F1; macro precision/recall/F1 and per-class
  precision/recall/F1/support from scikit-learn's classification_report (zero_division=0; the classes that
  occur in the true or the predicted labels, as scikit-learn does), an optional extra: without it they are
  None, with the reason (pip install 'gpt2lite[metrics]') in "per_class_unavailable".
"""

from __future__ import annotations

import logging
import math
import re
from typing import Dict, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """Text with one sentence per line, as ROUGE-Lsum expects; text holding newlines is left as it is."""
    text = text.strip()
    if "\n" in text:
        return text
    return "\n".join(SENTENCE_END.split(text))


def _check_pairs(predictions: Sequence[str], references: Sequence[str]):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if not all(isinstance(t, str) for t in list(predictions) + list(references)):
        raise TypeError("predictions and references must be strings")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (x100) through rouge-score with the Porter stemmer."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


def bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, object]:
    """BLEU (mean sentence BLEU), SacreBLEU (corpus BLEU), TER and chrF through sacrebleu (see module doc)."""
    import sacrebleu

    _check_pairs(predictions, references)
    predictions, references = list(predictions), list(references)
    corpus = sacrebleu.metrics.BLEU()
    corpus_score = corpus.corpus_score(predictions, [references])
    sentence = sacrebleu.metrics.BLEU(effective_order=True)
    sentence_mean = float(np.mean([sentence.sentence_score(p, [r]).score for p, r in zip(predictions, references)]))
    return {
        "bleu": sentence_mean,
        "sacrebleu": corpus_score.score,
        "sacrebleu_signature": str(corpus.get_signature()),
        "ter": sacrebleu.corpus_ter(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


def meteor(predictions: Sequence[str], references: Sequence[str]):
    """(mean METEOR x100, None) when nltk's WordNet data is installed, else (None, reason)."""
    _check_pairs(predictions, references)
    try:
        import nltk
        from nltk.translate.meteor_score import meteor_score

        nltk.data.find("corpora/wordnet")
    except (ImportError, LookupError):
        return None, "nltk WordNet data not installed (python -m nltk.downloader wordnet)"
    try:
        values = [meteor_score([r.split()], p.split()) for p, r in zip(predictions, references)]
    except LookupError as error:  # a WordNet file that nltk finds but cannot read
        return None, f"nltk WordNet data unusable: {str(error).splitlines()[0]}"
    return 100.0 * float(np.mean(values)), None


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, object]:
    """Every generation score in one dict: rouge1, rouge2, rougeL, rougeLsum, bleu, sacrebleu, ter, chrf,
    meteor (None when unavailable, with meteor_unavailable saying why), sacrebleu_signature, n_examples."""
    scores: Dict[str, object] = {**rouge(predictions, references), **bleu_scores(predictions, references)}
    scores["meteor"], reason = meteor(predictions, references)
    if reason is not None:
        scores["meteor_unavailable"] = reason
    scores["n_examples"] = len(predictions)
    return scores


def confusion_matrix(y_true, y_pred, num_labels: Optional[int] = None) -> np.ndarray:
    """(num_labels, num_labels) counts: rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be 1-D and of one length")
    if y_true.size == 0:
        raise ValueError("no predictions to score")
    if num_labels is None:
        num_labels = int(max(y_true.max(), y_pred.max())) + 1
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_labels:
        raise ValueError(f"labels must be in [0, {num_labels})")
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def classification_metrics(y_true, y_pred, num_labels: Optional[int] = None) -> Dict[str, object]:
    """Accuracy and support-weighted precision, recall and F1 (as scikit-learn's average="weighted" with
    zero_division=0: a class never predicted has precision 0), plus the confusion matrix as nested lists."""
    matrix = confusion_matrix(y_true, y_pred, num_labels)
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)  # per class: how often it was predicted
    support = matrix.sum(axis=1).astype(np.float64)  # per class: how often it is the true class
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    weights = support / support.sum()
    return {
        "accuracy": float(true_positive.sum() / support.sum()),
        "precision": float((precision * weights).sum()),
        "recall": float((recall * weights).sum()),
        "f1": float((f1 * weights).sum()),
        "confusion_matrix": matrix.tolist(),
        "n_examples": int(support.sum()),
        **per_class_scores(y_true, y_pred),
    }


SKLEARN_MISSING = "scikit-learn is not installed (pip install 'gpt2lite[metrics]', or pip install scikit-learn)"


def per_class_scores(y_true, y_pred) -> Dict[str, object]:
    """{"macro_precision", "macro_recall", "macro_f1", "per_class": [{"label", "precision", "recall", "f1",
    "support"}, ...]} by scikit-learn's classification_report; None each, and "per_class_unavailable", without it."""
    try:
        from sklearn.metrics import classification_report
    except ImportError:
        logger.warning("classification: no macro F1 or per-class scores: %s", SKLEARN_MISSING)
        return {"macro_precision": None, "macro_recall": None, "macro_f1": None, "per_class": None,
                "per_class_unavailable": SKLEARN_MISSING}
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    labels = sorted(int(key) for key in report if key.lstrip("-").isdigit())
    per_class = [{"label": label, "precision": float(scores["precision"]), "recall": float(scores["recall"]),
                  "f1": float(scores["f1-score"]), "support": int(scores["support"])}
                 for label, scores in ((label, report[str(label)]) for label in labels)]
    macro = report["macro avg"]
    return {"macro_precision": float(macro["precision"]), "macro_recall": float(macro["recall"]),
            "macro_f1": float(macro["f1-score"]), "per_class": per_class}


def perplexity(mean_token_loss: float) -> float:
    """exp(mean negative log-likelihood per token, in nats); inf when the loss overflows."""
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return math.inf
