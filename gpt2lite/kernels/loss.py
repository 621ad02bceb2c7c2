"""lm_loss: gpt2lite.loss.lm_loss without ever holding the whole logits tensor.

What it buys: less memory and time per step on the LM head, the single largest matmul of GPT-2 small
(benchmarks/run.py, README "Performance"; tests/test_loss.py shows the same loss and gradients).

A language-modelling batch often carries labels on a few positions only (summarization: the summary
tokens). The LM head (C -> 50,257) is the single largest matmul of GPT-2 small, so it runs only at the
positions that carry a label. And it runs in chunks whose gradients are computed on the spot: for each
chunk of positions the forward pass computes the logits, the summed cross-entropy, and - when a backward
pass will follow - d(loss)/d(hidden) and d(loss)/d(head weight), then frees the logits. The (positions x
vocab) logits never exist whole and are never stored for backward, which only scales the stored gradients.
The matmuls are the same three as autograd's (logits, input gradient, weight gradient): no recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2lite.loss import all_positions_loss, labelled_positions
from gpt2lite.kernels.linear import is_plain_linear, linear

CHUNK_SIZE = 512  # positions per chunk: chunk x 50,257 float32 logits = 103 MB


def lm_loss(hidden, labels, head, chunk_size: int = CHUNK_SIZE):
    """gpt2lite.loss.lm_loss (same arguments), by chunks of `chunk_size` positions; a plain linear head goes
    through linear_cross_entropy, any other head (an adapter around it) through autograd."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if torch.compiler.is_compiling():  # see gpt2lite.loss: the labelled positions' count is data-dependent
        return all_positions_loss(hidden, labels, head)
    selected, targets = labelled_positions(hidden, labels, head)  # (N, C), (N,)
    n = targets.numel()
    if n == 0:
        # no label in this batch: a zero that still depends on the parameters, so backward() works
        return hidden.sum() * 0.0
    device_type = hidden.device.type
    fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    if is_plain_linear(head) and not fp16:
        return linear_cross_entropy(selected, head.weight, head.bias, targets, chunk_size, scale=1.0 / n)
    # Any other head (an adapter around it), or float16 autocast: the same chunks through autograd, logits
    # kept for backward. float16 must wait for backward: the logits' gradients (about 1 / (V * N) each) only
    # fit float16's range once the GradScaler's factor has multiplied them, which happens in backward.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        logits = head(selected[start:start + chunk_size]).float()  # (chunk, V)
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total / n


def linear_cross_entropy(hidden, weight, bias, targets, chunk_size: int = CHUNK_SIZE, scale: float = 1.0):
    """scale * the summed cross-entropy of the logits hidden @ weight.T + bias against targets, by chunks.

    hidden: (N, C); weight: (V, C); bias: (V,) or None; targets: (N,) in [0, V). Returns a float32 scalar
    (scale = 1 / N gives the mean). The gradients are formed as autograd forms them for
    scale * F.cross_entropy(reduction="sum"): exp(log_softmax) * scale, minus scale at the target.
    Under autocast the matmuls run in the autocast dtype and the softmax in float32, as autograd would.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, dtype, scale)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: summed cross-entropy, plus the gradients of hidden, weight and bias when they are needed.

    Each chunk holds one (n, V) float32 buffer: the logits, turned in place into exp(logit - max), then into
    the softmax and the gradient of the logits. Chunks of 512 rows keep the matmuls large enough to run near
    the machine's peak (256 rows ran the two backward matmuls at two thirds of it) in 103 MB.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, dtype, scale):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            compute_weight = weight.to(dtype)
            compute_bias = None if bias is None else bias.to(dtype)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = grad_bias = None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.size(0), chunk_size):
                chunk = hidden[start:start + chunk_size].to(dtype)  # (n, C)
                chunk_targets = targets[start:start + chunk_size]  # (n,)
                rows = torch.arange(chunk.size(0), device=chunk.device)
                logits = linear(chunk, compute_weight, compute_bias).float()  # (n, V)
                # cross-entropy = logsumexp(logits) - logit[target], with the max taken out for stability
                row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                target_logits = logits[rows, chunk_targets]  # (n,)
                probs = logits.sub_(row_max).exp_()  # (n, V), unnormalised, in place
                row_sum = probs.sum(dim=-1, keepdim=True)  # (n, 1)
                total += (row_sum.log() + row_max).sum() - target_logits.sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                # d(scale * summed loss)/d(logits) = scale * softmax - scale * one_hot(target), in place
                grad_logits = probs.mul_(scale / row_sum)  # (n, V)
                grad_logits[rows, chunk_targets] -= scale
                if need_bias:
                    chunk_bias = grad_logits.sum(0)  # (V,)
                    grad_bias = chunk_bias if grad_bias is None else grad_bias.add_(chunk_bias)
                grad_logits = grad_logits.to(dtype)
                if need_hidden:
                    if dtype == hidden.dtype:
                        torch.matmul(grad_logits, compute_weight, out=grad_hidden[start:start + chunk_size])
                    else:
                        grad_hidden[start:start + chunk_size] = grad_logits @ compute_weight  # (n, C)
                if need_weight:
                    if grad_weight is None:
                        grad_weight = (grad_logits.t() @ chunk).float()  # (V, C)
                    elif dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.t(), chunk)  # (V, C)
                    else:
                        grad_weight += (grad_logits.t() @ chunk).float()
                del probs, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # loss.backward() passes a gradient of exactly 1: the stored gradients are then final as they are
        # (no second 154 MB tensor for the head's weight). Otherwise (loss scaling, accumulation) scale them.
        unit = grad_total.device.type == "cpu" and grad_total.item() == 1.0
        if grad_hidden is not None and not unit:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight if unit else grad_weight * grad_total).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias if unit else grad_bias * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
