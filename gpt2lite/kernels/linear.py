"""FastLinear: nn.Linear whose float32 CPU forward runs through oneDNN instead of MKL.

What it buys: PyTorch's CPU matmuls go to MKL, which on some CPUs (the AMD EPYC the benchmarks first ran on)
takes its AVX2 kernels; oneDNN, which PyTorch also ships, runs GPT-2's shapes faster there, most of all the
LM head of a decoding step. On other CPUs the two are about even. The backward matmuls stay with MKL. The
products and sums are the same, only their order differs (the last bits of float32). Anything else (CUDA,
other dtypes, autocast, torch.compile, a PyTorch without oneDNN, `torch.backends.mkldnn.flags(enabled=False)`) is F.linear.
Measured against transformers + peft: benchmarks/run.py (README, "Performance"); tests/kernels/test_linear.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None


def uses_onednn(x, weight) -> bool:
    """Whether linear(x, weight, ...) takes the oneDNN path (never under torch.compile: Inductor cannot
    lower mkldnn._linear_pointwise, and it plans its own matmuls)."""
    return (_ONEDNN_LINEAR is not None and not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias) (x: (..., in), weight: (out, in), bias: (out,) or None), differentiable."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_forward(x, weight, bias)


def _onednn_forward(x, weight, bias):
    rows = x.reshape(-1, x.size(-1))  # (N, in)
    out = _ONEDNN_LINEAR(rows, weight, bias, "none", [], "")  # (N, out)
    return out.view(*x.shape[:-1], weight.size(0))


class _OneDNNLinear(torch.autograd.Function):
    """Forward through oneDNN; backward as autograd does it for F.linear (MKL matmuls)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.size(-1))  # (N, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight).view(x.shape)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ x.reshape(-1, x.size(-1))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)  # (out,)
        return grad_x, grad_weight, grad_bias


class FastLinear(nn.Linear):
    """nn.Linear with its forward through `linear` above; same parameters, state-dict keys and results (to
    float32 rounding). use_fast_kernels turns a model's nn.Linear layers into FastLinear and back."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def is_plain_linear(module) -> bool:
    """Whether `module` is an nn.Linear as built, fast or not (not a subclass with other arithmetic)."""
    return type(module) in (nn.Linear, FastLinear)
