"""What every adapter shares: the adapter protocol, the one place that sets requires_grad, switching
adapters off, and the classifier-head rule.

An adapter module (LoRALinear, IA3Linear, SoftPrompt, Prefix, ModulesToSave) declares

    adapter_parameters()   the parameters it trains, so nothing is made trainable by matching a name
    adapter_enabled        True to run with the adapter, False to run the base model (disable_adapters)

and, if it can fold itself into the base weight (LoRA, DoRA), `merged` with merge() / unmerge().

A sequence classifier's `score` head is new and random, so every method trains it too, as peft does for
SEQ_CLS: the adapters wrap it in ModulesToSave (a trainable copy beside the frozen original).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, List, Tuple, Type

import torch.nn as nn

from gpt2lite.peft.modules_to_save import add_modules_to_save


def train_only(model: nn.Module, parameters: Iterable[nn.Parameter]) -> nn.Module:
    """Make exactly `parameters` trainable and freeze every other parameter of `model`."""
    keep = {id(p) for p in parameters}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


def adapter_parameters(model: nn.Module, kinds: Tuple[Type[nn.Module], ...]) -> List[nn.Parameter]:
    """What the adapter modules of the given types declare they train, in model order."""
    return [p for module in model.modules() if isinstance(module, kinds) for p in module.adapter_parameters()]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model inside this block: every module with an `adapter_enabled` flag is switched off
    (LoRA and IA3 layers, prompts, prefixes, modules_to_save copies); merged LoRA updates are taken out of
    the base weights and put back afterwards."""
    switched = [m for m in model.modules() if getattr(m, "adapter_enabled", False) is True]
    remerge = [m for m in switched if getattr(m, "merged", False) is True]
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


def is_classifier(model: nn.Module) -> bool:
    return isinstance(getattr(model, "score", None), nn.Module)


def classifier_head_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The score head of a sequence classifier (its trainable copy if wrapped), or [] for a language model."""
    if not is_classifier(model):
        return []
    score = model.score
    if hasattr(score, "adapter_parameters"):
        return score.adapter_parameters()
    return list(score.parameters())


def train_classifier_head(model: nn.Module) -> List[nn.Parameter]:
    """As peft does for SEQ_CLS: wrap a classifier's new `score` head in ModulesToSave (a trainable copy
    beside the frozen original, saved with the adapter); returns the copy's parameters ([] for a
    language model)."""
    if is_classifier(model):
        add_modules_to_save(model, ["score"])
    return classifier_head_parameters(model)
