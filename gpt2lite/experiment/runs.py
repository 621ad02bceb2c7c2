"""One fine-tuning method on one task, end to end: base model, method, training, evaluation, report row.

The command line (gpt2lite.cli) is built from these steps:

    base = load_base_model("gpt2")                          # experiment.base_model: pretrained, or a loud fallback
    splits = load_splits(DataConfig(train="my.jsonl"))      # gpt2lite.tasks.splits: three disjoint splits
    task = build_task(data, splits, tokenizer, context)     # gpt2lite.tasks.builders: examples + a scorer
    result = run_method("lora", {"name": "lora", "rank": 8}, base, task, TrainConfig(...))
    write_report([result.row, ...], output_dir, task.kind, random_init=base.random_init)

The fallbacks never hide: when pretrained weights or the hub dataset cannot be had, the returned objects
say so in `description`, `random_init` / `fallback` are set, and a warning is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch

from gpt2lite.experiment.base_model import BaseModel, copy_for_run
from gpt2lite.seed import seed_everything
from gpt2lite.tasks import LengthGroupedSampler
from gpt2lite.tasks.builders import Task
from gpt2lite.training.memory import peak_memory_mb, reset_peak_memory

__all__ = ["MethodResult", "run_method"]


@dataclass
class MethodResult:
    """What run_method returns: the report row, the trained model, train()'s summary, the test predictions."""

    row: dict
    model: torch.nn.Module
    summary: dict
    predictions: List[dict] = field(default_factory=list)


def run_method(label: str, method: Union["MethodConfig", dict, str, None], base: BaseModel, task: Task, train_config,
               sampler_seed: int = 0, evaluate: bool = True, copy_base: bool = True,
               on_log: Optional[Callable[[dict], None]] = None) -> MethodResult:
    """Train a copy of the base model with `method` (None: no fine-tuning, evaluation only) in
    train_config.output_dir, then score it on the test split (evaluate=False: the row has no quality).
    The process is seeded with train_config.seed first, so the method's new weights (LoRA's A, a soft
    prompt) are the same in every process and for every position in a comparison.
    QLoRA's copy is read from the base's checkpoint with its linears quantized as they load (copy_for_run).
    copy_base=False: adapt and train base.model itself, for the base's last use (one run of a command),
    which saves the copy's memory; the base is changed afterwards.
    on_log: train()'s, called with each record of log.jsonl.
    On the CPU the row's peak memory is this method's own (the process's peak is reset first)."""
    from gpt2lite.peft import MethodConfig, apply, train_only
    from gpt2lite.experiment.report import method_row
    from gpt2lite.tasks.batching import collate
    from gpt2lite.training.evaluation import evaluate_loss
    from gpt2lite.training.loop import train

    method = None if method is None else MethodConfig.from_value(method)  # a bad option fails before any work
    cpu = torch.device("cpu")
    per_method_peak = not torch.cuda.is_available() and reset_peak_memory(cpu)
    seed_everything(train_config.seed)
    model = copy_for_run(base, method) if copy_base else base.model
    eval_batch_size = train_config.eval_batch_size or train_config.batch_size
    if method is None:
        train_only(model, [])  # nothing trains (apply("frozen") would leave a classifier's score head trainable)
        model.to(train_config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        summary = {"best_val_loss": evaluate_loss(model, task.validation, collate, eval_batch_size),
                   "trainable_params": 0, "wall_time_s": 0.0,
                   "peak_memory_mb": peak_memory_mb(cpu) if per_method_peak else None}
    else:
        apply(model, method)
        sampler = LengthGroupedSampler(task.train.lengths(), train_config.batch_size * train_config.grad_accum,
                                       seed=sampler_seed)
        summary = train(model, task.train, train_config, eval_dataset=task.validation, sampler=sampler,
                        on_log=on_log)
        if summary.get("best_val_loss") is None:  # stopped before any evaluation: the final model's loss
            summary["best_val_loss"] = evaluate_loss(model, task.validation, collate, eval_batch_size)
        if per_method_peak:
            summary["peak_memory_mb"] = peak_memory_mb(cpu)  # this method's peak, not the whole process's
    quality, predictions = task.evaluate(model) if evaluate else ({}, [])
    row = method_row(label, summary, model, quality, random_init=base.random_init, base_kind=base.kind)
    return MethodResult(row, model, summary, predictions)
