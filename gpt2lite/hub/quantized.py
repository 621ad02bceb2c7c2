"""Quantize while loading: `GPT2.from_pretrained(path, quantize="nf4")` never holds the float model.

The model is built on the meta device; the checkpoint is read one tensor at a time; each block linear is
materialised from its weight and bias and at once replaced by its 4-bit NF4Linear (gpt2lite.quantization.linear), so
its float weight is freed before the next is read. The embeddings, LayerNorms and anything else not
quantized are read last. Peak memory is about the 4-bit model plus one float layer (gpt2-xl: the float
checkpoint is 6.2 GB). The result equals from_pretrained followed by quantize_nf4, code for code.

The checkpoint is read through hf_weights.CheckpointReader (a tensor at a time; a pytorch_model.bin is
loaded whole, with a warning).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.nn as nn

from gpt2lite.model.config import GPT2Config
from gpt2lite.model.architectures import architecture, default_targets
from gpt2lite.dtypes import torch_dtype
from gpt2lite.errors import CheckpointError
from gpt2lite.hub.weights import CheckpointReader, model_for_checkpoint
from gpt2lite.model.surgery import find_targets
from gpt2lite.quantization.linear import quantize_nf4

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4",)


def load_quantized(cls, directory: str, config: GPT2Config, quantize: str, dtype=None, device=None,
                   num_labels: Optional[int] = None, compute_dtype=torch.float32, double_quant: bool = True):
    """`cls` from a checkpoint directory with every block linear in NF4, quantized while reading.

    dtype: of the tensors that stay float (embeddings, LayerNorms, biases), and of the weights as quantized,
    as from_pretrained(dtype=...) then quantize_nf4 would have them. compute_dtype ("float32", "bfloat16",
    "float16" or the torch dtype): the dtype the 4-bit layers compute in. double_quant: 8-bit block constants.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} (or None), got {quantize!r}")
    dtype, compute_dtype = torch_dtype(dtype), torch_dtype(compute_dtype)
    reader = CheckpointReader(directory, architecture(config.model_type))
    if reader.loaded is not None:
        logger.warning("%s has no safetensors weights: reading the whole pytorch_model.bin before quantizing "
                       "(peak memory is the float model); save_pretrained() writes model.safetensors", directory)
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
    return find_targets(model, default_targets(model, "quantize"))


def _module_order(model: nn.Module):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return order.__getitem__


def _assign(model: nn.Module, tensors: Dict[str, torch.Tensor], dtype, device):
    """Put checkpoint tensors into the (meta) model, converted as hf.load_pretrained converts them."""
    state = {key: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
             for key, t in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
