"""A short timed probe: a few real optimizer steps of the run's shape on random tokens, for tokens/s and the
run's total time. Unlike the memory estimate this allocates the model (random init: the weights' values do
not change the speed) and runs on the run's device.

    timing = time_steps(run, steps=3)
    timing.tokens_per_s, timing.total_s(num_examples=20_000, epochs=3)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from gpt2lite.training.optim import parameter_groups
from gpt2lite.training.precision import autocast
from gpt2lite.estimation.predict import Run, model_builder


@dataclass
class Timing:
    step_s: float  # seconds per optimizer step (grad_accum micro-batches), after a first warm-up step
    tokens_per_s: float
    steps_timed: int
    batch_size: int
    grad_accum: int

    def steps_for(self, num_examples: int, epochs: int, max_steps: Optional[int] = None) -> int:
        """Optimizer steps of `epochs` over num_examples (capped at max_steps), as train() counts them."""
        steps = epochs * math.ceil(math.ceil(num_examples / self.batch_size) / self.grad_accum)
        return min(steps, max_steps) if max_steps else steps

    def total_s(self, num_examples: int, epochs: int, max_steps: Optional[int] = None) -> float:
        return self.steps_for(num_examples, epochs, max_steps) * self.step_s


def time_steps(run: Run, steps: int = 3) -> Timing:
    """Time `steps` optimizer steps (after one warm-up step) of the run's model, method, shape and precision:
    forward and backward of each micro-batch under autocast, clipping, AdamW's update."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(0)
    with torch.device(run.device):
        model = model_builder(run)()
    model.train()
    if run.train.activation_checkpointing:
        model.set_activation_checkpointing(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, run.train.weight_decay), lr=run.train.lr,
                                  betas=run.train.betas)
    B, T = run.shape.batch_size, run.shape.seq_len
    ids = torch.randint(0, run.config.vocab_size, (B, T), device=run.device)
    labels = torch.randint(0, run.num_labels, (B,), device=run.device) if run.num_labels else ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(run.shape.grad_accum):
            with autocast(run.device, run.precision):
                loss = model(**batch)
            (loss.float() / run.shape.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(trainable, run.train.clip or math.inf)
        optimizer.step()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        times.append(time.perf_counter() - started)
    step_s = sum(times[1:]) / steps
    return Timing(step_s, B * T * run.shape.grad_accum / step_s, steps, B, run.shape.grad_accum)
