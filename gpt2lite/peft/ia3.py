"""IA3 (Liu et al., 2022): learned vectors that rescale activations; everything else is frozen.

    attention layer (c_attn):         y = (x W^T + b) * l     l (out_features,), scales q, k and v
    feed-forward layer (mlp.c_proj):  y = (x * l) W^T + b     l (in_features,), scales the MLP's hidden units

The vectors start at ones, so the model is unchanged at step 0. Defaults follow peft for GPT-2
(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: c_attn and mlp.c_proj, mlp.c_proj feed-forward).
An IA3Linear takes over the base nn.Linear's weight and bias, so state-dict keys stay the same.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..hf import CheckpointError, default_targets, stores_transposed
from ..linear import linear
from .freeze import classifier_head_parameters, train_only
from .inject import as_patterns, find_targets, matches, replace_modules, unchanged_on_error
from .modules_to_save import train_classifier_head
from .prompt import load_score_head, read_peft_tensors, score_head_hint, score_head_tensors, task_type
from .prompt import write_peft_files

PEFT_PREFIX = "base_model.model."


class IA3Linear(nn.Module):
    """A linear layer whose output (or, for a feed-forward layer, input) is rescaled by `ia3_l`."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"IA3 needs an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # taken over: keys stay "<name>.weight/.bias"
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))
        self.adapter_enabled = True

    def adapter_parameters(self):
        return [self.ia3_l]

    def forward(self, x):
        if not self.adapter_enabled:
            return linear(x, self.weight, self.bias)
        if self.feedforward:
            return linear(x * self.ia3_l.to(x.dtype), self.weight, self.bias)
        result = linear(x, self.weight, self.bias)
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
    return _wrap(model, names, feedforward_names)


def _wrap(model, names, feedforward_names):
    twice = [n for n in names if isinstance(model.get_submodule(n), IA3Linear)]
    if twice:
        raise ValueError(f"IA3 is already applied to {twice}")
    with unchanged_on_error(model):  # a target that is not an nn.Linear is found midway
        replace_modules(model, names, lambda name, module: IA3Linear(module, name in feedforward_names))
        head = train_classifier_head(model)
    model.ia3_settings = dict(targets=list(names), feedforward=sorted(feedforward_names))
    parameters = [p for m in model.modules() if isinstance(m, IA3Linear) for p in m.adapter_parameters()]
    return train_only(model, parameters + head)


def ia3_layers(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def is_applied(model: nn.Module) -> bool:
    return bool(ia3_layers(model))


# --- peft's format: "base_model.model.<name>.ia3_l", (out, 1) or, feed-forward, (1, in) -------------

def save_peft(model: nn.Module, directory: str):
    layers = ia3_layers(model)
    if not layers:
        raise ValueError("the model has no IA3 layers; call add_ia3 first")
    feedforward = [n for n, m in layers.items() if m.feedforward]
    adapter_config = {
        "peft_type": "IA3", "task_type": task_type(model), "target_modules": list(layers),
        "feedforward_modules": feedforward, "fan_in_fan_out": stores_transposed(model),
        "init_ia3_weights": True, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        "modules_to_save": ["classifier", "score"] if classifier_head_parameters(model) else None,
        "exclude_modules": None, "auto_mapping": None,
    }
    tensors = {f"{PEFT_PREFIX}{name}.ia3_l": m.ia3_l.view(1, -1) if m.feedforward else m.ia3_l.view(-1, 1)
               for name, m in layers.items()}
    write_peft_files(directory, adapter_config, {**tensors, **score_head_tensors(model, PEFT_PREFIX)})


def load_peft(model: nn.Module, directory: str, adapter_config: dict) -> nn.Module:
    """Load a peft IA3 adapter: wrap its target modules if the model has no IA3 yet, then copy the vectors.
    All or nothing: on a CheckpointError the model is unchanged."""
    from .adapter_io import check_adapter_tensors

    config_path = os.path.join(directory, "adapter_config.json")
    if adapter_config.get("peft_type") != "IA3":
        raise CheckpointError(f"{config_path}: expected an IA3 adapter, got peft_type="
                              f"{adapter_config.get('peft_type')!r}")
    if not adapter_config.get("target_modules"):
        raise CheckpointError(f"{config_path} has no target_modules: an IA3 adapter names the layers it scales "
                              '(e.g. "target_modules": ["c_attn", "mlp.c_proj"])')
    path, tensors = read_peft_tensors(directory)
    with unchanged_on_error(model):
        if not is_applied(model):
            try:
                names = _peft_names(model, adapter_config["target_modules"])
                feedforward = _peft_names(model, adapter_config.get("feedforward_modules") or [], among=names)
                _wrap(model, names, set(feedforward))
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"{config_path}: {error}") from None
        layers = ia3_layers(model)
        expected = {f"{PEFT_PREFIX}{name}.ia3_l": torch.Size((1, m.in_features) if m.feedforward else
                                                             (m.out_features, 1)) for name, m in layers.items()}
        expected.update({k: v.shape for k, v in score_head_tensors(model, PEFT_PREFIX).items()})
        check_adapter_tensors(path, tensors, expected, "the adapter was made for another model size or set of "
                              "target modules? " + score_head_hint(model))
        with torch.no_grad():
            for name, layer in layers.items():
                layer.ia3_l.copy_(tensors[f"{PEFT_PREFIX}{name}.ia3_l"].reshape(-1))
        load_score_head(model, tensors, PEFT_PREFIX)
    return model


def _peft_names(model, modules: Optional[Union[str, Sequence[str]]], among=None):
    """Module names that peft's target_modules / feedforward_modules select (a list of suffixes, or a
    regular expression matched against the whole name)."""
    if isinstance(modules, str):
        names = [n for n, _ in model.named_modules() if re.fullmatch(modules, n)]
    else:
        names = [n for n, _ in model.named_modules() if n and any(matches(n, p) for p in modules or [])]
    if among is not None:
        names = [n for n in names if n in among]
    elif not names:
        raise ValueError(f"the adapter's target_modules {modules!r} match no module of this model")
    return names
