"""gpt2lite.kernels' one switch: every model is built with the fast kernels on; use_fast_kernels(model, False)
runs the textbook code of model.py, with the same logits, losses, gradients and greedy tokens (to float32
rounding) and transformers' loss; adapters injected later take the kernels of the layers they replace."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification, generate
from gpt2lite.kernels import FastLinear, use_fast_kernels, uses_fast_kernels
from gpt2lite.kernels.attention import scaled_dot_product_attention
from gpt2lite.kernels.linear import linear as fast_linear
from gpt2lite.kernels.loss import lm_loss as causal_lm_loss
from gpt2lite.loss import IGNORE_INDEX, lm_loss
from gpt2lite.peft import add_ia3, add_lora, merge_and_unload
from gpt2lite.quantization.linear import quantize_nf4

from helpers import TOKENS, hf_lm, load

NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def kernel_state(model):
    """{module name: its kernels} for every linear layer and kernel slot of the model."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            state[name] = type(module).__name__
        for slot in ("linear", "sdpa", "lm_loss"):
            if slot in vars(module):
                state[f"{name}:{slot}"] = getattr(module, slot)
    return state


def test_a_new_model_has_every_kernel_on_and_the_switch_turns_them_off_and_on():
    model = GPT2(GPT2Config.from_name("tiny"))
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fast = kernel_state(model)
    assert fast["transformer.h.0.attn.c_attn"] == "FastLinear" and fast["lm_head"] == "FastLinear"
    assert fast["transformer.h.1.mlp.c_fc"] == "FastLinear"
    assert fast["transformer.h.0.attn:sdpa"] is scaled_dot_product_attention and fast[":lm_loss"] is causal_lm_loss
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives the swap

    use_fast_kernels(model, False)
    textbook = kernel_state(model)
    assert set(textbook) == set(fast)
    assert all(v == "Linear" for k, v in textbook.items() if ":" not in k)
    assert textbook["transformer.h.0.attn:sdpa"] is F.scaled_dot_product_attention
    assert textbook[":lm_loss"] is lm_loss
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # same tensors, same keys
    assert model.lm_head.weight is model.transformer.wte.weight

    assert kernel_state(use_fast_kernels(model)) == fast


def run(model, ids, labels):
    """loss, gradients, logits, greedy tokens."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(ids)
    tokens = generate(model, ids[:, :4], 8, eos_id=None)
    return loss.detach(), grads, logits, tokens


@pytest.mark.parametrize("labels", ["every token", "second half only"])
def test_textbook_and_fast_paths_give_the_same_results(labels):
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_name("tiny", **NO_DROPOUT)).train()  # gradients: the training paths
    ids = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(1))
    target = ids.clone()
    if labels == "second half only":
        target[:, :8] = IGNORE_INDEX
    fast = run(model, ids, target)
    textbook = run(use_fast_kernels(model, False), ids, target)
    assert torch.allclose(fast[0], textbook[0], rtol=1e-5)
    assert fast[1].keys() == textbook[1].keys()
    for name in fast[1]:
        assert torch.allclose(fast[1][name], textbook[1][name], rtol=1e-4, atol=1e-6), name
    assert torch.allclose(fast[2], textbook[2], rtol=1e-4, atol=1e-5)
    assert torch.equal(fast[3], textbook[3])


@pytest.mark.parametrize("fast", [True, False])
def test_both_paths_give_transformers_loss_and_logits(tiny_hf_dir, fast):
    model = use_fast_kernels(load(tiny_hf_dir), fast)
    reference = hf_lm(tiny_hf_dir)
    with torch.no_grad():
        want = reference(TOKENS, labels=TOKENS)
        loss, logits = model(TOKENS, labels=TOKENS), model(TOKENS)
    assert torch.allclose(loss, want.loss, atol=1e-5)
    assert torch.allclose(logits, want.logits, atol=1e-4)


def test_training_with_dropout_goes_through_the_dropout_kernel_only_when_fast(monkeypatch):
    import gpt2lite.kernels.attention as attention

    calls = []
    real = attention.dropout_attention
    monkeypatch.setattr(attention, "dropout_attention", lambda *a: calls.append(1) or real(*a))
    model = GPT2(GPT2Config.from_name("tiny")).train()  # GPT-2's dropout of 0.1
    model(TOKENS, labels=TOKENS).backward()
    assert len(calls) == model.config.n_layer
    calls.clear()
    use_fast_kernels(model, False)(TOKENS, labels=TOKENS).backward()
    assert calls == []


@pytest.mark.parametrize("fast", [True, False])
def test_adapters_take_the_kernels_of_the_layers_they_replace(fast):
    torch.manual_seed(0)
    model = use_fast_kernels(GPT2(GPT2Config.from_name("tiny")), fast)
    kernel = fast_linear if fast else F.linear
    add_lora(model, rank=4, alpha=8, targets=["c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    assert layer.linear is kernel and uses_fast_kernels(layer) is fast
    assert type(layer.lora_A) is nn.Linear and type(layer.lora_B) is nn.Linear  # rank-wide: MKL is faster
    assert type(model.transformer.h[0].mlp.c_fc) is (FastLinear if fast else nn.Linear)
    merge_and_unload(model)
    assert type(model.transformer.h[0].attn.c_attn) is (FastLinear if fast else nn.Linear)

    ia3_model = add_ia3(use_fast_kernels(GPT2(GPT2Config.from_name("tiny")), fast))
    assert ia3_model.transformer.h[1].attn.c_attn.linear is kernel

    qlora_model = use_fast_kernels(GPT2(GPT2Config.from_name("tiny")), fast)
    quantize_nf4(qlora_model)
    add_lora(qlora_model, rank=4, alpha=8, targets=["c_attn"])
    base = qlora_model.transformer.h[0].attn.c_attn.base_layer
    assert base.linear is kernel and qlora_model.transformer.h[0].mlp.c_fc.linear is kernel


def test_lora_and_classifier_losses_are_the_same_on_both_paths():
    torch.manual_seed(0)
    lm = add_lora(GPT2(GPT2Config.from_name("tiny", **NO_DROPOUT)), rank=4, alpha=8, targets=["c_attn", "c_proj"])
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)  # B != 0: the adapters change the output
    classifier = GPT2ForSequenceClassification(GPT2Config.from_name("tiny", **NO_DROPOUT), num_labels=5)
    labels = torch.tensor([1, 4])
    for model, batch_labels in ((lm, TOKENS), (classifier, labels)):
        model.train()
        losses = []
        for fast in (True, False):
            use_fast_kernels(model, fast)
            model.zero_grad(set_to_none=True)
            loss = model(TOKENS, labels=batch_labels)
            loss.backward()
            losses.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        (loss, grads), (want, want_grads) = losses
        assert torch.allclose(loss, want, rtol=1e-5)
        for got, ref in zip(grads, want_grads):
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", [lm_loss, causal_lm_loss])
def test_both_losses_refuse_a_label_that_is_not_a_token_id(kernel):
    hidden, head = torch.randn(1, 4, 8), nn.Linear(8, 11, bias=False)
    with pytest.raises(ValueError, match=r"label 11 at row 0, position 2 is not a token id in \[0, 11\)"):
        kernel(hidden, torch.tensor([[0, 1, 11, IGNORE_INDEX]]), head)
