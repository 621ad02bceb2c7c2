"""gpt2lite.kernels.linear: float32 CPU matmuls through oneDNN give F.linear's outputs and gradients (to float32
rounding), the same greedy tokens and model losses; everything else is F.linear itself, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from gpt2lite import GPT2, GPT2Config, generate
from gpt2lite.kernels.linear import linear, uses_onednn

needs_onednn = pytest.mark.skipif(not uses_onednn(torch.zeros(1), torch.zeros(1)),
                                  reason="this PyTorch has no oneDNN linear")


def close(got, want, rtol=1e-5):
    """Equal up to float32 rounding: oneDNN sums the products in another order than MKL."""
    return torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 1, 48), (3, 7, 48), (5, 48)])
@pytest.mark.parametrize("trainable", ["all", "input_only", "weight_only"])
def test_outputs_and_gradients_equal_f_linear(bias, shape, trainable):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(130, 48, generator=generator)
    b = torch.randn(130, generator=generator) if bias else None
    x.requires_grad_(trainable in ("all", "input_only"))
    weight.requires_grad_(trainable in ("all", "weight_only"))
    if b is not None:
        b.requires_grad_(trainable == "all")
    params = [t for t in (x, weight, b) if t is not None and t.requires_grad]
    grad_out = torch.randn(*shape[:-1], 130, generator=generator)

    results = []
    for fn in (linear, F.linear):
        out = fn(x, weight, b)
        grads = torch.autograd.grad(out, params, grad_out)
        results.append((out.detach(), grads))
    (got, got_grads), (want, want_grads) = results
    assert got.shape == want.shape and close(got, want), (got - want).abs().max()
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape and close(g, w), (g - w).abs().max()


@needs_onednn
def test_without_autograd_it_is_the_same_function():
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(4, 1, 768, generator=generator), torch.randn(2304, 768, generator=generator)
    with torch.no_grad():
        got = linear(x, weight)
    assert not got.requires_grad and close(got, F.linear(x, weight))


def test_other_cases_are_f_linear_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 16, generator=generator)
    weight, bias = torch.randn(20, 16, generator=generator), torch.randn(20, generator=generator)
    with torch.backends.mkldnn.flags(enabled=False):  # the user's switch for oneDNN
        assert not uses_onednn(x, weight)
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert not uses_onednn(x.double(), weight.double())
    assert torch.equal(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.linear
        assert not uses_onednn(x, weight)
        got = linear(x, weight, bias)
        assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(x, weight, bias))


@needs_onednn
def test_model_loss_gradients_and_greedy_tokens_are_unchanged():
    """The whole model with and without oneDNN: loss and gradients to float32 rounding, same greedy tokens."""
    torch.manual_seed(3)
    model = GPT2(GPT2Config.from_name("tiny")).eval()  # no dropout: both runs see the same arithmetic
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(4))
    results = []
    for enabled in (True, False):
        with torch.backends.mkldnn.flags(enabled=enabled):
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            tokens = generate(model, ids[:, :9], 12, eos_id=None)
        results.append((loss.detach(), grads, tokens))
    (loss, grads, tokens), (want_loss, want_grads, want_tokens) = results
    assert torch.allclose(loss, want_loss, rtol=1e-6)
    for got, want in zip(grads, want_grads):
        assert close(got, want, rtol=1e-4), (got - want).abs().max()
    assert torch.equal(tokens, want_tokens)
