"""The label-positions-only, chunked LM loss equals cross-entropy over the full logits, in value and gradients.

gpt2lite computes the LM head only where a label is, in chunks whose gradients are formed in the forward
pass (the whole logits tensor never exists). These tests compare it with the plain computation (full
logits, F.cross_entropy, autograd) and with transformers' GPT2LMHeadModel loss.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lite import GPT2, GPT2Config
from gpt2lite.kernels.loss import lm_loss as causal_lm_loss, linear_cross_entropy
from gpt2lite.loss import IGNORE_INDEX

V, C = 50257, 32


def full_logits_loss(hidden, labels, head):
    """The plain computation: logits everywhere, shift, mean cross-entropy over labelled positions."""
    logits = head(hidden)[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def sparse_labels(B, T, seed, fraction=0.4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=generator)
    ignored = torch.rand(B, T, generator=generator) > fraction
    return labels.masked_fill(ignored, IGNORE_INDEX)


def close(got, want, rtol=1e-5):
    """Equal up to float32 rounding: the matmuls sum 50,257 terms in a different order per chunk size."""
    return torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def grads_of(loss_fn, *tensors):
    for tensor in tensors:
        tensor.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_full_logits(chunk_size, bias):
    torch.manual_seed(0)
    head = nn.Linear(C, V, bias=bias)
    if bias:
        nn.init.normal_(head.bias, std=0.5)
    hidden = torch.randn(3, 9, C, requires_grad=True)
    labels = sparse_labels(3, 9, seed=1)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    full, full_grads = grads_of(lambda: full_logits_loss(hidden, labels, head), *params)
    chunked, chunked_grads = grads_of(lambda: causal_lm_loss(hidden, labels, head, chunk_size=chunk_size), *params)
    assert torch.allclose(chunked, full, rtol=1e-6, atol=1e-6), (chunked.item(), full.item())
    for got, want in zip(chunked_grads, full_grads):
        assert close(got, want), (got - want).abs().max()


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_unchanged():
    torch.manual_seed(1)
    head = nn.Linear(C, V, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 7, C, requires_grad=True)
    labels = sparse_labels(2, 7, seed=2, fraction=0.7)
    full, (want,) = grads_of(lambda: full_logits_loss(hidden, labels, head), hidden)
    chunked, (got,) = grads_of(lambda: causal_lm_loss(hidden, labels, head, chunk_size=4), hidden)
    assert head.weight.grad is None
    assert torch.allclose(chunked, full, rtol=1e-6) and close(got, want)


def test_logits_are_never_saved_for_backward():
    """Nothing of size (positions x vocab) is kept for the backward pass: only gradients of hidden and head."""
    torch.manual_seed(2)
    head = nn.Linear(C, V, bias=False)
    hidden = torch.randn(2, 40, C, requires_grad=True)
    labels = sparse_labels(2, 40, seed=3, fraction=1.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = causal_lm_loss(hidden, labels, head, chunk_size=16)
    assert saved, "the loss saved nothing, so backward could not work"
    assert all(shape.numel() <= V * C for shape in saved), saved  # the head's gradient at most
    assert not any(len(shape) == 2 and shape[-1] == V and shape[0] != V for shape in saved)
    loss.backward()
    assert hidden.grad.shape == hidden.shape and head.weight.grad.shape == head.weight.shape


def test_no_grad_loss_equals_full_logits():
    torch.manual_seed(3)
    head = nn.Linear(C, V, bias=False)
    hidden = torch.randn(2, 6, C)
    labels = sparse_labels(2, 6, seed=4)
    with torch.no_grad():
        assert torch.allclose(causal_lm_loss(hidden, labels, head, chunk_size=2),
                              full_logits_loss(hidden, labels, head), rtol=1e-6)


def test_non_linear_head_takes_the_autograd_path_with_the_same_result():
    """A head that is not a plain nn.Linear (an adapter wrapping it) still gives the full-logits loss."""
    torch.manual_seed(4)
    head = nn.Sequential(nn.Linear(C, V, bias=False))
    hidden = torch.randn(2, 5, C, requires_grad=True)
    labels = sparse_labels(2, 5, seed=5, fraction=1.0)
    params = [hidden, head[0].weight]
    full, full_grads = grads_of(lambda: full_logits_loss(hidden, labels, head), *params)
    chunked, chunked_grads = grads_of(lambda: causal_lm_loss(hidden, labels, head, chunk_size=3), *params)
    assert torch.allclose(chunked, full, rtol=1e-6)
    assert all(close(a, b) for a, b in zip(chunked_grads, full_grads))


def test_bad_arguments_are_refused():
    head = nn.Linear(C, V, bias=False)
    hidden = torch.randn(1, 4, C)
    with pytest.raises(ValueError, match="labels have shape"):
        causal_lm_loss(hidden, torch.zeros(1, 3, dtype=torch.long), head)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        causal_lm_loss(hidden, torch.zeros(1, 4, dtype=torch.long), head, chunk_size=0)


def test_bf16_autocast_matches_autograd_under_autocast():
    """Under CPU bf16 autocast the matmuls run in bf16 on both paths; the results agree to bf16 precision."""
    torch.manual_seed(5)
    head = nn.Linear(C, V, bias=False)
    hidden = torch.randn(2, 6, C, requires_grad=True)
    labels = sparse_labels(2, 6, seed=6, fraction=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, (full_h, full_w) = grads_of(lambda: full_logits_loss(hidden, labels, head), hidden, head.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, (fused_h, fused_w) = grads_of(lambda: linear_cross_entropy(
            hidden[:, :-1].flatten(0, 1), head.weight, None, labels[:, 1:].flatten(), 4) / 10, hidden, head.weight)
    assert fused_w.dtype == head.weight.dtype and fused_h.dtype == hidden.dtype
    assert abs(fused.item() - full.item()) < 2e-2
    assert torch.allclose(fused_h, full_h, atol=2e-3) and torch.allclose(fused_w, full_w, atol=2e-3)


def test_model_loss_and_every_gradient_equal_transformers(tiny_hf_dir):
    """gpt2lite's model(ids, labels=...) against GPT2LMHeadModel(...).loss on the same weights: loss and the
    gradient of every parameter (the tied wte collects embedding and head gradients on both sides)."""
    import transformers

    reference = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)).eval()
    model = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (2, 24), generator=generator)
    labels = ids.masked_fill(torch.rand(2, 24, generator=generator) > 0.5, IGNORE_INDEX)
    want = reference(input_ids=ids, labels=labels).loss
    want.backward()
    got = model(ids, labels=labels)
    got.backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got.item(), want.item())
    reference_grads = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        expected = reference_grads[name].grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            expected = expected.t()  # Conv1D stores (in, out)
        assert torch.allclose(parameter.grad, expected, rtol=1e-4, atol=1e-6), name



