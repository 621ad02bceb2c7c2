"""AdamW (fused where it can be), its parameter groups and the learning-rate schedule (warmup, then linear, cosine or constant)."""

from __future__ import annotations

import math
from typing import Optional

import torch

SCHEDULES = ("linear", "cosine", "constant")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW parameter groups: weight decay on trainable weights of >= 2 dims; none on biases and norms
    (1-D) nor on a soft prompt or prefix (`model.transformer.virtual_tokens`, its projection included)."""
    virtual_tokens = getattr(getattr(model, "transformer", None), "virtual_tokens", None)
    exempt = {id(p) for p in virtual_tokens.parameters()} if virtual_tokens is not None else set()
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in exempt else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list, lr: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """torch.optim.AdamW over `groups`, fused (one pass over every parameter per step, PyTorch's CPU and CUDA
    kernel) where every parameter is a float tensor on the CPU or CUDA; PyTorch's default elsewhere (on the
    CPU that default is a loop of several passes per tensor). Same update to float rounding."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: Optional[int], schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
