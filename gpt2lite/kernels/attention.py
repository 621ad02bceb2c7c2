"""scaled_dot_product_attention: F.scaled_dot_product_attention, with a leaner path for CPU training with
attention dropout.

What it buys: a third less activation memory and a faster step when training on the CPU with dropout
(benchmarks/run.py, README "Performance"; tests/model/test_attention.py). Everywhere else it is PyTorch's function.

With dropout on, PyTorch's CPU scaled_dot_product_attention takes its plain math path: it keeps the
(B, nh, T, S) scores, probabilities and dropped probabilities for backward (about 40 MB per GPT-2 block at
4 x 256 tokens, a third of the activation memory) and spends time guarding against fully masked rows. This
function keeps q, k, v, the output and the dropout mask as booleans (1 byte per score), and recomputes the
probabilities in backward with one extra q @ k^T and softmax (about 2 % of the block's FLOPs). The
arithmetic is the textbook one; the mask is applied with masked_fill (no boolean-to-float copies), and it
is drawn as rand < p (faster than bernoulli_ on the CPU), so it is a different draw from PyTorch's, from
the same distribution. Rows must keep at least one key (causal attention and gpt2lite's padding masks do).

Under autocast q, k and v are cast to the autocast dtype, as autocast does for scaled_dot_product_attention,
and the function computes as FlashAttention does in bf16: the matmuls in that dtype (accumulating in float32),
the softmax in float32 rounded to that dtype, and the softmax backward's subtraction in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale=None):
    """F.scaled_dot_product_attention (same arguments), except for training with dropout on the CPU, where
    PyTorch's math path keeps every (T x S) probability for backward: dropout_attention keeps a boolean mask
    and recomputes the rest (same arithmetic, a third less activation memory)."""
    if dropout_p > 0.0 and q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        scale = scale if scale is not None else q.size(-1) ** -0.5
        return dropout_attention(q, k, v, attn_mask, is_causal, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def dropout_attention(q, k, v, mask, is_causal: bool, dropout: float, scale: float):
    """softmax(q k^T * scale, masked) with dropout, @ v. q: (B, nh, T, hs); k, v: (B, nh, S, hs);
    mask: None or bool (B or 1, 1, T, S), True = may attend; is_causal: the last T of S positions attend
    causally. Returns (B, nh, T, hs)."""
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"dropout_attention needs a dropout probability in (0, 1), got {dropout}")
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _DropoutAttention.apply(q, k, v, mask, is_causal, dropout, scale)


def _scores(q, k, mask, is_causal: bool, scale: float):
    """Masked, scaled scores (B, nh, T, S) in a fresh tensor."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)  # (B, nh, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu_(S - T + 1)  # (T, S)
        scores.masked_fill_(future, float("-inf"))
    elif mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores


class _DropoutAttention(torch.autograd.Function):
    """Every op in q's dtype, autocast off (the inputs are already cast); see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, dropout, scale):
        with torch.autocast(q.device.type, enabled=False):
            # softmax of bf16 scores accumulates in float32 and rounds once
            probs = torch.softmax(_scores(q, k, mask, is_causal, scale), dim=-1)  # (B, nh, T, S)
            # drawn in float32 whatever q's dtype: bf16 and float32 runs drop the same entries
            drop = torch.rand(probs.shape, device=probs.device) < dropout  # (B, nh, T, S) bool
            dropped = probs.masked_fill_(drop, 0.0).mul_(1.0 / (1.0 - dropout))
            out = torch.matmul(dropped, v)  # (B, nh, T, hs)
        ctx.save_for_backward(q, k, v, mask, drop, out)
        ctx.is_causal, ctx.dropout, ctx.scale = is_causal, dropout, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, drop, out = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype)
            inverse_keep = 1.0 / (1.0 - ctx.dropout)
            probs = torch.softmax(_scores(q, k, mask, ctx.is_causal, ctx.scale), dim=-1)  # (B, nh, T, S)
            dropped = probs.masked_fill(drop, 0.0).mul_(inverse_keep)
            grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)  # (B, nh, S, hs)
            del dropped
            grad_probs = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(drop, 0.0)  # (B, nh, T, S)
            # softmax backward: d scores = p * (d p - sum_j(d p * p)); that row sum equals grad_out . out
            # (out = dropped probabilities @ v), as in FlashAttention: (B, nh, T, hs) work instead of
            # (B, nh, T, S). In float32: d p and the row sum nearly cancel, which bf16 would round away.
            row_dot = (grad_out.float() * out.float()).sum(dim=-1, keepdim=True)  # (B, nh, T, 1)
            grad_scores = grad_probs.float().mul_(inverse_keep).sub_(row_dot).mul_(probs).mul_(ctx.scale)
            grad_scores = grad_scores.to(q.dtype)
            grad_q = torch.matmul(grad_scores, k)  # (B, nh, T, hs)
            grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)  # (B, nh, S, hs)
        return grad_q, grad_k, grad_v, None, None, None, None
