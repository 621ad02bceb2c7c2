"""The training loop: `train(model, train_dataset, config, ...)`, readable in one sitting.

train() calls setup(), which builds a `Run` (device, processes, DDP wrapper, optimizer, schedule, scaler,
loggers and the loop's `TrainState`, resumed from a checkpoint if asked), then runs the loop: each step
accumulates gradients over micro-batches, updates, logs, evaluates and saves. The config lives in
train_config.py, the counters in train_state.py, evaluation helpers in train_eval.py.

One optimizer step = `grad_accum` micro-batches of `batch_size` examples per process. The loss is the mean
over every label token of the step (all micro-batches, all processes), so accumulation and torchrun change
nothing but speed. Everything a step draws from (data order, dropout RNG) is saved with the checkpoint, so
`resume_from` continues with exactly the losses the uninterrupted run would have had.

Files in config.output_dir (rank 0 writes them; all but the appended log atomically):
    log.jsonl            one record per logged step or evaluation
    checkpoint.pt        resumable state (see checkpoint.py), every `save_every` steps and at the end
    best.safetensors     trainable weights at the best validation loss
    final.safetensors    trainable weights at the end (written when there is no best model to restore)
    summary.json         what train() returns
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from . import distributed, loggers
from .checkpoint import load_trainable, resume, save_checkpoint, save_trainable
from .files import atomic_write_text
from .model import count_parameters
from .optim import lr_factor, parameter_groups  # noqa: F401 (lr_factor: imported from here by tests)
from .precision import autocast, resolve_precision
from .train_config import TrainConfig
from .train_eval import (evaluate_loss, label_count, peak_memory_mb, require_label_tokens,  # noqa: F401
                         scores_first_label, to_device)
from .train_state import TrainState

logger = logging.getLogger(__name__)


def train(model, train_dataset, config: TrainConfig, eval_dataset=None, collate_fn: Optional[Callable] = None,
          sampler=None, eval_collate_fn: Optional[Callable] = None,
          on_log: Optional[Callable[[dict], None]] = None) -> dict:
    """Train `model` in place; return the run's summary dict (also written to output_dir/summary.json).

    model: a module whose forward(**batch) returns the mean loss over the batch's label positions
        (gpt2lite.GPT2, GPT2ForSequenceClassification, with or without adapters). Only parameters with
        requires_grad are trained and checkpointed.
    train_dataset / eval_dataset: map-style datasets (len, getitem) of examples.
    collate_fn: list of examples -> {"input_ids" (B, T), "attention_mask" (B, T), "labels" (B, T) or (B,)};
        default gpt2lite.tasks.batching.collate (dynamic right padding).
    sampler: optional index sampler over train_dataset (e.g. tasks.LengthGroupedSampler) with
        set_epoch(epoch), its order a function of the epoch (needed for exact resume). Default: a shuffle
        seeded by config.seed + epoch. Under torchrun each rank takes every world_size-th index.
    on_log: called on rank 0 with every record written to log.jsonl, as a dict: a train record
        {"type": "train", "step", "epoch", "loss" (token mean since the last record), "lr", "grad_norm",
        "tokens_per_s", "elapsed_s", "memory_mb"} every log_every steps, an eval record {"type": "eval",
        "step", "epoch", "val_loss", "best_val_loss"} after each evaluation. Use it to feed your own tracker
        or to stop the run: an exception raised there ends it. config.report_to sends the same records to
        TensorBoard, a CSV file, W&B or MLflow (see gpt2lite.loggers).

    Summary keys: steps, epochs_completed, stopped_by, best_train_loss (lowest logged loss),
    final_train_loss (the last finite step loss) and final_train_loss_step (its step: earlier than `steps`
    when the last steps were skipped for a NaN loss), best_val_loss, best_step, wall_time_s, tokens_per_s,
    peak_memory_mb, checkpoint_mb (size of the trainable-weights file), model_file, trainable_params,
    total_params, skipped_steps, precision (the one trained in: "auto" resolved),
    history {"train": [[step, loss], ...], "val": [[step, loss], ...]}.
    """
    run = setup(model, train_dataset, config, eval_dataset, collate_fn, sampler, eval_collate_fn, on_log)
    state = run.state
    # a run resumed from its last checkpoint may already be finished
    stopped_by = None if state.step == 0 else run.stop_reason(run.reached_total_steps())
    while stopped_by is None:
        if config.epochs is not None and state.epoch >= config.epochs:
            stopped_by = "epochs"
            break
        micro_batches = run.epoch_micro_batches(state.epoch)
        batches = run.loader(micro_batches[state.batch_in_epoch:])
        epoch_done = False
        while not epoch_done and stopped_by is None:
            step_start = time.perf_counter()
            # forward and backward over grad_accum micro-batches (fewer at the end of an epoch)
            n_micro = min(config.grad_accum, len(micro_batches) - state.batch_in_epoch)
            run.optimizer.zero_grad(set_to_none=True)
            loss_sum, tokens, input_tokens = _accumulate(run, [next(batches) for _ in range(n_micro)])
            # clip and update (or skip a step with a NaN loss), then advance the lr schedule
            loss, lr = loss_sum / max(tokens, 1), run.scheduler.get_last_lr()[0]
            grad_norm = _update(run, loss, lr)
            run.scheduler.step()
            state.end_step(n_micro, loss_sum, tokens, input_tokens, time.perf_counter() - step_start)
            state.elapsed_s = run.elapsed_s()
            # log, evaluate, move to the next epoch, decide whether to stop, save
            epoch_done = state.batch_in_epoch == len(micro_batches)
            last_step = run.reached_total_steps()
            if state.step % config.log_every == 0 or last_step or epoch_done:
                run.log(state.train_record(lr, grad_norm, peak_memory_mb(run.device)))
            run.show_progress(loss, lr)
            if run.eval_dataset is not None and ((config.eval_every and state.step % config.eval_every == 0)
                                                 or (epoch_done and config.eval_each_epoch)):
                run.evaluate()
            if epoch_done:
                state.next_epoch()
            stopped_by = run.stop_reason(last_step)
            if stopped_by is not None or (config.save_every and state.step % config.save_every == 0):
                run.save()
    run.close()
    return _finish(run, stopped_by)


@dataclass
class Run:
    """What setup() builds for one call of train(): the model (and its DDP wrapper), where and how it trains,
    the optimizer, schedule and grad scaler, the loop's TrainState, and where records and files go."""

    config: TrainConfig
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # the model itself unless under torchrun
    train_dataset: Any
    eval_dataset: Any
    collate_fn: Callable
    eval_collate_fn: Callable
    sampler: Any
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16": "auto" resolved
    world: distributed.World
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    total_steps: Optional[int]  # None: no known length (a time budget alone)
    state: TrainState
    trainable_params: int
    total_params: int
    on_log: Optional[Callable[[dict], None]] = None
    reporters: tuple = ()
    progress: Any = None  # a tqdm bar on rank 0
    loader_generator: Optional[torch.Generator] = None
    start_time: float = 0.0
    elapsed_before: float = 0.0  # elapsed_s of the runs this one resumes

    def path(self, name: str) -> str:
        return os.path.join(self.config.output_dir, name)

    def epoch_micro_batches(self, epoch: int) -> List[List[int]]:
        return epoch_micro_batches(len(self.train_dataset), epoch, self.config, self.sampler, self.world)

    def loader(self, micro_batches: List[List[int]]):
        """An iterator over the collated micro-batches (lists of dataset indices) given."""
        return iter(torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=micro_batches, collate_fn=self.collate_fn,
            num_workers=self.config.num_workers, generator=self.loader_generator,
            pin_memory=self.device.type == "cuda"))

    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def reached_total_steps(self) -> bool:
        return self.total_steps is not None and self.state.step >= self.total_steps

    def log(self, record: dict):
        """Append a record to log.jsonl and hand it to the reporters and on_log (rank 0 only)."""
        if not self.world.is_main:
            return
        with open(self.path("log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        for reporter in self.reporters:
            reporter.log(record)
        if self.on_log is not None:
            self.on_log(record)

    def show_progress(self, loss: float, lr: float):
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def evaluate(self):
        """Evaluate on eval_dataset, count it for early stopping, save the best weights, log the record."""
        val_loss = evaluate_loss(self.model, self.eval_dataset, self.eval_collate_fn,
                                 self.config.eval_batch_size or self.config.batch_size, self.device,
                                 self.precision, self.world)
        if self.state.end_evaluation(val_loss) and self.config.save_best and self.world.is_main:
            save_trainable(self.model, self.path("best.safetensors"))
        self.log({"type": "eval", "step": self.state.step, "epoch": self.state.epoch, "val_loss": val_loss,
                  "best_val_loss": self.state.best_val_loss})

    def stop_reason(self, last_step: bool) -> Optional[str]:
        """Why the run ends after this step, if it does; every process takes the same decision."""
        config, state = self.config, self.state
        if last_step:
            return "max_steps" if config.max_steps is not None and state.step >= config.max_steps else "epochs"
        if config.patience is not None and state.evals_without_improvement >= config.patience:
            return "early_stopping"
        if config.time_budget_s is not None:
            # the processes' clocks differ slightly: stop when any of them is out of time
            (out_of_time,) = distributed.all_reduce_sum([state.elapsed_s >= config.time_budget_s], self.world,
                                                        self.device)
            if out_of_time:
                return "time_budget"
        return None

    def save(self):
        save_checkpoint(self.path("checkpoint.pt"), self.model, self.optimizer, self.scheduler, self.scaler,
                        self.state, self.config, self.world)

    def close(self):
        if self.progress is not None:
            self.progress.close()
        for reporter in self.reporters:
            reporter.close()


def setup(model, train_dataset, config: TrainConfig, eval_dataset=None, collate_fn: Optional[Callable] = None,
          sampler=None, eval_collate_fn: Optional[Callable] = None,
          on_log: Optional[Callable[[dict], None]] = None) -> Run:
    """Check the inputs; pick the device and precision; join torchrun's process group; move (and DDP-wrap)
    the model; build the optimizer, schedule and grad scaler; seed the RNGs; resume from a checkpoint if
    asked; open the log and the reporters. Arguments as for train()."""
    _check_inputs(train_dataset, config, eval_dataset, sampler)
    if collate_fn is None:
        from .tasks.batching import collate as collate_fn
    device = _device(config)
    precision = resolve_precision(config.precision, device)  # "auto" -> "bf16" or "fp32", logged
    world = distributed.setup(device.type)
    ddp_model, trainable_params, total_params = _prepare_model(model, config, device, world)

    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    micro_batches = epoch_micro_batches(len(train_dataset), 0, config, sampler, world)
    steps_per_epoch = math.ceil(len(micro_batches) / config.grad_accum)
    total_steps = min(config.epochs * steps_per_epoch if config.epochs else math.inf, config.max_steps or math.inf)
    total_steps = None if total_steps == math.inf else int(total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps, config.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast(device, precision)  # fail early on fp16 without CUDA

    os.makedirs(config.output_dir, exist_ok=True)
    random.seed(config.seed + world.rank)
    np.random.seed((config.seed + world.rank) % 2**32)
    torch.manual_seed(config.seed + world.rank)
    state = TrainState()
    if config.resume_from:
        state = resume(config.resume_from, config, world, model, optimizer, scheduler, scaler)
    run = Run(config=config, model=model, ddp_model=ddp_model, train_dataset=train_dataset,
              eval_dataset=eval_dataset, collate_fn=collate_fn, eval_collate_fn=eval_collate_fn or collate_fn,
              sampler=sampler, device=device, precision=precision, world=world, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, total_steps=total_steps, state=state,
              trainable_params=trainable_params, total_params=total_params, on_log=on_log)
    if world.is_main:
        _truncate_log(run.path("log.jsonl"), state.step)
        run.reporters = tuple(loggers.open_loggers(config.report_to, config, state.step))
        if config.progress_bar:
            from tqdm.auto import tqdm  # the notebook widget inside Jupyter (whose stderr is no terminal)

            run.progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True)
    run.loader_generator = torch.Generator().manual_seed(config.seed)  # keeps DataLoader off the global RNG
    run.start_time, run.elapsed_before = time.perf_counter(), state.elapsed_s
    return run


def _check_inputs(train_dataset, config: TrainConfig, eval_dataset, sampler):
    """Refuse, before any work, a run that could not train or could not resume exactly."""
    if len(train_dataset) == 0:
        raise ValueError("the training set is empty: check the data files, columns and data_fraction/max_samples")
    require_label_tokens(train_dataset, "training")
    if eval_dataset is not None:
        require_label_tokens(eval_dataset, "evaluation")
    if sampler is not None and not hasattr(sampler, "set_epoch"):
        raise TypeError("the sampler needs set_epoch(epoch) so that the data order is reproducible on resume")
    if config.patience is not None and eval_dataset is None:
        raise ValueError("early stopping (patience) needs an eval_dataset")
    if eval_dataset is None and config.eval_every:
        logger.warning("eval_every=%d is ignored: no eval_dataset was given", config.eval_every)


def _device(config: TrainConfig) -> torch.device:
    """config.device, else CUDA when available; a bare "cuda" means this process's GPU under torchrun."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _prepare_model(model, config: TrainConfig, device: torch.device, world):
    """Move the model to `device` in training mode, with activation checkpointing if asked; return
    (the model, DDP-wrapped under torchrun; trainable parameter count; total parameter count)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    model.train()
    if config.activation_checkpointing:
        if not hasattr(model, "set_activation_checkpointing"):
            raise ValueError(f"activation_checkpointing=True, but {type(model).__name__} has no "
                             "set_activation_checkpointing(); use a gpt2lite model or set it to False")
        model.set_activation_checkpointing(True)
    trainable_params, total_params = count_parameters(model)
    if trainable_params == 0:
        raise ValueError("the model has no trainable parameters: add an adapter or set requires_grad")
    ddp_model = model
    if world.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp_model, trainable_params, total_params


def epoch_micro_batches(num_examples: int, epoch: int, config: TrainConfig, sampler, world) -> List[List[int]]:
    """This process's micro-batches (lists of dataset indices) for one epoch; a function of the epoch only."""
    if sampler is not None:
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
    elif config.shuffle:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    else:
        order = list(range(num_examples))
    order = distributed.shard(order, world)
    return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]


def _accumulate(run: Run, micro_batches: list):
    """Forward and backward over one step's micro-batches; gradients end up as those of the mean loss over
    every label token of the step on all processes. Returns (summed loss, label tokens, input tokens),
    each summed over all processes."""
    world, device = run.world, run.device
    first_too = scores_first_label(run.ddp_model)
    counts = [label_count(batch["labels"], first_too) for batch in micro_batches]
    (step_tokens,) = distributed.all_reduce_sum([sum(counts)], world, device)
    loss_sum = torch.zeros((), device=device)
    input_tokens = torch.zeros((), dtype=torch.long, device=device)
    for i, (batch, count) in enumerate(zip(micro_batches, counts)):
        batch = to_device(batch, device)
        input_tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not world.distributed else run.ddp_model.no_sync():
            with autocast(device, run.precision):
                loss = run.ddp_model(**batch)  # mean over this micro-batch's label tokens
            # weight by its share of the step's tokens; DDP averages over processes, hence * world_size
            weight = count * world.world_size / max(step_tokens, 1)
            run.scaler.scale(loss.float() * weight).backward()
        loss_sum += loss.detach().float() * count
    loss_sum, input_tokens = distributed.all_reduce_sum([float(loss_sum), int(input_tokens)], world, device)
    return loss_sum, step_tokens, input_tokens


def _update(run: Run, loss: float, lr: float) -> float:
    """Clip and apply the accumulated gradients; return the gradient norm. A NaN or infinite loss stops the
    run or, with nan_policy="skip", drops this step's gradients and counts the step as skipped."""
    state, optimizer, scaler = run.state, run.optimizer, run.scaler
    if not math.isfinite(loss):
        if run.config.nan_policy == "stop":
            raise FloatingPointError(
                f"the training loss is {loss} at step {state.step + 1} (epoch {state.epoch}); stopped so as "
                f"not to train on garbage. Try a lower lr (now {lr:.3g}), gradient clipping, bf16 instead of "
                "fp16, or nan_policy='skip' to skip such steps")
        state.skipped_steps += 1
        logger.warning("step %d: loss is %s, update skipped (%d so far)", state.step + 1, loss, state.skipped_steps)
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                               run.config.clip or math.inf)
    scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    scaler.update()
    return float(grad_norm)


