"""LoRA and DoRA on a 2x2 layer with rank 1, every number worked out by hand in the comments: the forward
pass, the merged weight, unmerging, and DoRA's magnitude. They double as a worked example of the formulas
in gpt2lite/peft/lora/layer.py; parity with peft on real models lives in test_peft_io.py."""

import pytest
import torch
import torch.nn as nn

from gpt2lite.peft import DoRALinear, LoRALinear


def layer_with(cls, weight, bias, A, B, alpha, **options):
    """A `cls` (LoRALinear or DoRALinear) of rank 1 over nn.Linear(2, 2) holding `weight` and `bias`, with
    its lora_A set to A (1, 2) and lora_B to B (2, 1)."""
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(weight))
        base.bias.copy_(torch.tensor(bias))
    layer = cls(base, rank=1, alpha=alpha, **options)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor(A))
        layer.lora_B.weight.copy_(torch.tensor(B))
    return layer.eval()


def lora_example():
    #   W = [[1, 2],   b = [0.5, -0.5]   A = [[1, 1]]   B = [[1],    alpha = 2, rank 1: scaling = 2 / 1 = 2
    #        [3, 4]]                                         [2]]
    return layer_with(LoRALinear, [[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5], [[1.0, 1.0]], [[1.0], [2.0]], alpha=2)


def test_lora_forward_is_base_plus_scaled_update():
    layer = lora_example()
    x = torch.tensor([[1.0, 2.0]])
    # W x + b = [1 + 4, 3 + 8] + [0.5, -0.5] = [5.5, 10.5]
    # A x = 1 + 2 = 3;  B (A x) = [3, 6];  times scaling 2 = [6, 12]
    # y = [5.5 + 6, 10.5 + 12] = [11.5, 22.5]
    assert layer.scaling == 2.0
    assert torch.equal(layer(x), torch.tensor([[11.5, 22.5]]))
    layer.adapter_enabled = False  # the base layer alone
    assert torch.equal(layer(x), torch.tensor([[5.5, 10.5]]))


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_lora_and_dora_at_initialisation_change_nothing(cls):
    """B = 0, so B A x = 0 (and for DoRA m / ||W + 0|| = 1): the layer is the base layer exactly."""
    base = nn.Linear(2, 2)
    layer = cls(base, rank=1, alpha=2)
    assert layer.weight is base.weight and layer.bias is base.bias  # taken over, not copied
    assert torch.equal(layer.lora_B.weight, torch.zeros(2, 1))
    x = torch.randn(3, 2)
    with_adapter = layer(x)
    layer.adapter_enabled = False
    assert torch.equal(with_adapter, layer(x))


def test_lora_merge_and_unmerge():
    layer = lora_example()
    x = torch.tensor([[1.0, 2.0]])
    # scaling * B @ A = 2 * [[1, 1],  = [[2, 2],     W + delta = [[3, 4],
    #                        [2, 2]]     [4, 4]]                  [7, 8]]
    assert torch.equal(layer.delta_weight(), torch.tensor([[2.0, 2.0], [4.0, 4.0]]))
    assert torch.equal(layer.merged_weight(), torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    layer.merge()
    layer.merge()  # twice is once
    assert layer.merged and torch.equal(layer.weight, torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    # merged: W' x + b = [3 + 8, 7 + 16] + [0.5, -0.5] = [11.5, 22.5], as unmerged
    assert torch.equal(layer(x), torch.tensor([[11.5, 22.5]]))
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


@pytest.mark.parametrize("rslora,scaling", [(False, 8 / 4), (True, 8 / 4 ** 0.5)])
def test_rslora_divides_alpha_by_the_square_root_of_the_rank(rslora, scaling):
    layer = LoRALinear(nn.Linear(8, 8), rank=4, alpha=8, rslora=rslora)  # alpha / r = 2, alpha / sqrt(r) = 4
    assert layer.scaling == scaling


def dora_example():
    #   W = [[4, 0],   b = [1, -1]   A = [[0, 3]]   B = [[1],    alpha = 1, rank 1: scaling = 1
    #        [0, 3]]                                     [0]]
    return layer_with(DoRALinear, [[4.0, 0.0], [0.0, 3.0]], [1.0, -1.0], [[0.0, 3.0]], [[1.0], [0.0]], alpha=1)


def test_dora_magnitude_starts_at_the_row_norms_of_w():
    layer = dora_example()
    # m = [||[4, 0]||, ||[0, 3]||] = [4, 3]
    assert torch.equal(layer.lora_magnitude_vector, torch.tensor([4.0, 3.0]))
    assert {name for name, _ in layer.named_parameters()} == {
        "weight", "bias", "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}  # peft's names


def test_dora_merged_weight_rescales_each_row_to_its_magnitude():
    layer = dora_example()
    # delta = B @ A = [[0, 3],    W + delta = [[4, 3],   row norms ||[4, 3]|| = 5, ||[0, 3]|| = 3
    #                  [0, 0]]                 [0, 3]]
    # W' = m / norm * (W + delta) = [4/5 * [4, 3], 3/3 * [0, 3]] = [[3.2, 2.4], [0, 3]]
    expected = torch.tensor([[3.2, 2.4], [0.0, 3.0]])
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.linalg.vector_norm(layer.merged_weight(), dim=1), torch.tensor([4.0, 3.0]))
    layer.merge()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, torch.tensor([[4.0, 0.0], [0.0, 3.0]]), rtol=0, atol=1e-6)


def test_dora_forward_equals_the_merged_layer():
    layer = dora_example()
    x = torch.tensor([[1.0, 1.0]])
    # W' x + b = [3.2 + 2.4, 0 + 3] + [1, -1] = [6.6, 2]. The forward pass gets there without forming W':
    # base = W x + b = [5, 2];  update = B A x = [3, 0];  m / norm = [0.8, 1]
    # y = base + (m / norm - 1) * (base - b) + m / norm * update = [5 - 0.8 + 2.4, 2] = [6.6, 2]
    torch.testing.assert_close(layer(x), torch.tensor([[6.6, 2.0]]), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.lora_magnitude_vector.copy_(torch.tensor([5.0, 3.0]))  # a learned length: row 0 becomes [4, 3]
    # W' row 0 = 5/5 * [4, 3];  y_0 = 4 + 3 + 1 = 8
    torch.testing.assert_close(layer(x), torch.tensor([[8.0, 2.0]]), rtol=0, atol=1e-6)
