"""The language-modelling loss, textbook: the LM head and cross-entropy at the labelled positions only.

GPT2.forward(..., labels=...) calls `lm_loss`; use_fast_kernels (on by default) swaps in
gpt2lite.kernels.loss.lm_loss, which gives the same loss and gradients without ever holding the
(positions x vocab) logits.

Under torch.compile both take `all_positions_loss`: selecting the labelled positions gives a tensor whose
size depends on the labels' values, which a compiled graph cannot hold; cross-entropy with ignore_index over
every position gives the same mean, and Inductor fuses its softmax passes. The label check then runs as a
custom op (`checked_lm_labels`, as gpt2lite.model.input_checks does for token ids), with the same message.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def check_label_shape(hidden, labels):
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:2])}")


def labelled_positions(hidden, labels, head):
    """(hidden states (N, C), targets (N,)) at the positions whose next-token label is not IGNORE_INDEX.

    hidden: (B, T, C) final hidden states; labels: (B, T) token ids aligned with the inputs (position t is
    predicted from hidden t-1, as in transformers); head: the LM head (its out_features bounds the labels).
    Raises ValueError for mismatched shapes and for labels that are not token ids.
    """
    check_label_shape(hidden, labels)
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    selected, targets = hidden[:, :-1][keep], targets[keep]  # (N, C), (N,)
    if targets.numel():
        check_targets(targets, labels, getattr(head, "out_features", None))
    return selected, targets


def lm_loss(hidden, labels, head):
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX (see
    labelled_positions for the arguments); the LM head runs at those positions only."""
    if torch.compiler.is_compiling():
        return all_positions_loss(hidden, labels, head)
    selected, targets = labelled_positions(hidden, labels, head)
    if targets.numel() == 0:
        # no label in this batch: a zero that still depends on the parameters, so backward() works
        return hidden.sum() * 0.0
    logits = head(selected).float()  # (N, V)
    return F.cross_entropy(logits, targets)


def all_positions_loss(hidden, labels, head):
    """lm_loss with shapes that do not depend on the labels' values (for torch.compile): the head at every
    position, the cross-entropy summed with ignore_index and divided by the number of targets (0 when
    there is none, as lm_loss)."""
    check_label_shape(hidden, labels)
    labels = checked_lm_labels(labels, getattr(head, "out_features", None))
    targets = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    logits = head(hidden[:, :-1]).float()  # (B, T-1, V)
    total = F.cross_entropy(logits.reshape(targets.numel(), -1), targets, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


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


@torch.library.custom_op("gpt2lite::checked_lm_labels", mutates_args=())
def lm_labels_op(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    targets = labels[:, 1:]  # (B, T-1)
    targets = targets[targets != IGNORE_INDEX]  # (N,)
    if targets.numel():
        check_targets(targets, labels, vocab_size if vocab_size > 0 else None)
    return labels.clone()


@lm_labels_op.register_fake
def lm_labels_fake(labels, vocab_size):
    return torch.empty_like(labels)


def checked_lm_labels(labels: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Labels (B, T) after check_targets, for traced code: a custom op that runs the check when the compiled
    graph runs and returns a copy of the labels (so that it is not dropped as dead code)."""
    return lm_labels_op(labels, vocab_size or 0)
