"""Causal self-attention, with Hugging Face's GPT-2 module names, and the boolean masks it attends under.

    attn.c_attn   fused q, k, v projection (C -> 3C)
    attn.c_proj   output projection (C -> C)

Attention itself is F.scaled_dot_product_attention, held in the `sdpa` kernel slot (gpt2lite.kernels swaps
in a leaner CPU-training path). Other architectures subclass CausalSelfAttention (gpt_neo.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lite.model.config import GPT2Config


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through F.scaled_dot_product_attention.

    Subclasses for other architectures override `build_projections`, `project_qkv` and `project_out` only.
    """

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.dropout = config.attn_pdrop
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn else 1.0
        self.build_projections(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.sdpa = F.scaled_dot_product_attention  # a kernel slot (gpt2lite.kernels)

    def build_projections(self, config: GPT2Config):
        """Create the linear layers project_qkv and project_out use: GPT-2's fused c_attn and c_proj."""
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def project_qkv(self, x):
        return self.c_attn(x).split(x.size(-1), dim=-1)

    def project_out(self, y):
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x, mask=None, kv_cache=None):
        """x: (B, T, C); mask: None (plain causal) or bool (B or 1, 1, T, S) with True = may attend."""
        B, T, C = x.shape
        q, k, v = self.project_qkv(x)  # each (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), S = past + T
        # With no mask, queries and keys are aligned when T == S; a single query (decoding) sees every key.
        is_causal = mask is None and T == k.size(2) and T > 1
        dropout = self.dropout if self.training else 0.0
        y = self.sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                      scale=self.scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.project_out(y)


def attention_mask_for(attention_mask, q_len: int, kv_len: int, window: Optional[int], device):
    """The boolean attention mask (B or 1, 1, q_len, kv_len) for SDPA, or None when plain causal suffices.

    attention_mask: None or (B, kv_len) with 1 for real tokens and 0 for padding. Queries are the last
    q_len of the kv_len positions. `window` limits each query to the `window` most recent keys.
    """
    needs_window = window is not None and window < kv_len
    if attention_mask is None and not needs_window and (q_len == kv_len or q_len == 1):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    allowed = k_pos <= q_pos  # (q_len, kv_len)
    if needs_window:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None]  # (1, 1, q_len, kv_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, q_len, kv_len)
        # A padding query (left padding) has no real key to attend to; softmax over nothing gives NaN.
        # Let it see itself: its output is never used, and the NaN would leak into gradients.
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed
