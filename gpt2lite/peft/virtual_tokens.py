"""What soft prompts and prefixes share: n virtual tokens placed before the real ones.

A virtual-token module is injected into the model (`model.transformer.virtual_tokens`), not wrapped around
it, so the model keeps GPT-2's forward signature and its outputs stay aligned with input_ids. The model
calls it before the blocks with (inputs_embeds, attention_mask, position_ids, kv_cache) and runs on what it
returns: a soft prompt (prompt.py) prepends embeddings, a prefix (prefix.py) fills the attention cache.
Either way the attention mask gains n leading ones, real tokens take positions n, n+1, ... (as peft with
transformers' GPT-2), and n cache slots are taken (`model.num_virtual_tokens`, which generate reserves).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from gpt2lite.peft.adapter import train_classifier_head, train_only


class VirtualTokens(nn.Module):
    """Base of SoftPrompt and Prefix: `embedding` (n_tokens, ...) holds one row per virtual token."""

    embedding: nn.Parameter

    def __init__(self):
        super().__init__()
        self.adapter_enabled = True

    @property
    def n_tokens(self) -> int:
        return self.embedding.size(0)

    @property
    def label_offset(self) -> int:
        """How many of the module's own outputs (its last ones) predict labels; the model reads it
        (GPT2.label_offset). A prefix has no outputs of its own: 0; a soft prompt overrides it."""
        return 0

    def adapter_parameters(self) -> List[nn.Parameter]:
        return list(self.parameters())

    @classmethod
    def of(cls, model: nn.Module) -> Optional["VirtualTokens"]:
        """The model's virtual-token module if it is one of this class, else None."""
        module = getattr(getattr(model, "transformer", None), "virtual_tokens", None)
        return module if isinstance(module, cls) else None

    def forward(self, inputs_embeds, attention_mask, position_ids, kv_cache):
        """(inputs_embeds (B, T, C), attention_mask, position_ids, kv_cache) with the virtual tokens in;
        all four unchanged while the adapter is disabled."""
        if not self.adapter_enabled:
            return inputs_embeds, attention_mask, position_ids, kv_cache
        return self.insert(inputs_embeds, attention_mask, position_ids, kv_cache)

    def insert(self, inputs_embeds, attention_mask, position_ids, kv_cache):
        raise NotImplementedError


def mask_with_virtual_tokens(attention_mask, n: int, total: int):
    """Prepend n ones to an attention mask (B, total - n) that covers the real tokens only; a mask of any
    other width is returned as it is (the model checks it)."""
    if attention_mask is None or attention_mask.size(-1) != total - n:
        return attention_mask
    ones = attention_mask.new_ones(attention_mask.size(0), n)
    return torch.cat([ones, attention_mask], dim=1)  # (B, total)


def check_virtual_tokens(model: nn.Module, n_tokens: int, what: str):
    """Validate n_tokens for `model` and that no prompt or prefix is injected yet."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"{what} needs n_tokens > 0 (an integer), got {n_tokens!r}")
    body = getattr(model, "transformer", None)
    if body is None or not hasattr(body, "virtual_tokens"):
        raise TypeError(f"{what} needs a gpt2lite GPT2 or GPT2ForSequenceClassification, got {type(model).__name__}")
    context = model.config.n_positions
    if n_tokens >= context:
        raise ValueError(f"{n_tokens} virtual tokens leave no room in the context of {context} positions; "
                         f"use fewer than {context} (typically 10-100)")
    if body.virtual_tokens is not None:
        raise ValueError(f"the model already has a {type(body.virtual_tokens).__name__}; "
                         "use a fresh model for another prompt or prefix")


def install(model: nn.Module, module: VirtualTokens) -> nn.Module:
    """Put `module` before the real tokens of `model` and freeze the rest; a classifier's score head trains
    too, as a modules_to_save copy beside the frozen original (peft's SEQ_CLS)."""
    module.train(model.training)
    head = train_classifier_head(model)
    model.transformer.virtual_tokens = module
    model.num_virtual_tokens = module.n_tokens
    return train_only(model, module.adapter_parameters() + head)
