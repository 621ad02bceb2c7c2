"""Quantize while loading: `GPT2.from_pretrained(path, quantize="nf4")` never holds the float model.

The model is built on the meta device; the checkpoint is read one tensor at a time; each block linear is
materialised from its weight and bias and at once replaced by its 4-bit NF4Linear (gpt2lite.peft.qlora), so
its float weight is freed before the next is read. The embeddings, LayerNorms and anything else not
quantized are read last. Peak memory is about the 4-bit model plus one float layer (gpt2-xl: the float
checkpoint is 6.2 GB). The result equals from_pretrained followed by quantize_nf4, code for code.

safetensors files are memory-mapped: a file kept open counts every page read in the process's resident set
until it is closed, so each read opens the file anew. A pytorch_model.bin cannot be read in parts and is
loaded whole (a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from .config import GPT2Config
from .architectures import architecture, default_targets
from .dtypes import torch_dtype
from .errors import CheckpointError
from .hf import WEIGHT_FILES, hf_to_gpt2lite, model_for_checkpoint, read_state_dict, require_float_weight

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4",)


class CheckpointReader:
    """The tensors of a checkpoint directory, read one at a time, in gpt2lite's names and layout.

    `shapes` maps every gpt2lite key to its shape (read from the headers, no data); `get(key)` reads one.
    """

    def __init__(self, directory: str, arch):
        self.arch = arch
        self.directory = directory
        self.files: Dict[str, tuple] = {}  # gpt2lite key -> (safetensors file, checkpoint key)
        self.shapes: Dict[str, torch.Size] = {}
        self.loaded: Optional[Dict[str, torch.Tensor]] = None  # a .bin checkpoint, read whole
        files = safetensors_files(directory)
        if files is None:
            logger.warning("%s has no safetensors weights: reading the whole pytorch_model.bin before quantizing "
                           "(peak memory is the float model); save_pretrained() writes model.safetensors", directory)
            self.loaded = hf_to_gpt2lite(read_state_dict(directory), arch)
            self.shapes = {key: tensor.shape for key, tensor in self.loaded.items()}
            return
        from safetensors import safe_open

        for path in files:
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        shape = handle.get_slice(name).get_shape()
                        # hf_to_gpt2lite on a shape-only tensor: the renaming and transposition of the real one
                        for key, meta in hf_to_gpt2lite({name: torch.empty(shape, device="meta")}, arch).items():
                            self.files[key], self.shapes[key] = (path, name), meta.shape
            except Exception as error:
                raise CheckpointError(f"could not read {path}: {type(error).__name__}: {error}. The file is probably "
                                      "truncated or corrupted; delete it and download or save it again.") from None

    def get(self, key: str) -> torch.Tensor:
        """One tensor (gpt2lite name and layout), read from disk now."""
        if self.loaded is not None:
            tensor = self.loaded.pop(key)
        else:
            from safetensors import safe_open

            path, name = self.files[key]
            with safe_open(path, framework="pt") as handle:  # closed again: its pages leave the resident set
                tensor = hf_to_gpt2lite({name: handle.get_tensor(name)}, self.arch)[key]
        require_float_weight(key, tensor, self.directory)
        return tensor


def safetensors_files(directory: str) -> Optional[list]:
    """The safetensors file(s) of a checkpoint directory (one, or the shards of an index); None if it has
    only pytorch_model.bin weights."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path) or "safetensors" not in name:
            continue
        if not name.endswith(".index.json"):
            return [path]
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
        if missing:
            raise CheckpointError(f"{path} names the shard {missing[0]}, which is missing from {directory}")
        return [os.path.join(directory, shard) for shard in shards]
    return None


def load_quantized(cls, directory: str, config: GPT2Config, quantize: str, dtype=None, device=None,
                   num_labels: Optional[int] = None, compute_dtype=torch.float32, double_quant: bool = True):
    """`cls` from a checkpoint directory with every block linear in NF4, quantized while reading.

    dtype: of the tensors that stay float (embeddings, LayerNorms, biases), and of the weights as quantized,
    as from_pretrained(dtype=...) then quantize_nf4 would have them. compute_dtype ("float32", "bfloat16",
    "float16" or the torch dtype): the dtype the 4-bit layers compute in. double_quant: 8-bit block constants.
    """
    from .peft.qlora import quantize_nf4

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} (or None), got {quantize!r}")
    dtype, compute_dtype = torch_dtype(dtype), torch_dtype(compute_dtype)
    reader = CheckpointReader(directory, architecture(config.model_type))
    model, keys, new, tied = model_for_checkpoint(cls, config, directory, reader.shapes, num_labels)
    for name in sorted(_quantized_layers(model), key=_module_order(model)):
        layer = model.get_submodule(name)
        tensors = {f"{name}.{p}": reader.get(f"{name}.{p}") for p, _ in layer.named_parameters(recurse=False)}
        _assign(model, tensors, dtype, device)  # one float layer, replaced by its 4-bit self just below
        quantize_nf4(model, targets=[name], compute_dtype=compute_dtype, double_quant=double_quant)
        keys = [key for key in keys if key not in tensors]
    _assign(model, {**{key: reader.get(key) for key in keys}, **new}, dtype, device)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:  # a tensor the model has but neither the checkpoint nor quantization provided
        raise CheckpointError(f"{directory!r} left {still_meta[:4]} unset; is it a {cls.__name__} checkpoint?")
    return model.eval()


def _quantized_layers(model: nn.Module) -> list:
    """Names of the linears quantize_nf4 would replace by default (the blocks' linear layers)."""
    from .peft.inject import find_targets

    return find_targets(model, default_targets(model, "quantize"))


def _module_order(model: nn.Module):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return order.__getitem__


def _assign(model: nn.Module, tensors: Dict[str, torch.Tensor], dtype, device):
    """Put checkpoint tensors into the (meta) model, converted as hf.load_pretrained converts them."""
    state = {key: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
             for key, t in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
