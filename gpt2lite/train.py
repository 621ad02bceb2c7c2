"""The training loop: one readable function, `train(model, train_dataset, config, ...)`.

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
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed, loggers
from .checkpoint import load_trainable, resume, save_checkpoint, save_trainable
from .files import atomic_write_text
from .loss import IGNORE_INDEX
from .memory import peak_memory_mb
from .model import count_parameters
from .optim import SCHEDULES, lr_factor, parameter_groups
from .precision import CHOICES as PRECISION_CHOICES
from .precision import autocast as _autocast
from .precision import resolve_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and bookkeeping of one training run (validated on construction)."""

    output_dir: str = "out"
    # optimisation
    lr: float = 3e-4
    weight_decay: float = 0.0  # on >= 2-D weights only; never biases, norms or soft prompts
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "linear"  # after warmup: "linear" or "cosine" decay to 0 at the last step, or "constant"
    clip: Optional[float] = 1.0  # max global gradient norm; None or 0 disables clipping
    # data and length of the run
    batch_size: int = 8  # examples per micro-batch (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: Optional[int] = 1  # None: run until max_steps or time_budget_s
    max_steps: Optional[int] = None  # optimizer steps; the schedule spans min(max_steps, epochs' steps)
    time_budget_s: Optional[float] = None  # stop (and save) once training has run this many seconds
    shuffle: bool = True  # without a sampler: a permutation seeded by seed + epoch
    seed: int = 0  # seeds python/numpy/torch with seed + rank (dropout) and the data order
    num_workers: int = 0  # DataLoader workers for collating
    # precision and device
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CPU or CUDA) | "fp16" (CUDA, with a GradScaler)
    #                          | "auto" (bf16 where the device has native bf16 arithmetic, else fp32)
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when available, else cpu
    activation_checkpointing: bool = False  # True: model.set_activation_checkpointing(True) (less memory, ~1.3x time)
    # evaluation, early stopping, checkpoints
    eval_every: Optional[int] = None  # evaluate every N optimizer steps
    eval_each_epoch: bool = True  # and at the end of each epoch
    eval_batch_size: Optional[int] = None  # default: batch_size
    patience: Optional[int] = None  # early stopping: evaluations without a lower val loss before stopping
    save_every: Optional[int] = None  # write checkpoint.pt every N steps (always at the end)
    save_best: bool = True  # write best.safetensors whenever the validation loss improves
    restore_best: bool = True  # load the best weights back into the model when training ends
    resume_from: Optional[str] = None  # a checkpoint.pt (or its directory) written by an earlier run
    # logging and failure handling
    log_every: int = 1  # one JSONL record per N steps (the loss is the token mean over those steps)
    progress_bar: bool = True  # tqdm on rank 0: a widget in Jupyter, text on stderr elsewhere (a file too)
    report_to: tuple = ()  # live logging of each record on rank 0: "tensorboard", "csv", "wandb", "mlflow"
    nan_policy: str = "stop"  # on a NaN/inf loss: "stop" raises FloatingPointError; "skip" skips the update

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "eval_every", "save_every", "patience", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be None or >= 1, got {value}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be None or > 0 seconds, got {self.time_budget_s}")
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr, weight_decay and warmup_steps must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        object.__setattr__(self, "report_to", loggers.check_names(self.report_to))
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.epochs is None and self.max_steps is None and self.time_budget_s is None:
            raise ValueError("nothing would end the run: set epochs, max_steps or time_budget_s")
        if self.epochs is None and self.max_steps is None and self.schedule != "constant":
            raise ValueError(f"a {self.schedule} schedule needs a known length: set epochs or max_steps, "
                             "or use schedule='constant' with a time budget alone")


def label_count(labels: torch.Tensor, first_too: bool = False) -> int:
    """How many targets a batch's mean loss averages: label tokens (B, T) after the one-token shift that
    causal_lm_loss applies, or examples for class labels (B,). first_too: labels[:, 0] is scored as well
    (behind a soft prompt, whose last virtual token predicts the first real token)."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 0 if first_too else 1:] != IGNORE_INDEX).sum())


def scores_first_label(model) -> bool:
    """Whether `model` (or the module DDP wraps) scores labels[:, 0]: an enabled soft prompt does, as in peft."""
    from .peft.prompt import soft_prompt

    prompt = soft_prompt(getattr(model, "module", model))
    return prompt is not None and prompt.adapter_enabled


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


def _device(config: TrainConfig) -> torch.device:
    """config.device, else CUDA when available; a bare "cuda" means this process's GPU under torchrun."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _epoch_micro_batches(num_examples: int, epoch: int, config: TrainConfig, sampler, world) -> list:
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


