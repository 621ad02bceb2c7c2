"""The language-modelling loss, textbook: the LM head and cross-entropy at the labelled positions only.

GPT2.forward(..., labels=...) calls `lm_loss`; use_fast_kernels (on by default) swaps in
gpt2lite.kernels.loss.causal_lm_loss, which gives the same loss and gradients without ever holding the
(positions x vocab) logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def labelled_positions(hidden, labels, head):
    """(hidden states (N, C), targets (N,)) at the positions whose next-token label is not IGNORE_INDEX.

    hidden: (B, T, C) final hidden states; labels: (B, T) token ids aligned with the inputs (position t is
    predicted from hidden t-1, as in transformers); head: the LM head (its out_features bounds the labels).
    Raises ValueError for mismatched shapes and for labels that are not token ids.
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:2])}")
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    selected, targets = hidden[:, :-1][keep], targets[keep]  # (N, C), (N,)
    if targets.numel():
        check_targets(targets, labels, getattr(head, "out_features", None))
    return selected, targets


def lm_loss(hidden, labels, head):
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX (see
    labelled_positions for the arguments); the LM head runs at those positions only."""
    selected, targets = labelled_positions(hidden, labels, head)
    if targets.numel() == 0:
        # no label in this batch: a zero that still depends on the parameters, so backward() works
        return hidden.sum() * 0.0
    logits = head(selected).float()  # (N, V)
    return F.cross_entropy(logits, targets)


def check_targets(targets, labels, vocab_size: Optional[int]):
    """Raise ValueError naming the first label that is neither IGNORE_INDEX nor a token id in [0, vocab_size),
    as F.cross_entropy would; the chunks' gather would instead read a wrong logit (-1: the last token's).

    targets: (N,) the labels kept (not IGNORE_INDEX); labels: (B, T), to say where a bad one is. Costs one
    min/max over N and one sync when the labels are fine.
    """
    if targets.is_meta:
        return
    low, high = torch.stack(targets.aminmax()).tolist()
    if low >= 0 and (vocab_size is None or high < vocab_size):
        return
    shifted = labels[:, 1:]  # (B, T-1): position t + 1 of labels is predicted from hidden t
    bad = (shifted != IGNORE_INDEX) & ((shifted < 0) | (shifted >= (vocab_size or high + 1)))
    row, position = bad.nonzero()[0].tolist()
    vocab = vocab_size if vocab_size is not None else "vocab_size"
    raise ValueError(
        f"label {int(shifted[row, position])} at row {row}, position {position + 1} is not a token id in "
        f"[0, {vocab}) nor {IGNORE_INDEX} (no target there); mask prompts and padding with {IGNORE_INDEX}")
