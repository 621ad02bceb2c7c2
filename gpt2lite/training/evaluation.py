"""Evaluation helpers of the training loop: label counting, the label check, evaluate_loss."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gpt2lite.training import distributed
from gpt2lite.training.fsdp import is_sharded
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.training.precision import autocast, resolve_precision


def label_count(labels: torch.Tensor, first_too: bool = False) -> int:
    """How many targets a batch's mean loss averages: label tokens (B, T) after the one-token shift that
    lm_loss applies, or examples for class labels (B,). first_too: labels[:, 0] is scored as well
    (behind a soft prompt, whose last virtual token predicts the first real token)."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 0 if first_too else 1:] != IGNORE_INDEX).sum())


def scores_first_label(model) -> bool:
    """Whether `model` (or the module DDP wraps) scores labels[:, 0]: the label offset its adapter publishes
    (an enabled soft prompt's last virtual token predicts the first real token, as in peft)."""
    return getattr(getattr(model, "module", model), "label_offset", 0) > 0


def require_label_tokens(dataset, name: str):
    """Raise ValueError when no example of `dataset` has a label other than IGNORE_INDEX: training on it
    would "succeed" with a loss of 0 and change nothing. Stops at the first example with a label, so a
    usable dataset costs one lookup; examples without a "labels" entry (built by a collate_fn) pass."""
    for i in range(len(dataset)):
        example = dataset[i]
        labels = example.get("labels") if isinstance(example, dict) else None
        if labels is None:
            return
        if torch.is_tensor(labels) or isinstance(labels, np.ndarray):
            labels = labels.tolist()
        if not isinstance(labels, (list, tuple)) or any(label != IGNORE_INDEX for label in labels):
            return
    raise ValueError(f"the {name} set has no label tokens: every label of its {len(dataset)} examples is "
                     f"{IGNORE_INDEX}, so there is nothing to learn from (a loss of 0). Check how the labels are "
                     "built: a prompt mask that covers the whole text, targets truncated away by max_length?")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a collated batch to `device` (asynchronously from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate_loss(model, dataset, collate_fn: Callable, batch_size: int, device=None, precision: str = "fp32",
                  world=None) -> float:
    """Mean loss over every label token of `dataset` (over all processes under torchrun; every process must
    call it, a sharded model's in lockstep)."""
    world = world or distributed.World()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    indices = distributed.shard(range(len(dataset)), world, pad=False)
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    n_batches = len(batches)
    if world.distributed and is_sharded(model):
        # every forward of a sharded model all-gathers: each rank runs as many, a short one repeating an
        # example it does not count
        n_batches = int(distributed.all_reduce_max([n_batches], world, device)[0])
    loss_sum, tokens = 0.0, 0
    first_too = scores_first_label(model)
    for i in range(n_batches):
        batch = to_device(collate_fn([dataset[j] for j in (batches[i] if i < len(batches) else [0])]), device)
        with autocast(device, precision):
            loss = model(**batch)
        count = label_count(batch["labels"], first_too) if i < len(batches) else 0
        loss_sum, tokens = loss_sum + float(loss) * count, tokens + count
    model.train(was_training)
    loss_sum, tokens = distributed.all_reduce_sum([loss_sum, tokens], world, device)
    if tokens == 0:
        raise ValueError("the evaluation set has no label tokens: check its labels (all -100?) or that it is empty")
    return loss_sum / tokens
