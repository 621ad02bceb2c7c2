"""LoRA and DoRA over a frozen 4-bit base (QLoRA): the LoRA layers of layer.py over a quantization.NF4Linear
that is kept and called, its dequantized weight standing in for W wherever LoRA or DoRA needs it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from gpt2lite.peft.lora.layer import DoRALinear, LoRALinear, plain_linear


class QuantizedBase:
    """The base-layer half of a LoRA layer over a 4-bit NF4Linear (mixed in before LoRALinear/DoRALinear).

    The base is kept as `base_layer` (state-dict keys "<name>.base_layer.weight_packed", ".base_layer.bias")
    and called as it is; its dequantized weight stands in for W wherever LoRA or DoRA needs W. Merging is
    refused, since 4 bits cannot hold the update; merge_and_unload dequantizes and keeps the result in float.
    """

    def take_base(self, base: nn.Module):
        if not hasattr(base, "dequantize"):
            raise TypeError(f"a 4-bit LoRA layer wraps a quantized linear (with dequantize()), got "
                            f"{type(base).__name__}")
        self.base_layer = base
        device = next(iter([*base.parameters(), *base.buffers()])).device
        return device, getattr(base, "compute_dtype", torch.float32)

    @property
    def base_bias(self) -> Optional[nn.Parameter]:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), in the base's compute dtype."""
        return self.base_layer.dequantize()

    def base_forward(self, x):
        return self.base_layer(x)

    def merge(self):
        raise RuntimeError(
            f"cannot merge LoRA into a quantized {type(self.base_layer).__name__}: 4 bits cannot hold the "
            "update. Use merge_and_unload(model), which dequantizes and keeps merged layers in float."
        )

    @torch.no_grad()
    def unload(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized, merged weight, in the adapter's (float) dtype."""
        return plain_linear(self.merged_weight(), self.base_bias, self.lora_A.weight.dtype)


class LoRA4bitLinear(QuantizedBase, LoRALinear):
    """LoRA over a frozen 4-bit base (QLoRA): y = base(x) + scaling * B A x."""


class DoRA4bitLinear(QuantizedBase, DoRALinear):
    """DoRA over a frozen 4-bit base: the dequantized weight's row norms set the magnitude."""
