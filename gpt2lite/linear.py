"""y = x @ W^T + b, with the forward matmul through oneDNN for float32 on the CPU.

PyTorch's CPU matmuls go to MKL. On CPUs that MKL does not give its fastest path (the benchmark machine is
an AMD EPYC with AVX-512, where MKL runs its AVX2 kernels), oneDNN, which PyTorch also ships, is faster on
GPT-2's shapes. Measured there, GFLOP/s of MKL -> oneDNN:

    training, 1024 rows:  768 -> 2304  150 -> 201    768 -> 3072  172 -> 203    768 -> 50257  98 -> 156
    decoding, 4 rows:     768 -> 50257 (the LM head) 15.1 ms -> 10.6 ms; each block's four layers 1.8 -> 1.0 ms

The backward matmuls (x's and W's gradients) stay with MKL, which was as fast or faster on them. The
products and sums are the same; only their order differs, in the last bits of float32. Anything else (CUDA,
other dtypes, autocast, a PyTorch without oneDNN, or `torch.backends.mkldnn.flags(enabled=False)`) is plain
F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None


def uses_onednn(x, weight) -> bool:
    """Whether linear(x, weight, ...) takes the oneDNN path."""
    return (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
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
