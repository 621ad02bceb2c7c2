"""Losses computed only where they are needed.

A language-modelling batch often carries labels on a few positions only (summarization: the summary
tokens). The LM head (C -> 50,257) is the single largest matmul of GPT-2 small, so it runs only at the
positions that carry a label, in chunks, instead of producing the whole (B, T, vocab) logits tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(hidden, labels, head, chunk_size: int = 2048):
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX.

    hidden: (B, T, C) final hidden states; labels: (B, T) token ids aligned with the inputs (position t is
    predicted from hidden t-1, as in transformers); head: the LM head module (C -> V).
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:2])}")
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    selected = hidden[:, :-1][keep]  # (N, C)
    targets = targets[keep]  # (N,)
    n = targets.numel()
    if n == 0:
        # no label in this batch: a zero that still depends on the parameters, so backward() works
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        logits = head(selected[start:start + chunk_size]).float()  # (chunk, V)
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total / n