@torch.no_grad()
def evaluate_loss(model, dataset, collate_fn: Callable, batch_size: int, device=None, precision: str = "fp32",
                  world=None) -> float:
    """Mean loss over every label token of `dataset` (over all processes under torchrun)."""
    world = world or distributed.World()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    indices = distributed.shard(range(len(dataset)), world, pad=False)
    loss_sum, tokens = 0.0, 0
    first_too = scores_first_label(model)
    for start in range(0, len(indices), batch_size):
        batch = _to_device(collate_fn([dataset[i] for i in indices[start:start + batch_size]]), device)
        with _autocast(device, precision):
            loss = model(**batch)
        count = label_count(batch["labels"], first_too)
        loss_sum, tokens = loss_sum + float(loss) * count, tokens + count
    model.train(was_training)
    loss_sum, tokens = distributed.all_reduce_sum([loss_sum, tokens], world, device)
    if tokens == 0:
        raise ValueError("the evaluation set has no label tokens: check its labels (all -100?) or that it is empty")
    return loss_sum / tokens


def _accumulate(ddp_model, micro_batches, world, device, precision, scaler):
    """Forward and backward over one step's micro-batches; gradients end up as those of the mean loss over
    every label token of the step on all processes. Returns (summed loss, label tokens, input tokens),
    each summed over all processes."""
    first_too = scores_first_label(ddp_model)
    counts = [label_count(batch["labels"], first_too) for batch in micro_batches]
    (step_tokens,) = distributed.all_reduce_sum([sum(counts)], world, device)
    loss_sum = torch.zeros((), device=device)
    input_tokens = torch.zeros((), dtype=torch.long, device=device)
    for i, (batch, count) in enumerate(zip(micro_batches, counts)):
        batch = _to_device(batch, device)
        input_tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not world.distributed else ddp_model.no_sync():
            with _autocast(device, precision):
                loss = ddp_model(**batch)  # mean over this micro-batch's label tokens
            # weight by its share of the step's tokens; DDP averages over processes, hence * world_size
            weight = count * world.world_size / max(step_tokens, 1)
            scaler.scale(loss.float() * weight).backward()
        loss_sum += loss.detach().float() * count
    loss_sum, input_tokens = distributed.all_reduce_sum([float(loss_sum), int(input_tokens)], world, device)
    return loss_sum, step_tokens, input_tokens


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
    if collate_fn is None:
        from .tasks.batching import collate as collate_fn
    eval_collate_fn = eval_collate_fn or collate_fn
    device = _device(config)
    precision = resolve_precision(config.precision, device)  # "auto" -> "bf16" or "fp32", logged
    world = distributed.setup(device.type)
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
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    micro_batches = _epoch_micro_batches(len(train_dataset), 0, config, sampler, world)
    steps_per_epoch = math.ceil(len(micro_batches) / config.grad_accum)
    total_steps = min(config.epochs * steps_per_epoch if config.epochs else math.inf, config.max_steps or math.inf)
    total_steps = None if total_steps == math.inf else int(total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps, config.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    _autocast(device, precision)  # fail early on fp16 without CUDA

    os.makedirs(config.output_dir, exist_ok=True)
    log_path = os.path.join(config.output_dir, "log.jsonl")
    best_path = os.path.join(config.output_dir, "best.safetensors")
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": math.inf, "best_step": None,
             "evals_without_improvement": 0, "skipped_steps": 0, "elapsed_s": 0.0, "step_time_s": 0.0,
             "tokens": 0, "history": {"train": [], "val": [], "logged": []},
             "interval": {"loss": 0.0, "tokens": 0, "input_tokens": 0, "time": 0.0}}  # since the last log line
    random.seed(config.seed + world.rank)
    np.random.seed((config.seed + world.rank) % 2**32)
    torch.manual_seed(config.seed + world.rank)
    if config.resume_from:
        state = resume(config.resume_from, config, world, model, optimizer, scheduler, scaler)
    if world.is_main:
        _truncate_log(log_path, state["step"])
    reporters = loggers.open_loggers(config.report_to, config, state["step"]) if world.is_main else []

    def log(record):
        if world.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for reporter in reporters:
                reporter.log(record)
            if on_log is not None:
                on_log(record)

    def save():
        save_checkpoint(os.path.join(config.output_dir, "checkpoint.pt"), model, optimizer, scheduler, scaler,
                        state, config, world)

    def run_evaluation():
        val_loss = evaluate_loss(model, eval_dataset, eval_collate_fn, config.eval_batch_size or config.batch_size,
                                 device, precision, world)
        state["history"]["val"].append([state["step"], val_loss])
        improved = val_loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=val_loss, best_step=state["step"], evals_without_improvement=0)
            if config.save_best and world.is_main:
                save_trainable(model, best_path)
        else:
            state["evals_without_improvement"] += 1
        log({"type": "eval", "step": state["step"], "epoch": state["epoch"], "val_loss": val_loss,
             "best_val_loss": state["best_val_loss"]})

    progress = None
    if config.progress_bar and world.is_main:
        from tqdm.auto import tqdm  # the notebook widget inside Jupyter (whose stderr is no terminal)

        progress = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True)
    loader_generator = torch.Generator().manual_seed(config.seed)  # keeps DataLoader off the global RNG
    start_time, elapsed_before = time.perf_counter(), state["elapsed_s"]
    # a run resumed from its last checkpoint may already be finished
    stopped_by = None if state["step"] == 0 else _stop_reason(
        config, state, total_steps is not None and state["step"] >= total_steps, world, device)
    while stopped_by is None:
        if config.epochs is not None and state["epoch"] >= config.epochs:
            stopped_by = "epochs"
            break
        micro_batches = _epoch_micro_batches(len(train_dataset), state["epoch"], config, sampler, world)
        batches = iter(torch.utils.data.DataLoader(
            train_dataset, batch_sampler=micro_batches[state["batch_in_epoch"]:], collate_fn=collate_fn,
            num_workers=config.num_workers, generator=loader_generator, pin_memory=device.type == "cuda"))
        epoch_done = False
        while not epoch_done and stopped_by is None:
            step_start = time.perf_counter()
            n_micro = min(config.grad_accum, len(micro_batches) - state["batch_in_epoch"])
            optimizer.zero_grad(set_to_none=True)
            loss_sum, tokens, input_tokens = _accumulate(
                ddp_model, [next(batches) for _ in range(n_micro)], world, device, precision, scaler)
            loss = loss_sum / max(tokens, 1)
            lr = scheduler.get_last_lr()[0]
            grad_norm = _update(model, optimizer, scaler, config, state, loss, lr)
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += n_micro
            step_time = time.perf_counter() - step_start
            state["step_time_s"] += step_time
            state["tokens"] += input_tokens
            state["history"]["train"].append([state["step"], loss])
            interval = state["interval"]
            if math.isfinite(loss):
                interval["loss"] += loss_sum
                interval["tokens"] += tokens
            interval["input_tokens"] += input_tokens
            interval["time"] += step_time
            state["elapsed_s"] = elapsed_before + time.perf_counter() - start_time
            epoch_done = state["batch_in_epoch"] == len(micro_batches)
            last_step = total_steps is not None and state["step"] >= total_steps
            if state["step"] % config.log_every == 0 or last_step or epoch_done:
                record = {"type": "train", "step": state["step"], "epoch": state["epoch"],
                          "loss": interval["loss"] / max(interval["tokens"], 1) if interval["tokens"] else float("nan"),
                          "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": interval["input_tokens"] / max(interval["time"], 1e-9),
                          "elapsed_s": state["elapsed_s"], "memory_mb": peak_memory_mb(device)}
                state["history"]["logged"].append([state["step"], record["loss"]])
                log(record)
                state["interval"] = {"loss": 0.0, "tokens": 0, "input_tokens": 0, "time": 0.0}
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if eval_dataset is not None and ((config.eval_every and state["step"] % config.eval_every == 0)
                                             or (epoch_done and config.eval_each_epoch)):
                run_evaluation()
            if epoch_done:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            stopped_by = _stop_reason(config, state, last_step, world, device)
            if stopped_by is not None or (config.save_every and state["step"] % config.save_every == 0):
                save()
    if progress is not None:
        progress.close()
    for reporter in reporters:
        reporter.close()
    return _finish(model, config, state, stopped_by, world, device, trainable_params, total_params, best_path,
                   precision)


