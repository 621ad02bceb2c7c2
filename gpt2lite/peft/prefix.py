"""Prefix tuning (Li & Liang, 2021): n trainable key/value vectors put before the real ones in every
attention layer; everything else is frozen.

The prefix is a table (n, n_layer * 2 * n_embd), or, with the reparametrisation, an embedding (n, n_embd)
passed through an MLP (Linear, tanh, Linear) to that table (peft's PrefixEncoder with prefix_projection).
Layer i reads its keys from slice 2i and its values from slice 2i+1, as peft lays them out.

It is injected into the model (`model.transformer.virtual_tokens`, see virtual_tokens.py) as the first n
positions of the attention cache: without a KV cache a one-pass `PrefixCache` holds it; with
gpt2lite.generation.decoding's KVCache it is written into the cache at the first call (generate reserves
`model.num_virtual_tokens` slots). As with peft and transformers' GPT-2, real tokens take positions n,
n+1, ... (passed position ids are shifted by n) and the attention mask gains n leading ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from gpt2lite.peft.virtual_tokens import VirtualTokens, check_virtual_tokens, install, mask_with_virtual_tokens


class PrefixCache:
    """A read-only cache for one forward pass: the prefix keys/values (B, nh, n, hs) of each layer, to
    which update() appends the current keys/values (the KV-cache protocol of gpt2lite.generation.decoding)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values  # lists over layers of (B, nh, n, hs)
        self.length = keys[0].size(2)

    def update(self, layer_idx: int, k, v):
        k_all = torch.cat([self.keys[layer_idx].to(k.dtype), k], dim=2)  # (B, nh, n + T, hs)
        v_all = torch.cat([self.values[layer_idx].to(v.dtype), v], dim=2)  # (B, nh, n + T, hs)
        return k_all, v_all

    def advance(self, T: int):
        """Nothing to keep: the cache lives for one forward pass."""


class Prefix(VirtualTokens):
    """Trainable per-layer key/value prefixes, optionally through an MLP (the reparametrisation)."""

    def __init__(self, n_tokens: int, n_layer: int, n_head: int, n_embd: int, projection_dim: Optional[int] = None,
                 device=None):
        super().__init__()
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, n_embd // n_head
        table_width = n_layer * 2 * n_embd
        self.projection_dim = projection_dim
        if projection_dim is None:
            self.embedding = nn.Parameter(torch.randn(n_tokens, table_width, device=device))  # as nn.Embedding
            self.transform = None
        else:
            self.embedding = nn.Parameter(torch.randn(n_tokens, n_embd, device=device))
            self.transform = nn.Sequential(
                nn.Linear(n_embd, projection_dim, device=device), nn.Tanh(),
                nn.Linear(projection_dim, table_width, device=device),
            )

    def table(self) -> torch.Tensor:
        """The prefix table (n, n_layer * 2 * n_embd): what peft saves as "prompt_embeddings"."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self, batch_size: int):
        """Per layer, the prefix keys and values, each (B, nh, n, hs)."""
        n = self.n_tokens
        table = self.table().view(n, 2 * self.n_layer, self.n_head, self.head_dim)  # (n, 2L, nh, hs)
        table = table.permute(1, 2, 0, 3)  # (2L, nh, n, hs)
        table = table.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, nh, n, hs)
        return list(table[0::2]), list(table[1::2])

    def insert(self, inputs_embeds, attention_mask, position_ids, kv_cache):
        """Supply a cache that starts with the prefix; extend the mask and shift the positions by n."""
        B, T, _ = inputs_embeds.shape
        n = self.n_tokens
        if kv_cache is None:
            kv_cache = PrefixCache(*self.key_values(B))
        elif kv_cache.length == 0:
            keys, values = self.key_values(B)
            for layer_idx, (k, v) in enumerate(zip(keys, values)):
                kv_cache.update(layer_idx, k.to(inputs_embeds.dtype), v.to(inputs_embeds.dtype))
            kv_cache.advance(n)
        attention_mask = mask_with_virtual_tokens(attention_mask, n, kv_cache.length + T)
        if position_ids is not None:
            position_ids = position_ids + n
        return inputs_embeds, attention_mask, position_ids, kv_cache


def add_prefix(model: nn.Module, n_tokens: int, projection: bool = False,
               projection_dim: Optional[int] = None) -> nn.Module:
    """Inject trainable key/value prefixes of n_tokens into every layer; freeze the rest. A classifier's
    score head trains too, as a modules_to_save copy beside the frozen original (peft's SEQ_CLS).

    projection: learn an embedding (n_tokens, n_embd) and an MLP n_embd -> projection_dim -> n_layer *
    2 * n_embd (peft's prefix_projection / encoder_hidden_size; projection_dim defaults to n_embd).
    """
    check_virtual_tokens(model, n_tokens, "add_prefix")
    config = model.config
    if projection_dim is not None and not projection:
        raise ValueError("projection_dim is only used with projection=True")
    if projection:
        projection_dim = config.n_embd if projection_dim is None else projection_dim
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0:
            raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    device = model.transformer.wte.weight.device
    return install(model, Prefix(n_tokens, config.n_layer, config.n_head, config.n_embd, projection_dim, device))


def prefix_of(model: nn.Module) -> Optional[Prefix]:
    """The model's prefix, or None."""
    return Prefix.of(model)


def is_applied(model: nn.Module) -> bool:
    return prefix_of(model) is not None
