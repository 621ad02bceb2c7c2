"""The training loop: `train(model, train_dataset, config, ...)`, readable in one sitting.

train() calls start_run() (run.py), which builds a `Run`: device, processes, DDP wrapper or FSDP
sharding (fsdp.py; the model is gathered back whole onto every rank at the end), optimizer,
schedule, scaler, loggers and the loop's `TrainState`, resumed from a checkpoint if asked. Then it runs the
loop: each step accumulates gradients over micro-batches, updates, logs, evaluates and saves. The config
lives in train_config.py, the counters in train_state.py, evaluation helpers in train_eval.py.

One optimizer step = `grad_accum` micro-batches of `batch_size` examples per process. The loss is the mean
over every label token of the step (all micro-batches, all processes), so accumulation and torchrun change
nothing but speed. Everything a step draws from (data order, dropout RNG) is saved with the checkpoint, so
`resume_from` continues with exactly the losses the uninterrupted run would have had.

Files in config.output_dir (rank 0 writes them; all but the appended log atomically):
    log.jsonl            one record per logged step or evaluation
    checkpoint.pt        resumable state (see checkpoint.py), every `save_every` steps and at the end;
                         checkpoint-shards/ instead under strategy="fsdp" (every rank writes its shards,
                         see fsdp_checkpoint.py)
    best.safetensors     trainable weights at the best validation loss
    final.safetensors    trainable weights at the end (written when there is no best model to restore)
    summary.json         what train() returns

Records (each line of log.jsonl, and the dict handed to `on_log` and to config.report_to's TensorBoard, CSV,
W&B or MLflow loggers, see gpt2lite.training.loggers):
    {"type": "train", "step", "epoch", "loss" (token mean since the last record), "lr", "grad_norm",
     "tokens_per_s", "elapsed_s", "memory_mb"}   every log_every steps, at the end of each epoch and run
    {"type": "eval", "step", "epoch", "val_loss", "best_val_loss"}   after each evaluation, and at the end of a
                                    run that stopped before its first one (unless eval_every is None and
                                    eval_each_epoch False: evaluation off)

Summary (train()'s return value and summary.json): steps, epochs_completed, stopped_by, best_train_loss
(lowest logged loss), final_train_loss (the last finite step loss) and final_train_loss_step (its step:
earlier than `steps` when the last steps were skipped for a NaN loss), best_val_loss, best_step,
wall_time_s, tokens_per_s, peak_memory_mb, checkpoint_mb (size of the trainable-weights file), model_file,
trainable_params, total_params, skipped_steps, world_size, precision (the one trained in: "auto" resolved),
compile_s (with TrainConfig.compile: the first step's wall time, compilation included; else None),
history {"train": [[step, loss], ...], "val": [[step, loss], ...]}.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Optional

import torch

from gpt2lite.training import distributed, fsdp
from gpt2lite.training.checkpoint import load_trainable, save_trainable
from gpt2lite.files import atomic_write_text
from gpt2lite.training.memory import peak_memory_mb
from gpt2lite.training.precision import autocast
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.evaluation import label_count, scores_first_label, to_device
from gpt2lite.training.run import Run, start_run

logger = logging.getLogger(__name__)


def train(model, train_dataset, config: TrainConfig, eval_dataset=None, collate_fn: Optional[Callable] = None,
          sampler=None, eval_collate_fn: Optional[Callable] = None,
          on_log: Optional[Callable[[dict], None]] = None) -> dict:
    """Train `model` in place; return the run's summary (also written to output_dir/summary.json). The
    summary's keys and the records of log.jsonl are listed in this module's docstring.

    model: forward(**batch) returns the mean loss over the batch's label positions (gpt2lite.GPT2 or
        GPT2ForSequenceClassification, with or without adapters); only parameters with requires_grad train.
    train_dataset / eval_dataset: map-style datasets (len, getitem) of examples.
    collate_fn: list of examples -> {"input_ids" (B, T), "attention_mask" (B, T), "labels" (B, T) or (B,)};
        default gpt2lite.tasks.batching.collate (dynamic right padding). eval_collate_fn: default collate_fn.
    sampler: optional index sampler over train_dataset (e.g. tasks.LengthGroupedSampler) with
        set_epoch(epoch), its order a function of the epoch (needed for exact resume). Default: a shuffle
        seeded by config.seed + epoch. Under torchrun each rank takes every world_size-th index.
    on_log: called on rank 0 with each record of log.jsonl (a dict), to feed your own tracker; raising ends the run.
    """
    run = start_run(model, train_dataset, config, eval_dataset, collate_fn, sampler, eval_collate_fn, on_log)
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
            if config.compile and run.compile_s is None:
                run.compile_s = time.perf_counter() - step_start
                logger.info("first compiled step (tracing and code generation included): %.1f s", run.compile_s)
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
            if stopped_by is not None and run.evaluates_at_end():
                run.evaluate()  # the run ends before its first evaluation (max_steps, time budget): one now
            if stopped_by is not None or (config.save_every and state.step % config.save_every == 0):
                run.save()
    run.close()
    return _finish(run, stopped_by)


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
        with fsdp.gradient_sync(run.ddp_model, last or not world.distributed):
            with autocast(device, run.precision):
                loss = run.ddp_model(**batch)  # mean over this micro-batch's label tokens
            # weight by its share of the step's tokens; DDP and FSDP average over processes, hence * world_size
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
    grad_norm = fsdp.clip_grad_norm([p for p in run.model.parameters() if p.requires_grad],
                                    run.config.clip or math.inf)  # the global norm over all shards
    scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    scaler.update()
    return float(grad_norm)


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
        save_trainable(run.model, model_file, world)  # rank 0 writes (gathered from the shards under FSDP)
    if fsdp.is_sharded(run.model):
        run.optimizer.state.clear()
        fsdp.consolidate(run.model)  # the whole model back on every rank, a plain module again
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
        "compile_s": run.compile_s,
        "history": {"train": state.history["train"], "val": state.history["val"]},
    }
    if world.is_main:
        atomic_write_text(run.path("summary.json"), json.dumps(summary, indent=1))
    logger.info("training stopped by %s after %d steps", stopped_by, state.step)
    return summary
