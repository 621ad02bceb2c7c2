"""What a traced step held: the storages' records summed into parts (weights, gradients, optimizer state,
activations, loss buffers, temporaries) at the step's peak (see trace.py for how they are recorded)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch


@dataclass
class Storage:
    nbytes: int
    made: int  # the operation counter when it was made
    phase: str
    key: int  # the StorageImpl's address (reused once it is freed)
    freed: float = math.inf


@dataclass
class StepTrace:
    """What one traced step held, in bytes: see parts()."""

    peak_bytes: int
    parts_at_peak: Dict[str, int]
    weights_float: int
    weights_4bit: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward at the end of the forward pass (the loss's own buffers apart)
    loss_buffers: int
    trainable_params: int
    total_params: int
    operations: int
    storages: List[Storage] = field(default_factory=list, repr=False)  # every storage of the trace, in order
    built: int = 0  # the clock when the model was built: storages made before and alive then are its weights
    repeated: set = field(default_factory=set, repr=False)  # ids of the records a later step makes again (grads)
    kept: set = field(default_factory=set, repr=False)  # ids of the records a later step holds from its start


def storage_keys(tensors) -> set:
    return {t.untyped_storage()._cdata for t in tensors if t is not None}


def model_tensors(model: torch.nn.Module):
    """(float parameters and buffers, 4-bit layers' buffers)."""
    from gpt2lite.quantization.linear import nf4_layers

    quantized = storage_keys(b for layer in nf4_layers(model).values() for b in layer.buffers())
    tensors = list(model.parameters()) + list(model.buffers())
    return [t for t in tensors if storage_keys([t]) - quantized], [t for t in tensors if storage_keys([t]) & quantized]


def summarize(tracker, marks: dict, model, floats, quantized, trainable, state, gradients) -> StepTrace:
    """The step's parts and its peak. The first step makes AdamW's state at its end; every later step holds
    it from the start, so the forward and backward passes' peak is counted with the state's bytes added."""
    from gpt2lite.model.gpt2 import count_parameters

    def records(tensors) -> set:  # the records of storages alive now
        return {id(tracker.live_storages[key]) for key in storage_keys(tensors) if key in tracker.live_storages}

    state_bytes = sum(t.untyped_storage().nbytes() for t in state)
    weights, gradient_records, state_records = records(floats + quantized), records(p.grad for p in trainable), records(state)
    at_forward_end = live_at(tracker.storages, marks["forward_end"])
    passes_end = marks.get("backward_end", marks["forward_end"])
    passes_clock, passes_peak = peak_until(tracker.storages, passes_end)
    if passes_peak + state_bytes >= tracker.peak:  # a later step's forward and backward, with the state held
        peak, live, state_at_peak = passes_peak + state_bytes, live_at(tracker.storages, passes_clock), state_bytes
    else:  # the optimizer's update
        peak, live = tracker.peak, live_at(tracker.storages, tracker.peak_clock)
        state_at_peak = sum(r.nbytes for r in live if id(r) in state_records)
    parts = {"weights": sum(r.nbytes for r in live if id(r) in weights),
             "gradients": sum(r.nbytes for r in live if id(r) in gradient_records),
             "optimizer_state": state_at_peak,
             "activations": sum(r.nbytes for r in live if r.phase == "forward" and id(r) not in weights),
             "loss_buffers": sum(r.nbytes for r in live if r.phase == "loss")}
    parts["temporaries"] = peak - sum(parts.values())
    trainable_count, total = count_parameters(model)
    return StepTrace(peak, parts, sum(t.untyped_storage().nbytes() for t in floats),
                     sum(t.untyped_storage().nbytes() for t in quantized), gradients, state_bytes,
                     sum(r.nbytes for r in at_forward_end if r.phase == "forward" and id(r) not in weights),
                     sum(r.nbytes for r in at_forward_end if r.phase == "loss"), trainable_count, total, tracker.clock,
                     tracker.storages, marks["built"], gradient_records, state_records)


def live_at(storages: List[Storage], clock: int) -> List[Storage]:
    return [r for r in storages if r.made <= clock < r.freed]


def peak_until(storages: List[Storage], end: int):
    """(the clock, the bytes) of the largest sum of live storages among those made up to `end`."""
    events = sorted([(r.made, r.nbytes) for r in storages if r.made <= end]
                    + [(r.freed, -r.nbytes) for r in storages if r.freed <= end])
    live = best = best_clock = 0
    for clock, change in events:
        live += change
        if live > best:
            best, best_clock = live, clock
    return best_clock, best