def _update(model, optimizer, scaler, config, state, loss: float, lr: float) -> float:
    """Clip and apply the accumulated gradients; return the gradient norm. A NaN or infinite loss stops the
    run or, with nan_policy="skip", drops this step's gradients and counts the step as skipped."""
    if not math.isfinite(loss):
        if config.nan_policy == "stop":
            raise FloatingPointError(
                f"the training loss is {loss} at step {state['step'] + 1} (epoch {state['epoch']}); stopped so as "
                f"not to train on garbage. Try a lower lr (now {lr:.3g}), gradient clipping, bf16 instead of "
                "fp16, or nan_policy='skip' to skip such steps")
        state["skipped_steps"] += 1
        logger.warning("step %d: loss is %s, update skipped (%d so far)", state["step"] + 1, loss,
                       state["skipped_steps"])
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               config.clip or math.inf)
    scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    scaler.update()
    return float(grad_norm)


def _stop_reason(config, state, last_step, world, device) -> Optional[str]:
    """Why the run ends after this step, if it does; every process takes the same decision."""
    if last_step:
        return "max_steps" if config.max_steps is not None and state["step"] >= config.max_steps else "epochs"
    if config.patience is not None and state["evals_without_improvement"] >= config.patience:
        return "early_stopping"
    if config.time_budget_s is not None:
        # the processes' clocks differ slightly: stop when any of them is out of time
        (out_of_time,) = distributed.all_reduce_sum([state["elapsed_s"] >= config.time_budget_s], world, device)
        if out_of_time:
            return "time_budget"
    return None


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


