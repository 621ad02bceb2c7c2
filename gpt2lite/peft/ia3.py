"""IA3 (Liu et al., 2022): learned vectors that rescale activations; everything else is frozen.

    attention layer (c_attn):         y = (x W^T + b) * l     l (out_features,), scales q, k and v
    feed-forward layer (mlp.c_proj):  y = (x * l) W^T + b     l (in_features,), scales the MLP's hidden units

The vectors start at ones, so the model is unchanged at step 0. Defaults follow peft for GPT-2
(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: c_attn and mlp.c_proj, mlp.c_proj feed-forward).
An IA3Linear takes over the base nn.Linear's weight and bias, so state-dict keys stay the same.
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lite.model.architectures import default_targets
from gpt2lite.kernels import is_plain_linear
from gpt2lite.peft.adapter import adapter_parameters, train_classifier_head, train_only
from gpt2lite.model.surgery import as_patterns, find_targets, matches, replace_modules, unchanged_on_error


class IA3Linear(nn.Module):
    """A linear layer whose output (or, for a feed-forward layer, input) is rescaled by `ia3_l`."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        if not is_plain_linear(base):
            raise TypeError(f"IA3 needs an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # taken over: keys stay "<name>.weight/.bias"
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))
        self.adapter_enabled = True
        self.linear = F.linear  # a kernel slot (gpt2lite.kernels)

    def adapter_parameters(self):
        return [self.ia3_l]

    def forward(self, x):
        if not self.adapter_enabled:
            return self.linear(x, self.weight, self.bias)
        if self.feedforward:
            return self.linear(x * self.ia3_l.to(x.dtype), self.weight, self.bias)
        result = self.linear(x, self.weight, self.bias)
        return result * self.ia3_l.to(result.dtype)

    def extra_repr(self):
        kind = "feed-forward (scales inputs)" if self.feedforward else "scales outputs"
        return f"in={self.in_features}, out={self.out_features}, {kind}"


def add_ia3(model: nn.Module, targets: Optional[Union[str, Sequence[str]]] = None,
            feedforward: Optional[Union[str, Sequence[str]]] = None) -> nn.Module:
    """Wrap the linear layers `targets` match (peft's suffix rule) in IA3Linear; freeze the rest (a
    classifier's score head trains too, as a modules_to_save copy, as in peft). Layers matched by
    `feedforward` scale their inputs, the others their outputs; every feed-forward layer must also be a
    target, as peft requires. By default both are the architecture's, as in peft (GPT-2: c_attn,
    mlp.c_proj; GPT-Neo: q_proj, v_proj, c_proj)."""
    targets = default_targets(model, "ia3") if targets is None else targets
    feedforward = default_targets(model, "ia3_feedforward") if feedforward is None else feedforward
    names = find_targets(model, targets)
    feedforward_patterns = as_patterns(feedforward, "feedforward") if feedforward else []
    feedforward_names = {n for n in names if any(matches(n, p) for p in feedforward_patterns)}
    for pattern in feedforward_patterns:
        if not any(matches(n, pattern) for n in names):
            raise ValueError(f"feedforward pattern {pattern!r} matches none of the targets {list(targets)}; "
                             "feed-forward modules must be a subset of the targets")
    return add_ia3_layers(model, names, feedforward_names)


def add_ia3_layers(model: nn.Module, names: Sequence[str], feedforward_names: Collection[str]) -> nn.Module:
    """Wrap the named modules in IA3Linear (feed-forward for those in `feedforward_names`) and freeze the
    rest, a classifier's score copy apart; all or nothing: a module that is not an nn.Linear changes nothing."""
    twice = [n for n in names if isinstance(model.get_submodule(n), IA3Linear)]
    if twice:
        raise ValueError(f"IA3 is already applied to {twice}")
    with unchanged_on_error(model):  # a target that is not an nn.Linear is found midway
        replace_modules(model, names, lambda name, module: IA3Linear(module, name in feedforward_names))
        head = train_classifier_head(model)
    return train_only(model, adapter_parameters(model, (IA3Linear,)) + head)


def ia3_layers(model: nn.Module):
    """{name: IA3Linear} of the model, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def is_applied(model: nn.Module) -> bool:
    return bool(ia3_layers(model))
