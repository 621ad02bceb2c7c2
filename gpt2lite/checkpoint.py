"""Training checkpoints: the trainable weights alone, and everything needed to resume bit for bit.

Two files, each written atomically (temporary file, then rename), so a crash never leaves half of one:

    best.safetensors         the trainable parameters only (a LoRA of GPT-2 124M: ~1 MB; full: ~480 MB);
                             final.safetensors when there is no best model to restore
    checkpoint.pt            trainable parameters + optimizer, scheduler, grad scaler, RNG states, step,
                             data position (epoch, micro-batch), early-stopping state and loss history
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict
from typing import Dict

import numpy as np
import torch

from .hf import CheckpointError, atomic_write

logger = logging.getLogger(__name__)
# a resumed run must cut the data into the same batches and follow the same schedule as the first
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "shuffle", "epochs", "max_steps", "warmup_steps",
                     "schedule")


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
    with torch.no_grad():
        for name, tensor in state.items():
            if parameters[name].shape != tensor.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"expects {tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)


def save_trainable(model: torch.nn.Module, path: str):
    """Write the trainable parameters to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    state = trainable_state_dict(model)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "content": "trainable"}))


def load_trainable(model: torch.nn.Module, path: str):
    """Load a file written by `save_trainable` into a model built the same way (same adapters)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"no trainable-weights file at {path}")
    load_trainable_state_dict(model, load_file(path), source=path)


def rng_state() -> dict:
    """The state of every random generator a training step draws from (dropout included)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, optimizer, scheduler, scaler, state: dict, config, world):
    """Write everything `resume` needs to continue bit for bit (rank 0 writes; every rank must call it)."""
    rng = [rng_state()]
    if world.distributed:  # every process has its own dropout RNG
        rng = [None] * world.world_size
        torch.distributed.all_gather_object(rng, rng_state())
    if world.is_main:
        checkpoint = {"trainable": trainable_state_dict(model), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                      "state": state, "config": asdict(config), "world_size": world.world_size}
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def resume(path: str, config, world, model, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint into the model, optimizer, scheduler, scaler and RNGs; return the loop's state."""
    checkpoint = load_checkpoint(path)
    for name in RESUME_MUST_MATCH:
        if checkpoint["config"][name] != getattr(config, name):
            raise CheckpointError(f"cannot resume: {name} was {checkpoint['config'][name]!r} in the checkpoint "
                                  f"and is {getattr(config, name)!r} now; use the same value")
    if checkpoint["world_size"] != world.world_size:
        raise CheckpointError(f"cannot resume a {checkpoint['world_size']}-process run with {world.world_size} "
                              "processes: the data would be split differently")
    load_trainable_state_dict(model, checkpoint["trainable"], source=path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][world.rank])
    logger.info("resumed from %s at step %d (epoch %d)", path, checkpoint["state"]["step"],
                checkpoint["state"]["epoch"])
    return checkpoint["state"]


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint.pt written by the training loop (on the CPU)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; pass the checkpoint.pt an earlier run wrote in its output_dir")
    # weights_only=False: the state holds python/numpy RNG states (our own file, not an untrusted download)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "trainable" not in state or "state" not in state:
        raise CheckpointError(f"{path} is not a gpt2lite training checkpoint")
    return state
