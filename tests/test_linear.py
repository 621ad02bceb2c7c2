"""gpt2lite.model.linear: decoding-step matmuls computed as W @ x^T give the nn.Linear results (to float32
rounding) and the same greedy tokens; training and anything but a small decoding step take nn.Linear itself,
bit for bit."""

import pytest
import torch
import torch.nn as nn

import gpt2lite.model as model_module
from gpt2lite import GPT2, GPT2Config, generate
from gpt2lite.model import linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 1, 48), (1, 1, 48), (16, 1, 48)])
def test_few_rows_without_grad_equal_nn_linear(bias, shape):
    torch.manual_seed(0)
    module = nn.Linear(48, 130, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        got, want = linear(module, x), module(x)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_training_and_many_rows_use_nn_linear_exactly():
    torch.manual_seed(1)
    module = nn.Linear(16, 20)
    few = torch.randn(2, 1, 16, requires_grad=True)
    out = linear(module, few)  # grad enabled: nn.Linear itself, differentiable
    assert torch.equal(out, module(few)) and out.requires_grad
    with torch.no_grad():
        for shape in [(3, 2, 16), (model_module.FEW_ROWS + 1, 1, 16), (4, 16)]:  # not a small decoding step
            many = torch.randn(*shape)
            assert torch.equal(linear(module, many), module(many))


def test_greedy_generation_is_unchanged_by_the_decoding_matmuls(monkeypatch):
    torch.manual_seed(2)
    model = GPT2(GPT2Config.from_name("tiny")).eval()
    prompts = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(3))
    fast = generate(model, prompts, 12, eos_id=None)
    monkeypatch.setattr(model_module, "FEW_ROWS", 0)  # every matmul through nn.Linear
    plain = generate(model, prompts, 12, eos_id=None)
    assert torch.equal(fast, plain)
