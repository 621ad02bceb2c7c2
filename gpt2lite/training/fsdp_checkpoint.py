"""Sharded training checkpoints of strategy="fsdp" runs, through torch.distributed.checkpoint (DCP).

    checkpoint-shards/       in config.output_dir, instead of checkpoint.pt
        __0_0.distcp, ...    each rank's shards of the trainable parameters and of AdamW's moments
        .metadata            DCP's index of them (written by rank 0 once every rank has written)
        meta.pt              scheduler, grad scaler, every rank's RNG states, the loop's TrainState, the
                             config and the world size (rank 0; loads with torch.load(weights_only=True))

Frozen parameters (a LoRA or QLoRA base) are not saved: the resumed run rebuilds them as the first did.
A checkpoint is written into checkpoint-shards.tmp and then renamed into place (the previous one moved to
checkpoint-shards.old for the moment between the two renames, and read from there if a crash left only it),
so a run killed while saving never leaves half of one. Resuming on the same world size continues bit for
bit; on another it is refused, as for checkpoint.pt, since the data would be split differently.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist

from gpt2lite.training.checkpoint import check_resumable, load_optimizer_and_scheduler, rng_state, set_rng_state
from gpt2lite.errors import CheckpointError
from gpt2lite.training.state import TrainState

logger = logging.getLogger(__name__)
SHARDS = "checkpoint-shards"


def state_dicts(model, optimizer):
    """The trainable parameters' and the optimizer's sharded state dicts (DTensors), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded(directory: str, model, optimizer, scheduler, scaler, state: TrainState, config, world):
    """Write checkpoint-shards/ (every rank must call it)."""
    import torch.distributed.checkpoint as dcp

    rng = [None] * world.world_size
    dist.all_gather_object(rng, rng_state())
    temporary = directory + ".tmp"
    if world.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    dist.barrier()
    model_state, optimizer_state = state_dicts(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary)
    if world.is_main:  # dcp.save returns on rank 0 after every rank's shards and the index are written
        meta = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                "state": state.to_dict(), "config": asdict(config), "world_size": world.world_size}
        torch.save(meta, os.path.join(temporary, "meta.pt"))
        replace_directory(temporary, directory)
    dist.barrier()


def replace_directory(new: str, target: str):
    """Put directory `new` at `target`, replacing the one there with no moment where neither exists."""
    old = target + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(target):
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def sharded_checkpoint_at(path: str) -> Optional[str]:
    """The checkpoint-shards directory that `path` (it, or the output_dir holding it) names, or None."""
    candidates = [path] if os.path.basename(os.path.normpath(path)).startswith(SHARDS) else []
    candidates += [os.path.join(path, SHARDS), os.path.join(path, SHARDS + ".old")]
    return next((c for c in candidates if os.path.isfile(os.path.join(c, "meta.pt"))), None)


def resume_sharded(path: str, config, world, model, optimizer, scheduler, scaler) -> TrainState:
    """Load a checkpoint-shards directory into the sharded model, optimizer, scheduler, scaler and RNGs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    directory = sharded_checkpoint_at(path)
    if directory is None:
        hint = (" (it holds a checkpoint.pt of a DDP or one-process run: resume it with strategy='ddp')"
                if os.path.exists(os.path.join(path, "checkpoint.pt")) or path.endswith(".pt") else "")
        raise CheckpointError(f"no sharded checkpoint ({SHARDS}/ with meta.pt) at {path}{hint}; pass the "
                              "output_dir of an earlier strategy='fsdp' run")
    meta = torch.load(os.path.join(directory, "meta.pt"), map_location="cpu", weights_only=True)
    check_resumable(meta, config, world)
    model_state, optimizer_state = state_dicts(model, optimizer)
    shards = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(shards, checkpoint_id=directory)  # in place, into this rank's shards

    def load_optimizer(saved):
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=saved,
                       options=StateDictOptions(ignore_frozen_params=True))

    checkpoint = {**meta, "optimizer": shards["optimizer"]}
    load_optimizer_and_scheduler(optimizer, scheduler, checkpoint, config, source=directory,
                                 load_optimizer=load_optimizer)
    scaler.load_state_dict(meta["scaler"])
    set_rng_state(meta["rng"][world.rank])
    logger.info("resumed from %s at step %d (epoch %d)", directory, meta["state"]["step"], meta["state"]["epoch"])
    return TrainState.from_dict(meta["state"])
