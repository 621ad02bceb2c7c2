"""Sequence classification (text, label 0..N-1) for GPT2ForSequenceClassification.

GPT-2 reads the class from the last real token, so batches are right-padded with an attention mask (the
model finds each row's last real token from the mask; without a mask it needs config.pad_token_id set).
Labels are checked when the examples are built, so a bad label stops the run before training starts.
"""

from __future__ import annotations

import logging
import math
import re
from typing import List, Optional

import numpy as np
import torch

from gpt2lite.errors import DataError
from gpt2lite.tasks.batching import Examples, collate
from gpt2lite.tasks.loading import as_list, require_columns

logger = logging.getLogger(__name__)


def build_classification(table, tokenizer, input_column: str = "text", label_column: str = "label",
                         num_labels: Optional[int] = None, max_length: int = 1024) -> Examples:
    """Examples {"input_ids", "labels": int}; texts longer than max_length keep their start.

    num_labels: labels must be integers in [0, num_labels) (default: 1 + the largest label seen).
    An empty text is skipped and counted; a label that is not such an integer raises DataError.
    """
    if not isinstance(table, list):
        require_columns(table, [input_column, label_column])
    texts, labels = as_list(table, input_column), as_list(table, label_column)
    checked = check_labels(labels, num_labels)
    rows, skipped, truncated = [], {"empty_text": 0}, {"text": 0}
    for text, label in zip(texts, checked):
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            skipped["empty_text"] += 1
            continue
        ids = tokenizer.encode(text, allow_special=False)
        if len(ids) > max_length:
            ids = ids[:max_length]
            truncated["text"] += 1
        rows.append({"input_ids": ids, "labels": label})
    if skipped["empty_text"]:
        logger.warning("classification: skipped %d of %d examples with an empty text",
                       skipped["empty_text"], len(texts))
    if not rows:
        raise DataError(f"all {len(texts)} examples have an empty {input_column!r}")
    return Examples(rows, skipped, truncated)


def check_labels(labels, num_labels: Optional[int] = None) -> List[int]:
    """Labels as ints, or DataError naming the first row whose label is not an integer in [0, num_labels).

    Whole numbers written as floats (3.0) or strings ("3") count: a CSV reader types a column as a whole, so
    one empty cell makes every label a float (the empty one NaN) and one word makes every label a string;
    the error then names that cell's row, not the first row.
    """
    checked = [_class_id(row, label) for row, label in enumerate(labels)]
    if not checked:
        raise DataError("the dataset has no labels")
    if num_labels is None:
        num_labels = max(checked) + 1
    for row, label in enumerate(checked):
        if not 0 <= label < num_labels:
            raise DataError(f"row {row}: label {label} is out of range; labels must be in [0, {num_labels}) "
                            f"(num_labels={num_labels})")
    return checked


def _class_id(row: int, label) -> int:
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return int(label)
    if label is None or (isinstance(label, (float, np.floating)) and math.isnan(label)) or label == "":
        raise DataError(f"row {row}: the label is empty; every example needs an integer class id")
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return int(label)
    if isinstance(label, str) and re.fullmatch(r"\s*-?\d+\s*", label):
        return int(label)
    raise DataError(f"row {row}: label {label!r} is not an integer class id; map class names to 0..N-1")


@torch.no_grad()
def predict_classes(model, examples: Examples, batch_size: int = 32, pad_id: int = 50256, device=None):
    """(predicted, true) class ids as numpy arrays, batching right-padded examples with their mask."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    predicted, true = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples.rows[start:start + batch_size], pad_id, "right")
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device))  # (B, num_labels)
        predicted.append(logits.argmax(-1).cpu())
        true.append(batch["labels"])
    model.train(was_training)
    return torch.cat(predicted).numpy(), torch.cat(true).numpy()
