"""NF4 quantization and QLoRA: the published codebook, the error bound, the storage, training on a 4-bit base."""

import copy

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, count_parameters
from gpt2lite.peft.lora.add import add_lora
from gpt2lite.quantization.nf4 import (ABSMAX_BLOCK_SIZE, NF4_BLOCK_SIZE, dequantize_nf4_tensor, dynamic_map, nf4_codebook,
                                       quantize_nf4_tensor)
from gpt2lite.quantization.linear import NF4Linear, quantize_nf4
from helpers import adamw_steps

# The NF4 data type as published (QLoRA paper, appendix E; bitsandbytes' NF4 lookup table).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_codebook_equals_the_published_nf4_values():
    codebook = nf4_codebook()
    assert codebook.dtype == torch.float32 and codebook.shape == (16,)
    assert torch.allclose(codebook, torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-7)


def test_dynamic_map_is_bitsandbytes_signed_8bit_map():
    levels = dynamic_map()
    assert levels.shape == (256,) and bool((levels[1:] > levels[:-1]).all())
    assert levels.max() == 1.0 and (levels == 0).sum() == 1
    # symmetric apart from +1: bitsandbytes' signed map has 127 negative and 128 positive levels
    assert torch.allclose(levels[levels < 0].flip(0).neg(), levels[(levels > 0) & (levels < 1)])


def error_bound(weight, double_quant):
    """Per element: half the largest gap between adjacent NF4 levels times the block's absmax, plus, with
    double quantization, the largest error on a block's absmax (half the 8-bit map's coarsest step,
    or its distance to -1, times the largest centred absmax of its 256-block)."""
    codebook = torch.tensor(PUBLISHED_NF4)
    half_gap = (codebook[1:] - codebook[:-1]).max() / 2  # 0.1385, between 0.7230 and 1
    blocks = weight.reshape(-1, NF4_BLOCK_SIZE)  # (n_blocks, 64)
    absmax = blocks.abs().amax(1)  # (n_blocks,)
    bound = absmax * half_gap  # (n_blocks,)
    if double_quant:
        levels = dynamic_map()
        step = max(((levels[1:] - levels[:-1]).max() / 2).item(), (1 + levels.min()).item())
        centred = (absmax - absmax.mean()).reshape(-1, ABSMAX_BLOCK_SIZE).abs().amax(1)  # (n_blocks / 256,)
        bound = bound + step * centred.repeat_interleave(ABSMAX_BLOCK_SIZE)
    return bound[:, None].expand_as(blocks).reshape(weight.shape)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_dequantize_error_within_the_bound(double_quant):
    torch.manual_seed(0)
    weight = torch.randn(512, 256)  # 2048 blocks of 64, 8 blocks of 256 absmax constants
    restored = dequantize_nf4_tensor(quantize_nf4_tensor(weight, double_quant))
    error = (restored - weight).abs()
    bound = error_bound(weight, double_quant)
    assert bool((error <= bound + 1e-6).all()), (error - bound).max()
    # and the bound is not vacuous: the worst element comes within 10% of it
    assert (error / bound).max() > 0.9
    assert error.mean() < 0.1  # QLoRA-level accuracy for unit-variance weights (measured ~0.073)


def test_storage_is_half_a_byte_per_weight_plus_constants():
    linear = torch.nn.Linear(768, 768)
    n = 768 * 768
    n_blocks = n // 64
    double = NF4Linear(linear, double_quant=True)
    single = NF4Linear(linear, double_quant=False)
    # 4-bit codes + one 8-bit code per block + a float32 scale per 256 blocks + the float32 mean
    assert double.quantized_bytes() == n // 2 + n_blocks + 4 * (n_blocks // 256) + 4
    assert single.quantized_bytes() == n // 2 + 4 * n_blocks  # float32 absmax per block of 64
    assert 0.5 < double.quantized_bytes() / n < 0.517
    assert double.weight_packed.dtype == torch.uint8 and double.weight_packed.numel() == n // 2
    assert not any(p.requires_grad for p in double.parameters())


def test_nf4_model_is_close_to_the_float_model_and_counts_all_weights(tiny_hf_dir):
    model = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    quantized = copy.deepcopy(model)
    names = quantize_nf4(quantized)
    assert len(names) == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in 2 blocks
    assert count_parameters(quantized)[1] == count_parameters(model)[1]
    layer = quantized.transformer.h[0].attn.c_attn
    reference = model.transformer.h[0].attn.c_attn.weight
    assert layer.dequantize().shape == reference.shape == (layer.out_features, layer.in_features)
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        exact, approx = model(ids), quantized(ids)
    assert (approx - exact).abs().mean() / exact.abs().mean() < 0.1


