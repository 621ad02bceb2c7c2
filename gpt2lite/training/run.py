"""How a training run is set up: `start_run()` builds the `Run` that train() loops over.

start_run() checks the inputs (a run that could not train or could not resume exactly is refused before any
work), picks the device and precision, joins torchrun's process group, moves the model (activation
checkpointing, DDP wrapper), builds AdamW's parameter groups, the lr schedule and the grad scaler, seeds
the RNGs, resumes from a checkpoint if asked, and opens log.jsonl, the reporters and the progress bar.

`Run` holds all of that and the services the loop calls once per step or less: the epoch's micro-batches
(a function of the epoch alone, so a resumed run sees the same order), a DataLoader over them, `log`,
`evaluate` (early stopping, best weights), `stop_reason` and `save`.
"""

from __future__ import annotations

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

from gpt2lite.training import distributed, fsdp, loggers
from gpt2lite.training.checkpoint import resume, save_checkpoint, save_trainable
from gpt2lite.training.fsdp_checkpoint import SHARDS, resume_sharded, save_sharded, sharded_checkpoint_at
from gpt2lite.files import atomic_write_text
from gpt2lite.model.gpt2 import count_parameters
from gpt2lite.training.optim import adamw, lr_factor, parameter_groups
from gpt2lite.training.precision import autocast, resolve_precision
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.evaluation import evaluate_loss, require_label_tokens
from gpt2lite.training.state import TrainState

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What start_run() builds for one call of train(): the model (and its DDP wrapper), where and how it trains,
    the optimizer, schedule and grad scaler, the loop's TrainState, and where records and files go."""

    config: TrainConfig
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # what the step calls: the model, DDP-wrapped under torchrun, compiled if asked
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
    compile_s: Optional[float] = None  # with config.compile: the first step's wall time, compilation included

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
        if self.state.end_evaluation(val_loss) and self.config.save_best:
            save_trainable(self.model, self.path("best.safetensors"), self.world)  # gathered under FSDP
        self.log({"type": "eval", "step": self.state.step, "epoch": self.state.epoch, "val_loss": val_loss,
                  "best_val_loss": self.state.best_val_loss})

    def evaluates_at_end(self) -> bool:
        """Whether a run that stops now must evaluate once more: it has an eval_dataset and evaluation on
        (eval_every or eval_each_epoch) but has not evaluated yet, so that best_val_loss is never missing."""
        config = self.config
        return (self.eval_dataset is not None and bool(config.eval_every or config.eval_each_epoch)
                and not self.state.history["val"])

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
        if fsdp.is_sharded(self.model):
            return save_sharded(self.path(SHARDS), self.model, self.optimizer, self.scheduler, self.scaler,
                                self.state, self.config, self.world)
        save_checkpoint(self.path("checkpoint.pt"), self.model, self.optimizer, self.scheduler, self.scaler,
                        self.state, self.config, self.world)

    def close(self):
        if self.progress is not None:
            self.progress.close()
        for reporter in self.reporters:
            reporter.close()


def start_run(model, train_dataset, config: TrainConfig, eval_dataset=None, collate_fn: Optional[Callable] = None,
          sampler=None, eval_collate_fn: Optional[Callable] = None,
          on_log: Optional[Callable[[dict], None]] = None) -> Run:
    """Check the inputs; pick the device and precision; join torchrun's process group; move (and DDP-wrap)
    the model; build the optimizer, schedule and grad scaler; seed the RNGs; resume from a checkpoint if
    asked; open the log and the reporters. Arguments as for train()."""
    _check_inputs(train_dataset, config, eval_dataset, sampler)
    if collate_fn is None:
        from gpt2lite.tasks.batching import collate as collate_fn
    device = _device(config)
    precision = resolve_precision(config.precision, device)  # "auto" -> "bf16" or "fp32", logged
    world = distributed.join_world(device.type)
    given, model = model, uncompiled(model)  # a torch.compile'd model trains compiled, saves as the model
    ddp_model, trainable_params, total_params = _prepare_model(model, config, device, world, given, precision)

    optimizer = adamw(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
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
        sharded = fsdp.is_sharded(model) or sharded_checkpoint_at(config.resume_from) is not None
        load = resume_sharded if sharded else resume
        state = load(config.resume_from, config, world, model, optimizer, scheduler, scaler)
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


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module that torch.compile wrapped (whose state-dict keys carry no "_orig_mod." prefix), or
    `model` itself when it is not a compiled module."""
    return getattr(model, "_orig_mod", model)


def _prepare_model(model, config: TrainConfig, device: torch.device, world, given=None, precision="fp32"):
    """Move the model to `device` in training mode, with activation checkpointing if asked; return
    (what the step calls: the model, DDP-wrapped or FSDP-sharded under torchrun, compiled with config.compile or as the
    caller compiled it (`given`); trainable parameter count; total parameter count)."""
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
    if fsdp.is_sharded(model) and not (world.distributed and config.strategy == "fsdp"):
        raise ValueError("the model is sharded already (fsdp_load.load_sharded): train it under torchrun with "
                         "TrainConfig(strategy='fsdp')")
    if world.distributed and config.strategy == "fsdp":
        if not fsdp.is_sharded(model):  # else sharded as it loaded (fsdp_load.load_sharded)
            fsdp.shard_model(model, precision, config.fsdp_reshard_after_forward, config.fsdp_cpu_offload)
    elif world.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        # once, around DDP (whose buckets then split the graph); dynamic: batches of other lengths reuse it
        ddp_model = torch.compile(ddp_model, dynamic=True)
    elif given is not model and not world.distributed:
        ddp_model = given  # the caller's torch.compile(model): trained as compiled, saved as the model
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
