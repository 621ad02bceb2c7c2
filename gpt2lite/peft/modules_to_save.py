"""Modules trained in full beside an adapter and saved with it (peft's `modules_to_save`).

As in peft, the wrapper keeps the original module, frozen, next to a trainable copy: running with the
adapters disabled gives the base model back exactly, and parameter counts equal peft's (the total includes
the original). The copy's weights are saved with the adapter under the module's own name (`score.weight`).

Names that match no module are ignored, as peft ignores them: peft writes modules_to_save ["classifier",
"score"] for every SEQ_CLS adapter, whatever the model calls its head.
"""

from __future__ import annotations

import copy
import logging
from typing import List, Sequence

import torch.nn as nn

from gpt2lite.model.surgery import as_patterns, find_targets, matches, replace_modules

logger = logging.getLogger(__name__)

WRAPPER_PARTS = ("original_module.", "modules_to_save.")


class ModulesToSave(nn.Module):
    """Runs a trainable copy of `module` (`modules_to_save`), or the frozen `original_module` when disabled."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.adapter_enabled = True
        self._register_load_state_dict_pre_hook(self._load_plain_keys)

    def forward(self, *args, **kwargs):
        active = self.modules_to_save if self.adapter_enabled else self.original_module
        return active(*args, **kwargs)

    def adapter_parameters(self) -> List[nn.Parameter]:
        return list(self.modules_to_save.parameters())

    def adapter_state_dict(self):
        """The trained copy's tensors under the wrapped module's own names ("weight", not "modules_to_save.weight")."""
        return {name: tensor for name, tensor in self.modules_to_save.state_dict().items()}

    @staticmethod
    def _load_plain_keys(state_dict, prefix, *args):
        """A checkpoint of the unwrapped model ("score.weight") fills both the original and the copy."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(WRAPPER_PARTS):
                tensor = state_dict.pop(key)
                state_dict[prefix + "original_module." + rest] = tensor
                state_dict[prefix + "modules_to_save." + rest] = tensor


def add_modules_to_save(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Wrap each module that `names` match (peft's suffix rule) in ModulesToSave; returns the wrapped names.

    Names that match nothing are ignored (as in peft); already wrapped modules are left as they are.
    Trainability is set by the caller (adapter.train_only).
    """
    patterns = as_patterns(names, "modules_to_save")
    module_names = [n for n, _ in model.named_modules() if n]
    found = [p for p in patterns if any(matches(n, p) for n in module_names)]
    if len(found) < len(patterns):
        unmatched = [p for p in patterns if p not in found]
        # a name peft itself adds for classifiers ("classifier") is routine; a list that matches nothing is not
        log = logger.warning if not found else logger.info
        log("modules_to_save %s match no module of %s; ignored, as peft does", unmatched, type(model).__name__)
    if not found:
        return []
    existing = modules_to_save_of(model)
    wrapped = [n for n in find_targets(model, found)
               if n not in existing and not any(n.startswith(w + ".") for w in existing)]
    # Wrap only the outermost of nested matches.
    wrapped = [n for n in wrapped if not any(n.startswith(other + ".") for other in wrapped)]
    replace_modules(model, wrapped, lambda name, module: ModulesToSave(module))
    return wrapped


def modules_to_save_of(model: nn.Module):
    """{name: wrapper} of every ModulesToSave in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSave)}