def test_state_dict_round_trips(tiny_hf_dir):
    torch.manual_seed(1)
    source = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    quantize_nf4(source, double_quant=True)
    target = GPT2(source.config).eval()  # different random weights
    quantize_nf4(target, double_quant=True)
    target.load_state_dict(source.state_dict())
    ids = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.equal(source(ids), target(ids))
    assert "transformer.h.0.attn.c_attn.weight_packed" in source.state_dict()
    assert "transformer.h.0.attn.c_attn.codebook" not in source.state_dict()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_trains_while_the_4bit_weights_stay_unchanged(compute_dtype):
    torch.manual_seed(2)
    config = GPT2Config.from_name("tiny").replace(vocab_size=512, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2(config)
    quantize_nf4(model, compute_dtype=compute_dtype)
    add_lora(model, rank=8, alpha=16, targets=["c_attn", "c_proj", "c_fc"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = adamw_steps(model, torch.randint(0, 512, (4, 32)), steps=20, lr=1e-2)  # a fixed batch
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert after["transformer.h.1.mlp.c_fc.base_layer.weight_packed"].dtype == torch.uint8


def test_bad_input_gets_clear_errors(tiny_hf_dir):
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    with pytest.raises(ValueError, match="matches no module"):
        quantize_nf4(model, targets=["q_proj"])
    with pytest.raises(ValueError, match="lm_head is tied"):
        quantize_nf4(model, targets=["lm_head"])
    with pytest.raises(ValueError, match="compute_dtype"):
        quantize_nf4(model, compute_dtype=torch.int8)
    quantize_nf4(model, targets=["c_attn"])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_nf4(model, targets=["c_attn"])
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4_tensor(torch.randn(4, 4), block_size=63)


# ------------------------------------------------------------------ the memory of a 4-bit layer in training

def float_path_forward(self, x):
    """NF4Linear.forward before the dequantizing autograd Function: dequantize, then a differentiable linear
    (which saves the float weight for backward). The reference for values and gradients."""
    from gpt2lite.kernels.linear import linear

    weight = self.dequantize()
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)


def tiny_qlora(compute_dtype=torch.float32, bias="none", seed=3):
    torch.manual_seed(seed)
    config = GPT2Config.from_name("tiny").replace(vocab_size=512, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2(config)
    quantize_nf4(model, compute_dtype=compute_dtype)
    add_lora(model, rank=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"], bias=bias)
    with torch.no_grad():  # B = 0 at init would hide any error in the gradients flowing through the base
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    return model


def test_a_qlora_forward_saves_no_float_copy_of_a_4bit_weight():
    model = tiny_qlora().train()
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    weight_shapes = {(m.out_features, m.in_features) for m in layers} | {(m.in_features, m.out_features) for m in layers}
    ids = torch.randint(0, 512, (2, 24))  # 48 rows: no activation has a weight's shape
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, labels=ids)
    float_weights = [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    assert saved and not float_weights, float_weights
    loss.backward()  # and the backward pass still finds what it needs
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype,autocast,bias", [
    (torch.float32, False, "none"), (torch.bfloat16, False, "all"), (torch.float32, True, "all"),
    (torch.bfloat16, True, "none")])
def test_dequantizing_linear_equals_the_float_path(monkeypatch, device, compute_dtype, autocast, bias):
    """Loss and every trainable gradient equal the float path's (dequantize, then a differentiable linear),
    with compute dtypes, bf16 autocast, and a trained base bias (LoRA bias="all")."""
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)

    def loss_and_grads(forward):
        monkeypatch.setattr(NF4Linear, "forward", forward)
        model = tiny_qlora(compute_dtype, bias).to(device).train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    new_loss, new_grads = loss_and_grads(NF4Linear.forward)
    old_loss, old_grads = loss_and_grads(float_path_forward)
    low_precision = compute_dtype == torch.bfloat16 or autocast
    tolerance = dict(rtol=2e-2, atol=1e-4) if low_precision else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(new_loss, old_loss, **tolerance)
    assert new_grads.keys() == old_grads.keys() and any(".bias" in n for n in new_grads) == (bias == "all")
    for name in old_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], **tolerance, msg=name)


# ------------------------------------------------------------------ parity with bitsandbytes' NF4

def bitsandbytes_functional():
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.zeros(64), blocksize=64, quant_type="nf4")  # has a CPU kernel
    except Exception as error:  # not installed, or no kernel for this device
        pytest.skip(f"bitsandbytes' CPU NF4 is unavailable: {type(error).__name__}: {error}")
    return bnb_functional


@pytest.mark.parametrize("double_quant", [False, True])
def test_codes_and_weights_equal_bitsandbytes(double_quant):
    bnb = bitsandbytes_functional()
    torch.manual_seed(4)
    weight = torch.randn(1024, 512) * 0.02  # 8192 blocks of 64, 32 blocks of 256 constants
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4_tensor(weight, double_quant)
    assert torch.equal(packed.flatten(), ours.packed)  # same 4-bit codes, same nibble order
    if not double_quant:
        assert torch.equal(state.absmax, ours.absmax)
        torch.testing.assert_close(dequantize_nf4_tensor(ours), bnb.dequantize_4bit(packed, state), rtol=1e-6, atol=1e-9)
        return
    theirs = ours.quantized_absmax
    assert torch.equal(state.offset, theirs.offset) and torch.equal(state.state2.absmax, theirs.scale)
    torch.testing.assert_close(state.state2.code, dynamic_map(), rtol=0, atol=1e-7)  # built in float64 here
    # The 8-bit absmax codes agree but for a few, where bitsandbytes' CPU search stops one level off the
    # nearest (a value near a midpoint, or among the dense levels near zero); ours is never the farther.
    differ = (state.absmax != theirs.codes).nonzero().flatten()
    assert differ.numel() < 0.005 * theirs.codes.numel()
    values = (weight.reshape(-1, 64).abs().amax(1) - theirs.offset)
    values = values / theirs.scale.repeat_interleave(256)[:values.numel()]
    levels = dynamic_map()
    for i in differ.tolist():
        ours_error = (values[i] - levels[theirs.codes[i].long()]).abs()
        their_error = (values[i] - levels[state.absmax[i].long()]).abs()
        assert ours_error <= their_error, (i, ours_error, their_error)
        assert abs(int(theirs.codes[i]) - int(state.absmax[i])) == 1, i  # neighbouring levels
    restored, reference = dequantize_nf4_tensor(ours), bnb.dequantize_4bit(packed, state)
    same_blocks = torch.ones(restored.numel() // 64, dtype=torch.bool)
    same_blocks[differ] = False
    torch.testing.assert_close(restored.reshape(-1, 64)[same_blocks], reference.reshape(-1, 64)[same_blocks],
                               rtol=1e-6, atol=1e-9)
