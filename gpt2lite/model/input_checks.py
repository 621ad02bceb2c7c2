"""The checks of input values (token ids, class labels) that survive torch.compile, with the same messages.

A check such as `int(input_ids.min()) < 0` reads a tensor's value: torch.compile cannot trace it (a graph
break, an error under fullgraph=True). Eager code calls the check directly. Traced code calls it through a
registered custom op (torch.library.custom_op): opaque to Dynamo and Inductor, it runs the same Python check
on the real tensor when the compiled graph runs, raises the same ValueError, and returns a copy of its input
that the model goes on with (so the check cannot be dropped as dead code). The copy is of (B, T) integers.

    checked_token_ids(input_ids, vocab_size)      GPT2Model.forward
    checked_class_labels(labels, num_labels)      GPT2ForSequenceClassification's loss (labels (B,))

The LM labels' check works the same way: loss.checked_lm_labels.
"""

from __future__ import annotations

import torch


def check_token_ids(input_ids: torch.Tensor, vocab_size: int):
    """Raise ValueError unless every id of input_ids is in [0, vocab_size)."""
    if input_ids.numel() and not input_ids.is_meta:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got values in [{low}, {high}]")


def check_class_labels(labels: torch.Tensor, num_labels: int):
    """Raise ValueError unless every class label (B,) is in [0, num_labels)."""
    if labels.numel() and not labels.is_meta and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must be in [0, {num_labels}), got {labels.tolist()}")


# --- the same checks as custom ops, for traced code ---------------------------------------------------

@torch.library.custom_op("gpt2lite::checked_token_ids", mutates_args=())
def token_ids_op(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    check_token_ids(input_ids, vocab_size)
    return input_ids.clone()


@torch.library.custom_op("gpt2lite::checked_class_labels", mutates_args=())
def class_labels_op(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    check_class_labels(labels, num_labels)
    return labels.clone()


@token_ids_op.register_fake
def token_ids_fake(input_ids, vocab_size):
    return torch.empty_like(input_ids)


@class_labels_op.register_fake
def class_labels_fake(labels, num_labels):
    return torch.empty_like(labels)


def checked_token_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """input_ids (B, T), after check_token_ids: itself in eager code, a checked copy in traced code."""
    if torch.compiler.is_compiling():
        return token_ids_op(input_ids, vocab_size)
    check_token_ids(input_ids, vocab_size)
    return input_ids


def checked_class_labels(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Class labels (B,), after check_class_labels."""
    if torch.compiler.is_compiling():
        return class_labels_op(labels, num_labels)
    check_class_labels(labels, num_labels)
    return labels