def _finish(model, config, state, stopped_by, world, device, trainable_params, total_params, best_path,
            precision: str) -> dict:
    """Restore the best weights if asked, write the final weights and summary.json, return the summary."""
    has_best = config.save_best and state["best_step"] is not None
    if has_best and config.restore_best:
        if world.distributed:
            torch.distributed.barrier()  # rank 0 wrote the file
        load_trainable(model, best_path)
        model_file = best_path
    else:
        model_file = os.path.join(config.output_dir, "final.safetensors")
        if world.is_main:
            save_trainable(model, model_file)
    logged = [loss for _, loss in state["history"]["logged"] if math.isfinite(loss)]
    # the last finite loss, with its step: after skipped (NaN) steps it is from before they began
    final_step, final_loss = next(((step, loss) for step, loss in reversed(state["history"]["train"])
                                   if math.isfinite(loss)), (None, None))
    if final_step is not None and final_step < state["step"]:
        logger.warning("the last %d step(s) had a non-finite loss; final_train_loss is from step %d",
                       state["step"] - final_step, final_step)
    summary = {
        "steps": state["step"], "epochs_completed": state["epoch"], "stopped_by": stopped_by,
        "best_train_loss": min(logged) if logged else None,
        "final_train_loss": final_loss, "final_train_loss_step": final_step,
        "best_val_loss": state["best_val_loss"] if state["best_step"] is not None else None,
        "best_step": state["best_step"], "wall_time_s": state["elapsed_s"],
        "tokens_per_s": state["tokens"] / max(state["step_time_s"], 1e-9),
        "peak_memory_mb": peak_memory_mb(device),
        "checkpoint_mb": os.path.getsize(model_file) / 2**20 if world.is_main else None,
        "model_file": model_file, "trainable_params": trainable_params, "total_params": total_params,
        "skipped_steps": state["skipped_steps"], "world_size": world.world_size, "precision": precision,
        "history": {"train": state["history"]["train"], "val": state["history"]["val"]},
    }
    if world.is_main:
        atomic_write_text(os.path.join(config.output_dir, "summary.json"), json.dumps(summary, indent=1))
    logger.info("training stopped by %s after %d steps", stopped_by, state["step"])
    return summary
