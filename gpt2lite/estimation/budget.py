"""A memory budget: the largest micro-batch that fits it, or the options that would make the run fit.

    fit = fit_budget(run, parse_size("8GB"))
    fit.batch_size, fit.grad_accum     # the micro-batch to run and the accumulation that keeps the global batch
    fit.lines                          # what was found, one line each (an option that would make it fit, ...)

The peak grows with the micro-batch, so a bisection over 1 .. the run's global batch (batch_size x
grad_accum) finds the largest that fits with a handful of traces.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from gpt2lite.estimation.predict import Estimate, Run, estimate_run

UNITS = {"": 1, "b": 2**-20, "kb": 2**-10, "kib": 2**-10, "mb": 1, "mib": 1, "gb": 2**10, "gib": 2**10,
         "tb": 2**20, "tib": 2**20}


def parse_size(text) -> float:
    """A memory size in MB (2**20 bytes) from "8GB", "8 GiB", "500MB" or a bare number of MB. GB means GiB
    here, as the peak is counted in MB of 2**20 bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        size = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"memory budget {text!r} is not a size; write it like 8GB, 16GiB or 500MB")
        size = float(match.group(1)) * UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"memory budget must be positive, got {text!r}")
    return size


@dataclass
class BudgetFit:
    """The largest micro-batch within the budget (None: not even one example) and what else would fit."""

    budget_mb: float
    max_batch: Optional[int]  # the largest micro-batch that fits (at most the global batch)
    batch_size: Optional[int]  # the largest divisor of the global batch that fits: the one to run
    grad_accum: Optional[int]  # global batch // batch_size
    estimate: Optional[Estimate]  # at batch_size
    lines: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["estimate"] = None if self.estimate is None else self.estimate.to_dict()
        return data


def with_batch(run: Run, batch_size: int, grad_accum: int = 1) -> Run:
    train = dataclasses.replace(run.train, batch_size=batch_size, grad_accum=grad_accum)
    return dataclasses.replace(run, train=train, shape=dataclasses.replace(run.shape, batch_size=batch_size,
                                                                           grad_accum=grad_accum))


def largest_fitting(peak_mb: Callable[[int], float], budget_mb: float, most: int) -> Optional[int]:
    """The largest b in 1..most with peak_mb(b) <= budget_mb (peak_mb grows with b), or None."""
    if peak_mb(1) > budget_mb:
        return None
    low, high = 1, most  # peak_mb(low) fits
    while low < high:
        middle = (low + high + 1) // 2
        if peak_mb(middle) <= budget_mb:
            low = middle
        else:
            high = middle - 1
    return low


def fit_budget(run: Run, budget_mb: float) -> BudgetFit:
    """The micro-batch and accumulation of `run` that fit budget_mb; when none does, one line per option
    (activation checkpointing, QLoRA, bf16, a shorter max_length) saying whether it would make it fit."""
    global_batch = run.shape.batch_size * run.shape.grad_accum
    estimates = {}

    def peak_mb(batch: int) -> float:
        if batch not in estimates:
            estimates[batch] = estimate_run(with_batch(run, batch, -(-global_batch // batch)), both_settings=False)
        return estimates[batch].peak_memory_mb

    weights_mb = 0.0
    biggest = largest_fitting(peak_mb, budget_mb, global_batch)
    if biggest is None:
        parts = estimates[1].parts
        weights_mb = parts["weights_float_mb"] + parts["weights_4bit_mb"] + parts.get("baseline_mb", 0.0)
        lines = [f"not even one example of {run.shape.seq_len} tokens fits {budget_mb:.0f} MB: the run needs "
                 f"{peak_mb(1):.0f} MB at batch 1"]
        if weights_mb > budget_mb:
            lines.append(f"the weights alone take {weights_mb:.0f} MB (with the process's baseline), more than the "
                         "budget: only a smaller model or QLoRA's 4-bit weights can fit")
        return BudgetFit(budget_mb, None, None, None, None, lines + option_lines(run, budget_mb))
    batch = max(d for d in range(1, biggest + 1) if global_batch % d == 0)
    fit = estimate_run(with_batch(run, batch, global_batch // batch))
    line = (f"micro-batch {batch} x {global_batch // batch} accumulation steps (global batch {global_batch}): "
            f"predicted peak {fit.peak_memory_mb:.0f} MB of {budget_mb:.0f} MB")
    if biggest > batch:
        line += f"; micro-batches up to {biggest} fit, but {global_batch} is not a multiple of them"
    return BudgetFit(budget_mb, biggest, batch, global_batch // batch, fit, [line])


def option_lines(run: Run, budget_mb: float) -> List[str]:
    """One line per option that changes the run's memory: whether, alone, it makes batch 1 fit the budget."""
    from gpt2lite.peft import MethodConfig

    options = []
    if not run.train.activation_checkpointing:
        options.append(("activation checkpointing (--train.activation_checkpointing true)",
                        dataclasses.replace(run, train=dataclasses.replace(run.train, activation_checkpointing=True))))
    if run.method.name in ("lora", "full"):
        options.append(("QLoRA (--method.name qlora): 4-bit frozen weights",
                        dataclasses.replace(run, method=MethodConfig(name="qlora"))))
    if run.precision == "fp32":
        options.append(("bf16 autocast (--train.precision bf16)",
                        dataclasses.replace(run, precision="bf16",
                                            train=dataclasses.replace(run.train, precision="bf16"))))
    lines = []
    for label, changed in options:
        peak = estimate_run(with_batch(changed, 1), both_settings=False).peak_memory_mb
        verdict = "fits" if peak <= budget_mb else "does not fit"
        lines.append(f"{label}: {verdict} at batch 1 ({peak:.0f} MB)")
    lines.append(shorter_length_line(run, budget_mb))
    return lines


def shorter_length_line(run: Run, budget_mb: float) -> str:
    """The longest max_length (halving from the run's) at which batch 1 fits."""
    length = run.shape.seq_len // 2
    while length >= 16:
        shorter = dataclasses.replace(run, shape=dataclasses.replace(run.shape, seq_len=length))
        peak = estimate_run(with_batch(shorter, 1), both_settings=False).peak_memory_mb
        if peak <= budget_mb:
            return f"a shorter max_length (--data.max_length {length}): fits at batch 1 ({peak:.0f} MB)"
        length //= 2
    return "a shorter max_length: even 16 tokens do not fit"
