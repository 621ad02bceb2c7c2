"""gpt2lite.kernels.attention.dropout_attention (training with dropout on the CPU) computes textbook attention with
dropout, keeps no float (T x S) tensor for backward, and the model uses it only where it should."""

import pytest
import torch
import torch.nn.functional as F

from gpt2lite import GPT2, GPT2Config
from gpt2lite.kernels.attention import dropout_attention

B, NH, T, HS = 2, 3, 7, 8


def qkv(seed, S=T):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, T, HS, generator=generator, requires_grad=True)
    k = torch.randn(B, NH, S, HS, generator=generator, requires_grad=True)
    v = torch.randn(B, NH, S, HS, generator=generator, requires_grad=True)
    return q, k, v


def textbook(q, k, v, allowed, keep, dropout, scale):
    """softmax(q k^T scale) over the allowed keys, times keep / (1 - p), @ v, through autograd."""
    scores = (q @ k.transpose(-2, -1)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs * keep / (1 - dropout)) @ v


@pytest.mark.parametrize("masking", ["causal", "padding"])
def test_output_and_gradients_equal_textbook_attention_with_the_same_mask(masking):
    dropout, scale = 0.3, HS ** -0.5
    q, k, v = qkv(0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if masking == "causal":
        mask, allowed = None, causal
    else:  # left padding of 2 in the first row; every query still sees itself
        real = torch.ones(B, T, dtype=torch.bool)
        real[0, :2] = False
        mask = (causal & real[:, None, None, :]) | torch.eye(T, dtype=torch.bool)
        allowed = mask
    grad_out = torch.randn(B, NH, T, HS, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = dropout_attention(q, k, v, mask, masking == "causal", dropout, scale)
    out.backward(grad_out)
    ours = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    torch.manual_seed(5)  # the same draw: the function's only random call
    keep = torch.rand(B, NH, T, T) >= dropout
    for t in (q, k, v):
        t.grad = None
    expected_out = textbook(q, k, v, allowed, keep, dropout, scale)
    expected_out.backward(grad_out)
    expected = [expected_out.detach()] + [t.grad for t in (q, k, v)]
    for got, want in zip(ours, expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert 0.15 < 1 - keep.float().mean() < 0.45  # dropout really dropped about 30 %


def test_backward_keeps_only_q_k_v_and_a_boolean_mask():
    q, k, v = qkv(2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.shape, t.dtype)) or t, lambda t: t):
        out = dropout_attention(q, k, v, None, True, 0.1, 1.0)
    square = [dtype for shape, dtype in saved if tuple(shape[-2:]) == (T, T)]
    assert square == [torch.bool]  # the dropout mask, one byte per score
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))


def test_model_uses_it_only_for_training_with_dropout(monkeypatch):
    """Evaluation and dropout-free training keep PyTorch's fused SDPA (results unchanged); training with
    dropout goes through dropout_attention."""
    import gpt2lite.kernels.attention as attention_module

    calls = []
    real = attention_module.dropout_attention
    monkeypatch.setattr(attention_module, "dropout_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_name("tiny"))  # GPT-2's dropout of 0.1
    model.eval()
    with torch.no_grad():
        model(ids, labels=ids)
    assert calls == []
    model.train()
    model(ids, labels=ids).backward()
    assert len(calls) == model.config.n_layer
    calls.clear()
    no_dropout = GPT2(GPT2Config.from_name("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).train()
    no_dropout(ids, labels=ids).backward()
    assert calls == []


def statistic(model, ids):
    """A scalar of the hidden states that attention dropout moves (the body only: no LM head)."""
    ids_embeds = model.transformer.wte(ids).detach().requires_grad_()  # a gradient is wanted: training path
    return model.transformer(inputs_embeds=ids_embeds).pow(2).mean().detach()


def test_training_with_dropout_learns_like_sdpa_on_average():
    """Attention dropout matches PyTorch's SDPA dropout in distribution: the mean over draws of a statistic
    of the training-mode hidden states agrees (different draws, same distribution)."""
    import gpt2lite.kernels.attention as attention_module

    torch.manual_seed(0)
    config = GPT2Config.from_name("tiny", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.5)
    model = GPT2(config).train()
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.enable_grad():
        ours = torch.stack([statistic(model, ids) for _ in range(30)])
    sdpa = lambda q, k, v, mask, causal, p, scale: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale)
    original = attention_module.dropout_attention
    attention_module.dropout_attention = sdpa
    try:
        theirs = torch.stack([statistic(model, ids) for _ in range(30)])
    finally:
        attention_module.dropout_attention = original
    assert ours.std() > 0 and theirs.std() > 0
    spread = float(torch.sqrt(ours.var() / 30 + theirs.var() / 30))
    assert abs(float(ours.mean() - theirs.mean())) < 4 * spread + 1e-4
