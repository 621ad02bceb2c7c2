"""Shard while loading: a QLoRA (LoRA, full) model whose every rank holds only its shards, never the whole model.

`load_sharded(path, method, precision)`, called on every rank under torchrun, builds the model on the meta
device, quantizes its block linears there (shapes only), adds the method's adapters, and applies
fsdp.shard_model, still on meta. `to_empty` then allocates each rank's shards, and only those; the tensors
are filled one at a time in module order: a block linear's float weight is read from the checkpoint,
quantized, and each rank copies its part of the codes and constants into its shards; other tensors are read
and cut the same way; LoRA's A and B are initialised as add_lora would (same random draws, in the same
order), then cut. So a rank holds its shards plus one float layer and its quantization at any moment
(gpt2-xl: ~0.5 GB of shards for 2 ranks, and a 6.6M-weight c_fc of 26 MB). The result is what
from_pretrained(quantize="nf4"), apply(method) and shard_model would have made, shard for shard.

Pass the model to train() with TrainConfig(strategy="fsdp"): it is trained as it is (not sharded again).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from gpt2lite.dtypes import torch_dtype
from gpt2lite.hub.pretrained import read_config, resolve
from gpt2lite.hub.weights import CheckpointReader, model_for_checkpoint
from gpt2lite.model.architectures import architecture, default_targets
from gpt2lite.model.gpt2 import GPT2
from gpt2lite.model.surgery import find_targets, replace_modules
from gpt2lite.peft.methods import MethodConfig, apply
from gpt2lite.quantization.linear import NF4Linear
from gpt2lite.quantization.nf4 import dynamic_map, nf4_codebook
from gpt2lite.training import fsdp


def load_sharded(name_or_path: str, method, precision: str = "fp32", cls=None, dtype=None, device="cpu",
                 reshard_after_forward: bool = True, on_tensor: Optional[Callable[[str], None]] = None):
    """The sharded `cls` (default GPT2) from a checkpoint with `method` (a MethodConfig or its dict: "qlora",
    "lora" or "full") applied; every rank must call it, in a process group. on_tensor(name) is called after each
    tensor is filled (memory accounting in tests and benchmarks)."""
    method = MethodConfig.from_value(method)
    if method.name not in ("qlora", "lora", "full") or method.dora:
        raise ValueError(f"load_sharded supports the 'qlora', 'lora' (no DoRA) and 'full' methods, got "
                         f"{method.name!r}; load the model whole and let train(strategy='fsdp') shard it")
    directory = resolve(name_or_path)
    config = read_config(directory)
    reader = CheckpointReader(directory, architecture(config.model_type))
    model, keys, new, tied = model_for_checkpoint(cls or GPT2, config, directory, reader.shapes)
    if method.name == "qlora":
        quantize_on_meta(model, torch_dtype(method.compute_dtype), method.double_quant)
    apply(model, method)  # finds the 4-bit layers and keeps them; adapters on meta
    fsdp.shard_model(model, precision, reshard_after_forward)
    model.to_empty(device=device)
    fill_shards(model, TensorSource(reader, set(keys), new, torch_dtype(dtype)), on_tensor)
    return model.eval()


def quantize_on_meta(model: nn.Module, compute_dtype, double_quant: bool):
    """Replace the block linears by NF4Linear layers on the meta device (their codes' shapes and dtypes)."""
    names = find_targets(model, default_targets(model, "quantize"))
    replace_modules(model, names, lambda name, linear: NF4Linear(linear, compute_dtype, double_quant))


class TensorSource:
    """The whole value of each tensor of the model, one at a time: from the checkpoint, quantized from it
    (a 4-bit layer's codes, computed once per layer), a new head, or a LoRA initialisation."""

    def __init__(self, reader, keys: set, new: Dict[str, torch.Tensor], dtype):
        self.reader, self.keys, self.new, self.dtype = reader, keys, new, dtype
        self.layer_name, self.layer = None, None  # the 4-bit layer quantized last
        self.lora_name, self.lora_b = None, None

    def read(self, key: str) -> torch.Tensor:
        tensor = self.new[key] if key in self.new else self.reader.get(key)
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def quantized(self, layer_name: str, layer: nn.Module) -> nn.Module:
        """A real NF4Linear with the layer's codes, its constants held as bytes as in the sharded layer."""
        if self.layer_name != layer_name:
            key = layer_name[: -len(".base_layer")] if layer_name.endswith(".base_layer") else layer_name
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = nn.Parameter(self.read(f"{key}.weight"))
            if layer.bias is not None:
                linear.bias = nn.Parameter(self.read(f"{key}.bias"))
            self.layer_name, self.layer = layer_name, None  # the previous layer is freed first
            self.layer = NF4Linear(linear, layer.compute_dtype, layer.double_quant).hold_codes_as_parameters()
        return self.layer

    def lora(self, module_name: str, module: nn.Module, which: str) -> torch.Tensor:
        """lora_A / lora_B as add_lora draws them: both nn.Linear initialisations, then Kaiming A, zero B."""
        if self.lora_name != module_name:
            a = nn.Linear(module.in_features, module.rank, bias=False, dtype=module.lora_A.weight.dtype)
            b = nn.Linear(module.rank, module.out_features, bias=False, dtype=module.lora_B.weight.dtype)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            self.lora_name, self.lora_a, self.lora_b = module_name, a.weight.detach(), torch.zeros_like(b.weight)
        return self.lora_a if which == "lora_A" else self.lora_b

    def value(self, model: nn.Module, module_name: str, module: nn.Module, name: str) -> torch.Tensor:
        full = f"{module_name}.{name}" if module_name else name
        if hasattr(module, "hold_codes_as_parameters"):  # a 4-bit layer: codes, constants, bias
            return getattr(self.quantized(module_name, module), name).detach()
        parent_name, _, child = module_name.rpartition(".")
        if child in ("lora_A", "lora_B"):
            return self.lora(parent_name, model.get_submodule(parent_name), child)
        if full in self.keys or full in self.new:
            return self.read(full)
        raise ValueError(f"load_sharded does not know how to fill {full}; load the model whole and let "
                         "train(strategy='fsdp') shard it")


@torch.no_grad()
def fill_shards(model: nn.Module, source: TensorSource, on_tensor=None):
    """Fill every rank's shards (and the replicated buffers), one whole tensor at a time."""
    done = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in done:  # tied: lm_head.weight is transformer.wte.weight
                continue
            whole = source.value(model, module_name, module, name).to(param.dtype)
            local = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
            done.add(id(param))
            if on_tensor is not None:
                on_tensor(f"{module_name}.{name}")
        if hasattr(module, "hold_codes_as_parameters"):
            module.codebook.copy_(nf4_codebook())
            module.absmax_levels.copy_(dynamic_map())
            if module.double_quant:
                module.absmax_offset.copy_(source.quantized(module_name, module).absmax_offset)
        elif any(True for _ in module.buffers(recurse=False)):
            raise ValueError(f"load_sharded cannot fill the buffers of {module_name}")
    source.layer = None
    if not all(isinstance(p, DTensor) for p in model.parameters()):
        raise RuntimeError("load_sharded left a parameter unsharded")
