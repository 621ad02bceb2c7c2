"""Injecting adapter modules by module-name patterns, with peft's matching rule; injection is all or nothing.

A pattern names a module by its full name or by a suffix made of whole name parts: "c_attn" matches
`transformer.h.0.attn.c_attn`; "attn.c_proj" matches only the attention output projection; a bare "c_proj"
matches both `attn.c_proj` and `mlp.c_proj` (peft's `check_target_module_exists` does the same).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch.nn as nn

from gpt2lite.kernels import use_fast_kernels, uses_fast_kernels

# peft's rule for the layer index: the first number that follows a dotted name part ("transformer.h.3.").
LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
MODULE_TABLES = ("_parameters", "_buffers", "_modules")  # nn.Module's own dicts: copied, not shared


def matches(name: str, pattern: str) -> bool:
    """Whether the module `name` is the one `pattern` names: equal, or ending in "." + pattern."""
    return name == pattern or name.endswith("." + pattern)


def layer_index(name: str) -> Optional[int]:
    """The block index in a module name (3 for "transformer.h.3.attn.c_attn"), None outside the blocks."""
    found = LAYER_INDEX.match(name)
    return int(found.group("idx")) if found else None


def as_patterns(targets: Union[str, Sequence[str]], what: str = "targets") -> List[str]:
    patterns = [targets] if isinstance(targets, str) else list(targets or [])
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must be a non-empty list of module names such as ['c_attn'], got {targets!r}")
    return patterns


def select_modules(model: nn.Module, modules: Union[str, Sequence[str]], among: Optional[Sequence[str]] = None):
    """Module names that a peft config's target_modules / feedforward_modules select: a list of names
    matched as above, or a string, a regular expression matched against the whole name. Kept to `among`
    if given; otherwise a ValueError if nothing matches."""
    if isinstance(modules, str):
        names = [n for n, _ in model.named_modules() if re.fullmatch(modules, n)]
    else:
        names = [n for n, _ in model.named_modules() if n and any(matches(n, p) for p in modules or [])]
    if among is not None:
        names = [n for n in names if n in among]
    elif not names:
        raise ValueError(f"the adapter's target_modules {modules!r} match no module of this model")
    return names


def find_targets(model: nn.Module, targets: Union[str, Sequence[str]],
                 layers_to_transform: Optional[Union[int, Iterable[int]]] = None,
                 exclude: Sequence[str] = ()) -> List[str]:
    """Names of the modules that `targets` match, in model order.

    layers_to_transform: a block index or indices; only modules inside those blocks are kept.
    exclude: patterns whose modules (and everything inside them) are never targets (modules_to_save).
    Raises ValueError when a pattern matches nothing, naming the modules that could have been meant.
    """
    patterns = as_patterns(targets)
    layers = None
    if layers_to_transform is not None:
        layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        n_blocks = len(getattr(getattr(model, "transformer", None), "h", ()))
        outside = sorted(i for i in layers if not 0 <= i < n_blocks)
        if outside:
            raise ValueError(f"layers_to_transform {outside} out of range: the model has blocks 0..{n_blocks - 1}")
    names = [name for name, _ in model.named_modules() if name]
    excluded = [n for n in names if any(matches(n, e) or any(matches(prefix, e) for prefix in _prefixes(n))
                                        for e in exclude)]
    chosen = []
    for pattern in patterns:
        found = [n for n in names if matches(n, pattern) and n not in excluded
                 and (layers is None or layer_index(n) in layers)]
        if not found:
            leaves = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            where = f" in blocks {sorted(layers)}" if layers is not None else ""
            raise ValueError(
                f"target {pattern!r} matches no module{where}; use a module name or its last parts, e.g. "
                f"{leaves} or 'attn.c_proj' / 'mlp.c_proj'"
            )
        chosen.extend(n for n in found if n not in chosen)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def _prefixes(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def replace_modules(model: nn.Module, names: Sequence[str],
                    build: Callable[[str, nn.Module], nn.Module]) -> Dict[str, nn.Module]:
    """Put `build(name, module)` in place of each named module; returns {name: the module replaced}.

    The new modules take the model's mode (train or eval): a LoRA dropout added to a model in eval mode
    stays off; and the kernels of the module they replace (gpt2lite.kernels): fast stays fast."""
    replaced = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        new = build(name, original).train(model.training)
        setattr(parent, child, use_fast_kernels(new, uses_fast_kernels(original)))
        replaced[name] = original
    return replaced


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module):
    """If the block raises, put back every module, attribute and requires_grad flag of `model` as they were.

    Injection only rearranges modules (the adapters take the base weights over, they do not copy them), so
    restoring each module's attributes and children restores the model exactly. Tensor values are not
    saved: copy values in only once every check has passed.
    """
    saved = [(module, {key: value.copy() if key in MODULE_TABLES else value for key, value in vars(module).items()})
             for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    except BaseException:
        for module, attributes in saved:
            vars(module).clear()
            vars(module).update(attributes)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
