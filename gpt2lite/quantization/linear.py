"""Linear layers whose weights are stored in 4-bit NF4 and dequantized on the fly: QLoRA's frozen base.

`quantize_nf4(model)` replaces the matching nn.Linear layers by `NF4Linear`; peft's add_lora then wraps each
in a LoRA4bitLinear or DoRA4bitLinear (peft/lora/quantized.py). The packed codes and constants are buffers,
not parameters, so no optimizer can touch them; the bias stays a frozen float parameter. Quantization is a
property of the base model (from_pretrained(..., quantize="nf4") builds it), not of an adapter.

The float weight lives only while a matmul needs it, as in bitsandbytes' 4-bit matmul: forward dequantizes
it, multiplies and drops it; backward dequantizes it again for the input gradient (the frozen weight has no
gradient of its own). Autograd keeps nothing of the layer between the two but a reference to its buffers,
so training holds the weights in 4 bits, not a float copy of every layer until backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lite.model.architectures import default_targets
from gpt2lite.dtypes import DTYPES
from gpt2lite.kernels import is_plain_linear
from gpt2lite.model.surgery import find_targets, replace_modules
from gpt2lite.quantization.nf4 import (NF4_BLOCK_SIZE, NF4Tensor, QuantizedAbsmax, dequantize_nf4_tensor, dynamic_map,
                                       nf4_codebook, quantize_nf4_tensor)

COMPUTE_DTYPES = tuple(DTYPES.values())  # the 4-bit layers dequantize into one of these


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight (out_features, in_features): about 0.5 byte per weight.

    forward(x) dequantizes the weight into `compute_dtype`, computes x W^T + b in that dtype and returns
    the result in x's dtype.
    """

    def __init__(self, linear: nn.Linear, compute_dtype=torch.float32, double_quant: bool = True,
                 block_size: int = NF4_BLOCK_SIZE):
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = compute_dtype
        self.double_quant = double_quant
        quantized = quantize_nf4_tensor(linear.weight, double_quant, block_size)
        self.register_buffer("weight_packed", quantized.packed)
        if double_quant:
            self.register_buffer("absmax_codes", quantized.quantized_absmax.codes)
            self.register_buffer("absmax_scale", quantized.quantized_absmax.scale)
            self.register_buffer("absmax_offset", quantized.quantized_absmax.offset)
        else:
            self.register_buffer("absmax", quantized.absmax)
        # the lookup tables travel with .to(device) but are rebuilt, not stored, in state_dict
        self.register_buffer("codebook", nf4_codebook().to(linear.weight.device), persistent=False)
        self.register_buffer("absmax_levels", dynamic_map().to(linear.weight.device), persistent=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.linear = F.linear  # a kernel slot (gpt2lite.kernels): the product with the dequantized weight
        self.held_as_bytes = {}  # {name: float dtype} of constants held as uint8 parameters (FSDP2)

    def quantized(self) -> NF4Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        if self.double_quant:
            absmax = QuantizedAbsmax(self.absmax_codes, self.stored("absmax_scale"), self.absmax_offset)
            return NF4Tensor(self.weight_packed, None, absmax, shape)
        return NF4Tensor(self.weight_packed, self.stored("absmax"), None, shape)

    def stored(self, name: str) -> torch.Tensor:
        """A stored tensor as quantize_nf4_tensor made it: a float constant held as bytes is viewed back."""
        tensor = getattr(self, name)
        dtype = self.held_as_bytes.get(name)
        return tensor if dtype is None else tensor.view(dtype)

    def hold_codes_as_parameters(self, as_parameters: bool = True):
        """Hold the quantized weight in frozen uint8 parameters instead of buffers (as_parameters=False: back).

        FSDP2's fully_shard shards parameters only (buffers are replicated on every rank), so a sharded
        QLoRA base holds its codes and block constants as parameters (requires_grad=False), and float
        constants (the absmax scales) as their bytes: fully_shard then shards every one of them and
        all-gathers it as uint8, which a mixed-precision policy never casts (it casts floating parameters
        only), so no rank ever holds a float copy of a quantized weight. The 0-d absmax_offset stays a
        replicated buffer (4 bytes; a 0-d tensor cannot be sharded). `stored()` views the bytes back.
        """
        for name in ("weight_packed", "absmax_codes", "absmax_scale", "absmax"):
            tensor = getattr(self, name, None)
            if tensor is None or isinstance(tensor, nn.Parameter) == as_parameters:
                continue
            tensor = tensor.detach()
            delattr(self, name)
            if as_parameters:
                if tensor.is_floating_point():
                    self.held_as_bytes[name], tensor = tensor.dtype, tensor.contiguous().view(torch.uint8)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                dtype = self.held_as_bytes.pop(name, None)
                self.register_buffer(name, tensor if dtype is None else tensor.view(dtype))
        return self

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: compute_dtype)."""
        return dequantize_nf4_tensor(self.quantized(), dtype or self.compute_dtype, self.codebook,
                                     self.absmax_levels)

    def forward(self, x):
        """x (..., in) -> (..., out) in x's dtype; the matmul runs in compute_dtype, or autocast's dtype."""
        return DequantizingLinear.apply(x, self.bias, self)

    def num_quantized_parameters(self) -> int:
        """Weights held in the buffers, so that count_parameters includes them in the total."""
        return self.in_features * self.out_features

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight: packed codes plus block constants."""
        stored = [*self.buffers(recurse=False), *(p for p in self.parameters(recurse=False) if p is not self.bias)]
        return sum(t.numel() * t.element_size() for t in stored
                   if t is not self.codebook and t is not self.absmax_levels)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, double_quant={self.double_quant}")


class DequantizingLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 in forward and again in backward, never saved for backward.

    The matmul dtype is compute_dtype, or autocast's dtype when autocast is on for x's device (what autocast
    would have made of an F.linear); the output is cast back to x's dtype. Gradients: x's (always, through W)
    and the bias's when it trains (LoRA's bias="all"); the 4-bit weight is frozen.
    """

    @staticmethod
    def forward(ctx, x, bias, layer: "NF4Linear"):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else layer.compute_dtype
        ctx.layer, ctx.dtype, ctx.input_dtype = layer, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(device_type, enabled=False):
            weight = layer.dequantize(dtype)  # (out, in), freed on return
            out = layer.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))  # (..., out)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        grad = grad_out.to(ctx.dtype)  # (..., out)
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantize(ctx.dtype)  # (out, in), dequantized again
            grad_x = (grad @ weight).to(ctx.input_dtype)  # (..., in)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.size(-1)).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, grad_bias, None


def quantize_nf4(model: nn.Module, targets: Optional[Sequence[str]] = None, compute_dtype=torch.float32,
                 double_quant: bool = True, block_size: int = NF4_BLOCK_SIZE) -> list[str]:
    """Replace every nn.Linear whose name matches a pattern in `targets` ("c_attn", "attn.c_proj", ...,
    matched as peft does: the whole name or a dotted suffix) by an NF4Linear; by default every linear layer
    of the blocks (architectures.default_targets(model, "quantize")). Returns the replaced names.

    Call before add_lora. The LM head is refused: it shares its weight with the token embedding.
    """
    names = find_targets(model, default_targets(model, "quantize") if targets is None else targets)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, NF4Linear):
            raise ValueError(f"{name} is already quantized")
        if name.endswith("lm_head"):
            raise ValueError("lm_head is tied to transformer.wte and cannot be quantized; leave it out of targets")
        if not is_plain_linear(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear; quantize the model "
                             "before adding adapters")
        if module.weight.is_meta:
            raise ValueError(f"{name} is on the meta device; load real weights before quantizing")
    replace_modules(model, names, lambda name, linear: NF4Linear(linear, compute_dtype, double_quant, block_size))
    return names


def nf4_layers(model: nn.Module) -> dict:
    """{name: NF4Linear} of the model's 4-bit layers ({} for a float model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def quantize_unless_quantized(model: nn.Module, compute_dtype=torch.float32, double_quant: bool = True) -> list[str]:
    """QLoRA's base: quantize_nf4(model), or, for a model whose linears are 4-bit already (quantized as it
    loaded: from_pretrained(quantize="nf4")), nothing, once their settings are checked to be the asked ones.
    Returns the names of the 4-bit layers."""
    layers = nf4_layers(model)
    if not layers:
        return quantize_nf4(model, compute_dtype=compute_dtype, double_quant=double_quant)
    found = sorted({(str(m.compute_dtype), m.double_quant) for m in layers.values()})
    if found != [(str(compute_dtype), double_quant)]:
        raise ValueError(f"the model is quantized already with (compute_dtype, double_quant) {found}, but QLoRA "
                         f"asks for ({compute_dtype}, {double_quant}); load it with the method's settings "
                         "(from_pretrained(..., **method_config.load_options())) or in float")
    return list(layers)
