"""The little that torchrun/DistributedDataParallel needs: set-up from the environment, rank helpers, sums.

`torchrun --nproc_per_node N script.py` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE set; the
training loop calls `join_world()` and works unchanged with one process (no environment: world of 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_world(device_type: str) -> World:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA); a world of 1 otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size())


def all_reduce_sum(values: Sequence[float], world: World, device) -> List[float]:
    """Sum a few numbers over all processes (one collective); a no-op for a single process."""
    return all_reduce_numbers(values, world, device, "sum")


def all_reduce_max(values: Sequence[float], world: World, device) -> List[float]:
    """The largest of a few numbers over all processes (one collective); a no-op for a single process."""
    return all_reduce_numbers(values, world, device, "max")


def all_reduce_numbers(values: Sequence[float], world: World, device, op: str) -> List[float]:
    """A few numbers reduced ("sum" or "max") over all processes in one float64 collective."""
    if not world.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def shard(indices: Sequence[int], world: World, pad: bool = True) -> List[int]:
    """This rank's share of an index order: every world_size-th index, starting at the rank.

    With pad=True the order is first extended by repeating its start (as DistributedSampler does), so
    every rank gets as many indices and takes as many optimizer steps; evaluation uses pad=False so no
    example is counted twice.
    """
    indices = list(indices)
    if not world.distributed:
        return indices
    if pad and len(indices) % world.world_size:
        missing = world.world_size - len(indices) % world.world_size
        indices += (indices * (missing // max(len(indices), 1) + 1))[:missing]
    return indices[world.rank::world.world_size]
