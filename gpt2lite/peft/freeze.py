"""Choosing what trains without an adapter: full fine-tuning, the frozen baseline, the last N blocks, BitFit.

Each calls adapter.train_only, the one place that sets `requires_grad`.

GPT-2 ties `lm_head` to `transformer.wte`. Training "the head" is therefore an explicit choice:
    head="tied"    train the shared matrix (the token embeddings change too)
    head="untied"  give lm_head its own trainable copy of wte; the embeddings stay frozen
    head="none"    the head is not trained
A sequence classifier's `score` head is new and random, so its methods keep it trainable (head="score").
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from gpt2lite.peft.adapter import classifier_head_parameters, is_classifier, train_only

LM_HEAD_CHOICES = ("none", "tied", "untied")


def full_finetuning(model: nn.Module) -> nn.Module:
    """Everything trains."""
    return train_only(model, model.parameters())


def frozen_baseline(model: nn.Module) -> nn.Module:
    """No fine-tuning: nothing trains, except a classifier's new score head (a linear probe)."""
    return train_only(model, classifier_head_parameters(model))


def freeze_layers(model: nn.Module, last_n: int, head: Optional[str] = None) -> nn.Module:
    """Train the last `last_n` transformer blocks, plus ln_f when last_n > 0, plus the head as chosen.

    head: for a language model "none" (default), "tied" or "untied" (see the module docstring); for a
    sequence classifier "score" (default) or "none".
    """
    blocks = model.transformer.h
    if not isinstance(last_n, int) or not 0 <= last_n <= len(blocks):
        raise ValueError(f"last_n must be an integer in [0, {len(blocks)}], got {last_n!r}")
    classifier = is_classifier(model)
    choices = ("score", "none") if classifier else LM_HEAD_CHOICES
    head = choices[0] if head is None else head
    if head not in choices:
        raise ValueError(f"head={head!r} is not one of {choices} for {type(model).__name__}")
    parameters = [p for block in blocks[len(blocks) - last_n:] for p in block.parameters()]
    if last_n > 0:
        parameters += list(model.transformer.ln_f.parameters())
    if head == "score":
        parameters += classifier_head_parameters(model)
    elif head == "tied":
        parameters.append(model.lm_head.weight)  # the same Parameter as transformer.wte.weight
    elif head == "untied":
        parameters.append(untie_lm_head(model))
    return train_only(model, parameters)


def untie_lm_head(model: nn.Module) -> nn.Parameter:
    """Give lm_head its own weight, initialised from wte; the config records it so checkpoints keep both."""
    if model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
        model.config = model.config.replace(tie_word_embeddings=False)
    return model.lm_head.weight


def add_bitfit(model: nn.Module) -> nn.Module:
    """BitFit: train only the bias vectors (every parameter registered as `bias`), plus a classifier's head."""
    biases = [module.bias for module in model.modules()
              if isinstance(getattr(module, "bias", None), nn.Parameter)]
    return train_only(model, biases + classifier_head_parameters(model))
