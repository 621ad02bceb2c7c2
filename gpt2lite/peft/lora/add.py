"""LoRA on a whole model: add_lora injects the layers by module-name patterns (peft's suffix rule) over plain
or 4-bit linears; merging is explicit (merge_lora / unmerge_lora) and idempotent, never a side effect of
train()/eval(); merge_and_unload replaces every LoRA layer by a plain nn.Linear holding the merged weight.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from gpt2lite.model.surgery import as_patterns, find_targets, replace_modules
from gpt2lite.peft.adapter import adapter_parameters, train_only
from gpt2lite.peft.lora.layer import DoRALinear, LoRALinear, check_rank
from gpt2lite.peft.lora.quantized import DoRA4bitLinear, LoRA4bitLinear
from gpt2lite.peft.modules_to_save import ModulesToSave, add_modules_to_save, modules_to_save_of

BIAS_MODES = ("none", "all", "lora_only")


def lora_layer(base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool, dora: bool) -> LoRALinear:
    """The LoRA (or DoRA) layer for `base`: over an nn.Linear, or over a quantized linear (with dequantize())."""
    if isinstance(base, nn.Linear):
        return (DoRALinear if dora else LoRALinear)(base, rank, alpha, dropout, rslora)
    return (DoRA4bitLinear if dora else LoRA4bitLinear)(base, rank, alpha, dropout, rslora)


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
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    saved_patterns = as_patterns(modules_to_save, "modules_to_save") if modules_to_save else []
    names = find_targets(model, targets, layers_to_transform, exclude=saved_patterns)
    twice = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]
    if twice:
        raise ValueError(f"LoRA is already applied to {twice}; merge_and_unload(model) first to add another")
    not_linear = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names
                  if not isinstance(model.get_submodule(n), nn.Linear) and
                  not hasattr(model.get_submodule(n), "dequantize")]
    if not_linear:
        raise ValueError(f"LoRA applies to linear layers; the targets also match {not_linear}")
    # every layer is built before any is put in place: a refused argument leaves the model as it was
    layers = {n: lora_layer(model.get_submodule(n), rank, alpha, dropout, rslora, dora) for n in names}
    replace_modules(model, names, lambda name, module: layers[name])
    if saved_patterns:
        add_modules_to_save(model, saved_patterns)
    model.lora_settings = dict(rank=rank, alpha=alpha, targets=as_patterns(targets), dropout=dropout, bias=bias,
                               rslora=rslora, dora=dora, layers_to_transform=layers_to_transform,
                               modules_to_save=saved_patterns or None)
    return train_only(model, lora_trainable_parameters(model, bias))


def lora_trainable_parameters(model: nn.Module, bias: str) -> List[nn.Parameter]:
    """What a LoRA model trains: each layer's adapter, the biases per mode, the modules_to_save copies."""
    return adapter_parameters(model, (LoRALinear, ModulesToSave)) + [b for _, b in lora_biases(model, bias)]


def lora_biases(model: nn.Module, bias: str):
    """[(module name, bias parameter)] trained in bias mode `bias`: "all" every bias of the model (as peft),
    "lora_only" those of the LoRA layers. A modules_to_save wrapper trains its copy whole, not its bias alone."""
    if bias == "none":
        return []
    seen = {id(p) for wrapper in modules_to_save_of(model).values() for p in wrapper.parameters()}
    found = []
    for name, module in model.named_modules():  # a LoRA layer comes before its own 4-bit base_layer
        if isinstance(module, LoRALinear):
            b = module.base_bias
        else:
            b = getattr(module, "bias", None) if bias == "all" else None
        if isinstance(b, nn.Parameter) and id(b) not in seen:
            seen.add(id(b))
            found.append((name, b))
    return found


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
    replace_modules(model, list(lora_layers(model)), lambda name, layer: layer.unload())
    replace_modules(model, list(modules_to_save_of(model)), lambda name, wrapper: wrapper.modules_to_save)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model
