"""LoRA (Hu et al. 2021) with rsLoRA scaling, and DoRA (Liu et al. 2024), written to match peft exactly.

    LoRA: y = W x + b + scaling * B A x       A (r, in) Kaiming-uniform, B (out, r) zeros,
                                              scaling = alpha / r (alpha / sqrt(r) with rsLoRA)
    DoRA: y = m / ||W + scaling B A||_row * (W x + scaling B A x) + b,   the norm detached (as peft)

A LoRALinear takes over its nn.Linear's `weight` and `bias` (same state-dict keys), so base checkpoints
load before or after injection. Over a 4-bit base (QLoRA) the same layers keep the base and call it: see
quantized.py, whose LoRA4bitLinear / DoRA4bitLinear override the four `base_*` methods and merge().
Injection and merging of whole models are in add.py.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """y = W x + b + scaling * B A dropout(x); parameter names follow peft (lora_A, lora_B)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        check_rank(rank)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        device, dtype = self.take_base(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        # As peft (autocast_adapter_dtype): adapters of a 16-bit base are kept, and trained, in float32.
        dtype = torch.promote_types(dtype, torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        if not self.lora_A.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and peft
            nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.adapter_enabled = True
        self.linear = F.linear  # a kernel slot (gpt2lite.kernels): the base product

    # --- the base layer: an nn.Linear whose weight and bias this layer takes over ----------------------
    def take_base(self, base: nn.Linear):
        """Hold the base's weight and bias as this layer's own; returns the (device, dtype) of the adapter."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__} (a 4-bit NF4Linear takes "
                            "qlora.LoRA4bitLinear; add_lora chooses)")
        self.weight, self.bias = base.weight, base.bias  # keys stay "<name>.weight/.bias"
        return base.weight.device, base.weight.dtype

    @property
    def base_bias(self) -> Optional[nn.Parameter]:
        return self.bias

    def base_weight(self) -> torch.Tensor:
        """W, (out, in)."""
        return self.weight

    def base_forward(self, x):
        return self.linear(x, self.weight, self.bias)

    # --- the adapter ---------------------------------------------------------------------------------
    def adapter_parameters(self) -> List[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def forward(self, x):
        result = self.base_forward(x)  # (..., out)
        if self.merged or not self.adapter_enabled:
            return result
        dropped = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast lora_A casts to its dtype anyway
            dropped = dropped.to(self.lora_A.weight.dtype)
        return result + self.adapter_output(dropped, result).to(result.dtype)

    def adapter_output(self, dropped, result):
        """What the adapter adds to the base output `result`: scaling * B A x, (..., out)."""
        return self.lora_B(self.lora_A(dropped)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, in float32, shape (out, in)."""
        return self.base_weight().float() + self.delta_weight().float()

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` (idempotent)."""
        if not self.merged:
            self.weight.copy_(self.merged_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge() (idempotent): the base weight back, up to rounding."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight().float()).to(self.weight.dtype))
            self.merged = False

    @torch.no_grad()
    def unload(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight and the base bias, in the base weight's dtype."""
        self.unmerge()
        return plain_linear(self.merged_weight(), self.base_bias, self.weight.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class DoRALinear(LoRALinear):
    """LoRA with a learned length per output row (DoRA): W' = m * (W + scaling B A) / ||W + scaling B A||_row.
    The magnitude m is peft's `lora_magnitude_vector` (out,)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rslora)
        like = self.lora_A.weight
        # m starts at ||W||_row so that DoRA, like LoRA, leaves the model unchanged at step 0.
        magnitude = torch.empty(self.out_features, device=like.device, dtype=like.dtype)
        if not magnitude.is_meta:
            magnitude = torch.linalg.vector_norm(self.base_weight().detach().to(like.dtype), dim=1)
        self.lora_magnitude_vector = nn.Parameter(magnitude)
        self.register_buffer("merged_weight_norm", None, persistent=False)  # the norm at merge time

    def adapter_parameters(self) -> List[nn.Parameter]:
        return super().adapter_parameters() + [self.lora_magnitude_vector]

    @staticmethod
    def weight_norm(weight, delta) -> torch.Tensor:
        """||W + delta|| per output row (out,), detached: DoRA treats it as a constant (paper section 4.3)."""
        return torch.linalg.vector_norm(weight + delta, dim=1).detach()

    def adapter_output(self, dropped, result):
        """As peft computes DoRA: the base output rescaled row-wise by m / ||W + scaling B A||, plus the
        update scaled likewise."""
        lora = super().adapter_output(dropped, result)  # (..., out)
        weight = self.base_weight().to(self.lora_A.weight.dtype)
        norm_scale = self.lora_magnitude_vector / self.weight_norm(weight, self.delta_weight().detach())  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_without_bias = result if self.base_bias is None else result - self.base_bias
        else:  # peft runs the dropped-out input through W
            base_without_bias = self.linear(dropped, weight)
        return (norm_scale - 1) * base_without_bias + norm_scale * lora

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """m / ||W + scaling * B @ A||_row * (W + scaling * B @ A), in float32, shape (out, in)."""
        weight, delta = self.base_weight().float(), self.delta_weight().float()
        return (self.lora_magnitude_vector.float() / self.weight_norm(weight, delta))[:, None] * (weight + delta)

    @torch.no_grad()
    def merge(self):
        if not self.merged:  # unmerge divides by this same norm
            self.merged_weight_norm = self.weight_norm(self.base_weight().float(), self.delta_weight().float())
        super().merge()

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            scale = (self.lora_magnitude_vector.float() / self.merged_weight_norm)[:, None]  # (out, 1)
            self.weight.copy_((self.weight.float() / scale - self.delta_weight().float()).to(self.weight.dtype))
            self.merged_weight_norm = None
            self.merged = False

    def extra_repr(self):
        return super().extra_repr() + ", dora"


def plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (out, in) and `bias` (out,) in `dtype`."""
    layer = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
    return layer


def check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