def _truncate_log(log_path: str, step: int):
    """Drop records written after `step` (by a run that crashed after its last checkpoint)."""
    if not os.path.exists(log_path):
        return
    kept = []
    with open(log_path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by the crash
                continue
    atomic_write_text(log_path, "".join(kept))


def _finish(run: Run, stopped_by: Optional[str]) -> dict:
    """Restore the best weights if asked, write the final weights and summary.json, return the summary."""
    config, state, world = run.config, run.state, run.world
    best_path = run.path("best.safetensors")
    if config.save_best and state.best_step is not None and config.restore_best:
        if world.distributed:
            torch.distributed.barrier()  # rank 0 wrote the file
        load_trainable(run.model, best_path)
        model_file = best_path
    else:
        model_file = run.path("final.safetensors")
        if world.is_main:
            save_trainable(run.model, model_file)
    # the last finite loss, with its step: after skipped (NaN) steps it is from before they began
    final_step, final_loss = state.final_train_loss()
    if final_step is not None and final_step < state.step:
        logger.warning("the last %d step(s) had a non-finite loss; final_train_loss is from step %d",
                       state.step - final_step, final_step)
    summary = {
        "steps": state.step, "epochs_completed": state.epoch, "stopped_by": stopped_by,
        "best_train_loss": state.best_train_loss if math.isfinite(state.best_train_loss) else None,
        "final_train_loss": final_loss, "final_train_loss_step": final_step,
        "best_val_loss": state.best_val_loss if state.best_step is not None else None,
        "best_step": state.best_step, "wall_time_s": state.elapsed_s,
        "tokens_per_s": state.tokens / max(state.step_time_s, 1e-9),
        "peak_memory_mb": peak_memory_mb(run.device),
        "checkpoint_mb": os.path.getsize(model_file) / 2**20 if world.is_main else None,
        "model_file": model_file, "trainable_params": run.trainable_params, "total_params": run.total_params,
        "skipped_steps": state.skipped_steps, "world_size": world.world_size, "precision": run.precision,
        "history": {"train": state.history["train"], "val": state.history["val"]},
    }
    if world.is_main:
        atomic_write_text(run.path("summary.json"), json.dumps(summary, indent=1))
    logger.info("training stopped by %s after %d steps", stopped_by, state.step)
    return summary
