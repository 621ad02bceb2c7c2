"""LoRA (Hu et al. 2021), rsLoRA scaling and DoRA (Liu et al. 2024), written to match peft exactly.

    y = base(x) + (B @ A) x * scaling,    A (r, in) Kaiming-uniform, B (out, r) zeros, scaling = alpha / r
                                          (alpha / sqrt(r) with rsLoRA)
    DoRA: y = m / ||W + scaling * B @ A||_row * (W x + scaling * B A x) + bias, the norm detached (as peft)

A LoRALinear wrapping an nn.Linear takes over its `weight` and `bias` (same state-dict keys), so base
checkpoints load before or after injection. Over any other base with `in_features`/`out_features`/`bias`
and `dequantize()` (the 4-bit NF4Linear of QLoRA) it keeps that module as `base_layer` and calls it.

Merging is explicit (merge_lora / unmerge_lora), idempotent, and refused on a quantized base, whose 4-bit
weight cannot hold the update: merge_and_unload dequantizes instead and keeps the result in float.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..linear import linear
from .freeze import train_only
from .inject import as_patterns, find_targets, replace_modules
from .modules_to_save import ModulesToSave, add_modules_to_save

BIAS_MODES = ("none", "all", "lora_only")


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update; parameter names follow peft (lora_A, lora_B, lora_magnitude_vector)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False):
        super().__init__()
        check_rank(rank)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise TypeError(f"LoRA needs a linear layer (with in_features/out_features), got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        if type(base) is nn.Linear:
            self.weight, self.bias = base.weight, base.bias  # taken over: keys stay "<name>.weight/.bias"
            self.base_layer = None
            device, dtype = base.weight.device, base.weight.dtype
        else:
            self.base_layer = base  # a quantized linear, called as it is
            device = next(iter([*base.parameters(), *base.buffers()])).device
            dtype = getattr(base, "compute_dtype", torch.float32)
        # As peft (autocast_adapter_dtype): adapters of a 16-bit base are kept, and trained, in float32.
        dtype = torch.promote_types(dtype, torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        if not self.lora_A.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and peft
            nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if dora:
            # m starts at ||W||_row so that DoRA, like LoRA, leaves the model unchanged at step 0.
            magnitude = torch.empty(self.out_features, device=device, dtype=dtype)
            if not magnitude.is_meta:
                magnitude = torch.linalg.vector_norm(self.base_weight().detach().to(dtype), dim=1)
            self.lora_magnitude_vector = nn.Parameter(magnitude)
        self.merged = False
        self.adapter_enabled = True
        self.register_buffer("merged_weight_norm", None, persistent=False)  # DoRA's norm at merge time

    # --- the base layer ------------------------------------------------------------------------------
    @property
    def base_bias(self) -> Optional[nn.Parameter]:
        return self.bias if self.base_layer is None else self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight (out, in) in float: the parameter itself, or the dequantized 4-bit weight."""
        return self.weight if self.base_layer is None else self.base_layer.dequantize()

    def base_forward(self, x):
        return linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)

    # --- LoRA ----------------------------------------------------------------------------------------
    def adapter_parameters(self) -> List[nn.Parameter]:
        extra = [self.lora_magnitude_vector] if self.lora_magnitude_vector is not None else []
        return [self.lora_A.weight, self.lora_B.weight] + extra

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def dora_weight_norm(self, weight, delta) -> torch.Tensor:
        """||W + delta|| per output row (out,), detached: DoRA treats it as a constant (paper section 4.3)."""
        return torch.linalg.vector_norm(weight + delta, dim=1).detach()

    def forward(self, x):
        result = self.base_forward(x)
        if self.merged or not self.adapter_enabled:
            return result
        lora_dtype = self.lora_A.weight.dtype
        dropped = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # (under autocast lora_A casts to bf16 anyway)
            dropped = dropped.to(lora_dtype)
        lora = self.lora_B(self.lora_A(dropped)) * self.scaling  # (..., out)
        if self.lora_magnitude_vector is None:
            return result + lora.to(result.dtype)
        # DoRA, as peft computes it: the base output rescaled column-wise by m / ||W + BA||, plus the update.
        weight = self.base_weight().to(lora_dtype)
        norm_scale = self.lora_magnitude_vector / self.dora_weight_norm(weight, self.delta_weight().detach())
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_without_bias = result if self.base_bias is None else result - self.base_bias
        else:
            base_without_bias = linear(dropped, weight)
        return result + ((norm_scale - 1) * base_without_bias + norm_scale * lora).to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` (idempotent). Refused on a quantized base: use merge_and_unload."""
        if self.merged:
            return
        if self.base_layer is not None:
            raise RuntimeError(
                f"cannot merge LoRA into a quantized {type(self.base_layer).__name__}: 4 bits cannot hold the "
                "update. Use merge_and_unload(model), which dequantizes and keeps merged layers in float."
            )
        if self.lora_magnitude_vector is not None:  # unmerge divides by the same norm
            self.merged_weight_norm = self.dora_weight_norm(self.weight.float(), self.delta_weight().float())
        self.weight.copy_(self.merged_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge() (idempotent): the base weight back, up to rounding."""
        if not self.merged:
            return
        delta = self.delta_weight().to(torch.float32)
        weight = self.weight.to(torch.float32)
        if self.lora_magnitude_vector is not None:
            weight = weight / (self.lora_magnitude_vector.float() / self.merged_weight_norm)[:, None]
            self.merged_weight_norm = None
        self.weight.copy_((weight - delta).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A (times m / ||W + scaling * B @ A|| for DoRA), in float32, shape (out, in)."""
        weight = self.base_weight().to(torch.float32)
        delta = self.delta_weight().to(torch.float32)
        if self.lora_magnitude_vector is None:
            return weight + delta
        norm = self.dora_weight_norm(weight, delta)
        return (self.lora_magnitude_vector.float() / norm)[:, None] * (weight + delta)

    def extra_repr(self):
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}{dora}"


def check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")


def lora_layers(model: nn.Module):
    """{name: LoRALinear} of the model, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Union[str, Sequence[str]], dropout: float = 0.0,
             bias: str = "none", rslora: bool = False, dora: bool = False,
             layers_to_transform: Optional[Union[int, Iterable[int]]] = None,
             modules_to_save: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace the linear layers that `targets` match (peft's suffix rule) by LoRALinear; freeze the rest.

    bias: "none" trains no bias; "all" every bias of the model; "lora_only" the biases of the LoRA layers.
    layers_to_transform: block index or indices to adapt (default: all blocks).
    modules_to_save: modules trained in full and saved with the adapter, e.g. ["score"] for a classifier.
    Trainable afterwards: lora_A, lora_B (and DoRA's magnitude), the biases per `bias`, modules_to_save.
    """
    check_rank(rank)
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if alpha is None or alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    saved_patterns = as_patterns(modules_to_save, "modules_to_save") if modules_to_save else []
    names = find_targets(model, targets, layers_to_transform, exclude=saved_patterns)
    twice = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]
    if twice:
        raise ValueError(f"LoRA is already applied to {twice}; merge_and_unload(model) first to add another")
    not_linear = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names
                  if not hasattr(model.get_submodule(n), "in_features")]
    if not_linear:
        raise ValueError(f"LoRA applies to linear layers; the targets also match {not_linear}")
    # every layer is built before any is put in place: a refused argument leaves the model as it was
    layers = {n: LoRALinear(model.get_submodule(n), rank, alpha, dropout, rslora, dora) for n in names}
    replace_modules(model, names, lambda name, module: layers[name])
    if saved_patterns:
        add_modules_to_save(model, saved_patterns)
    model.lora_settings = dict(rank=rank, alpha=alpha, targets=as_patterns(targets), dropout=dropout, bias=bias,
                               rslora=rslora, dora=dora, layers_to_transform=layers_to_transform,
                               modules_to_save=saved_patterns or None)
    return train_only(model, lora_trainable_parameters(model, bias))


def lora_trainable_parameters(model: nn.Module, bias: str) -> List[nn.Parameter]:
    """What a LoRA model trains: each layer's adapter, the biases per mode, the modules_to_save copies."""
    parameters = []
    for module in model.modules():
        if isinstance(module, (LoRALinear, ModulesToSave)):
            parameters += module.adapter_parameters()
    parameters += [b for _, b in lora_biases(model, bias)]
    return parameters


def lora_biases(model: nn.Module, bias: str):
    """[(module name, bias parameter)] trained in bias mode `bias` (peft: "all" = every bias of the model)."""
    if bias == "none":
        return []
    # modules_to_save wrappers are trained and saved whole (the copy) or not at all (the original)
    wrapped = {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.parameters()}
    found = []
    for name, module in model.named_modules():
        b = module.base_bias if isinstance(module, LoRALinear) else getattr(module, "bias", None)
        if bias == "lora_only" and not isinstance(module, LoRALinear):
            continue
        if isinstance(b, nn.Parameter) and id(b) not in wrapped and not _inside_lora_base(model, name):
            found.append((name, b))
    return found


def _inside_lora_base(model, name):
    """Whether `name` is a quantized base_layer inside a LoRALinear (its bias is the LoRA layer's)."""
    return name.endswith(".base_layer") and isinstance(model.get_submodule(name.rpartition(".")[0]), LoRALinear)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight; exact, idempotent, reversible with unmerge_lora."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged LoRA updates back out of the base weights."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer by a plain nn.Linear holding the merged weight (dequantized first on a 4-bit
    base, kept in float), and each modules_to_save wrapper by its trained copy: a plain GPT-2 that
    save_pretrained writes as a Hugging Face checkpoint."""

    def plain_linear(name, layer: LoRALinear):
        if layer.merged:
            layer.unmerge()
        bias = layer.base_bias
        dtype = layer.weight.dtype if layer.base_layer is None else layer.lora_A.weight.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                           device=layer.lora_A.weight.device, dtype=dtype)
        linear.weight.copy_(layer.merged_weight().to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.detach().to(dtype))
        return linear

    replace_modules(model, list(lora_layers(model)), plain_linear)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    replace_modules(model, wrappers, lambda name, wrapper: wrapper.modules_to_save)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model inside this block: LoRA updates (merged ones are taken out and put back),
    modules_to_save copies, and any adapter module with an `adapter_enabled` flag are switched off."""
    switched = [m for m in model.modules() if getattr(m, "adapter_enabled", False) is True]
    remerge = [m for m in switched if isinstance(m, LoRALinear) and m.merged]
    for m in remerge:
        m.unmerge()
    for m in switched:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in switched:
            m.adapter_enabled = True
        for m in remerge:
            m.merge()
