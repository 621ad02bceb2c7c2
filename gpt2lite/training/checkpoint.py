"""Training checkpoints: the trainable weights alone, and everything needed to resume bit for bit.

Two files, each written atomically (temporary file, then rename), so a crash never leaves half of one:

    best.safetensors         the trainable parameters only (a LoRA of GPT-2 124M: ~1 MB; full: ~480 MB);
                             final.safetensors when there is no best model to restore
    checkpoint.pt            trainable parameters + optimizer, scheduler, grad scaler, RNG states, step,
                             data position (epoch, micro-batch), early-stopping state and loss history
                             (a TrainState, stored as a plain dict)
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import asdict
from typing import Dict

import numpy as np
import torch

from gpt2lite.errors import CheckpointError
from gpt2lite.files import atomic_write, remove_stale_temporaries
from gpt2lite.training.state import TrainState

logger = logging.getLogger(__name__)
# a resumed run must cut the data into the same batches and follow the same schedule as the first
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "shuffle", "epochs", "max_steps", "warmup_steps",
                     "schedule")
# these may change on resume (a lower lr to continue more gently): the new values are used, and logged
RESUME_MAY_CHANGE = ("lr", "betas", "weight_decay")


def trainable_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters that require grad, by name (tied parameters once), detached, on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str = "checkpoint"):
    """Copy saved trainable parameters into `model`; the names must match its trainable parameters exactly."""
    parameters = dict(model.named_parameters())
    expected = {name for name, p in parameters.items() if p.requires_grad}
    missing, unexpected = expected - state.keys(), state.keys() - parameters.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: missing trainable {sorted(missing)[:5]}, unknown "
            f"{sorted(unexpected)[:5]}; build the model with the same method (adapters, frozen layers) first"
        )
    for name, tensor in state.items():
        if parameters[name].shape != tensor.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"expects {tuple(parameters[name].shape)}")
    from gpt2lite.training.fsdp import is_sharded, load_full_trainable

    if is_sharded(model):
        return load_full_trainable(model, state)
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def save_trainable(model: torch.nn.Module, path: str, world=None):
    """Write the trainable parameters to a safetensors file (atomically). With `world`, every rank calls
    it and rank 0 writes; the weights of a sharded (FSDP) model are gathered to it first."""
    from safetensors.torch import save_file

    from gpt2lite.training.fsdp import full_trainable_state_dict, is_sharded

    if world is not None and is_sharded(model):
        state = full_trainable_state_dict(model)
    elif world is None or world.is_main:
        state = trainable_state_dict(model)
    if world is not None and not world.is_main:
        return
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "content": "trainable"}))


def load_trainable(model: torch.nn.Module, path: str):
    """Load a file written by `save_trainable` into a model built the same way (same adapters)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"no trainable-weights file at {path}")
    load_trainable_state_dict(model, load_file(path), source=path)


def rng_state() -> dict:
    """The state of every random generator a training step draws from (dropout included), as tensors and
    plain containers, so that checkpoint.pt loads with torch.load(weights_only=True)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),  # (version, 625 ints, None)
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))  # weights_only loading may give lists for tuples
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, optimizer, scheduler, scaler, state: TrainState, config, world):
    """Write everything `resume` needs to continue bit for bit (rank 0 writes; every rank must call it)."""
    rng = [rng_state()]
    if world.distributed:  # every process has its own dropout RNG
        rng = [None] * world.world_size
        torch.distributed.all_gather_object(rng, rng_state())
    if world.is_main:
        checkpoint = {"trainable": trainable_state_dict(model), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                      "state": state.to_dict(), "config": asdict(config), "world_size": world.world_size}
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def resume(path: str, config, world, model, optimizer, scheduler, scaler) -> TrainState:
    """Load a checkpoint into the model, optimizer, scheduler, scaler and RNGs; return the loop's state."""
    checkpoint = load_checkpoint(path)
    if world.is_main:  # a run killed while saving left a temporary file beside its checkpoint
        remove_stale_temporaries(os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path)
    check_resumable(checkpoint, config, world)
    load_trainable_state_dict(model, checkpoint["trainable"], source=path)
    load_optimizer_and_scheduler(optimizer, scheduler, checkpoint, config, source=path)
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][world.rank])
    logger.info("resumed from %s at step %d (epoch %d)", path, checkpoint["state"]["step"],
                checkpoint["state"]["epoch"])
    return TrainState.from_dict(checkpoint["state"])


def check_resumable(checkpoint: dict, config, world):
    """Refuse a checkpoint whose run cut the data or followed the schedule differently."""
    for name in RESUME_MUST_MATCH:
        if checkpoint["config"][name] != getattr(config, name):
            raise CheckpointError(f"cannot resume: {name} was {checkpoint['config'][name]!r} in the checkpoint "
                                  f"and is {getattr(config, name)!r} now; use the same value")
    if checkpoint["world_size"] != world.world_size:
        raise CheckpointError(f"cannot resume a {checkpoint['world_size']}-process run with {world.world_size} "
                              "processes: the data would be split differently; run torchrun with "
                              f"--nproc_per_node (times --nnodes) = {checkpoint['world_size']}")


def load_optimizer_and_scheduler(optimizer, scheduler, checkpoint: dict, config, source: str, load_optimizer=None):
    """Load the optimizer's moments and the scheduler's position from `checkpoint`, but keep the lr, betas and
    weight decay that `optimizer` and `scheduler` were built with from `config`: loading their states alone
    would silently bring back the earlier run's values. The lr at the resumed step is then config.lr times
    the schedule's factor at that step."""
    chosen = [(group["initial_lr"], group["betas"], group["weight_decay"]) for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    for group, (lr, betas, weight_decay), lr_lambda in zip(optimizer.param_groups, chosen, scheduler.lr_lambdas):
        group.update(initial_lr=lr, betas=betas, weight_decay=weight_decay, lr=lr * lr_lambda(scheduler.last_epoch))
    scheduler.base_lrs = [lr for lr, _, _ in chosen]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    for name in RESUME_MAY_CHANGE:
        before, now = (_plain(value) for value in (checkpoint["config"][name], getattr(config, name)))
        if before != now:
            logger.warning("resuming %s with %s=%r; it was %r in the run that wrote it", source, name, now, before)


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint.pt written by the training loop (on the CPU). It holds only tensors and plain
    containers, so it is read with weights_only=True: a file that would run code when unpickled is refused."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; pass the checkpoint.pt an earlier run wrote in its output_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is not None:
            raise CheckpointError(
                f"{path} holds a Python object that is not a tensor or a plain container ({found.group(1)}); "
                "refused, because loading it could run code. A gpt2lite checkpoint.pt holds none: this file was "
                "written by another program (or by a gpt2lite from before checkpoints were made safe to load, "
                "which stored numpy arrays)") from None
        # a cut-off zip archive, bytes that are no pickle at all ("invalid load key"), an empty file
        raise CheckpointError(f"could not read {path} ({type(error).__name__}): the file is truncated or corrupted "
                              "(a run killed while writing or copying it?); resume from another checkpoint") from None
    if not isinstance(state, dict) or not {"trainable", "state", "config", "optimizer"} <= state.keys():
        raise CheckpointError(f"{path} is not a gpt2lite training checkpoint (no trainable weights, optimizer "
                              "and loop state); pass the checkpoint.pt that train() wrote in its output_dir")
    return state
