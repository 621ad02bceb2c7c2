"""FSDP2 sharding for TrainConfig(strategy="fsdp") under torchrun: each rank holds 1/world_size of the weights,
gradients and optimizer state instead of all of them (DDP).

`shard_model` applies torch.distributed.fsdp.fully_shard to each transformer block and then to the root
(embeddings, final LayerNorm, tied LM head, soft prompt or prefix, classifier head), with a
MixedPrecisionPolicy from the run's precision (bf16 or fp16 parameters and compute, fp32 gradient
reduction; fp32 runs unchanged). Every parameter becomes a DTensor sharded on dim 0; a block's are
all-gathered just before its forward (and again before its backward when reshard_after_forward), its
gradients reduce-scattered after its backward. Frozen parameters (a LoRA base, frozen layers) are sharded
too, and never get gradients.

QLoRA: the 4-bit base's packed codes and block constants are buffers, which fully_shard would replicate.
`shard_model` first calls NF4Linear.hold_codes_as_parameters: the codes become frozen uint8 parameters
and the float constants their bytes, so they are sharded and all-gathered as uint8 (a mixed-precision
policy casts floating parameters only): no rank ever holds a float copy of a quantized weight, and the
float weight exists, as on one process, only inside one layer's matmul. This was chosen over a tensor
subclass such as torchao's NF4Tensor (which implements the aten ops FSDP2 calls on a parameter: chunk,
split, view, copy_, the all-gather extension hooks fsdp_pre_all_gather / fsdp_post_all_gather): plain
uint8 parameters need no dispatch code at all, the layer's forward and dequantization stay those of one
process, and its state-dict keys are unchanged. The price: a parameter sharded on dim 0 is cut at any
byte, so a rank's shard is not dequantizable by itself, which FSDP never needs (it all-gathers first).

The loop's other needs: gradient accumulation without a reduce-scatter on non-final micro-batches
(`gradient_sync`), clipping by the global norm over all shards (`clip_grad_norm`), the full trainable
weights gathered to rank 0 for best/final.safetensors (`full_trainable_state_dict`) and loaded back
(`load_full_trainable`), and at the end `consolidate`, which gathers the full model back onto every rank
as a plain module, so that exporting it (save_pretrained, save_adapter) works as after one process.
Sharded checkpoints: fsdp_checkpoint.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, Iterable

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)
STRATEGIES = ("ddp", "fsdp")


def dtensor_class():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    dtensor = dtensor_class()
    return any(isinstance(p, dtensor) for p in model.parameters())


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, each of which becomes one FSDP unit."""
    body = getattr(model, "transformer", None)
    blocks = getattr(body, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"strategy='fsdp' shards a gpt2lite model's transformer.h blocks; {type(model).__name__} "
                         "has none. Use strategy='ddp'")
    return blocks


def mixed_precision(precision: str):
    """bf16/fp16 parameters and compute with fp32 gradient reduction; fp32: no casting."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)


def shard_model(model: nn.Module, precision: str, reshard_after_forward: bool = True,
                cpu_offload: bool = False) -> nn.Module:
    """fully_shard each block, then the root, in place (after the model is on its device); returns the model."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from gpt2lite.quantization.linear import nf4_layers

    if cpu_offload and next(model.parameters()).device.type != "cuda":
        raise ValueError("fsdp_cpu_offload=True keeps the shards of a CUDA run in CPU memory; this run is on the "
                         "CPU already, where they are: set fsdp_cpu_offload=False")
    for layer in nf4_layers(model).values():
        layer.hold_codes_as_parameters()
    options = dict(mp_policy=mixed_precision(precision), reshard_after_forward=reshard_after_forward,
                   offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in blocks_of(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: without sync, gradients accumulate locally (DDP's no_sync,
    FSDP's set_requires_gradient_sync(False)); with it, they are all-reduced or reduce-scattered."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` by the norm over every gradient of every rank; returns that norm. With sharded
    gradients the local norms are DTensors whose full_tensor() all-reduces their squares."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
    if isinstance(total, dtensor_class()):
        total = total.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


def full_trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable parameters, gathered whole on rank 0 (on the CPU); {} on the other ranks. Every rank
    must call it (one all-gather per tensor)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    return {name: tensor.contiguous() for name, tensor in state.items() if name in names}


def load_full_trainable(model: nn.Module, state: Dict[str, torch.Tensor]):
    """Copy whole trainable tensors (the same on every rank) into their shards."""
    from torch.distributed.tensor import distribute_tensor

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            param = parameters[name]
            tensor = tensor.to(param.device, param.dtype)
            param.copy_(distribute_tensor(tensor, param.device_mesh, param.placements))


@torch.no_grad()
def consolidate(model: nn.Module) -> nn.Module:
    """Undo shard_model in place: every parameter gathered whole onto every rank as a plain parameter (tied
    ones stay one), the FSDP hooks, classes and states removed, a 4-bit base's codes back in buffers, so that
    the model can be exported, evaluated or sharded again as a plain one. Every rank must call it."""
    from torch.distributed.fsdp import FSDPModule

    from gpt2lite.quantization.linear import nf4_layers

    dtensor, gathered = dtensor_class(), {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, dtensor):
                if id(param) not in gathered:
                    gathered[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                setattr(module, name, gathered[id(param)])
    for module in list(model.modules()):
        if isinstance(module, FSDPModule):
            strip_fsdp(module)
        for attribute in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(attribute, None)
    for layer in nf4_layers(model).values():
        layer.hold_codes_as_parameters(False)
    return model


def strip_fsdp(module: nn.Module):
    """Remove what fully_shard added to one module: its forward hooks, its FSDP class, its composable state."""
    import importlib

    from torch.distributed.fsdp import FSDPModule, fully_shard

    state = fully_shard.state(module)
    for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)}.values():
        handle.remove()
    module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
    for key in [key for key in module.__dict__ if key.startswith("__composable_api_state_key")]:
        del module.__dict__[key]
    # torch keeps a module -> state map, and refuses a second fully_shard of a module found in it
    importlib.import_module("torch.distributed._composable_state")._module_state_mapping.pop(module, None)
